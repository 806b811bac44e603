"""``robopolicy teleop``: drive an env from the keyboard or a gamepad and record a LeRobotDataset.

The loop, at the env's fps times ``speed`` (real time by default): poll the input sources
(:mod:`robopolicy.data.teleop_input`, :mod:`robopolicy.real.joy`), turn the events into the
action and episode commands (:class:`~robopolicy.data.teleop_input.Teleoperator`), step the
env, show the camera view (window keyboard only). An episode starts recording at the first
motion input after a reset (an idle operator records nothing) and ends when

* the env reports success (``info["is_success"]``): saved;
* the operator saves it (Enter / gamepad A): saved, successful or not;
* the operator discards it (Backspace / B): dropped;
* the time limit passes: dropped, unless ``keep_failures``;
* the operator quits (Esc / Back, Ctrl-C): the episode under way is dropped.

Each saved episode is committed at once, atomically, with the same features, names, fps and
task strings as ``robopolicy collect`` writes (:class:`DatasetRecorder`): a kill loses at most
the episode under way, and teleop and expert episodes can share a dataset.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robopolicy.data.collect import StopRequest
from robopolicy.data.recorder import DatasetRecorder, lerobot_features
from robopolicy.data.teleop_input import (
    Command, InputSource, Teleoperator, joy_map, key_layout, open_keyboard,
)
from robopolicy.errors import RobopolicyError
from robopolicy.progress import progress, write
from robopolicy.sim import Randomization, make_env
from robopolicy.spec import ACTION, IMAGE_PREFIX


@dataclass
class TeleopConfig:
    env: str
    out: Path
    episodes: int = 10
    cameras: tuple[str, ...] = ()
    image_size: int = 84
    seed: int = 0
    overwrite: bool = False
    randomize: bool = False
    use_videos: bool = True
    keep_failures: bool = False
    #: ``sensor_msgs/Joy`` topic of a gamepad (None: keyboard only).
    joy: str | None = None
    #: ``auto`` (window where a display exists, else terminal), ``window``, ``terminal``, ``none``.
    keyboard: str = "auto"
    #: Multiple of real time (1: the env's fps); 0 steps as fast as the inputs come.
    speed: float = 1.0
    #: Keyboard command change per press (a fraction of the half-range; None: the layout's).
    key_step: float | None = None
    #: Side of the camera view in the window when no observation camera is recorded.
    view_size: int = 320


@dataclass
class TeleopResult:
    saved: int = 0
    attempts: int = 0  # episodes started (that moved)
    successes: int = 0
    frames: int = 0
    seconds: float = 0.0
    total_episodes: int = 0
    quit: bool = False  # ended before ``episodes`` were saved


def _validate(cfg: TeleopConfig) -> None:
    if cfg.episodes < 1:
        raise RobopolicyError(f"--episodes must be >= 1, got {cfg.episodes}")
    if not 16 <= cfg.image_size <= 512:
        raise RobopolicyError(f"--image-size must be in [16, 512], got {cfg.image_size}")
    if cfg.speed < 0:
        raise RobopolicyError(f"--speed must be >= 0 (0: as fast as inputs come), got {cfg.speed}")
    if cfg.key_step is not None and not 0 < cfg.key_step <= 2:
        raise RobopolicyError(f"--key-step must be in (0, 2], got {cfg.key_step}")


def open_sources(cfg: TeleopConfig) -> list[InputSource]:
    """The keyboard (per ``cfg.keyboard``) and the gamepad (``cfg.joy``)."""
    sources: list[InputSource] = []
    keyboard = open_keyboard(cfg.keyboard, have_joy=cfg.joy is not None)
    if keyboard is not None:
        sources.append(keyboard)
    if cfg.joy is not None:
        from robopolicy.real.joy import JoySource

        try:
            sources.append(JoySource(cfg.joy))
        except BaseException:
            for s in sources:
                s.close()
            raise
    return sources


def _gather(sources: list[InputSource], deadline: float) -> list:
    """Every source's events until ``deadline`` (at least one poll of each)."""
    events: list = []
    blocking = [s for s in sources if s.blocking]
    while True:
        for s in sources:
            if not s.blocking:
                events += s.poll(0.0)
        remaining = deadline - time.monotonic()
        if blocking:
            for s in blocking:
                events += s.poll(max(remaining, 0.0) / len(blocking))
        elif remaining > 0:
            time.sleep(min(remaining, 0.01))
        if time.monotonic() >= deadline or any(_is_command(e) for e in events):
            return events


def _is_command(ev: Any) -> bool:
    return getattr(ev, "key", None) in ("enter", "backspace", "esc")


