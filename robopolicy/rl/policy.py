"""The fine-tuned policy: a frozen base chunk policy plus a per-step residual actor.

A :class:`ResidualPolicy` is a first-class policy checkpoint (``policy.json`` type
``"residual"`` + ``policy.safetensors`` holding ``base.*`` and ``actor.*`` weights): the
base's type, config and feature spec travel inside it, so it loads without the base's
run folder. At run time the plan comes from the base (``predict_chunk``, receding
horizon as for any policy) and every executed action is corrected by
``correct_action(current obs, planned action)``; :class:`~robopolicy.train.evaluate.ChunkExecutor`
applies it. For export, ``policy.actor`` is a self-contained module
``(state [B, Ds], base_action [B, Da]) -> action [B, Da]`` with ``state`` the raw low-dim
features concatenated in ``policy.actor.keys`` order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from robopolicy.errors import CheckpointError, RobopolicyError
from robopolicy.rl.networks import ResidualActor
from robopolicy.spec import FeatureSpec
from robopolicy.train.checkpoint import (
    POLICY_WEIGHTS,
    load_policy,
    load_tensors,
    load_weights,
    read_policy_meta,
    resolve_checkpoint,
)

RESIDUAL = "residual"


@dataclass
class ResidualConfig:
    """What rebuilds a :class:`ResidualPolicy` (saved as ``policy.json["config"]``)."""

    type: ClassVar[str] = RESIDUAL
    base_type: str
    base_config: dict[str, Any]
    action_scale: float
    hidden: tuple[int, ...]
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]


class ResidualPolicy(nn.Module):
    """Frozen base chunk policy + residual actor; the ``Policy`` interface for inference."""

    def __init__(self, base: nn.Module, config: ResidualConfig) -> None:
        super().__init__()
        self.base = base.eval().requires_grad_(False)
        self.config = config
        self.spec: FeatureSpec = base.spec
        self.actor = ResidualActor(self.spec, config.hidden, config.action_scale, config.action_low, config.action_high)

    @property
    def type(self) -> str:
        return RESIDUAL

    def noise_shape(self, batch_size: int) -> tuple[int, ...]:
        return self.base.noise_shape(batch_size)

    def predict_chunk(self, obs: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        """The base policy's chunk ``[B, Ta, Da]`` (the plan the residual corrects step by step)."""
        return self.base.predict_chunk(obs, noise)

    @torch.no_grad()
    def correct_action(self, obs: dict[str, torch.Tensor], base_action: torch.Tensor) -> torch.Tensor:
        """Current raw observation ``{key: [B, *shape]}`` + planned action ``[B, Da]`` -> executed action."""
        return self.actor(self.actor.obs.flatten(obs), base_action)


def make_residual_policy(base: nn.Module, action_scale: float, hidden: tuple[int, ...],
                         action_low: tuple[float, ...], action_high: tuple[float, ...]) -> ResidualPolicy:
    """A fresh residual policy around ``base`` (the actor starts as the identity on the base action)."""
    from robopolicy.policies.factory import config_to_dict

    base_config = config_to_dict(base.config)
    base_config.pop("type")
    config = ResidualConfig(base.type, base_config, float(action_scale), tuple(hidden),
                            tuple(float(x) for x in action_low), tuple(float(x) for x in action_high))
    return ResidualPolicy(base, config)


def is_residual_checkpoint(path: Path) -> bool:
    """Whether the run or checkpoint folder ``path`` holds a residual policy."""
    return read_policy_meta(resolve_checkpoint(path)).get("type") == RESIDUAL


def load_residual_policy(path: Path) -> ResidualPolicy:
    """Load the residual policy of a fine-tuning run (or one of its checkpoints), in eval mode."""
    from robopolicy.policies.factory import config_from_dict, policy_class

    ckpt = resolve_checkpoint(Path(path))
    meta = read_policy_meta(ckpt)
    if meta["type"] != RESIDUAL:
        raise CheckpointError(f"{ckpt} holds a {meta['type']!r} policy, not a residual RL fine-tuning")
    try:
        c = meta["config"]
        config = ResidualConfig(c["base_type"], dict(c["base_config"]), float(c["action_scale"]),
                                tuple(int(h) for h in c["hidden"]), tuple(c["action_low"]), tuple(c["action_high"]))
        spec = FeatureSpec.from_dict(meta["spec"])
        base = policy_class(config.base_type)(config_from_dict(config.base_type, config.base_config), spec)
    except (KeyError, TypeError, ValueError, RobopolicyError) as e:
        raise CheckpointError(f"{ckpt / 'policy.json'} does not describe a residual policy: {e}") from e
    policy = ResidualPolicy(base, config)
    load_weights(policy, load_tensors(ckpt / POLICY_WEIGHTS), f"{ckpt / POLICY_WEIGHTS}")
    policy.checkpoint_meta = meta
    return policy.eval()


def load_trained_policy(path: Path) -> nn.Module:
    """The inference policy of any run or checkpoint folder: a residual fine-tuning or a BC policy."""
    return load_residual_policy(path) if is_residual_checkpoint(path) else load_policy(Path(path))
