"""Configuration of the VLA-style policy (language + vision + state -> flow-matching action chunks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from robopolicy.errors import RobopolicyError
from robopolicy.policies.base import PolicyConfig


@dataclass
class VLAConfig(PolicyConfig):
    """A small pi0-like policy; the defaults fit a 2-core CPU and scale up by width and depth.

    Prefix tokens: ``language_tokens`` from the frozen sentence embedding of the
    instruction, about ``image_token_grid ** 2`` per camera and observation step from a
    trained patch embedding, and a readout token. A bidirectional transformer (``depth``
    blocks of width ``dim``) encodes the prefix once per chunk; the action expert
    (``expert_depth`` blocks: self-attention over the ``Tp`` action tokens, cross-attention
    to the prefix, conditioned on readout + instruction + low-dim state) is the velocity
    field of rectified flow, integrated in ``num_inference_steps`` Euler steps
    (``time_sampling`` as in the flow policy).
    """

    type: ClassVar[str] = "vla"
    # 35-50 minutes at batch 64 on this 2-core CPU shared with other jobs (see README).
    train_steps: ClassVar[int] = 3500
    dim: int = 128
    heads: int = 4
    depth: int = 3
    expert_depth: int = 3
    mlp_ratio: int = 4
    dropout: float = 0.0
    language_tokens: int = 2
    # Patch embedding widths (two convs before the projection to ``dim``).
    image_channels: tuple[int, int] = (32, 64)
    image_token_grid: int = 4
    crop_ratio: float = 0.875
    # Feed observation.environment_state (object poses from the sim, as the diffusion / flow
    # policies do) into the state token. False: camera + proprioception only, what a robot
    # without an object tracker has.
    use_environment_state: bool = True
    num_inference_steps: int = 10
    time_sampling: Literal["uniform", "logit_normal", "beta"] = "beta"
    # Flow-matching samples drawn per prefix in training (the prefix is encoded once).
    flow_samples: int = 2

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.dim < 8 or self.heads < 1 or self.dim % self.heads:
            problems.append(f"dim {self.dim} must be >= 8 and divisible by heads={self.heads}")
        for name in ("depth", "expert_depth", "mlp_ratio", "language_tokens", "image_token_grid",
                     "num_inference_steps", "flow_samples"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.crop_ratio <= 1.0:
            problems.append(f"crop_ratio {self.crop_ratio} must be in (0, 1]")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout {self.dropout} must be in [0, 1)")
        if problems:
            raise RobopolicyError("invalid vla policy config: " + "; ".join(problems))
