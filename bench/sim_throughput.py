"""Simulation throughput: env steps/s of every registered env beside its raw simulator rate.

The raw rate is measured in the same run, on the same model: for robosuite tasks robosuite's
own ``env.step`` on the wrapped robosuite env; for own-MJCF tasks ``mujoco.mj_step`` on the
env's model with a fresh ``MjData``, as many substeps per control step as the control period
holds. Both sides take uniform random actions from a fixed seed, one step each in turn (so
machine noise hits both alike), and reset at the env's time limit. Steps/s are means;
the overhead is the wrapper's median time per step over the raw median, minus one (the
median ignores descheduling spikes on a busy machine); the target is < 10 %.
The last column is the cost of one observation-camera frame at ``--image-size``: the time
per step with the env's first camera on, minus the state-only time per step.

    python bench/sim_throughput.py [--steps 300] [--envs lift push] [--image-size 64] [--frames 10]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

from robopolicy.process_defaults import apply_defaults

apply_defaults()  # before mujoco / torch / lerobot are imported

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from robopolicy.sim import env_names, make_env  # noqa: E402
from robopolicy.sim.base import RobopolicyEnv  # noqa: E402
from robopolicy.sim.registry import env_entry  # noqa: E402
from robopolicy.sim.robosuite_tasks import RobosuiteEnv  # noqa: E402

TARGET_OVERHEAD = 0.10
WARMUP = 20


def wrapper_stepper(env: RobopolicyEnv, rng: np.random.Generator) -> Callable[[], None]:
    """One env step with a random action, resetting when the episode ends."""
    env.reset(seed=0)
    low, high = env.action_space.low, env.action_space.high

    def step() -> None:
        _, _, terminated, truncated, _ = env.step(rng.uniform(low, high).astype(np.float32))
        if terminated or truncated:
            env.reset()

    return step


def raw_stepper(env: RobopolicyEnv, rng: np.random.Generator) -> tuple[str, Callable[[], None]]:
    """One step of the simulator under the wrapper (name, step), resetting at the time limit."""
    count = 0
    if isinstance(env, RobosuiteEnv):
        rs, dim = env.rs, env.action_space.shape[0]

        def step() -> None:
            nonlocal count
            rs.step(rng.uniform(-1.0, 1.0, dim))
            count += 1
            if count % env.max_episode_steps == 0:
                rs.reset()

        return "robosuite env.step", step

    model = env.model
    data = mujoco.MjData(model)
    substeps = max(1, round(1.0 / env.fps / model.opt.timestep))
    low, high = model.actuator_ctrlrange.T

    def mj_step() -> None:
        nonlocal count
        data.ctrl[:] = rng.uniform(low, high)
        mujoco.mj_step(model, data, nstep=substeps)
        count += 1
        if count % env.max_episode_steps == 0:
            mujoco.mj_resetData(model, data)

    return f"mj_step x{substeps}", mj_step


def interleaved(raw: Callable[[], None], wrapped: Callable[[], None], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-step seconds of ``raw`` and ``wrapped``, alternating one step each."""
    times = np.empty((n, 2))
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        raw()
        t1 = clock()
        wrapped()
        times[i] = t1 - t0, clock() - t1
    return times[:, 0], times[:, 1]


def timed(step: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def frame_ms(name: str, size: int, frames: int, step_s: float) -> str:
    """Camera cost: median time per step with one observation camera, minus the state-only median."""
    cameras = env_entry(name).cameras
    if not cameras or frames <= 0:
        return "-"
    env = make_env(name, cameras=cameras[:1], image_size=size)
    try:
        step = wrapper_stepper(env, np.random.default_rng(0))
        timed(step, 2)  # the first frames build GL state
        per_step = np.median([timed(step, 1) for _ in range(frames)])
    finally:
        env.close()
    return f"{(per_step - step_s) * 1e3:.1f} ({cameras[0]})"


def measure(name: str, steps: int, size: int, frames: int) -> dict:
    env = make_env(name)
    try:
        backend, raw = raw_stepper(env, np.random.default_rng(0))
        wrapped = wrapper_stepper(env, np.random.default_rng(0))
        interleaved(raw, wrapped, WARMUP)
        t_raw, t_env = interleaved(raw, wrapped, steps)
    finally:
        env.close()
    return {"name": name, "backend": backend, "env": 1 / t_env.mean(), "raw": 1 / t_raw.mean(),
            "overhead": np.median(t_env) / np.median(t_raw) - 1.0,
            "frame": frame_ms(name, size, frames, float(np.median(t_env)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="timed steps per env and side (default 300)")
    ap.add_argument("--envs", nargs="*", default=None, help="env names (default: all registered)")
    ap.add_argument("--image-size", type=int, default=64, help="camera frame side in pixels (default 64)")
    ap.add_argument("--frames", type=int, default=10, help="camera steps timed per env; 0 skips cameras (default 10)")
    args = ap.parse_args()
    names = args.envs or env_names()

    print(f"sim throughput: {args.steps} random-action steps per env and side, seed 0, "
          f"camera frames at {args.image_size}x{args.image_size}")
    header = (f"{'env':<10} {'raw backend':<20} {'env steps/s':>12} {'raw steps/s':>12} {'env/raw':>8} "
              f"{'overhead':>9}  {'ms/frame (camera)'}")
    print(header)
    print("-" * len(header))
    over = []
    for name in names:
        r = measure(name, args.steps, args.image_size, args.frames)
        flag = "" if r["overhead"] < TARGET_OVERHEAD else "  > target"
        print(f"{r['name']:<10} {r['backend']:<20} {r['env']:>12.1f} {r['raw']:>12.1f} {r['env'] / r['raw']:>8.2f} "
              f"{r['overhead']:>8.1%}{flag:<2}  {r['frame']}", flush=True)
        over.append(r["overhead"] >= TARGET_OVERHEAD)
    print(f"target: wrapper overhead < {TARGET_OVERHEAD:.0%}; {sum(over)} of {len(names)} env(s) above it")


if __name__ == "__main__":
    main()
