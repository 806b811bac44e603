"""Optimizer and target-network helpers shared by behaviour cloning and RL.

Both use multi-tensor kernels: on this 2-core CPU the fused AdamW step costs ~2 ms for
4.6 M parameters against ~17 ms for the default ``foreach`` implementation, about 10 %
of a diffusion training step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def adamw(params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA); ``weight_decay=0`` is plain Adam."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """``target <- (1 - tau) * target + tau * source`` for every parameter (buffers copied)."""
    targets, sources = list(target.parameters()), list(source.parameters())
    if len(targets) != len(sources):
        raise ValueError(f"polyak_update: {len(targets)} target parameters but {len(sources)} source parameters")
    torch._foreach_lerp_(targets, sources, tau)
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        t.copy_(s)
