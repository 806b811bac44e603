"""Envs and their scripted experts, registered by name.

``make_env("lift", cameras=("agentview",), image_size=64)`` builds an env;
``make_expert("lift")`` builds the scripted expert that solves it.

An env name is one of:

* a built-in task (``push``, ``multitask``, ``lift``, ``stack``, ``can``);
* a task from a plugin: an installed distribution that declares an entry point in the
  ``robopolicy.envs`` group (see :data:`ENTRY_POINT_GROUP` and :func:`_load_plugins`);
* ``robosuite:<Env>``: any single-arm robosuite environment (``robosuite:Door``), wrapped
  generically, without a scripted expert;
* ``module:attr`` (a quick try, no packaging): ``attr`` is a :class:`RobopolicyEnv`
  subclass, a function returning a :class:`RobopolicyEnv`, or an :class:`EnvEntry`.

Names resolve in that order, so built-ins cannot be shadowed. Plugins are loaded only when
a name is not built in (or when listing), so a broken plugin never stops a built-in env;
its error is one line naming the entry point and its distribution. Every process resolves
names the same way (entry points are read from the installed metadata, ``module:attr`` is
imported on demand), so the sim bridge's process and RL worker processes see the same envs.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import gymnasium as gym
import numpy as np

from robopolicy.errors import RobopolicyError, UnknownNameError
from robopolicy.sim.base import RobopolicyEnv
from robopolicy.spec import ACTION, STATE

#: The entry point group a distribution declares its envs in (``[project.entry-points."robopolicy.envs"]``).
ENTRY_POINT_GROUP = "robopolicy.envs"
#: Prefix of the generic robosuite wrapper's names (``robosuite:Door``).
ROBOSUITE_PREFIX = "robosuite:"
#: The hooks a :class:`RobopolicyEnv` subclass must implement.
REQUIRED_HOOKS = ("model", "data", "_reset_task", "_apply_action", "_observe", "_is_success", "_dense_reward")


class Expert(Protocol):
    """A scripted demonstrator: reset once per episode, then one action per step."""

    def reset(self, env: RobopolicyEnv, rng: np.random.Generator) -> None: ...

    def act(self, env: RobopolicyEnv, obs: dict[str, np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class EnvEntry:
    """One task: how to build it (``make(**kwargs)``: the :class:`RobopolicyEnv` keyword
    arguments ``max_episode_steps``, ``dense_reward``, ``terminate_on_success``,
    ``randomization``, ``cameras``, ``image_size``), its scripted expert (``None``: none,
    demonstrations come from teleoperation or recordings), a one-line description and its camera names."""

    name: str
    make: Callable[..., RobopolicyEnv]
    make_expert: Callable[[], Expert] | None = None
    description: str = ""
    cameras: tuple[str, ...] = ()
    #: Where it comes from: ``builtin``, ``plugin <entry point> (<distribution> <version>)``,
    #: ``robosuite`` or ``module``.
    source: str = "builtin"


_REGISTRY: dict[str, EnvEntry] = {}
_builtins_loaded = False
_plugins_loaded = False
#: One line per plugin that failed to load (shown by ``robopolicy envs`` and unknown-name errors).
_PLUGIN_ERRORS: list[str] = []


def register_env(entry: EnvEntry) -> None:
    _REGISTRY[entry.name] = entry


def _load_builtin() -> None:
    # The task modules register on import; robosuite itself is imported only when a
    # robosuite env is built (it takes seconds and the light tasks do not need it).
    global _builtins_loaded
    if not _builtins_loaded:
        from robopolicy.sim import tasks  # noqa: F401

        _builtins_loaded = True


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _entries_from(obj: Any, where: str) -> list[EnvEntry]:
    """The :class:`EnvEntry` objects an entry point (or ``module:attr``) resolves to: an
    EnvEntry, or a callable taking no arguments that returns one or an iterable of them."""
    if isinstance(obj, EnvEntry):
        return [obj]
    if not callable(obj) or inspect.isclass(obj):
        raise RobopolicyError(f"{where} is a {type(obj).__name__}, not an EnvEntry or a function returning EnvEntry objects")
    result = obj()
    items: Iterable[Any] = [result] if isinstance(result, EnvEntry) else result
    try:
        entries = list(items)
    except TypeError:
        raise RobopolicyError(f"{where} returned a {type(result).__name__}, not an EnvEntry or a list of them") from None
    for e in entries:
        if not isinstance(e, EnvEntry):
            raise RobopolicyError(f"{where} returned a {type(e).__name__} among its entries, not an EnvEntry")
        if not isinstance(e.name, str) or not e.name or ":" in e.name or e.name != e.name.strip():
            raise RobopolicyError(f"{where}: env name {e.name!r} must be a non-empty string without ':' or spaces")
        if not callable(e.make):
            raise RobopolicyError(f"{where}: env {e.name!r} has no callable 'make'")
    return entries


def _load_plugins() -> None:
    """Register the envs of every ``robopolicy.envs`` entry point, once per process.

    The contract: an entry point names an :class:`EnvEntry`, or a callable taking no
    arguments that returns one EnvEntry or an iterable of them. The env names are the
    entries' names (not the entry point's). A plugin that fails (import error, wrong type,
    an exception, a name already taken) registers nothing and leaves one line in
    :data:`_PLUGIN_ERRORS`; the other plugins and the built-ins are unaffected.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    _load_builtin()
    try:
        eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception as e:  # a corrupt installed distribution's metadata
        _PLUGIN_ERRORS.append(f"cannot read the {ENTRY_POINT_GROUP!r} entry points: {_one_line(e)}")
        return
    seen: set[tuple[str, str]] = set()
    for ep in sorted(eps, key=lambda ep: (ep.name, ep.value)):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
        if (ep.name, ep.value) in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add((ep.name, ep.value))
        label = f"env plugin {ep.name!r} = {ep.value!r} (distribution {dist})"
        try:
            entries = _entries_from(ep.load(), label)
            for e in entries:
                if e.name in _REGISTRY:
                    raise RobopolicyError(f"{label}: env name {e.name!r} is already taken by {_REGISTRY[e.name].source}")
        except RobopolicyError as e:
            _PLUGIN_ERRORS.append(str(e) if str(e).startswith(label) else f"{label}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - whatever a user's module raises on import
            _PLUGIN_ERRORS.append(f"{label} failed to load: {_one_line(e)}")
            continue
        for e in entries:
            register_env(dataclasses.replace(e, source=f"plugin {ep.name} ({dist})"))


def plugin_errors() -> list[str]:
    """One line per ``robopolicy.envs`` plugin that failed to load (after loading them)."""
    _load_plugins()
    return list(_PLUGIN_ERRORS)


def _missing_hooks(cls: type) -> list[str]:
    return [h for h in REQUIRED_HOOKS if getattr(cls, h, None) is getattr(RobopolicyEnv, h)]


def check_env(env: Any, where: str) -> RobopolicyEnv:
    """``env`` if it keeps the robopolicy env contract; else an error naming what is missing."""
    if not isinstance(env, RobopolicyEnv):
        what = "a gymnasium.Env" if isinstance(env, gym.Env) else f"a {type(env).__name__}"
        raise RobopolicyError(f"{where} built {what}, not a robopolicy.sim.RobopolicyEnv: subclass RobopolicyEnv "
                              f"and implement {', '.join(REQUIRED_HOOKS)}")
    missing = []
    obs_space = getattr(env, "observation_space", None)
    if not isinstance(obs_space, gym.spaces.Dict) or STATE not in obs_space.spaces:
        missing.append(f"observation_space (a gymnasium.spaces.Dict with {STATE!r})")
    act_space = getattr(env, "action_space", None)
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        missing.append("action_space (a 1-D gymnasium.spaces.Box)")
    names = getattr(env, "feature_names", None) or {}
    for key, space in ((STATE, obs_space.spaces.get(STATE) if isinstance(obs_space, gym.spaces.Dict) else None),
                       (ACTION, act_space)):
        if space is not None and len(names.get(key, ())) != int(np.prod(space.shape)):
            missing.append(f"feature_names[{key!r}] (one name per dimension, {int(np.prod(space.shape))})")
    if not (isinstance(getattr(env, "fps", None), (int, float)) and env.fps > 0):
        missing.append("fps (> 0)")
    if missing:
        env.close()
        raise RobopolicyError(f"{where}: the env lacks {'; '.join(missing)}")
    return env


def _checked_make(make: Callable[..., Any], where: str) -> Callable[..., RobopolicyEnv]:
    def build(**kwargs: Any) -> RobopolicyEnv:
        return check_env(make(**kwargs), where)

    return build


def _import_attr(name: str) -> Any:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise RobopolicyError(f"env {name!r}: expected module:attr (e.g. my_tasks:MyEnv)")
    # Like `python -m`, a module in the current directory can be named (the sim bridge's
    # process is started with `python -m` from the same directory, so it sees it too).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise RobopolicyError(f"env {name!r}: no module named {module_name!r} (put it on PYTHONPATH or in the "
                                  f"current directory)") from None
        raise RobopolicyError(f"env {name!r}: importing {module_name!r} failed: {_one_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - whatever a user's module raises on import
        raise RobopolicyError(f"env {name!r}: importing {module_name!r} failed: {_one_line(e)}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RobopolicyError(f"env {name!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _module_entry(name: str) -> EnvEntry:
    """The entry for ``module:attr``; ``name`` itself is its name (datasets record it, and
    eval, fine-tuning and the sim bridge rebuild the env from it)."""
    obj = _import_attr(name)
    where = f"env {name!r}"
    if isinstance(obj, EnvEntry):
        return dataclasses.replace(obj, name=name, make=_checked_make(obj.make, where), source="module")
    if inspect.isclass(obj):
        if not issubclass(obj, RobopolicyEnv):
            what = "a gymnasium.Env subclass" if issubclass(obj, gym.Env) else f"the class {obj.__name__}"
            raise RobopolicyError(f"{where} is {what}, not a robopolicy.sim.RobopolicyEnv subclass: subclass "
                                  f"RobopolicyEnv and implement {', '.join(REQUIRED_HOOKS)}")
        missing = _missing_hooks(obj)
        if missing:
            raise RobopolicyError(f"{where}: {obj.__name__} does not implement {', '.join(missing)}")
        doc = (inspect.getdoc(obj) or "").split("\n")[0]
        return EnvEntry(name, _checked_make(obj, where), None, doc or obj.__name__, source="module")
    if callable(obj):
        doc = (inspect.getdoc(obj) or "").split("\n")[0]
        return EnvEntry(name, _checked_make(obj, where), None, doc or getattr(obj, "__name__", name), source="module")
    raise RobopolicyError(f"{where} is a {type(obj).__name__}, not a RobopolicyEnv subclass, a function returning "
                          f"one, or an EnvEntry")


def env_entry(name: str) -> EnvEntry:
    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(ROBOSUITE_PREFIX):
        from robopolicy.sim.robosuite_tasks import generic_entry

        return generic_entry(name.removeprefix(ROBOSUITE_PREFIX))
    _load_plugins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _module_entry(name)
    known = [*_REGISTRY, "robosuite:<Env>", "module:Class"]
    if _PLUGIN_ERRORS:
        raise RobopolicyError(f"{UnknownNameError('env', name, known)}; also, " + "; ".join(_PLUGIN_ERRORS))
    raise UnknownNameError("env", name, known)


def env_names() -> list[str]:
    """Every registered env: the built-ins and those of the plugins that loaded."""
    _load_plugins()
    return sorted(_REGISTRY)


def make_env(name: str, **kwargs: Any) -> RobopolicyEnv:
    """Build the env ``name`` (see the module docstring); kwargs go to its constructor."""
    return env_entry(name).make(**kwargs)


def has_expert(name: str) -> bool:
    return env_entry(name).make_expert is not None


def make_expert(name: str) -> Expert:
    entry = env_entry(name)
    if entry.make_expert is None:
        raise RobopolicyError(
            f"no scripted expert for {name}: collect needs one. Teleoperate it (robopolicy teleop --env {name} "
            "--out DIR), import recordings (robopolicy dataset import-bag), or give its EnvEntry a make_expert")
    return entry.make_expert()
