"""Networks and small pure helpers of the off-policy learners.

* :class:`ResidualActor`: the per-step correction on top of a frozen base policy. Raw
  low-dim observation ``[B, Ds]`` + raw base action ``[B, Da]`` in, raw final action out;
  it carries its own normalization buffers, so it exports to ONNX on its own.
* :class:`CriticEnsemble`: ``E`` Q-networks (LayerNorm MLPs) evaluated as one batched
  matmul per layer.
* :class:`GaussianActor`: the tanh-squashed Gaussian actor of the SAC baseline.
* :func:`min_over_subset`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from robopolicy.errors import SpecMismatchError
from robopolicy.policies.normalize import Normalizer
from robopolicy.spec import ACTION, FeatureSpec


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, layer_norm: bool = False) -> nn.Sequential:
    """Linear (+ LayerNorm) + ReLU per hidden width, then a linear output layer."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), *([nn.LayerNorm(width)] if layer_norm else []), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class ObservationFlattener(nn.Module):
    """Raw low-dim features (spec order) -> one raw vector, and its normalized form.

    The normalization is the policy's: per-dimension min-max to ``[-1, 1]`` from the
    dataset statistics (:class:`~robopolicy.policies.normalize.Normalizer`).
    """

    def __init__(self, spec: FeatureSpec) -> None:
        super().__init__()
        features = spec.state_features
        if not features:
            raise SpecMismatchError("residual RL needs low-dim observation features; the spec has only images")
        self.keys = [f.name for f in features]
        self.dims = [f.dim for f in features]
        self.normalizer = Normalizer([*features, spec.action])

    @property
    def dim(self) -> int:
        return sum(self.dims)

    def flatten(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{key: [B, *shape]}`` (extra keys ignored) -> raw ``[B, Ds]``."""
        missing = [k for k in self.keys if k not in obs]
        if missing:
            raise SpecMismatchError(f"observation lacks features {missing} (needs {self.keys})")
        return torch.cat([obs[k].reshape(obs[k].shape[0], -1).float() for k in self.keys], dim=-1)

    def normalize_state(self, state: torch.Tensor) -> torch.Tensor:
        parts = torch.split(state, self.dims, dim=-1)
        return torch.cat([self.normalizer.normalize(k, p) for k, p in zip(self.keys, parts)], dim=-1)

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:
        return self.normalizer.normalize(ACTION, action)


class ResidualActor(nn.Module):
    """``action = clip(base + action_scale * tanh(mlp(norm(state), norm(base))), low, high)``.

    The last layer starts at zero, so a fresh actor returns exactly the base action
    (clipped to the action box). ``forward`` takes the raw concatenated low-dim features
    (order: :attr:`keys`) and the raw base action: that is the whole ONNX graph.
    """

    def __init__(self, spec: FeatureSpec, hidden: Sequence[int], action_scale: float,
                 action_low: Iterable[float], action_high: Iterable[float]) -> None:
        super().__init__()
        self.obs = ObservationFlattener(spec)
        self.keys = self.obs.keys
        self.action_scale = float(action_scale)
        da = spec.action.dim
        self.net = mlp(self.obs.dim + da, hidden, da)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("action_low", torch.as_tensor(list(action_low), dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(list(action_high), dtype=torch.float32))

    def residual(self, state: torch.Tensor, base_action: torch.Tensor) -> torch.Tensor:
        """The correction in ``[-1, 1]`` units of ``action_scale`` (before scaling)."""
        x = torch.cat([self.obs.normalize_state(state), self.obs.normalize_action(base_action)], dim=-1)
        return torch.tanh(self.net(x))

    def with_residual(self, base_action: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Final action from a residual in ``[-1, 1]`` units."""
        return torch.clamp(base_action + self.action_scale * residual, self.action_low, self.action_high)

    def forward(self, state: torch.Tensor, base_action: torch.Tensor) -> torch.Tensor:
        return self.with_residual(base_action, self.residual(state, base_action))


class EnsembleLinear(nn.Module):
    """``E`` independent linear layers applied to ``[E, B, in]`` in one batched matmul."""

    def __init__(self, ensemble: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, per member
        self.weight = nn.Parameter(torch.empty(ensemble, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(ensemble, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over the last dim with a separate affine per ensemble member."""

    def __init__(self, ensemble: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ensemble, 1, dim))
        self.bias = nn.Parameter(torch.zeros(ensemble, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


class CriticEnsemble(nn.Module):
    """``E`` Q-functions ``Q_e(x, a)`` (Linear-LayerNorm-ReLU MLPs); returns ``[E, B]``."""

    def __init__(self, ensemble: int, in_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [EnsembleLinear(ensemble, in_dim, width), EnsembleLayerNorm(ensemble, width), nn.ReLU()]
            in_dim = width
        layers.append(EnsembleLinear(ensemble, in_dim, 1))
        self.net = nn.Sequential(*layers)
        self.ensemble = ensemble

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = torch.cat(inputs, dim=-1)
        return self.net(x.unsqueeze(0).expand(self.ensemble, *x.shape)).squeeze(-1)


class GaussianActor(nn.Module):
    """SAC actor: tanh-squashed diagonal Gaussian over a box ``[low, high]``."""

    log_std_min, log_std_max = -5.0, 2.0

    def __init__(self, in_dim: int, action_dim: int, hidden: Sequence[int],
                 action_low: Iterable[float], action_high: Iterable[float]) -> None:
        super().__init__()
        self.net = mlp(in_dim, hidden, 2 * action_dim)
        low = torch.as_tensor(list(action_low), dtype=torch.float32)
        high = torch.as_tensor(list(action_high), dtype=torch.float32)
        self.register_buffer("center", (high + low) / 2)
        self.register_buffer("half_range", (high - low) / 2)

    def forward(self, x: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(action in the box, log-probability ``[B]``); the mean action when ``deterministic``."""
        mean, log_std = self.net(x).chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(log_std) + 1)
        u = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
        log_prob = torch.distributions.Normal(mean, log_std.exp()).log_prob(u)
        # log det of tanh: log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), numerically stable.
        log_prob = log_prob - 2 * (math.log(2) - u - nn.functional.softplus(-2 * u)) - self.half_range.log()
        return self.center + self.half_range * torch.tanh(u), log_prob.sum(-1)


@torch.no_grad()
def min_over_subset(q: torch.Tensor, subset: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """REDQ target: min over a random subset of ``subset`` members of ``q [E, B]`` -> ``[B]``.

    With ``subset == E`` this is clipped double-Q (the min over all members).
    """
    if not 1 <= subset <= q.shape[0]:
        raise ValueError(f"subset size {subset} must be in [1, {q.shape[0]}]")
    if subset < q.shape[0]:
        q = q[torch.randperm(q.shape[0], generator=generator)[:subset].to(q.device)]
    return q.min(dim=0).values
