"""Residual off-policy RL on top of frozen BC policies (and a SAC-from-scratch baseline).

``finetune(ResidualArgs(checkpoint=..., env=..., steps=..., out=...))`` trains and returns
a summary; the run folder's policy loads with :func:`load_residual_policy` (the evaluator
applies its per-step correction; ``policy.actor`` exports to ONNX on its own). Names are
imported on first use, so ``robopolicy.rl.config`` (and the CLI) stay free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OffPolicyArgs": "config", "ResidualArgs": "config", "SACArgs": "config",
    "finetune": "residual", "train_sac": "sac",
    "ResidualPolicy": "policy", "is_residual_checkpoint": "policy", "load_residual_policy": "policy",
    "load_trained_policy": "policy",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'robopolicy.rl' has no attribute {name!r}")
    return getattr(importlib.import_module(f"robopolicy.rl.{_EXPORTS[name]}"), name)
