"""Flow-matching policy: the U-Net regresses the velocity ``data - noise`` at ``x_t``.

Convention: ``x_t = (1 - t) * noise + t * data`` with ``t`` in ``[0, 1]`` (``t = 1`` is the
data), so sampling integrates ``dx/dt = v(x, t)`` forward from noise with Euler steps.
"""

from __future__ import annotations

import torch

from robopolicy.policies.denoising import DenoisingPolicy, TrainingPair
from robopolicy.policies.flow.config import FlowConfig
from robopolicy.spec import FeatureSpec

# The U-Net's sinusoidal embedding is tuned for inputs spanning ~0..1000 (diffusion steps).
TIME_SCALE = 1000.0


class FlowPolicy(DenoisingPolicy):
    """FiLM U-Net trained by flow matching on action chunks."""

    config_class = FlowConfig
    config: FlowConfig

    def __init__(self, config: FlowConfig, spec: FeatureSpec) -> None:
        super().__init__(config, spec)
        steps = torch.arange(config.num_inference_steps) / config.num_inference_steps
        self.register_buffer("euler_time", steps * TIME_SCALE, persistent=False)

    def draw_time(self, n: int, device: torch.device) -> torch.Tensor:
        """Training times ``t [n]`` in ``[0, 1]`` by ``config.time_sampling``."""
        if self.config.time_sampling == "uniform":
            return torch.rand(n, device=device)
        if self.config.time_sampling == "logit_normal":
            return torch.sigmoid(torch.randn(n, device=device))
        noise_level = torch.distributions.Beta(1.5, 1.0).sample((n,)).to(device)
        return 1.0 - (0.001 + 0.999 * noise_level)

    def training_pair(self, actions: torch.Tensor, noise: torch.Tensor) -> TrainingPair:
        t = self.draw_time(actions.shape[0], actions.device)
        return TrainingPair(torch.lerp(noise, actions, t.view(-1, 1, 1)), t * TIME_SCALE, actions - noise)

    def sample(self, x: torch.Tensor, obs_film: torch.Tensor) -> torch.Tensor:
        time_film = self.unet.time_film(self.euler_time)  # [K, F], once for all steps
        dt = 1.0 / self.config.num_inference_steps
        for k in range(self.config.num_inference_steps):
            x = x.add(self.unet(x, obs_film + time_film[k]), alpha=dt)
        return x
