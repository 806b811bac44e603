"""The VLA-style policy: language, vision and state tokens -> transformer -> flow-matching action expert.

Shapes (see :mod:`robopolicy.policies.base`): observations ``[B, To, ...]``, the instruction
as ``obs["task"]`` (``list[str]``, one per row) or its embedding ``obs["observation.language"]``
``[B, E]``; chunks ``[B, Tp, Da]``.

* **Language**: the frozen sentence embedding (:mod:`~robopolicy.policies.vla.language`)
  is standardized with the statistics of the training instructions (their mean removed, so
  what tells them apart is what is left, scaled to unit RMS norm: sentence embeddings of
  similar instructions share most of their direction), then enters twice: as
  ``language_tokens`` prefix tokens (a linear map) and in the expert's global condition.
  The embeddings of the training instructions are computed once, when the policy is made,
  and kept in the buffer ``instruction_embeddings`` (rows in ``spec.tasks`` order) with
  the statistics: a loaded checkpoint or an export needs no text encoder for them. An
  instruction outside ``spec.tasks`` is an :class:`~robopolicy.errors.InstructionError`.
* **Prefix** (the vision-language part) ``[language, images (camera-major, then step),
  readout]`` plus learned positions goes through ``depth`` bidirectional blocks once per
  chunk; the learned readout token (as in Octo) gathers what the expert needs globally.
* **Action expert**: ``expert_depth`` blocks over the ``Tp`` action tokens (noisy action +
  position + flow-time embedding + the global condition) with cross-attention to the
  prefix, whose keys / values are computed once per chunk. The global condition is the sum
  of maps of the readout output, the instruction embedding and the low-dim state of the
  ``To`` steps: as in pi0 the robot state enters on the expert's side, not the VLM's. The
  global path lets a small model condition on instruction and state from its first steps;
  the cross-attention carries the visual detail.
  The expert is the velocity of rectified flow (the flow policy's convention:
  ``x_t = (1 - t) noise + t data``), integrated by Euler steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from robopolicy.errors import SpecMismatchError
from robopolicy.policies.base import Policy
from robopolicy.policies.denoising import chunk_loss, fill_padded
from robopolicy.policies.encoders import check_observation
from robopolicy.policies.flow.model import TIME_SCALE, draw_flow_time, euler_integrate, flow_pair
from robopolicy.policies.normalize import Normalizer
from robopolicy.policies.unet1d import SinusoidalEmbedding
from robopolicy.policies.vla import language
from robopolicy.policies.vla.blocks import Block, ImageTokenizer, KeysValues
from robopolicy.policies.vla.config import VLAConfig
from robopolicy.spec import ACTION, ENV_STATE, LANGUAGE, Feature, FeatureSpec, check_instruction


def vla_spec(spec: FeatureSpec, config: VLAConfig) -> FeatureSpec:
    """The policy's own spec: the dataset's features (without the privileged environment state unless
    ``use_environment_state``) plus ``observation.language`` (the instruction embedding)."""
    if not spec.tasks:
        raise SpecMismatchError("the vla policy follows language instructions, but the dataset has no task strings")
    features = {k: f for k, f in spec.features.items() if k != ENV_STATE or config.use_environment_state}
    features[LANGUAGE] = Feature(LANGUAGE, (language.EMBED_DIM,), "float32")
    return dataclasses.replace(spec, features=features)


class VLAPolicy(Policy):
    """See the module docstring."""

    config_class = VLAConfig
    config: VLAConfig

    def __init__(self, config: VLAConfig, spec: FeatureSpec) -> None:
        super().__init__(config, vla_spec(spec, config))
        spec, d, to = self.spec, config.dim, config.n_obs_steps
        states, images = spec.state_features, spec.image_features
        if not states and not images:
            raise SpecMismatchError("the vla policy needs at least one observation feature (state or image)")
        self.state_keys = [f.name for f in states]
        self.image_keys = [f.name for f in images]
        self.shapes = {f.name: (to, *f.shape) for f in [*states, *images]}
        self._task_rows = {t: i for i, t in enumerate(spec.tasks)}
        self.register_buffer("instruction_embeddings", torch.zeros(len(spec.tasks), language.EMBED_DIM))
        self.register_buffer("language_center", torch.zeros(language.EMBED_DIM))
        self.register_buffer("language_scale", torch.ones(()))
        self.action_normalizer = Normalizer([spec.action])
        self.state_normalizer = Normalizer(states)

        self.language = nn.Linear(language.EMBED_DIM, config.language_tokens * d)
        self.cameras = nn.ModuleList(
            ImageTokenizer(f.shape, config.image_channels, config.image_token_grid, d, config.crop_ratio) for f in images
        )
        n_prefix = config.language_tokens + to * sum(c.num_tokens for c in self.cameras) + 1
        self.readout = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.prefix_position = nn.Parameter(torch.randn(1, n_prefix, d) * 0.02)

        def block(cross: bool) -> Block:
            return Block(d, config.heads, config.mlp_ratio, config.dropout, cross)

        self.backbone = nn.ModuleList(block(False) for _ in range(config.depth))
        self.backbone_norm = nn.LayerNorm(d)

        da = spec.action.dim
        self.action_in = nn.Linear(da, d)
        self.action_position = nn.Parameter(torch.randn(1, config.horizon, d) * 0.02)
        self.time_embed = nn.Sequential(SinusoidalEmbedding(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.language_to_expert = nn.Linear(language.EMBED_DIM, d)
        self.readout_to_expert = nn.Linear(d, d)
        state_in = to * sum(f.dim for f in states)
        self.state_to_expert = nn.Sequential(nn.Linear(state_in, d), nn.GELU(), nn.Linear(d, d)) if states else None
        self.expert = nn.ModuleList(block(True) for _ in range(config.expert_depth))
        self.expert_norm = nn.LayerNorm(d)
        self.action_out = nn.Linear(d, da)
        steps = torch.arange(config.num_inference_steps) / config.num_inference_steps
        self.register_buffer("euler_time", steps * TIME_SCALE, persistent=False)

    # -- language --------------------------------------------------------------------------
    def setup_new(self) -> None:
        """Embed the training instructions with the frozen encoder and standardize over them (once; checkpoints keep both)."""
        table = language.embed(self.spec.tasks)
        self.instruction_embeddings.copy_(table)
        if len(table) > 1:
            centered = table - table.mean(dim=0)
            self.language_center.copy_(table.mean(dim=0))
            self.language_scale.fill_(float(centered.square().sum(dim=1).mean().rsqrt()))

    def language_info(self) -> dict[str, Any]:
        return {
            "encoder": language.ENCODER_NAME,
            "dim": language.EMBED_DIM,
            "instructions": {t: self.instruction_embeddings[i].tolist() for t, i in self._task_rows.items()},
        }

    def embed_instructions(self, tasks: Sequence[str], batch_size: int) -> torch.Tensor:
        """Cached embeddings ``[B, E]`` of ``tasks`` (one per row); an unknown or empty one is an error."""
        if not isinstance(tasks, (list, tuple)) or len(tasks) != batch_size:
            raise SpecMismatchError(
                f"the vla policy needs obs['task']: a list of {batch_size} instruction(s), one per batch row; got {tasks!r}"
            )
        rows = [self._task_rows[check_instruction(t, self.spec.tasks)] for t in tasks]
        return self.instruction_embeddings[torch.tensor(rows, device=self.instruction_embeddings.device)]

    # -- networks --------------------------------------------------------------------------
    def encode_prefix(self, obs: dict[str, Any], embedding: torch.Tensor) -> torch.Tensor:
        """Prefix tokens ``[B, P, D]`` from raw observations and standardized instruction embeddings ``[B, E]``."""
        b, d = embedding.shape[0], self.config.dim
        tokens = [self.language(embedding).view(b, self.config.language_tokens, d)]
        for key, camera in zip(self.image_keys, self.cameras):
            tokens.append(camera(obs[key].flatten(0, 1)).reshape(b, -1, d))
        tokens.append(self.readout.expand(b, -1, -1))
        x = torch.cat(tokens, dim=1) + self.prefix_position
        for blk in self.backbone:
            x = blk(x)
        return self.backbone_norm(x)

    def global_condition(self, obs: dict[str, Any], prefix: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """What every action token gets besides the time: ``[B, D]`` from the readout output, the instruction
        and the normalized low-dim state of the ``To`` steps."""
        condition = self.readout_to_expert(prefix[:, -1]) + self.language_to_expert(embedding)
        if self.state_to_expert is not None:
            state = torch.cat([self.state_normalizer.normalize(k, obs[k]) for k in self.state_keys], dim=-1)
            condition = condition + self.state_to_expert(state.flatten(1))
        return condition

    def context(self, prefix: torch.Tensor) -> list[KeysValues]:
        """Each expert block's cross-attention keys / values of the prefix (once per chunk)."""
        return [blk.cross.keys_values(prefix) for blk in self.expert]

    def velocity(self, x: torch.Tensor, condition: torch.Tensor, context: list[KeysValues]) -> torch.Tensor:
        """Flow velocity ``[B, Tp, Da]`` at normalized actions ``x [B, Tp, Da]``; ``condition [B, D]``: the time
        embedding plus the global condition, added to every action token."""
        h = self.action_in(x) + self.action_position + condition.unsqueeze(1)
        for blk, kv in zip(self.expert, context):
            h = blk(h, kv)
        return self.action_out(self.expert_norm(h))

    def _language_input(self, obs: dict[str, Any]) -> torch.Tensor:
        """Standardized instruction embeddings ``[B, E]``: ``obs["observation.language"]`` if given, else looked up."""
        batch = next(iter(obs[k] for k in self.shapes)).shape[0]
        if LANGUAGE in obs:
            embedding = obs[LANGUAGE]
            if tuple(embedding.shape) != (batch, language.EMBED_DIM):
                raise SpecMismatchError(
                    f"observation {LANGUAGE!r} has shape {tuple(embedding.shape)}, the policy expects "
                    f"[{batch}, {language.EMBED_DIM}]")
        else:
            embedding = self.embed_instructions(obs.get("task"), batch)
        return (embedding - self.language_center) * self.language_scale

    # -- the Policy interface --------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        check_observation(batch, self.shapes)
        self.check_chunk("'action'", batch[ACTION])
        actions = self.action_normalizer.normalize(ACTION, batch[ACTION])
        is_pad = batch.get("action_is_pad")
        if is_pad is not None:
            actions = fill_padded(actions, is_pad)
        k = self.config.flow_samples
        embedding = self._language_input(batch)
        prefix = self.encode_prefix(batch, embedding)
        context = [(keys.repeat(k, 1, 1, 1), values.repeat(k, 1, 1, 1)) for keys, values in self.context(prefix)]
        actions = actions.repeat(k, 1, 1)
        t = draw_flow_time(self.config.time_sampling, actions.shape[0], actions.device)
        x_t, target = flow_pair(actions, torch.randn_like(actions), t)
        condition = self.time_embed(t * TIME_SCALE) + self.global_condition(batch, prefix, embedding).repeat(k, 1)
        error = self.velocity(x_t, condition, context) - target
        loss = chunk_loss(error, None if is_pad is None else is_pad.repeat(k, 1))
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, Any], noise: torch.Tensor | None = None) -> torch.Tensor:
        check_observation(obs, self.shapes)
        embedding = self._language_input(obs)
        prefix = self.encode_prefix(obs, embedding)
        context = self.context(prefix)
        batch = embedding.shape[0]
        if noise is None:
            noise = torch.randn(self.noise_shape(batch), device=self.euler_time.device)
        self.check_chunk("noise", noise)
        time_embedding = self.time_embed(self.euler_time)  # [K, D], once for all steps
        condition = self.global_condition(obs, prefix, embedding)  # [B, D]
        x = euler_integrate(
            noise, lambda x_k, k: self.velocity(x_k, time_embedding[k : k + 1] + condition, context),
            self.config.num_inference_steps)
        start = self.config.n_obs_steps - 1
        chunk = x[:, start : start + self.config.n_action_steps]
        return self.action_normalizer.unnormalize(ACTION, chunk.clamp(-1.0, 1.0))
