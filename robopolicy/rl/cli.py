"""``robopolicy finetune``: the subcommand, with one flag per :class:`ResidualArgs` field.

``robopolicy.cli`` registers it with ``add_finetune(subparsers)``. Flags are generated
from the dataclass (``--num-envs``, ``--action-scale``, ``--critic-hidden 256,256``, ...)
so the CLI and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from robopolicy.rl.config import ResidualArgs

HELP = {
    "checkpoint": "BC run folder (or checkpoint) whose policy stays frozen as the base",
    "env": "task name (default: the env the base policy's data came from)",
    "out": "run folder: checkpoints, log.json, learning_curve.png",
    "steps": "environment steps in total (summed over envs)",
    "num_envs": "parallel envs",
    "vector": "async: worker processes (robosuite); sync: in-process (fast own-MJCF tasks)",
    "randomize": "domain randomization in training and evaluation",
    "dense_reward": "the task's shaped reward instead of sparse success (needs --demo-fraction 0)",
    "resume": "continue the run in --out from its last checkpoint (--checkpoint not needed)",
    "demos": "demonstrations mixed into replay (default: the base's training dataset)",
    "demo_fraction": "share of each batch drawn from the demonstrations",
    "action_scale": "largest residual per action dimension, in env action units",
    "utd": "gradient updates per environment step",
    "num_critics": "critic ensemble size",
    "critic_subset": "critics in the min of the TD target (REDQ)",
    "eval_every": "env steps between evaluations (0: only at start and end)",
}


def _flag_type(tp: Any) -> tuple[dict[str, Any], Any]:
    """argparse keyword arguments for a field annotation, and the annotation without ``None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}, tp
    if typing.get_origin(tp) is typing.Literal:
        return {"choices": list(args)}, tp
    if typing.get_origin(tp) is tuple:
        return {"type": lambda s: tuple(int(v) for v in s.split(",") if v.strip()), "metavar": "N,N"}, tp
    return {"type": tp}, tp


def add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="residual off-policy RL on top of a frozen BC policy, in sim")
    hints = typing.get_type_hints(ResidualArgs)
    for f in dataclasses.fields(ResidualArgs):
        kwargs, _ = _flag_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = " ".join(t for t in (HELP.get(f.name, ""), f"(default: {shown})" if default is not None else "") if t)
        p.add_argument(f"--{f.name.replace('_', '-')}", default=default, help=text or None, **kwargs)
    p.set_defaults(func=cmd_finetune)


def residual_args(ns: argparse.Namespace) -> ResidualArgs:
    """The :class:`ResidualArgs` of parsed ``finetune`` flags."""
    return ResidualArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(ResidualArgs)})


def cmd_finetune(args: argparse.Namespace) -> int:
    from robopolicy.rl.residual import finetune

    s = finetune(residual_args(args))
    t = s["throughput"]
    evals = (f"eval success {s['initial_eval_success']:.0%} -> {s['final_eval_success']:.0%}; "
             if s["final_eval_success"] is not None else "")
    print(f"fine-tuned on {s['env']} for {s['env_steps']} env steps ({s['updates']} updates, "
          f"{s['episodes']} episodes): "
          f"{evals}"
          f"{t['env_steps_per_s']:.0f} env steps/s (sim {t['share_sim']:.0%}, base policy {t['share_base']:.0%}, "
          f"updates {t['share_update']:.0%}); run folder {s['run_dir']}")
    return 0
