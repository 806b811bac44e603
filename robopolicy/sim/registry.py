"""Envs and their scripted experts, registered by name.

``make_env("lift", cameras=("agentview",), image_size=64)`` builds an env;
``make_expert("lift", env)`` builds the scripted expert that solves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from robopolicy.errors import UnknownNameError
from robopolicy.sim.base import RobopolicyEnv


class Expert(Protocol):
    """A scripted demonstrator: reset once per episode, then one action per step."""

    def reset(self, env: RobopolicyEnv, rng: np.random.Generator) -> None: ...

    def act(self, env: RobopolicyEnv, obs: dict[str, np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class EnvEntry:
    name: str
    make: Callable[..., RobopolicyEnv]
    make_expert: Callable[[], Expert]
    description: str
    cameras: tuple[str, ...]


_REGISTRY: dict[str, EnvEntry] = {}
_builtins_loaded = False


def register_env(entry: EnvEntry) -> None:
    _REGISTRY[entry.name] = entry


def _load_builtin() -> None:
    # The task modules register on import; robosuite itself is imported only when a
    # robosuite env is built (it takes seconds and the light tasks do not need it).
    global _builtins_loaded
    if not _builtins_loaded:
        from robopolicy.sim import tasks  # noqa: F401

        _builtins_loaded = True


def env_entry(name: str) -> EnvEntry:
    _load_builtin()
    if name not in _REGISTRY:
        raise UnknownNameError("env", name, list(_REGISTRY))
    return _REGISTRY[name]


def env_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_env(name: str, **kwargs: Any) -> RobopolicyEnv:
    """Build the env registered as ``name``; kwargs go to its constructor."""
    return env_entry(name).make(**kwargs)


def make_expert(name: str) -> Expert:
    return env_entry(name).make_expert()
