"""The VLA-style policy: a vision-language transformer encoder under the flow policy's action expert.

Shapes (see :mod:`robopolicy.policies.base`): observations ``[B, To, ...]``, the instruction
as ``obs["task"]`` (``list[str]``, one per row) or its embedding ``obs["observation.language"]``
``[B, E]``; chunks ``[B, Tp, Da]``.

* **Language**: the frozen sentence embedding (:mod:`~robopolicy.policies.vla.language`) is
  standardized with the statistics of the training instructions (their mean removed, so
  what tells them apart is what is left, scaled to unit RMS per dimension, the scale of
  the other inputs: sentence embeddings of similar instructions share most of their
  direction), then enters twice: as
  ``language_tokens`` prefix tokens (a linear map) and in the expert's condition. The
  embeddings of the training instructions are computed once, when the policy is made,
  and kept in the buffer ``encoder.instruction_embeddings`` (rows in ``spec.tasks`` order)
  with the statistics: a loaded checkpoint or an export needs no text encoder for them.
  An instruction outside ``spec.tasks`` is an :class:`~robopolicy.errors.InstructionError`.
* **Prefix** ``[language, images (camera-major, then step), state per step, readout]`` plus
  learned positions goes through ``depth`` bidirectional blocks once per chunk; the
  learned readout token (as in Octo) gathers what the expert needs.
* **Instructed object** (:mod:`~robopolicy.policies.vla.objects`): with two or more
  training instructions, the state token and the state MLP get, of the environment state,
  only the object whose name the instruction's sentence embedding matches (plus the
  features of no object).
* **Action expert**: the flow policy's FiLM U-Net over the chunk (rectified flow, Euler
  steps), conditioned on ``[readout output, instruction, state MLP]``: FiLM gives every
  block of the expert the instruction and the state directly, which a small model learns
  from far faster than from attention alone (measured: docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from robopolicy.errors import SpecMismatchError
from robopolicy.policies.encoders import check_observation, mlp
from robopolicy.policies.flow.model import FlowPolicy
from robopolicy.policies.normalize import Normalizer
from robopolicy.policies.vla import language
from robopolicy.policies.vla.blocks import Block, ImageTokenizer
from robopolicy.policies.vla.config import VLAConfig
from robopolicy.policies.vla.objects import InstructedObject, candidate_objects, object_phrase
from robopolicy.spec import ENV_STATE, LANGUAGE, Feature, FeatureSpec, check_instruction


def vla_spec(spec: FeatureSpec, config: VLAConfig) -> FeatureSpec:
    """The policy's own spec: the dataset's features (without the privileged environment state unless
    ``use_environment_state``) plus ``observation.language`` (the instruction embedding)."""
    if not spec.tasks:
        raise SpecMismatchError("the vla policy follows language instructions, but the dataset has no task strings")
    features = {k: f for k, f in spec.features.items() if k != ENV_STATE or config.use_environment_state}
    features[LANGUAGE] = Feature(LANGUAGE, (language.EMBED_DIM,), "float32")
    return dataclasses.replace(spec, features=features)


class VisionLanguageEncoder(nn.Module):
    """Raw observations + instruction -> the expert's condition ``[B, out_dim]`` (see the module docstring)."""

    def __init__(self, spec: FeatureSpec, config: VLAConfig) -> None:
        super().__init__()
        d, to = config.dim, config.n_obs_steps
        states, images = spec.state_features, spec.image_features
        if not states and not images:
            raise SpecMismatchError("the vla policy needs at least one observation feature (state or image)")
        self.tasks = list(spec.tasks)
        self._task_rows = {t: i for i, t in enumerate(self.tasks)}
        self.language_tokens, self.dim = config.language_tokens, d
        self.state_keys = [f.name for f in states]
        self.image_keys = [f.name for f in images]
        self.shapes = {f.name: (to, *f.shape) for f in [*states, *images]}
        self.register_buffer("instruction_embeddings", torch.zeros(len(self.tasks), language.EMBED_DIM))
        self.register_buffer("language_center", torch.zeros(language.EMBED_DIM))
        self.register_buffer("language_scale", torch.ones(()))
        self.normalizer = Normalizer(states)

        self.language = nn.Linear(language.EMBED_DIM, config.language_tokens * d)
        self.cameras = nn.ModuleList(
            ImageTokenizer(f.shape, config.image_channels, config.image_token_grid, d, config.crop_ratio) for f in images
        )
        state_dim = sum(f.dim for f in states)
        self.readout = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        n_prefix = config.language_tokens + to * sum(c.num_tokens for c in self.cameras) + (to if states else 0) + 1
        self.prefix_position = nn.Parameter(torch.randn(1, n_prefix, d) * 0.02)
        self.backbone = nn.ModuleList(Block(d, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.depth))
        self.backbone_norm = nn.LayerNorm(d)
        self.language_out = nn.Linear(language.EMBED_DIM, d)
        env = next((f for f in states if f.name == ENV_STATE), None)
        # Only where instructions differ: with one, nothing says which candidate matters.
        select = env is not None and config.select_object and len(self.tasks) >= 2
        candidates = candidate_objects(env.names) if select else {}
        self.instructed_object = InstructedObject(candidates, env.dim, language.EMBED_DIM) if candidates else None
        # the state token's and the state MLP's input: the environment state narrowed to the instructed object
        state_in = state_dim - env.dim + self.instructed_object.out_dim if candidates else state_dim
        self.state = nn.Linear(state_in, d) if states else None
        self.state_mlp = mlp(to * state_in, config.state_mlp_dims) if states else None
        state_out = (config.state_mlp_dims[-1] if config.state_mlp_dims else to * state_in) if states else 0
        self.out_dim = 2 * d + state_out

    # -- language --------------------------------------------------------------------------
    def set_instructions(self, table: torch.Tensor) -> None:
        """Store the training instructions' embeddings ``[N, E]`` and the statistics that standardize them."""
        self.instruction_embeddings.copy_(table)
        if len(table) > 1:
            centered = table - table.mean(dim=0)
            self.language_center.copy_(table.mean(dim=0))
            self.language_scale.fill_(float(centered.square().mean().rsqrt()))

    def embed_instructions(self, tasks: Sequence[str], batch_size: int) -> torch.Tensor:
        """Cached embeddings ``[B, E]`` of ``tasks`` (one per row); an unknown or empty one is an error."""
        if not isinstance(tasks, (list, tuple)) or len(tasks) != batch_size:
            raise SpecMismatchError(
                f"the vla policy needs obs['task']: a list of {batch_size} instruction(s), one per batch row; got {tasks!r}"
            )
        rows = [self._task_rows[check_instruction(t, self.tasks)] for t in tasks]
        return self.instruction_embeddings[torch.tensor(rows, device=self.instruction_embeddings.device)]

    def instruction(self, obs: dict[str, Any]) -> torch.Tensor:
        """Sentence embeddings ``[B, E]`` of the instructions: ``obs["observation.language"]`` if given, else looked up."""
        batch = next(iter(obs[k] for k in self.shapes)).shape[0]
        if LANGUAGE in obs:
            embedding = obs[LANGUAGE]
            if tuple(embedding.shape) != (batch, language.EMBED_DIM):
                raise SpecMismatchError(
                    f"observation {LANGUAGE!r} has shape {tuple(embedding.shape)}, the policy expects "
                    f"[{batch}, {language.EMBED_DIM}]")
        else:
            embedding = self.embed_instructions(obs.get("task"), batch)
        return embedding

    # -- the encoder interface of the denoising policies -------------------------------------
    def check(self, obs: dict[str, Any]) -> None:
        """Raise :class:`SpecMismatchError` naming the key if an observation lacks or has a wrong shape."""
        check_observation(obs, self.shapes)

    def forward(self, obs: dict[str, Any]) -> torch.Tensor:
        sentence = self.instruction(obs)
        embedding = (sentence - self.language_center) * self.language_scale
        b, d = embedding.shape[0], self.dim
        tokens = [self.language(embedding).view(b, self.language_tokens, d)]
        for key, camera in zip(self.image_keys, self.cameras):
            tokens.append(camera(obs[key].flatten(0, 1)).reshape(b, -1, d))
        parts = [self.language_out(embedding)]
        if self.state is not None:
            normalized = {k: self.normalizer.normalize(k, obs[k]) for k in self.state_keys}
            if self.instructed_object is not None:
                normalized[ENV_STATE] = self.instructed_object(normalized[ENV_STATE], sentence)
            state = torch.cat(list(normalized.values()), dim=-1)
            tokens.append(self.state(state))
            parts.append(self.state_mlp(state.flatten(1)))
        tokens.append(self.readout.expand(b, -1, -1))
        x = torch.cat(tokens, dim=1) + self.prefix_position
        for blk in self.backbone:
            x = blk(x)
        return torch.cat([self.backbone_norm(x[:, -1]), *parts], dim=-1)


class VLAPolicy(FlowPolicy):
    """A flow-matching policy whose observation encoder is :class:`VisionLanguageEncoder`."""

    config_class = VLAConfig
    config: VLAConfig

    def __init__(self, config: VLAConfig, spec: FeatureSpec) -> None:
        super().__init__(config, vla_spec(spec, config))

    def make_encoder(self) -> VisionLanguageEncoder:
        return VisionLanguageEncoder(self.spec, self.config)

    def setup_new(self) -> None:
        """Embed the training instructions and the candidate objects' names with the frozen encoder
        (once; checkpoints keep them)."""
        self.encoder.set_instructions(language.embed(self.spec.tasks))
        if (pointer := self.encoder.instructed_object) is not None:
            pointer.set_name_embeddings(language.embed([object_phrase(n) for n in pointer.names]))

    def language_info(self) -> dict[str, Any]:
        table = self.encoder.instruction_embeddings
        return {
            "encoder": language.ENCODER_NAME,
            "dim": language.EMBED_DIM,
            "instructions": {t: table[i].tolist() for i, t in enumerate(self.spec.tasks)},
        }
