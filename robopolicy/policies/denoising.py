"""What diffusion and flow policies share: config fields, encoder + U-Net, loss masking, sampling frame.

A family only says how to make a training pair (:meth:`DenoisingPolicy.training_pair`) and
how to turn noise into a normalized chunk (:meth:`DenoisingPolicy.sample`), given the FiLM
parameters of the observation, which are computed once per chunk. Internally action
chunks are channels-first ``[B, Da, Tp]`` (the U-Net layout); the public interface is
``[B, Tp, Da]`` (see :mod:`robopolicy.policies.base`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from robopolicy.errors import RobopolicyError
from robopolicy.policies.base import Policy, PolicyConfig
from robopolicy.policies.encoders import ObservationEncoder
from robopolicy.policies.normalize import Normalizer
from robopolicy.policies.unet1d import ConditionalUnet1d
from robopolicy.spec import ACTION, FeatureSpec


@dataclass
class DenoisingConfig(PolicyConfig):
    """Backbone and encoder fields shared by the diffusion and flow families."""

    # Sampler steps: DDIM steps (diffusion) or Euler steps (flow).
    num_inference_steps: int = 10
    # U-Net. These defaults give ~4.6 M parameters for a state policy (Chi et al.: (256, 512,
    # 1024), time_embed_dim 128, ~65 M), which trains at a useful rate on a 2-core CPU.
    down_dims: tuple[int, ...] = (64, 128, 256)
    kernel_size: int = 5
    n_groups: int = 8
    time_embed_dim: int = 64
    # Observation encoder: state MLP widths (() = raw normalized state) and per-camera CNN.
    state_mlp_dims: tuple[int, ...] = (256, 128)
    image_channels: tuple[int, ...] = (32, 64, 128)
    image_keypoints: int = 32
    image_feature_dim: int = 64
    crop_ratio: float = 0.9

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.down_dims or any(d % self.n_groups for d in self.down_dims):
            problems.append(f"down_dims {self.down_dims} must be non-empty and divisible by n_groups={self.n_groups}")
        factor = 2 ** (len(self.down_dims) - 1)
        if self.horizon % factor:
            problems.append(f"horizon {self.horizon} must be divisible by {factor} (2 ** (len(down_dims) - 1))")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            problems.append(f"kernel_size {self.kernel_size} must be odd and positive")
        if self.time_embed_dim < 4 or self.time_embed_dim % 2:
            problems.append(f"time_embed_dim {self.time_embed_dim} must be even and >= 4")
        if not self.image_channels:
            problems.append("image_channels must be non-empty")
        if not 0.0 < self.crop_ratio <= 1.0:
            problems.append(f"crop_ratio {self.crop_ratio} must be in (0, 1]")
        if self.num_inference_steps < 1:
            problems.append(f"num_inference_steps {self.num_inference_steps} must be >= 1")
        if problems:
            raise RobopolicyError(f"invalid {self.type} policy config: " + "; ".join(problems))


class TrainingPair(NamedTuple):
    """One training example of a family, all channels-first ``[B, Da, Tp]`` but ``time``."""

    x_t: torch.Tensor  # the U-Net input
    time: torch.Tensor  # [B], on the scale the U-Net embeds
    target: torch.Tensor  # what the U-Net regresses


def fill_padded(actions: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
    """Replace padded steps of ``[B, Tp, Da]`` by the nearest valid step (edge replication).

    Padded steps are out of the loss, but the U-Net's convolutions would still read them
    from the noisy input; replicating the edge makes their stored values irrelevant.
    """
    steps = torch.arange(actions.shape[1], device=actions.device).expand_as(is_pad)
    last_valid = torch.where(is_pad, -1, steps).cummax(dim=1).values
    first_valid = torch.where(is_pad, actions.shape[1], steps).min(dim=1, keepdim=True).values
    index = torch.where(last_valid < 0, first_valid, last_valid).clamp(max=actions.shape[1] - 1)
    return actions.gather(1, index.unsqueeze(-1).expand_as(actions))


def chunk_loss(error: torch.Tensor, is_pad: torch.Tensor | None) -> torch.Tensor:
    """Mean square of ``error [B, Tp, Da]`` over the steps that are not padding (``is_pad [B, Tp]``)."""
    squared = error.square()
    if is_pad is None:
        return squared.mean()
    weight = (~is_pad).unsqueeze(-1).to(squared.dtype)  # [B, Tp, 1]
    return (squared * weight).sum() / (weight.sum() * squared.shape[-1]).clamp_min(1.0)


class DenoisingPolicy(Policy):
    """Observation encoder + FiLM U-Net over action chunks; families add the generative process."""

    config: DenoisingConfig

    def __init__(self, config: DenoisingConfig, spec: FeatureSpec) -> None:
        super().__init__(config, spec)
        self.action_normalizer = Normalizer([self.spec.action])
        self.encoder = self.make_encoder()
        self.unet = ConditionalUnet1d(
            action_dim=self.spec.action.dim,
            cond_dim=self.encoder.out_dim,
            down_dims=config.down_dims,
            kernel_size=config.kernel_size,
            n_groups=config.n_groups,
            time_embed_dim=config.time_embed_dim,
        )

    # -- family hooks --------------------------------------------------------------------
    def make_encoder(self) -> nn.Module:
        """The observation encoder: ``check(obs)``, ``forward(obs) -> [B, out_dim]``, ``out_dim``."""
        config = self.config
        return ObservationEncoder(
            self.spec.state_features,
            self.spec.image_features,
            n_obs_steps=config.n_obs_steps,
            state_mlp_dims=config.state_mlp_dims,
            image_channels=config.image_channels,
            image_keypoints=config.image_keypoints,
            image_feature_dim=config.image_feature_dim,
            crop_ratio=config.crop_ratio,
        )

    def training_pair(self, actions: torch.Tensor, noise: torch.Tensor) -> TrainingPair:
        """From clean normalized ``actions`` and ``noise`` (both ``[B, Da, Tp]``), one time per sample."""
        raise NotImplementedError

    def sample(self, x: torch.Tensor, obs_film: torch.Tensor) -> torch.Tensor:
        """Run the sampler from noise ``x [B, Da, Tp]`` given ``unet.condition(...)``; normalized result."""
        raise NotImplementedError

    # -- the Policy interface ------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        self.encoder.check(batch)
        self.check_chunk("'action'", batch[ACTION])
        actions = self.action_normalizer.normalize(ACTION, batch[ACTION])
        is_pad = batch.get("action_is_pad")
        if is_pad is not None:
            actions = fill_padded(actions, is_pad)
        actions = actions.transpose(1, 2)
        noise = torch.randn_like(actions)
        pair = self.training_pair(actions, noise)
        film = self.unet.condition(self.encoder(batch)) + self.unet.time_film(pair.time)
        loss = chunk_loss((self.unet(pair.x_t, film) - pair.target).transpose(1, 2), is_pad)
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        self.encoder.check(obs)
        obs_film = self.unet.condition(self.encoder(obs))
        if noise is None:
            noise = torch.randn(self.noise_shape(obs_film.shape[0]), device=obs_film.device, dtype=obs_film.dtype)
        self.check_chunk("noise", noise)
        start = self.config.n_obs_steps - 1
        chunk = self.sample(noise.transpose(1, 2), obs_film)[:, :, start : start + self.config.n_action_steps]
        return self.action_normalizer.unnormalize(ACTION, chunk.clamp(-1.0, 1.0).transpose(1, 2))

