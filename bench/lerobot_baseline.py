"""lerobot's own DiffusionPolicy, built offline for a dataset, as the benchmarks' baseline.

State-only: lerobot's DiffusionPolicy needs ``observation.environment_state`` (or an
image) besides ``observation.state``; our datasets carry both. ``down_dims`` is chosen by
the caller to match our policy's parameter count. No hub access: no pretrained backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def make_lerobot_diffusion(
    dataset_root: Path,
    down_dims: tuple[int, ...],
    n_obs_steps: int = 2,
    horizon: int = 16,
    n_action_steps: int = 8,
    num_inference_steps: int | None = None,
) -> tuple[Any, Any, Any, Any]:
    """(policy, preprocessor, postprocessor, dataset metadata) for a local dataset."""
    from lerobot.configs.types import FeatureType
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.diffusion.processor_diffusion import make_diffusion_pre_post_processors
    from lerobot.utils.feature_utils import dataset_to_policy_features

    meta = LeRobotDatasetMetadata(f"local/{Path(dataset_root).name}", root=dataset_root)
    features = dataset_to_policy_features(meta.features)
    cfg = DiffusionConfig(
        input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        output_features={k: f for k, f in features.items() if f.type is FeatureType.ACTION},
        n_obs_steps=n_obs_steps,
        horizon=horizon,
        n_action_steps=n_action_steps,
        down_dims=down_dims,
        pretrained_backbone_weights=None,
        num_inference_steps=num_inference_steps,
        device="cpu",
    )
    policy = DiffusionPolicy(cfg)
    pre, post = make_diffusion_pre_post_processors(cfg, dataset_stats=meta.stats)
    return policy, pre, post, meta


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
