"""Configuration of the flow-matching policy (rectified flow, Euler sampling)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from robopolicy.policies.denoising import DenoisingConfig


@dataclass
class FlowConfig(DenoisingConfig):
    """Rectified flow over action chunks: ``x_t = (1 - t) noise + t data``, velocity target.

    ``t`` = 0 is pure noise and ``t`` = 1 the data; sampling integrates
    ``num_inference_steps`` Euler steps from 0 to 1. Training draws ``t`` per sample:

    * ``"uniform"``: ``t ~ U(0, 1)``;
    * ``"logit_normal"``: ``t = sigmoid(n)``, ``n ~ N(0, 1)`` (Esser et al. 2024, SD3);
    * ``"beta"``: ``1 - t ~ 0.001 + 0.999 Beta(1.5, 1)``, weighted toward noise (pi0).
    """

    type: ClassVar[str] = "flow"
    time_sampling: Literal["uniform", "logit_normal", "beta"] = "beta"
