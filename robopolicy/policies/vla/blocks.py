"""Transformer pieces of the VLA: multi-head self-attention, pre-LN blocks, and the image tokenizer.

Written with plain ops (``scaled_dot_product_attention``, ``Linear``, ``LayerNorm``) rather
than ``nn.TransformerEncoderLayer``, whose inference fast path does not export to ONNX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robopolicy.errors import SpecMismatchError
from robopolicy.policies.encoders import RandomCrop, to_float_chw


class Attention(nn.Module):
    """Multi-head self-attention over ``x [B, N, D]``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, then an MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class ImageTokenizer(nn.Module):
    """One camera: uint8 ``[N, H, W, 3]`` -> tokens ``[N, T, dim]``, trained from scratch.

    A convolutional patch embedding (ViT "early convolutions"): a 4x4 stride-4 conv, a 3x3
    conv, a 2x2 stride-2 projection to ``dim`` (8x8-pixel patches), then average pooling to
    about ``grid x grid`` tokens, each with a learned position. A crop (random in training)
    comes first. Far cheaper on a CPU than a ResNet stem at full resolution; any module
    with this signature (e.g. a pretrained ViT's patch tokens projected to ``dim``) can
    stand in for it: see docs/ARCHITECTURE.md.
    """

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int], grid: int, dim: int, crop_ratio: float) -> None:
        super().__init__()
        height, width, _ = image_shape
        c1, c2 = channels
        self.crop = RandomCrop(height, width, crop_ratio)
        self.patches = nn.Sequential(
            nn.Conv2d(3, c1, 4, 4), nn.GELU(), nn.Conv2d(c1, c2, 3, 1, 1), nn.GELU(), nn.Conv2d(c2, dim, 2, 2),
        )
        h, w = self.crop.crop_h // 8, self.crop.crop_w // 8
        if min(h, w) < 1:
            raise SpecMismatchError(f"images of {height}x{width} are too small for 8x8-pixel patches after the crop")
        kernel = (math.ceil(h / grid), math.ceil(w / grid))
        self.pool = nn.AvgPool2d(kernel, kernel, ceil_mode=True)
        self.num_tokens = math.ceil(h / kernel[0]) * math.ceil(w / kernel[1])
        self.position = nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.patches(to_float_chw(self.crop(images))))
        return x.flatten(2).transpose(1, 2) + self.position
