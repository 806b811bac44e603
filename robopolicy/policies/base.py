"""The contract every policy family shares.

Shape legend (Chi et al.): ``B`` batch, ``To`` observation steps, ``Tp`` prediction
horizon, ``Ta`` executed actions, ``Da`` action dim.

* Observations are a dict keyed by feature name, raw (unnormalized) values:
  low-dim features ``[B, To, D]`` float32, images ``[B, To, H, W, 3]`` uint8.
* ``compute_loss(batch)`` trains on ``batch = obs | {"action": [B, Tp, Da] raw,
  "action_is_pad": [B, Tp] bool}`` (+ ``"task"``: list[str] for language policies).
* ``predict_chunk(obs, noise)`` returns the raw (unnormalized) executable chunk
  ``[B, Ta, Da]`` = predicted steps ``To-1 .. To-1+Ta-1``. ``noise`` ``[B, Tp, Da]`` is the
  sampler's initial noise (drawn inside when ``None``): given as an input it makes
  results reproducible and lets ONNX export take it as a graph input.
* Normalization (dataset statistics) is part of the policy and saved with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from robopolicy.errors import SpecMismatchError
from robopolicy.spec import FeatureSpec


@dataclass
class PolicyConfig:
    """Fields every policy config has; families subclass it with their own."""

    type: ClassVar[str] = ""
    #: ``robopolicy train`` steps when ``--steps`` is not given.
    train_steps: ClassVar[int] = 4000
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8


class Policy(nn.Module):
    """Base class: holds the config and the feature spec (with statistics)."""

    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig

    def __init__(self, config: PolicyConfig, spec: FeatureSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec.with_timing(config.n_obs_steps, config.horizon, config.n_action_steps)

    @property
    def type(self) -> str:
        return self.config.type

    def setup_new(self) -> None:
        """One-time set-up of a freshly made policy (e.g. caching instruction embeddings); not run on load."""

    def language_info(self) -> dict[str, Any] | None:
        """What an export needs to map task strings onto the policy's language input (``None``: no language)."""
        return None

    def check_chunk(self, what: str, x: torch.Tensor) -> None:
        """Raise :class:`SpecMismatchError` unless ``x`` is ``[B, Tp, Da]``."""
        tp, da = self.config.horizon, self.spec.action.dim
        if x.dim() != 3 or tuple(x.shape[1:]) != (tp, da):
            raise SpecMismatchError(f"{what} has shape {tuple(x.shape)}, the policy expects [B, {tp}, {da}]")

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Training forward = ``compute_loss`` (so DistributedDataParallel syncs gradients)."""
        return self.compute_loss(batch)

    def predict_chunk(self, obs: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def noise_shape(self, batch_size: int) -> tuple[int, int, int]:
        return (batch_size, self.config.horizon, self.spec.action.dim)
