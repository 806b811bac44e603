"""The 1-D temporal U-Net with FiLM conditioning (Chi et al. 2023), shared by every family.

Layout is channels-first: the network maps ``x [B, Da, Tp]`` to ``[B, Da, Tp]``.

Each residual block is FiLM-modulated by ``Linear(Mish([time_emb, obs_cond]))`` exactly as in
Chi et al., but all blocks' FiLM layers are stacked into one matrix and split into its
time and observation columns (Mish is elementwise, so this is the same function). The
observation part is computed once per chunk (:meth:`ConditionalUnet1d.condition`) and
the time part once per sampler step or once for all steps (:meth:`ConditionalUnet1d.time_film`);
a denoising step then costs one add plus the convolutions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """``t [N]`` (any real scale, e.g. 0..1000) -> ``[N, dim]`` sin/cos features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.arange(half) * (-math.log(10000.0) / max(half - 1, 1)))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.unsqueeze(-1) * self.freqs
        return torch.cat([args.sin(), args.cos()], dim=-1)


def conv_block(c_in: int, c_out: int, kernel_size: int, n_groups: int) -> nn.Sequential:
    """Conv1d -> GroupNorm -> Mish."""
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2), nn.GroupNorm(n_groups, c_out), nn.Mish()
    )


class FiLMResBlock1d(nn.Module):
    """Two conv blocks; the first one's output is scaled and shifted by FiLM; 1x1 conv skip."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int) -> None:
        super().__init__()
        self.conv1 = conv_block(c_in, c_out, kernel_size, n_groups)
        self.conv2 = conv_block(c_out, c_out, kernel_size, n_groups)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.film_dim = 2 * c_out

    def forward(self, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        scale, bias = film.unsqueeze(-1).chunk(2, dim=1)
        return self.conv2(torch.addcmul(bias, scale, self.conv1(x))) + self.skip(x)


class ConditionalUnet1d(nn.Module):
    """FiLM-conditioned 1-D U-Net: ``down_dims`` channel widths, one level each."""

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        down_dims: Sequence[int],
        kernel_size: int,
        n_groups: int,
        time_embed_dim: int,
    ) -> None:
        super().__init__()

        def res(c_in: int, c_out: int) -> FiLMResBlock1d:
            return FiLMResBlock1d(c_in, c_out, kernel_size, n_groups)

        dims = [action_dim, *down_dims]
        levels = list(zip(dims[:-1], dims[1:]))
        downsamples = [*(nn.Conv1d(c, c, 3, 2, 1) for c in down_dims[:-1]), nn.Identity()]
        self.down = nn.ModuleList(
            nn.ModuleList([res(c_in, c_out), res(c_out, c_out), down])
            for (c_in, c_out), down in zip(levels, downsamples)
        )
        self.mid = nn.ModuleList([res(down_dims[-1], down_dims[-1]), res(down_dims[-1], down_dims[-1])])
        self.up = nn.ModuleList(
            nn.ModuleList([res(2 * c_out, c_in), res(c_in, c_in), nn.ConvTranspose1d(c_in, c_in, 4, 2, 1)])
            for c_in, c_out in reversed(levels[1:])
        )
        self.final = nn.Sequential(
            conv_block(down_dims[0], down_dims[0], kernel_size, n_groups), nn.Conv1d(down_dims[0], action_dim, 1)
        )
        self.film_sizes = [m.film_dim for m in self.modules() if isinstance(m, FiLMResBlock1d)]
        film_dim = sum(self.film_sizes)
        self.time_mlp = nn.Sequential(
            SinusoidalEmbedding(time_embed_dim),
            nn.Linear(time_embed_dim, 4 * time_embed_dim),
            nn.Mish(),
            nn.Linear(4 * time_embed_dim, time_embed_dim),
            nn.Mish(),  # the FiLM encoder's Mish, applied to the time columns
        )
        self.film_time = nn.Linear(time_embed_dim, film_dim, bias=False)
        self.film_obs = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, film_dim))

    def condition(self, cond: torch.Tensor) -> torch.Tensor:
        """Observation part of every block's FiLM parameters: ``[B, G] -> [B, F]``."""
        return self.film_obs(cond)

    def time_film(self, t: torch.Tensor) -> torch.Tensor:
        """Time part of every block's FiLM parameters: ``[N] -> [N, F]``."""
        return self.film_time(self.time_mlp(t))

    def forward(self, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        """``x [B, Da, Tp]``, ``film = condition(cond) + time_film(t)`` ``[B, F]`` -> ``[B, Da, Tp]``."""
        films = iter(film.split(self.film_sizes, dim=1))
        skips: list[torch.Tensor] = []
        for res1, res2, downsample in self.down:
            x = res2(res1(x, next(films)), next(films))
            skips.append(x)
            x = downsample(x)
        for res_block in self.mid:
            x = res_block(x, next(films))
        for (res1, res2, upsample), skip in zip(self.up, reversed(skips[1:])):
            x = upsample(res2(res1(torch.cat([x, skip], dim=1), next(films)), next(films)))
        return self.final(x)
