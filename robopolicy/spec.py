"""The feature spec: the one contract every stage speaks.

A :class:`FeatureSpec` names the observation and action features (LeRobot naming:
``observation.state``, ``observation.environment_state``, ``observation.images.<cam>``,
``action``), their shapes, dtypes and normalization statistics, plus the timing:
fps, observation horizon ``To`` (``n_obs_steps``), prediction horizon ``Tp``
(``horizon``) and executed chunk ``Ta`` (``n_action_steps``).

The dataset writes it, the policy checkpoint carries it, the export manifest carries it
and the ROS node maps topics onto it. :meth:`FeatureSpec.check_compatible` turns any
mismatch into an error that names both sides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import numpy as np

from robopolicy.errors import InstructionError, SpecMismatchError

ACTION = "action"
STATE = "observation.state"
ENV_STATE = "observation.environment_state"
IMAGE_PREFIX = "observation.images."
LANGUAGE = "observation.language"

FeatureKind = Literal["state", "image", "language", "action"]


def feature_kind(name: str) -> FeatureKind:
    """Classify a feature by its LeRobot name.

    ``observation.language`` is the instruction embedding a language-conditioned policy
    takes (shape ``(D,)``); it is computed from the task string, never read from an env or
    a dataset, so it is neither a state nor an observation key.
    """
    if name == ACTION:
        return "action"
    if name == LANGUAGE:
        return "language"
    if name.startswith(IMAGE_PREFIX):
        return "image"
    if name.startswith("observation."):
        return "state"
    raise SpecMismatchError(f"feature {name!r} is neither 'action' nor 'observation.*'")


@dataclass
class Stats:
    """Per-dimension statistics of one feature (as lerobot computes them)."""

    min: list[float]
    max: list[float]
    mean: list[float]
    std: list[float]

    @classmethod
    def from_arrays(cls, stats: Mapping[str, Any]) -> "Stats":
        def flat(key: str) -> list[float]:
            return np.asarray(stats[key], dtype=np.float64).reshape(-1).tolist()

        return cls(min=flat("min"), max=flat("max"), mean=flat("mean"), std=flat("std"))

    @classmethod
    def unit(cls, dim: int) -> "Stats":
        """[-1, 1], mean 0, std 1 in every dimension: for a model whose weights do not matter (benchmarks, tests)."""
        return cls([-1.0] * dim, [1.0] * dim, [0.0] * dim, [1.0] * dim)


@dataclass
class Feature:
    """One named feature: shape, dtype, per-dimension names and statistics.

    Images are ``(H, W, 3)`` uint8 at the env / dataset boundary; ``dtype`` records the
    storage (``"image"`` or ``"video"`` in a dataset, ``"uint8"`` at run time).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    names: list[str] | None = None
    stats: Stats | None = None

    @property
    def kind(self) -> FeatureKind:
        return feature_kind(self.name)

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Feature":
        stats = d.get("stats")
        return cls(
            name=d["name"],
            shape=tuple(int(s) for s in d["shape"]),
            dtype=d.get("dtype", "float32"),
            names=d.get("names"),
            stats=Stats(**stats) if stats else None,
        )


