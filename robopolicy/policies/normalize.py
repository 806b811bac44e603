"""Dataset-statistics normalization that lives inside the policy (and its state_dict).

Low-dimensional features and actions are min-max scaled to ``[-1, 1]`` per dimension.
A dimension whose range is below :data:`MIN_RANGE` (a constant joint, an unused gripper)
maps to 0 and back to its mean, so it can neither blow up nor carry noise.
Images are not handled here: the image encoder turns uint8 into ``[0, 1]`` floats.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from robopolicy.errors import SpecMismatchError
from robopolicy.spec import Feature

MIN_RANGE = 1e-4


class _Affine(nn.Module):
    """``y = x * scale + shift`` and back ``x = y * inv_scale + center`` for one feature."""

    def __init__(self, feature: Feature) -> None:
        super().__init__()
        if feature.stats is None:
            raise SpecMismatchError(
                f"feature {feature.name!r} has no statistics; the policy needs min/max to normalize it"
            )
        lo = torch.tensor(feature.stats.min, dtype=torch.float64)
        hi = torch.tensor(feature.stats.max, dtype=torch.float64)
        mean = torch.tensor(feature.stats.mean, dtype=torch.float64)
        if not lo.numel() == hi.numel() == mean.numel() == feature.dim:
            raise SpecMismatchError(
                f"statistics of {feature.name!r} have {lo.numel()} dims but its shape "
                f"{tuple(feature.shape)} has {feature.dim}"
            )
        span = hi - lo
        ok = span >= MIN_RANGE
        scale = torch.where(ok, 2.0 / span.clamp_min(MIN_RANGE), torch.zeros_like(span))
        center = torch.where(ok, (hi + lo) / 2.0, mean)
        self.register_buffer("scale", scale.float())
        self.register_buffer("shift", (-center * scale).float())
        self.register_buffer("inv_scale", torch.where(ok, span / 2.0, torch.zeros_like(span)).float())
        self.register_buffer("center", center.float())


class Normalizer(nn.Module):
    """Per-feature min-max normalization to ``[-1, 1]`` over the last dimension."""

    def __init__(self, features: Iterable[Feature]) -> None:
        super().__init__()
        self.affines = nn.ModuleDict()
        self._slot: dict[str, str] = {}
        for feature in features:
            slot = feature.name.replace(".", "_")
            if slot in self.affines:
                raise SpecMismatchError(f"two features map to the same normalizer slot {slot!r}")
            self.affines[slot] = _Affine(feature)
            self._slot[feature.name] = slot

    def _affine(self, key: str) -> _Affine:
        if key not in self._slot:
            raise SpecMismatchError(f"normalizer has no statistics for {key!r} (it has: {', '.join(self._slot)})")
        return self.affines[self._slot[key]]  # type: ignore[return-value]

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        a = self._affine(key)
        return torch.addcmul(a.shift, x, a.scale)

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        a = self._affine(key)
        return torch.addcmul(a.center, x, a.inv_scale)
