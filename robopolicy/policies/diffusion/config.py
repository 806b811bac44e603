"""Configuration of the diffusion policy (DDPM training, DDIM sampling)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from robopolicy.errors import RobopolicyError
from robopolicy.policies.denoising import DenoisingConfig


@dataclass
class DiffusionConfig(DenoisingConfig):
    """Noise-prediction (epsilon) diffusion over action chunks (Chi et al. 2023).

    Trained with DDPM noising over ``num_train_timesteps``; sampled with deterministic
    DDIM (eta = 0) in ``num_inference_steps`` steps, clipping the predicted clean sample
    to ``[-clip_sample_range, clip_sample_range]`` when ``clip_sample``.
    """

    type: ClassVar[str] = "diffusion"
    num_train_timesteps: int = 100
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise RobopolicyError(
                f"invalid diffusion policy config: num_inference_steps {self.num_inference_steps} "
                f"must be in [1, num_train_timesteps={self.num_train_timesteps}]"
            )
