"""The off-policy training loop shared by residual RL and the SAC baseline.

Each iteration: act on every env (agent action on top of the base action, if any) -> run
the gradient updates due for the transitions stored so far (``utd`` per env step after
``learning_starts``; batches mix online and demo transitions), overlapped with the
simulation when the envs run in worker processes -> store the new transitions -> periodically
evaluate with the real evaluator (:func:`robopolicy.train.evaluate.evaluate`, fixed seeds)
-> checkpoint. What differs between algorithms lives in the :class:`Agent`.

A run folder holds ``checkpoints/step_NNNNNNNNN/`` (inference policy, ``train_state``
safetensors + JSON, ``replay.safetensors``; staged, fsynced and renamed into place, then
``checkpoints/last`` moves), ``log.json`` (args, curves, throughput) and
``learning_curve.png``. ``resume`` restores networks, optimizers, counters, RNG states and
the replay buffer; episodes that were running at the checkpoint are abandoned (their
transitions stay in replay and bootstrap where they stop).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import save_file

from robopolicy import progress
from robopolicy.atomic_io import write_json_atomic
from robopolicy.errors import CheckpointError
from robopolicy.rl.config import OffPolicyArgs
from robopolicy.rl.curves import plot_learning_curves
from robopolicy.rl.envs import ChunkRunner, close_vector_env, final_observations, step_success
from robopolicy.rl.networks import ObservationFlattener
from robopolicy.rl.replay import Batch, ReplayBuffer, sample_mixed
from robopolicy.train.checkpoint import (
    commit_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    load_tensors,
    load_weights,
    resolve_checkpoint,
)
from robopolicy.inference import ChunkPredictor
from robopolicy.train.evaluate import EvalConfig, evaluate

TRAIN_STATE = "train_state"
REPLAY = "replay.safetensors"


class Agent(Protocol):
    """What the loop needs from an algorithm."""

    def act(self, state: torch.Tensor, base: torch.Tensor, explore: bool, warmup: bool) -> torch.Tensor:
        """Actions ``[N, Da]`` for raw states ``[N, Ds]``, base actions ``[N, Db]`` (``Db`` may be 0); CPU tensors."""
        ...

    def update(self, batch: Batch, update_actor: bool) -> dict[str, float]:
        """One critic update (and one actor update if ``update_actor``) on a CPU batch."""
        ...

    def predictor(self) -> ChunkPredictor:
        """The current policy for :func:`~robopolicy.train.evaluate.evaluate`."""
        ...

    def modules(self) -> dict[str, torch.nn.Module]: ...

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...


@dataclass
class RunState:
    """Counters and curves of a run (saved in ``train_state.json``)."""

    env_steps: int = 0
    updates: int = 0
    episodes: int = 0
    history: dict[str, list[Any]] = field(default_factory=lambda: {"eval": [], "train": [], "losses": []})


class Stopwatch:
    """Accumulated wall time per named section."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


@dataclass
class Setup:
    """Everything :func:`train` runs on, built by the algorithm's entry point."""

    args: OffPolicyArgs
    env_name: str
    envs: gym.vector.VectorEnv
    agent: Agent
    features: ObservationFlattener
    online: ReplayBuffer
    demos: ReplayBuffer | None
    runner: ChunkRunner | None  # the frozen base policy; None for from-scratch RL
    write_policy: Callable[[Path, RunState], None] | None  # inference policy into a checkpoint folder
    label: str
    extra_log: dict[str, Any] = field(default_factory=dict)


def train(s: Setup) -> dict[str, Any]:
    """Run (or resume) the loop until ``args.steps`` env steps; returns the summary (also in ``log.json``)."""
    try:
        summary = _train(s)
    except BaseException:
        close_vector_env(s.envs, failed=True)
        raise
    close_vector_env(s.envs)
    return summary


