"""Observation encoders: ``[B, To, ...]`` raw observations -> one conditioning vector ``[B, G]``.

* Low-dim features are normalized, concatenated in spec order, flattened over ``To`` and
  passed through an MLP (``state_mlp_dims=()`` passes them through unchanged, as Chi et al.).
* Each camera has its own small ResNet-style CNN (GroupNorm, no BatchNorm, so it behaves the
  same at batch 1 and under EMA) ending in spatial-softmax keypoints (robomimic). Training
  takes a random crop per image; eval takes the center crop with static slicing, so the
  eval graph exports to ONNX without data-dependent control flow.
* The parts are fused by concatenation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robopolicy.errors import SpecMismatchError
from robopolicy.policies.normalize import Normalizer
from robopolicy.spec import Feature


def group_count(channels: int, per_group: int = 16) -> int:
    """GroupNorm groups for ``channels``: about ``per_group`` channels each, dividing evenly."""
    groups = max(1, channels // per_group)
    while channels % groups:
        groups -= 1
    return groups


def mlp(in_dim: int, dims: Sequence[int]) -> nn.Module:
    """Linear layers with Mish between them (none after the last); identity when ``dims`` is empty."""
    layers: list[nn.Module] = []
    for i, d in enumerate(dims):
        layers.append(nn.Linear(in_dim, d))
        if i < len(dims) - 1:
            layers.append(nn.Mish())
        in_dim = d
    return nn.Sequential(*layers) if layers else nn.Identity()


def check_observation(obs: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise :class:`SpecMismatchError` naming the key unless ``obs[key]`` is ``[B, *shapes[key]]`` for every key."""
    for key, shape in shapes.items():
        if key not in obs:
            raise SpecMismatchError(f"observation {key!r} is missing (the policy needs: {', '.join(shapes)})")
        if tuple(obs[key].shape[1:]) != shape:
            expected = ", ".join(map(str, ("B", *shape)))
            raise SpecMismatchError(f"observation {key!r} has shape {tuple(obs[key].shape)}, the policy expects [{expected}]")


class ResBlock2d(nn.Module):
    """Basic ResNet block (two 3x3 convs) with GroupNorm; strided 1x1 projection on the skip."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.GroupNorm(group_count(c_out), c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.GroupNorm(group_count(c_out), c_out),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(group_count(c_out), c_out))
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class SpatialSoftmax(nn.Module):
    """Per-channel softmax over pixels -> expected (x, y) in ``[-1, 1]``: ``[N, K, h, w] -> [N, 2K]``."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = torch.softmax(x.flatten(2), dim=-1)  # [N, K, h*w]
        return (attention @ self.grid).flatten(1)


class RandomCrop(nn.Module):
    """Crop ``[N, H, W, C]`` images to ``crop_ratio``: a random crop per image in training, the
    center crop in eval (static slicing, so the eval graph exports without data-dependent ops)."""

    def __init__(self, height: int, width: int, crop_ratio: float) -> None:
        super().__init__()
        self.crop_h = max(1, round(height * crop_ratio))
        self.crop_w = max(1, round(width * crop_ratio))
        self.top = (height - self.crop_h) // 2
        self.left = (width - self.crop_w) // 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return images[:, self.top : self.top + self.crop_h, self.left : self.left + self.crop_w]
        n, height, width, _ = images.shape
        dev = images.device
        top = torch.randint(0, height - self.crop_h + 1, (n, 1, 1), device=dev)
        left = torch.randint(0, width - self.crop_w + 1, (n, 1, 1), device=dev)
        rows = top + torch.arange(self.crop_h, device=dev).view(1, -1, 1)
        cols = left + torch.arange(self.crop_w, device=dev).view(1, 1, -1)
        return images[torch.arange(n, device=dev).view(-1, 1, 1), rows, cols]


def to_float_chw(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in ``[0, 1]``."""
    return images.permute(0, 3, 1, 2).float() * (1.0 / 255.0)


class ImageEncoder(nn.Module):
    """One camera: uint8 ``[N, H, W, 3]`` -> features ``[N, out_dim]``."""

    def __init__(
        self, image_shape: Sequence[int], channels: Sequence[int], keypoints: int, out_dim: int, crop_ratio: float
    ) -> None:
        super().__init__()
        height, width, _ = image_shape
        self.crop = RandomCrop(height, width, crop_ratio)
        c_ins = [channels[0], *channels[:-1]]
        self.backbone = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 2, 1, bias=False),
            nn.GroupNorm(group_count(channels[0]), channels[0]),
            nn.ReLU(),
            *(ResBlock2d(c_in, c, 1 if i == 0 else 2) for i, (c_in, c) in enumerate(zip(c_ins, channels))),
            nn.Conv2d(channels[-1], keypoints, 1),
        )
        h, w = self.crop.crop_h, self.crop.crop_w
        for _ in channels:  # the stem and every stage after the first halve the resolution
            h, w = -(-h // 2), -(-w // 2)
        self.keypoints = SpatialSoftmax(h, w)
        self.out = nn.Linear(2 * keypoints, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.keypoints(self.backbone(to_float_chw(self.crop(images)))))


class ObservationEncoder(nn.Module):
    """Raw observation dict ``{key: [B, To, ...]}`` -> conditioning ``[B, out_dim]``."""

    def __init__(
        self,
        state_features: Sequence[Feature],
        image_features: Sequence[Feature],
        n_obs_steps: int,
        state_mlp_dims: Sequence[int],
        image_channels: Sequence[int],
        image_keypoints: int,
        image_feature_dim: int,
        crop_ratio: float,
    ) -> None:
        super().__init__()
        if not state_features and not image_features:
            raise SpecMismatchError("the policy needs at least one observation feature (state or image)")
        self.normalizer = Normalizer(state_features)
        self.state_keys = [f.name for f in state_features]
        self.image_keys = [f.name for f in image_features]
        self.shapes = {f.name: (n_obs_steps, *f.shape) for f in [*state_features, *image_features]}
        state_in = n_obs_steps * sum(f.dim for f in state_features)
        self.state_mlp = mlp(state_in, state_mlp_dims) if state_features else None
        self.cameras = nn.ModuleList(
            ImageEncoder(f.shape, image_channels, image_keypoints, image_feature_dim, crop_ratio)
            for f in image_features
        )
        state_out = (state_mlp_dims[-1] if state_mlp_dims else state_in) if state_features else 0
        self.out_dim = state_out + len(image_features) * n_obs_steps * image_feature_dim

    def check(self, obs: dict[str, torch.Tensor]) -> None:
        """Raise :class:`SpecMismatchError` naming the key if an input lacks or has a wrong shape."""
        check_observation(obs, self.shapes)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        if self.state_mlp is not None:
            state = [self.normalizer.normalize(k, obs[k]) for k in self.state_keys]
            x = state[0] if len(state) == 1 else torch.cat(state, dim=-1)
            parts.append(self.state_mlp(x.flatten(1)))
        for key, camera in zip(self.image_keys, self.cameras):
            images = obs[key]
            parts.append(camera(images.flatten(0, 1)).view(images.shape[0], -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