def teleop(cfg: TeleopConfig, sources: list[InputSource] | None = None, env: Any = None) -> TeleopResult:
    """Teleoperate ``cfg.env`` until ``cfg.episodes`` episodes are saved or the operator quits.

    ``sources``: input sources (default: :func:`open_sources`); ``env``: an env already built
    for ``cfg.env`` (default: built here). Both are closed at the end.
    """
    _validate(cfg)
    if env is None:
        env = make_env(cfg.env, cameras=tuple(cfg.cameras), image_size=cfg.image_size,
                       randomization=Randomization.default_dr() if cfg.randomize else None)
    try:
        names = list(env.feature_names[ACTION])
        layout = key_layout(names, cfg.key_step)
        if sources is None:
            sources = open_sources(cfg)
        has_joy = any(s.name == "joy" for s in sources)
        operator = Teleoperator(layout, env.action_space.low, env.action_space.high,
                                joy_map(names, layout) if has_joy else None)
        features = lerobot_features(env.observation_space, env.action_space.shape[0], env.feature_names,
                                    cfg.use_videos)
        meta = {
            "env": cfg.env, "cameras": list(cfg.cameras), "image_size": cfg.image_size,
            "randomization": dataclasses.asdict(env.randomization), "fps": env.fps,
            "max_episode_steps": env.max_episode_steps,
            "source": "teleoperation (" + ", ".join(s.name for s in sources) + ")",
        }
        recorder = DatasetRecorder(cfg.out, features, int(round(env.fps)), robot_type=cfg.env,
                                   extra_meta=meta, overwrite=cfg.overwrite)
        write(f"teleop {cfg.env}: {', '.join(s.name for s in sources)} input, action {names}")
        write(layout.help(names))
        if operator.joy_map is not None:
            write(operator.joy_map.help(names))
        write("an episode records from the first motion input; success saves it; the time limit "
              f"({env.max_episode_steps} steps) {'saves' if cfg.keep_failures else 'drops'} it")
        return _run(cfg, env, sources, operator, recorder)
    finally:
        for s in sources or []:
            s.close()
        env.close()


def _view(env: Any, obs: dict[str, np.ndarray], size: int) -> np.ndarray:
    for key, value in obs.items():
        if key.startswith(IMAGE_PREFIX):
            return value
    return env.render_frame(size=size)


def _run(cfg: TeleopConfig, env: Any, sources: list[InputSource], operator: Teleoperator,
         recorder: DatasetRecorder) -> TeleopResult:
    episodes_before, frames_before = recorder.on_disk()
    result = TeleopResult(total_episodes=episodes_before)
    base_seed = cfg.seed * 1_000_003 + episodes_before * 7919
    period = 1.0 / (env.fps * cfg.speed) if cfg.speed > 0 else 0.0
    display = next((s for s in sources if hasattr(s, "show")), None)
    start = time.perf_counter()
    bar = progress(total=cfg.episodes, desc=f"teleop {cfg.env}", unit="ep")
    stop = StopRequest()
    episode = 0
    try:
        with stop.installed():
            while result.saved < cfg.episodes and not result.quit:
                obs, info = env.reset(seed=base_seed + episode)
                episode += 1
                operator.reset()
                frames: list[dict] = []
                tasks: list[str] = []
                outcome = None
                deadline = time.monotonic()
                while outcome is None:
                    if display is not None:
                        state = "recording" if operator.moved else "ready: move to start"
                        display.show(_view(env, obs, cfg.view_size), [
                            f"episode {episode}  step {len(frames)}/{env.max_episode_steps}  {state}",
                            f"saved {result.saved}/{cfg.episodes}  success {result.successes}/{result.attempts}",
                            f"task: {info['task']}"])
                    deadline = max(deadline + period, time.monotonic()) if period else time.monotonic()
                    commands = operator.handle(_gather(sources, deadline))
                    if stop.requested or Command.QUIT in commands:
                        outcome = "quit"
                    elif Command.DISCARD in commands:
                        outcome = "discarded by the operator"
                    elif Command.SAVE in commands and frames:
                        outcome = "saved by the operator"
                    elif Command.SAVE in commands:
                        write("nothing to save yet: move first")
                    if outcome is not None or not operator.moved:
                        continue
                    action = operator.action()
                    frames.append({**{k: np.asarray(v) for k, v in obs.items()}, "action": action})
                    tasks.append(info["task"])
                    obs, _, terminated, truncated, info = env.step(action)
                    if info["is_success"]:
                        outcome = "success"
                    elif terminated or truncated:
                        outcome = "time limit"
                    bar.set_postfix(episode=episode, steps=len(frames),
                                    success=f"{result.successes}/{result.attempts}")
                if outcome == "quit":
                    result.quit = True
                    if frames:
                        write(f"episode {episode}: quit, {len(frames)} steps dropped")
                    break
                result.attempts += 1
                result.successes += int(outcome == "success")
                keep = outcome in ("success", "saved by the operator") or (outcome == "time limit" and cfg.keep_failures)
                if keep:
                    recorder.commit_episodes([(frames, tasks)])
                    result.saved += 1
                    result.frames += len(frames)
                    bar.update(1)
                write(f"episode {episode}: {outcome}, {len(frames)} steps -> {'saved' if keep else 'dropped'}; "
                      f"saved {result.saved}/{cfg.episodes}, success {result.successes}/{result.attempts}")
                bar.set_postfix(episode=episode, steps=len(frames), success=f"{result.successes}/{result.attempts}")
    except KeyboardInterrupt:
        result.quit = True
    finally:
        bar.close()
        result.seconds = time.perf_counter() - start
        result.total_episodes, frames_after = recorder.on_disk()
        result.saved, result.frames = result.total_episodes - episodes_before, frames_after - frames_before
    return result