def _train(s: Setup) -> dict[str, Any]:
    args, n = s.args, s.args.num_envs
    out = Path(args.out)
    state, rng = RunState(), np.random.default_rng(args.seed)
    if args.resume:
        state, rng = _restore(out, s)
    out.mkdir(parents=True, exist_ok=True)
    clock, window = Stopwatch(), collections.deque(maxlen=args.log_window)
    start, first_step = time.perf_counter(), state.env_steps
    if not state.history["eval"] and args.eval_episodes:
        _evaluate(s, state, clock)

    with clock("sim"):
        obs, info = s.envs.reset(seed=args.seed * 1_000_003 + state.env_steps)
    tasks = list(info["task"])
    x = s.features.flatten(_tensors(obs))
    base = _base_actions(s, obs, np.arange(n), np.ones(n, bool), tasks, clock)
    ep_return, ep_length = np.zeros(n), np.zeros(n, np.int64)
    metrics: dict[str, float] = {}
    next_eval = _next_multiple(state.env_steps, args.eval_every)
    next_save = _next_multiple(state.env_steps, args.save_every)
    next_log = _next_multiple(state.env_steps, args.log_every)
    bar = progress.progress(total=args.steps, initial=state.env_steps, unit="step",
                            disable=not args.progress, desc=f"{s.label} {s.env_name}")
    overlap = isinstance(s.envs, gym.vector.AsyncVectorEnv)  # workers simulate while this process learns
    while state.env_steps < args.steps:
        with clock("act"):
            action = s.agent.act(x, base, explore=True, warmup=state.env_steps < args.learning_starts).numpy()
        if overlap:
            s.envs.step_async(action)
        due = int((state.env_steps - args.learning_starts) * args.utd) if state.env_steps >= args.learning_starts else 0
        with clock("update"):
            while state.updates < due:
                batch = sample_mixed(s.online, s.demos, args.batch_size, args.demo_fraction, args.n_step,
                                     args.gamma, rng)
                actor = state.env_steps >= args.actor_starts and state.updates % args.actor_delay == 0
                metrics.update(s.agent.update(batch, actor))
                state.updates += 1
        with clock("sim"):
            obs, reward, terminated, truncated, info = s.envs.step_wait() if overlap else s.envs.step(action)
        done = terminated | truncated
        reached = final_observations(obs, info, done)
        x_next = s.features.flatten(_tensors(reached))
        # Base action at the state reached: needed to bootstrap (not after a terminal).
        next_base = torch.zeros_like(base)
        goes_on = np.flatnonzero(~terminated)
        if len(goes_on):
            next_base[goes_on] = _base_actions(s, _rows(reached, goes_on), goes_on, np.zeros(len(goes_on), bool),
                                               [tasks[i] for i in goes_on], clock)
        with clock("replay"):
            s.online.add(x.numpy(), base.numpy(), action, reward, x_next.numpy(), next_base.numpy(),
                         terminated, truncated)
        ep_return += reward
        ep_length += 1
        success = step_success(info, done)
        for i in np.flatnonzero(done):
            window.append((bool(success[i]), float(ep_return[i]), int(ep_length[i])))
            state.episodes += 1
        ep_return[done], ep_length[done] = 0.0, 0
        tasks = list(info["task"])
        x, base = x_next, next_base
        restarted = np.flatnonzero(done)
        if len(restarted):
            x[restarted] = s.features.flatten(_tensors(_rows(obs, restarted)))
            base[restarted] = _base_actions(s, _rows(obs, restarted), restarted, np.ones(len(restarted), bool),
                                            [tasks[i] for i in restarted], clock)
        state.env_steps += n
        bar.update(n)

        if state.env_steps >= next_log or state.env_steps >= args.steps:
            next_log = _next_multiple(state.env_steps, args.log_every)
            if window:
                wins, returns, _ = zip(*window)
                state.history["train"].append([state.env_steps, float(np.mean(wins)), float(np.mean(returns)),
                                               state.episodes])
            if metrics:
                state.history["losses"].append({"env_steps": state.env_steps, **metrics})
            bar.set_postfix(_postfix(state, clock, start))
        last = state.env_steps >= args.steps
        if args.eval_episodes and (last or state.env_steps >= next_eval):
            next_eval = _next_multiple(state.env_steps, args.eval_every)
            _evaluate(s, state, clock)
            _write_log(s, state, clock, start, first_step)
            bar.set_postfix(_postfix(state, clock, start))
        if s.write_policy is not None and (last or state.env_steps >= next_save):
            next_save = _next_multiple(state.env_steps, args.save_every)
            with clock("save"):
                _save(out, s, state, rng)
    bar.close()
    return _write_log(s, state, clock, start, first_step)


# ---- helpers -------------------------------------------------------------------------------
def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every if every else 1 << 62


def _tensors(obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in obs.items()}


def _rows(obs: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in obs.items()}


def _base_actions(s: Setup, obs: dict[str, np.ndarray], envs: np.ndarray, fresh: np.ndarray, tasks: list[str],
                  clock: Stopwatch) -> torch.Tensor:
    if s.runner is None:
        return torch.zeros(len(envs), 0)
    with clock("base"):
        return torch.from_numpy(s.runner.act(obs, envs, fresh, tasks))


def _evaluate(s: Setup, state: RunState, clock: Stopwatch) -> None:
    args = s.args
    with clock("eval"):
        result = evaluate(s.agent.predictor(), EvalConfig(
            env=s.env_name, episodes=args.eval_episodes, seed=args.eval_seed, randomize=args.randomize,
            progress=False, max_episode_steps=args.max_episode_steps))
    state.history["eval"].append([state.env_steps, result.success_rate])
    if args.progress:
        progress.write(f"{s.label} step {state.env_steps}: eval success {result.success_rate:.0%} "
                   f"over {result.episodes} episodes (95% CI {result.ci95[0]:.0%}-{result.ci95[1]:.0%})")


