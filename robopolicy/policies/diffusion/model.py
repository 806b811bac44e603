"""Diffusion policy: epsilon prediction, DDPM noising for training, DDIM for sampling.

diffusers' schedulers define the noise schedule and the DDIM timesteps; sampling itself
is plain torch over coefficients precomputed at construction, unrolled over a fixed
number of steps, so that one ONNX graph holds the whole sampler.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from robopolicy.policies.denoising import DenoisingPolicy, TrainingPair
from robopolicy.policies.diffusion.config import DiffusionConfig
from robopolicy.spec import FeatureSpec


def _scheduler_kwargs(config: DiffusionConfig) -> dict[str, object]:
    return {
        "num_train_timesteps": config.num_train_timesteps,
        "beta_schedule": config.beta_schedule,
        "prediction_type": "epsilon",
        "clip_sample": config.clip_sample,
        "clip_sample_range": config.clip_sample_range,
    }


def ddim_scheduler(config: DiffusionConfig) -> DDIMScheduler:
    """diffusers' DDIM scheduler for ``config``, with its timesteps set."""
    scheduler = DDIMScheduler(**_scheduler_kwargs(config))
    scheduler.set_timesteps(config.num_inference_steps)
    return scheduler


class DiffusionPolicy(DenoisingPolicy):
    """FiLM U-Net trained to predict the noise of DDPM-noised action chunks."""

    config_class = DiffusionConfig
    config: DiffusionConfig

    def __init__(self, config: DiffusionConfig, spec: FeatureSpec) -> None:
        super().__init__(config, spec)
        self.noise_scheduler = DDPMScheduler(**_scheduler_kwargs(config))
        ddim = ddim_scheduler(config)
        # DDIM step k goes from timestep t to t - num_train_timesteps // num_inference_steps
        # (diffusers' rule); below 0 the target is the clean sample (alpha_cumprod = 1).
        t = ddim.timesteps.long()
        prev = t - config.num_train_timesteps // config.num_inference_steps
        alphas = ddim.alphas_cumprod.double()
        a_t = alphas[t]
        a_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], torch.as_tensor(ddim.final_alpha_cumprod).double())
        # Derived from the schedule on construction, so not part of the state_dict.
        self.register_buffer("ddim_time", t.float(), persistent=False)
        coef = torch.stack([a_t.rsqrt(), -(1 - a_t).sqrt() * a_t.rsqrt(), a_prev.sqrt(), (1 - a_prev).sqrt()], dim=1)
        self.register_buffer("ddim_coef", coef.float(), persistent=False)

    def training_pair(self, actions: torch.Tensor, noise: torch.Tensor) -> TrainingPair:
        t = torch.randint(0, self.config.num_train_timesteps, (actions.shape[0],), device=actions.device)
        return TrainingPair(self.noise_scheduler.add_noise(actions, noise, t), t.float(), noise)

    def ddim_step(self, x: torch.Tensor, eps: torch.Tensor, k: int) -> torch.Tensor:
        """Deterministic DDIM update of step ``k`` (same as ``DDIMScheduler.step`` with eta = 0)."""
        x0_from_x, x0_from_eps, prev_from_x0, prev_from_eps = self.ddim_coef[k].unbind()
        x0 = torch.addcmul(x * x0_from_x, eps, x0_from_eps)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return torch.addcmul(eps * prev_from_eps, x0, prev_from_x0)

    def sample(self, x: torch.Tensor, obs_film: torch.Tensor) -> torch.Tensor:
        time_film = self.unet.time_film(self.ddim_time)  # [K, F], once for all steps
        for k in range(self.config.num_inference_steps):
            x = self.ddim_step(x, self.unet(x, obs_film + time_film[k]), k)
        return x
