"""Closed-loop evaluation in sim with receding-horizon chunk execution.

Works with anything that predicts chunks (:class:`robopolicy.inference.ChunkPredictor`):
a torch policy (wrapped by :class:`~robopolicy.inference.TorchChunkPredictor`) or an
exported one (``robopolicy.export.load_policy``).
A predictor may also correct each executed action (``correct_action``, e.g. a residual-RL
policy): the executor passes it the current observation and the planned action.
Reports success rate with a Wilson 95 % interval, episode length, inference latency
p50/p99, per-instruction success and instruction following for multi-task envs;
optional temporal ensembling, MP4 of rollouts, JSON results.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robopolicy.atomic_io import write_json_atomic
from robopolicy.errors import RobopolicyError
from robopolicy.inference import ChunkPredictor, TorchChunkPredictor
from robopolicy.progress import progress
from robopolicy.seeds import EVAL_SEED
from robopolicy.sim import Randomization, make_env
from robopolicy.spec import FeatureSpec
from robopolicy.stats import percentiles, wilson_interval


@dataclass
class EvalConfig:
    env: str
    episodes: int = 50
    seed: int = EVAL_SEED
    randomize: bool = False
    ensemble: bool = False
    ensemble_decay: float = 0.1
    video: Path | None = None
    video_episodes: int = 3
    instruction: str | None = None
    progress: bool = True
    max_episode_steps: int | None = None


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    length: int
    task: str
    achieved_task: str | None = None


@dataclass
class EvalResult:
    env: str
    episodes: int
    success_rate: float
    ci95: tuple[float, float]
    mean_length: float
    latency_ms_p50: float
    latency_ms_p99: float
    per_task: dict[str, dict[str, float]]
    instruction_following: float | None
    seconds: float
    episode_results: list[EpisodeResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        lo, hi = self.ci95
        lines = [
            f"env {self.env}: success {self.success_rate:.0%} ({sum(e.success for e in self.episode_results)}"
            f"/{self.episodes}), 95% CI [{lo:.0%}, {hi:.0%}]",
            f"mean episode length {self.mean_length:.1f} steps; chunk inference p50 {self.latency_ms_p50:.1f} ms,"
            f" p99 {self.latency_ms_p99:.1f} ms; {self.seconds:.0f} s",
        ]
        if len(self.per_task) > 1:
            lines.append(f"{'instruction':<44} {'episodes':>8} {'success':>8}")
            for task, r in self.per_task.items():
                lines.append(f"{task:<44} {int(r['episodes']):>8} {r['success_rate']:>8.0%}")
        if self.instruction_following is not None:
            lines.append(f"instruction following: {self.instruction_following:.0%} of episodes did the instructed task")
        return "\n".join(lines)


class ChunkExecutor:
    """Receding-horizon execution: keeps the To-step observation history and the action plan.

    Without ensembling a chunk of Ta actions is predicted when the plan runs out. With
    temporal ensembling a chunk is predicted every step and the actions that overlap the
    current step are averaged with weights ``exp(-decay * age)`` (ACT). A predictor's
    ``correct_action`` (if any) then adjusts the action to the current observation.
    """

    def __init__(self, predictor: ChunkPredictor, ensemble: bool = False, decay: float = 0.1) -> None:
        self.predictor = predictor
        self.n_obs = predictor.spec.n_obs_steps
        self.keys = predictor.spec.observation_keys
        self.ensemble, self.decay = ensemble, decay
        self.correct = getattr(predictor, "correct_action", None)
        self.latencies: list[float] = []

    def reset(self) -> None:
        self.history: collections.deque[dict[str, np.ndarray]] = collections.deque(maxlen=self.n_obs)
        self.plan: collections.deque[np.ndarray] = collections.deque()
        self.ensemble_buf: list[tuple[int, np.ndarray]] = []
        self.t = 0

    def _stacked(self, task: str) -> dict[str, Any]:
        out: dict[str, Any] = {k: np.stack([h[k] for h in self.history])[None] for k in self.keys}
        out["task"] = [task]
        return out

    def act(self, obs: dict[str, np.ndarray], task: str) -> np.ndarray:
        missing = [k for k in self.keys if k not in obs]
        if missing:
            raise RobopolicyError(f"policy needs observation features {missing} that the env does not provide")
        self.history.append(obs)
        while len(self.history) < self.n_obs:
            self.history.appendleft(self.history[0])
        if self.ensemble or not self.plan:
            start = time.perf_counter()
            chunk = np.asarray(self.predictor.predict_chunk(self._stacked(task)))[0]
            self.latencies.append(time.perf_counter() - start)
            if self.ensemble:
                self.ensemble_buf = [(t0, c) for t0, c in self.ensemble_buf if self.t - t0 < len(c)]
                self.ensemble_buf.append((self.t, chunk))
            else:
                self.plan.extend(chunk)
        self.t += 1
        if self.ensemble:
            ages = np.array([self.t - 1 - t0 for t0, _ in self.ensemble_buf], dtype=np.float64)
            w = np.exp(-self.decay * ages)
            acts = np.stack([c[self.t - 1 - t0] for t0, c in self.ensemble_buf])
            action = ((w[:, None] * acts).sum(0) / w.sum()).astype(acts.dtype)
        else:
            action = self.plan.popleft()
        return action if self.correct is None else self.correct(obs, action)


def evaluate(predictor: ChunkPredictor, cfg: EvalConfig, out_json: Path | None = None) -> EvalResult:
    """Roll out ``cfg.episodes`` seeded episodes and summarize them."""
    env = make_env(cfg.env, **env_kwargs(predictor.spec, cfg.randomize, cfg.max_episode_steps))
    predictor.spec.check_fits_env(env.observation_space, env.action_space.shape[0], env.fps, env.feature_names,
                                  "the policy", f"env {cfg.env!r}")
    executor = ChunkExecutor(predictor, cfg.ensemble, cfg.ensemble_decay)
    recorder = _VideoRecorder(env, cfg.video, cfg.video_episodes) if cfg.video else None
    results: list[EpisodeResult] = []
    start = time.perf_counter()
    bar = progress(range(cfg.episodes), desc=f"eval {cfg.env}", unit="ep", disable=not cfg.progress)
    for i in bar:
        seed = cfg.seed + i
        options = {"task": cfg.instruction} if cfg.instruction else None
        obs, info = env.reset(seed=seed, options=options)
        executor.reset()
        success, length, achieved = False, 0, None
        while True:
            if recorder:
                recorder.capture(i)
            obs, _, terminated, truncated, info = env.step(executor.act(obs, info["task"]))
            length += 1
            success = success or bool(info["is_success"])
            achieved = info.get("achieved_task", achieved) or achieved
            if terminated or truncated:
                break
        results.append(EpisodeResult(seed, success, length, info["task"], achieved))
        bar.set_postfix(success=f"{sum(r.success for r in results)}/{len(results)}")
    env.close()
    if recorder:
        recorder.close()
    result = summarize(cfg.env, results, executor.latencies, time.perf_counter() - start)
    if out_json is not None:
        write_json_atomic(Path(out_json), result.to_dict())
    return result


def env_kwargs(spec: FeatureSpec, randomize: bool, max_episode_steps: int | None = None) -> dict[str, Any]:
    """``make_env`` keyword arguments for a policy: its cameras, randomization, time limit."""
    kwargs: dict[str, Any] = {}
    cams = [f.name.split(".")[-1] for f in spec.image_features]
    if cams:
        kwargs.update(cameras=tuple(cams), image_size=spec.image_features[0].shape[0])
    if randomize:
        kwargs["randomization"] = Randomization.default_dr()
    if max_episode_steps:
        kwargs["max_episode_steps"] = max_episode_steps
    return kwargs


def evaluate_policy(policy: torch.nn.Module, cfg: EvalConfig, out_json: Path | None = None) -> EvalResult:
    return evaluate(TorchChunkPredictor(policy, seed=cfg.seed), cfg, out_json)


def summarize(env: str, results: list[EpisodeResult], latencies: list[float], seconds: float) -> EvalResult:
    n = len(results)
    wins = sum(r.success for r in results)
    per_task: dict[str, dict[str, float]] = {}
    for task in sorted({r.task for r in results}):
        rs = [r for r in results if r.task == task]
        per_task[task] = {"episodes": len(rs), "success_rate": sum(r.success for r in rs) / len(rs)}
    tracked = [r for r in results if r.achieved_task is not None]
    following = (sum(r.achieved_task == r.task for r in tracked) / len(tracked)) if tracked else None
    lat_p50, lat_p99 = percentiles(np.asarray(latencies) * 1e3 if latencies else np.zeros(1))
    return EvalResult(
        env=env, episodes=n, success_rate=wins / max(n, 1), ci95=wilson_interval(wins, n),
        mean_length=float(np.mean([r.length for r in results])) if results else 0.0,
        latency_ms_p50=lat_p50, latency_ms_p99=lat_p99,
        per_task=per_task, instruction_following=following, seconds=seconds, episode_results=results,
    )


class _VideoRecorder:
    """Collects frames of the first ``n`` episodes from the env's video camera."""

    def __init__(self, env, path: Path, n: int) -> None:
        self.env, self.path, self.n = env, Path(path), n
        self.frames: list[np.ndarray] = []

    def capture(self, episode: int) -> None:
        if episode < self.n:
            self.frames.append(self.env.render_frame())

    def close(self) -> None:
        from robopolicy.media import write_video

        if self.frames:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_video(self.path, np.stack(self.frames), fps=int(round(self.env.fps)))