def _throughput(state: RunState, clock: Stopwatch, start: float, first_step: int) -> dict[str, float]:
    """Env steps/s of this session (evaluation and checkpointing excluded) and the share of each part."""
    total = time.perf_counter() - start
    training = max(total - clock.seconds["eval"] - clock.seconds["save"], 1e-9)
    parts = {k: clock.seconds[k] for k in ("sim", "base", "update", "act", "replay")}
    return {
        "env_steps_per_s": (state.env_steps - first_step) / training,
        "training_seconds": training, "eval_seconds": clock.seconds["eval"], "save_seconds": clock.seconds["save"],
        **{f"share_{k}": v / training for k, v in parts.items()},
        "share_other": max(0.0, 1.0 - sum(parts.values()) / training),
    }


def _postfix(state: RunState, clock: Stopwatch, start: float) -> dict[str, str]:
    post = {}
    if state.history["train"]:
        post["train_success"] = f"{state.history['train'][-1][1]:.0%}"
    if state.history["eval"]:
        post["eval"] = f"{state.history['eval'][-1][1]:.0%}"
    post["sim"] = f"{clock.seconds['sim'] / max(time.perf_counter() - start - clock.seconds['eval'], 1e-9):.0%}"
    return post


def _write_log(s: Setup, state: RunState, clock: Stopwatch, start: float, first_step: int) -> dict[str, Any]:
    out = Path(s.args.out)
    summary = {
        "algorithm": s.label, "env": s.env_name, "env_steps": state.env_steps, "updates": state.updates,
        "episodes": state.episodes,
        "initial_eval_success": state.history["eval"][0][1] if state.history["eval"] else None,
        "final_eval_success": state.history["eval"][-1][1] if state.history["eval"] else None,
        "throughput": _throughput(state, clock, start, first_step), "run_dir": str(out),
    }
    write_json_atomic(out / "log.json", {"summary": summary, "args": s.args.to_json(), **s.extra_log,
                                         "history": state.history})
    plot_learning_curves({s.label: state.history}, out / "learning_curve.png",
                         title=f"{s.label} on {s.env_name}{' (randomized)' if s.args.randomize else ''}")
    return summary


# ---- checkpoints -----------------------------------------------------------------------------
def _save(out: Path, s: Setup, state: RunState, rng: np.random.Generator, keep: int = 2) -> Path:
    """Stage a checkpoint (policy, train state, replay), fsync, rename into place, move ``last``."""
    root = out / "checkpoints"
    final = root / f"step_{state.env_steps:09d}"
    stage = root / f".{final.name}.staging"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    s.write_policy(stage, state)
    tensors = {f"module.{name}.{k}": v for name, m in s.agent.modules().items() for k, v in m.state_dict().items()}
    optimizers = {}
    for name, opt in s.agent.optimizers().items():
        flat, optimizers[name] = optimizer_to_flat(opt)
        tensors.update({f"optimizer.{name}.{k}": v for k, v in flat.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if s.runner is not None:
        tensors["rng.base"] = s.runner.generator.get_state()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(stage / f"{TRAIN_STATE}.safetensors"))
    write_json_atomic(stage / f"{TRAIN_STATE}.json", {
        "algorithm": s.label, "state": dataclasses.asdict(state), "numpy_rng": rng.bit_generator.state,
        "optimizers": optimizers, "args": s.args.to_json()})
    s.online.save(stage / REPLAY)
    return commit_checkpoint(stage, final, keep)


def _restore(out: Path, s: Setup) -> tuple[RunState, np.random.Generator]:
    """Networks, optimizers, RNGs, counters and replay from the run's last checkpoint."""
    ckpt = resolve_checkpoint(out)
    tensors = load_tensors(ckpt / f"{TRAIN_STATE}.safetensors")
    try:
        meta = json.loads((ckpt / f"{TRAIN_STATE}.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / TRAIN_STATE}.json is unreadable or corrupt: {e}") from e
    if meta.get("algorithm") != s.label:
        raise CheckpointError(f"cannot resume: {ckpt} holds a {meta.get('algorithm')!r} run, not {s.label!r}")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    for name, module in s.agent.modules().items():
        load_weights(module, part(f"module.{name}."), f"{ckpt / TRAIN_STATE}.safetensors ({name})")
    for name, opt in s.agent.optimizers().items():
        opt.load_state_dict(optimizer_from_flat(part(f"optimizer.{name}."), meta["optimizers"][name]))
    torch.set_rng_state(tensors["rng.torch"])
    if s.runner is not None:
        s.runner.generator.set_state(tensors["rng.base"])
    s.online.load(ckpt / REPLAY)
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["numpy_rng"]
    state = RunState(**meta["state"])
    if s.args.progress:
        progress.write(f"resumed {out} at env step {state.env_steps} ({len(s.online)} transitions in replay)")
    return state, rng
