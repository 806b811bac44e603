"""``robopolicy collect``: run a scripted expert and record a LeRobotDataset."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robopolicy import progress
from robopolicy.data.recorder import DatasetRecorder, lerobot_features
from robopolicy.errors import RobopolicyError
from robopolicy.sim import Randomization, make_env, make_expert


@dataclass
class CollectConfig:
    env: str
    episodes: int
    out: Path
    cameras: tuple[str, ...] = ()
    image_size: int = 84
    seed: int = 0
    keep_failures: bool = False
    overwrite: bool = False
    randomize: bool = False
    use_videos: bool = True
    max_attempts_factor: int = 3
    #: Finished episodes are committed to disk in batches, at most this often (seconds); a kill
    #: loses the episodes of at most the last interval. 0 commits every episode.
    commit_every_s: float = 10.0


@dataclass
class CollectResult:
    kept: int
    attempts: int
    successes: int
    frames: int
    seconds: float
    total_episodes: int
    interrupted: bool = False

    @property
    def success_rate(self) -> float:
        return self.successes / max(self.attempts, 1)


def _validate(cfg: CollectConfig) -> None:
    if cfg.episodes < 1:
        raise RobopolicyError(f"--episodes must be >= 1, got {cfg.episodes}")
    if not 16 <= cfg.image_size <= 512:
        raise RobopolicyError(f"--image-size must be in [16, 512], got {cfg.image_size}")
    if cfg.commit_every_s < 0:
        raise RobopolicyError(f"--commit-every must be >= 0 seconds, got {cfg.commit_every_s}")


class StopRequest:
    """Ctrl-C (SIGINT) while collecting: the first asks to stop at the next episode boundary,
    so the interrupt never lands inside lerobot's writer (there it once left the process
    hanging past 60 s under load); a second raises :class:`KeyboardInterrupt` at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        progress.write("interrupt: stopping after this episode (Ctrl-C again to abort)", file=sys.stderr)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle SIGINT in the block (only the main thread can; elsewhere it stays as it was)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def rollout_expert(env, expert, seed: int) -> tuple[list[dict], list[str], bool]:
    """One expert episode: (frames of obs + action, task per frame, success)."""
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    expert.reset(env, rng)
    frames, tasks, success = [], [], False
    while True:
        action = np.asarray(expert.act(env, obs), dtype=np.float32)
        frames.append({**{k: np.asarray(v) for k, v in obs.items()}, "action": action})
        tasks.append(info["task"])
        obs, _, terminated, truncated, info = env.step(action)
        success = success or bool(info["is_success"])
        if terminated or truncated:
            return frames, tasks, success


def collect(cfg: CollectConfig) -> CollectResult:
    """Collect ``cfg.episodes`` kept episodes (successful ones unless ``keep_failures``)."""
    _validate(cfg)
    env = make_env(
        cfg.env, cameras=tuple(cfg.cameras), image_size=cfg.image_size,
        randomization=Randomization.default_dr() if cfg.randomize else None,
    )
    expert = make_expert(cfg.env)
    features = lerobot_features(env.observation_space, env.action_space.shape[0], env.feature_names, cfg.use_videos)
    meta = {
        "env": cfg.env,
        "cameras": list(cfg.cameras),
        "image_size": cfg.image_size,
        "randomization": dataclasses.asdict(env.randomization),
        "fps": env.fps,
        "max_episode_steps": env.max_episode_steps,
        "source": "scripted expert",
    }
    recorder = DatasetRecorder(cfg.out, features, int(round(env.fps)), robot_type=cfg.env,
                               extra_meta=meta, overwrite=cfg.overwrite)
    episodes_before, frames_before = recorder.on_disk()
    result = CollectResult(0, 0, 0, 0, 0.0, episodes_before)
    base_seed = cfg.seed * 1_000_003 + episodes_before * 7919
    pending: list[tuple[list[dict], list[str]]] = []  # finished, not yet on disk

    def commit() -> None:
        if pending:
            recorder.commit_episodes(pending)
            pending.clear()

    start = last_commit = time.perf_counter()
    bar = progress.progress(total=cfg.episodes, desc=f"collect {cfg.env}", unit="ep")
    stop = StopRequest()
    try:
        with stop.installed():
            while result.kept < cfg.episodes and not stop.requested:
                if result.attempts >= cfg.episodes * cfg.max_attempts_factor:
                    commit()
                    raise RobopolicyError(
                        f"expert for {cfg.env!r} kept only {result.kept}/{cfg.episodes} episodes in "
                        f"{result.attempts} attempts (success {result.success_rate:.0%}); dataset keeps them"
                    )
                frames, tasks, success = rollout_expert(env, expert, base_seed + result.attempts)
                result.attempts += 1
                result.successes += int(success)
                if success or cfg.keep_failures:
                    pending.append((frames, tasks))
                    result.kept += 1
                    result.frames += len(frames)
                    bar.update(1)
                    if time.perf_counter() - last_commit >= cfg.commit_every_s:
                        commit()
                        last_commit = time.perf_counter()
                bar.set_postfix(success=f"{result.successes}/{result.attempts}", frames=result.frames)
            commit()
        result.interrupted = stop.requested
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        bar.close()
        result.seconds = time.perf_counter() - start
        # what is on disk: a second Ctrl-C drops the episodes not yet committed
        result.total_episodes, frames_after = recorder.on_disk()
        result.kept, result.frames = result.total_episodes - episodes_before, frames_after - frames_before
        env.close()
    return result
