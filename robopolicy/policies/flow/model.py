"""Flow-matching policy: the U-Net regresses the velocity ``data - noise`` at ``x_t``.

Convention: ``x_t = (1 - t) * noise + t * data`` with ``t`` in ``[0, 1]`` (``t = 1`` is the
data), so sampling integrates ``dx/dt = v(x, t)`` forward from noise with Euler steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from robopolicy.policies.denoising import DenoisingPolicy, TrainingPair
from robopolicy.policies.flow.config import FlowConfig
from robopolicy.spec import FeatureSpec

# The U-Net's sinusoidal embedding is tuned for inputs spanning ~0..1000 (diffusion steps).
TIME_SCALE = 1000.0


def draw_flow_time(kind: str, n: int, device: torch.device) -> torch.Tensor:
    """Training times ``t [n]`` in ``[0, 1]`` (see :class:`FlowConfig` for the ``kind`` of sampling)."""
    if kind == "uniform":
        return torch.rand(n, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, device=device))
    noise_level = torch.distributions.Beta(1.5, 1.0).sample((n,)).to(device)
    return 1.0 - (0.001 + 0.999 * noise_level)


def flow_pair(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, velocity target)`` for per-sample times ``t [B]``: ``x_t = (1 - t) noise + t data``."""
    return torch.lerp(noise, data, t.view(-1, *[1] * (data.dim() - 1))), data - noise


def euler_integrate(x: torch.Tensor, velocity: Callable[[torch.Tensor, int], torch.Tensor], steps: int) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, k)`` from ``t = 0`` to 1 in ``steps`` Euler steps (step ``k`` at ``t = k / steps``)."""
    dt = 1.0 / steps
    for k in range(steps):
        x = x.add(velocity(x, k), alpha=dt)
    return x


class FlowPolicy(DenoisingPolicy):
    """FiLM U-Net trained by flow matching on action chunks."""

    config_class = FlowConfig
    config: FlowConfig

    def __init__(self, config: FlowConfig, spec: FeatureSpec) -> None:
        super().__init__(config, spec)
        steps = torch.arange(config.num_inference_steps) / config.num_inference_steps
        self.register_buffer("euler_time", steps * TIME_SCALE, persistent=False)

    def training_pair(self, actions: torch.Tensor, noise: torch.Tensor) -> TrainingPair:
        t = draw_flow_time(self.config.time_sampling, actions.shape[0], actions.device)
        x_t, target = flow_pair(actions, noise, t)
        return TrainingPair(x_t, t * TIME_SCALE, target)

    def sample(self, x: torch.Tensor, obs_film: torch.Tensor) -> torch.Tensor:
        time_film = self.unet.time_film(self.euler_time)  # [K, F], once for all steps
        return euler_integrate(x, lambda x_k, k: self.unet(x_k, obs_film + time_film[k]), self.config.num_inference_steps)