@dataclass
class FeatureSpec:
    """Features plus timing; serializable to JSON and checked for compatibility."""

    features: dict[str, Feature]
    fps: float
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    tasks: list[str] = field(default_factory=list)

    # -- views ---------------------------------------------------------------------------
    @property
    def action(self) -> Feature:
        if ACTION not in self.features:
            raise SpecMismatchError("feature spec has no 'action' feature")
        return self.features[ACTION]

    @property
    def state_features(self) -> list[Feature]:
        """Low-dimensional observation features, in a fixed (sorted) order."""
        return [self.features[k] for k in sorted(self.features) if feature_kind(k) == "state"]

    @property
    def image_features(self) -> list[Feature]:
        return [self.features[k] for k in sorted(self.features) if feature_kind(k) == "image"]

    @property
    def language(self) -> Feature | None:
        """The instruction-embedding feature of a language-conditioned policy, else ``None``."""
        return self.features.get(LANGUAGE)

    @property
    def observation_keys(self) -> list[str]:
        return [f.name for f in self.state_features + self.image_features]

    @property
    def state_dim(self) -> int:
        return sum(f.dim for f in self.state_features)

    # -- (de)serialization ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "features": {k: f.to_dict() for k, f in self.features.items()},
            "fps": self.fps,
            "n_obs_steps": self.n_obs_steps,
            "horizon": self.horizon,
            "n_action_steps": self.n_action_steps,
            "tasks": list(self.tasks),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureSpec":
        try:
            return cls(
                features={k: Feature.from_dict(v) for k, v in d["features"].items()},
                fps=float(d["fps"]),
                n_obs_steps=int(d.get("n_obs_steps", 2)),
                horizon=int(d.get("horizon", 16)),
                n_action_steps=int(d.get("n_action_steps", 8)),
                tasks=list(d.get("tasks", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SpecMismatchError(f"malformed feature spec: {e!r}") from e

    def with_timing(self, n_obs_steps: int, horizon: int, n_action_steps: int) -> "FeatureSpec":
        if not 1 <= n_action_steps <= horizon:
            raise SpecMismatchError(
                f"need 1 <= n_action_steps (Ta={n_action_steps}) <= horizon (Tp={horizon})"
            )
        if n_obs_steps < 1:
            raise SpecMismatchError(f"n_obs_steps (To) must be >= 1, got {n_obs_steps}")
        return dataclasses.replace(
            self, n_obs_steps=n_obs_steps, horizon=horizon, n_action_steps=n_action_steps
        )

    # -- contract checks -----------------------------------------------------------------
    def check_compatible(
        self,
        other: "FeatureSpec",
        this_side: str,
        other_side: str,
        keys: list[str] | None = None,
        check_fps: bool = True,
    ) -> None:
        """Raise :class:`SpecMismatchError` naming both sides if features disagree.

        ``keys`` restricts the check (default: every feature of ``self``); the other side
        may have extra features. Shapes must match exactly: no silent reshapes. Where both
        sides name the dimensions, the names must match too (same shape, other meaning).
        """
        problems: list[str] = []
        for key in keys if keys is not None else list(self.features):
            mine = self.features.get(key)
            theirs = other.features.get(key)
            if mine is None:
                problems.append(f"{key!r} missing in {this_side}")
            elif theirs is None:
                problems.append(f"{key!r} missing in {other_side}")
            elif tuple(mine.shape) != tuple(theirs.shape):
                problems.append(
                    f"{key!r} has shape {tuple(mine.shape)} in {this_side} "
                    f"but {tuple(theirs.shape)} in {other_side}"
                )
            elif mine.names is not None and theirs.names is not None and list(mine.names) != list(theirs.names):
                i = next(i for i, (a, b) in enumerate(zip(mine.names, theirs.names)) if a != b)
                problems.append(
                    f"{key!r} dimension {i} is {mine.names[i]!r} in {this_side} but {theirs.names[i]!r} "
                    f"in {other_side} (names {list(mine.names)} vs {list(theirs.names)})"
                )
        if check_fps and abs(self.fps - other.fps) > 1e-6:
            problems.append(f"fps is {self.fps:g} in {this_side} but {other.fps:g} in {other_side}")
        if problems:
            raise SpecMismatchError(
                f"feature spec of {this_side} does not match {other_side}: " + "; ".join(problems)
            )

    def check_fits_env(
        self, obs_space: Mapping[str, Any], action_dim: int, fps: float, names: Mapping[str, list[str]] | None,
        this_side: str, env_side: str,
    ) -> None:
        """:meth:`check_compatible` on this spec's observations, action and fps against an env's (one env's
        observation space, its action width and fps, ``names``: its ``feature_names``)."""
        env_spec = spec_from_observation_space(obs_space, action_dim, fps, names=names)
        self.check_compatible(env_spec, this_side, env_side, keys=self.observation_keys + [ACTION], check_fps=True)


def check_instruction(task: object, known: list[str]) -> str:
    """``task`` if it is one of the ``known`` instructions, else :class:`InstructionError` saying why."""
    if not isinstance(task, str) or not task.strip():
        raise InstructionError(f"empty instruction {task!r}; expected one of: {', '.join(map(repr, known))}")
    if task not in known:
        raise InstructionError(f"unknown instruction {task!r}; expected one of: {', '.join(map(repr, known))}")
    return task


def spec_from_observation_space(
    obs_space: Mapping[str, Any], action_dim: int, fps: float, task: str | None = None,
    names: Mapping[str, list[str]] | None = None,
) -> FeatureSpec:
    """Build a (statistics-free) spec from a gymnasium Dict observation space (``names``: the
    env's per-dimension feature names, e.g. ``env.feature_names``)."""
    names = names or {}
    feats = {
        k: Feature(k, tuple(space.shape), "uint8" if feature_kind(k) == "image" else "float32", names.get(k))
        for k, space in obs_space.items()
    }
    feats[ACTION] = Feature(ACTION, (action_dim,), names=names.get(ACTION))
    return FeatureSpec(features=feats, fps=fps, tasks=[task] if task else [])
