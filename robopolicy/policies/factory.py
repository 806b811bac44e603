"""Policy families by name, and configs to and from plain (JSON-friendly) dicts."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from robopolicy.errors import RobopolicyError, UnknownNameError
from robopolicy.policies.base import Policy, PolicyConfig
from robopolicy.policies.diffusion import DiffusionPolicy
from robopolicy.policies.flow import FlowPolicy
from robopolicy.policies.vla import VLAPolicy
from robopolicy.spec import FeatureSpec

POLICIES: dict[str, type[Policy]] = {cls.config_class.type: cls for cls in (DiffusionPolicy, FlowPolicy, VLAPolicy)}


def policy_families() -> list[str]:
    """Registered policy type names."""
    return sorted(POLICIES)


def policy_class(type_name: str) -> type[Policy]:
    if type_name not in POLICIES:
        raise UnknownNameError("policy", type_name, list(POLICIES))
    return POLICIES[type_name]


def config_from_dict(type_name: str, values: Mapping[str, Any]) -> PolicyConfig:
    """Build the config of ``type_name`` from ``values`` (field -> value; missing fields keep defaults).

    Values are type-checked against the field annotations (lists are accepted for tuple
    fields, ints for float fields); an optional ``"type"`` entry must equal ``type_name``.
    """
    cls = policy_class(type_name).config_class
    values = dict(values)
    stated = values.pop("type", type_name)
    if stated != type_name:
        raise RobopolicyError(f"config says type {stated!r} but policy {type_name!r} was asked for")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise RobopolicyError(
            f"unknown field(s) {', '.join(map(repr, unknown))} for policy {type_name!r}; "
            f"its fields are: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in values.items():
        try:
            kwargs[name] = _check_type(value, hints[name])
        except TypeError:
            raise RobopolicyError(
                f"policy {type_name!r} field {name!r} expects {_type_name(hints[name])}, got {value!r}"
            ) from None
    return cls(**kwargs)


def config_to_dict(cfg: PolicyConfig) -> dict[str, Any]:
    """``{"type": ..., field: value}`` with tuples as lists; inverse of :func:`config_from_dict`."""
    out: dict[str, Any] = {"type": cfg.type}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def make_policy(type_name: str, spec: FeatureSpec, overrides: Mapping[str, Any] | None = None) -> Policy:
    """A fresh policy of ``type_name`` for ``spec``: the family's config defaults, timing included,
    with ``overrides`` on top. The policy's spec then takes its timing from the config (a
    dataset's spec carries none of its own: only :class:`FeatureSpec`'s placeholders)."""
    config = config_from_dict(type_name, dict(overrides or {}))
    policy = policy_class(type_name)(config, spec)
    policy.setup_new()
    return policy


def _check_type(value: Any, tp: Any) -> Any:
    """``value`` (converted where lossless: list -> tuple, int -> float) if it fits ``tp``, else TypeError."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_check_type(v, args[0]) for v in value)
            if len(args) == len(value):
                return tuple(_check_type(v, a) for v, a in zip(value, args))
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg)
            except TypeError:
                continue
    elif tp is type(None):
        if value is None:
            return None
    else:
        raise NotImplementedError(f"config annotation {tp!r} is not supported")
    raise TypeError(f"{value!r} is not {tp!r}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
