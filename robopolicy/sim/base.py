"""The base every robopolicy env shares: gymnasium API over a MuJoCo model.

Subclasses implement the task (``_reset_task``, ``_apply_action``, ``_observe``,
``_is_success``, ``_dense_reward``) and expose the MuJoCo ``model``; this class owns what
every task must do the same way:

* seeding and reproducible resets (``reset(seed=...)``),
* ``info["is_success"]``, a sparse 0/1 success reward or the task's dense reward,
* a time limit (``truncated``), and termination on success when asked,
* domain randomization for sim-to-real (:class:`Randomization`): friction, mass and
  actuator-gain scales re-drawn each reset from the nominal model, observation noise and
  action latency, and a scale on the task's object-pose range.

Observations are a dict keyed by feature name (``observation.state``,
``observation.environment_state``, ``observation.images.<cam>``); actions are a
``float32`` box in ``[-1, 1]``.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from robopolicy.errors import RobopolicyError
from robopolicy.spec import IMAGE_PREFIX, FeatureSpec, spec_from_observation_space


@dataclass(frozen=True)
class Randomization:
    """Domain-randomization knobs. The default (all zeros) is the nominal sim.

    Scales are relative half-ranges: ``friction=0.3`` multiplies every geom's friction by a
    factor drawn uniformly from ``[0.7, 1.3]`` at each reset. ``object_pose`` scales the
    task's placement range (1.0 = the task's nominal range, 2.0 = twice as wide).
    """

    object_pose: float = 1.0
    friction: float = 0.0
    mass: float = 0.0
    actuator_gain: float = 0.0
    obs_noise_std: float = 0.0
    action_latency_steps: int = 0

    @classmethod
    def default_dr(cls) -> "Randomization":
        """A moderate sim-to-real preset (what ``--randomize`` turns on)."""
        return cls(object_pose=1.5, friction=0.3, mass=0.3, actuator_gain=0.15,
                   obs_noise_std=0.005, action_latency_steps=1)

    def validate(self) -> "Randomization":
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise RobopolicyError(f"randomization {f.name} must be >= 0, got {getattr(self, f.name)}")
        for name in ("friction", "mass", "actuator_gain"):
            if getattr(self, name) >= 1.0:
                raise RobopolicyError(f"randomization {name} must be < 1 (a relative half-range)")
        return self

    @property
    def physics(self) -> bool:
        return bool(self.friction or self.mass or self.actuator_gain)


class RobopolicyEnv(gym.Env):
    """Shared reset/step logic; see the module docstring for what a subclass provides."""

    metadata = {"render_modes": ["rgb_array"]}

    #: Name of the task as registered, and the default language instruction.
    name: str = ""
    task_description: str = ""
    #: Control frequency in Hz (one ``step`` = one control period).
    fps: float = 20.0
    #: Per-dimension names of each low-dimensional feature (``observation.state``,
    #: ``observation.environment_state``, ``action``): datasets store them and the ROS
    #: node maps JointState names onto them. Set by the subclass.
    feature_names: dict[str, list[str]] = {}

    def __init__(
        self,
        max_episode_steps: int,
        dense_reward: bool = False,
        terminate_on_success: bool = True,
        randomization: Randomization | None = None,
        cameras: tuple[str, ...] = (),
        image_size: int = 84,
    ) -> None:
        self.max_episode_steps = int(max_episode_steps)
        self.dense_reward = dense_reward
        self.terminate_on_success = terminate_on_success
        self.randomization = (randomization or Randomization()).validate()
        self.cameras = tuple(cameras)
        self.image_size = int(image_size)
        self._elapsed = 0
        self._pending: collections.deque[np.ndarray] = collections.deque()
        self._nominal: dict[str, np.ndarray] | None = None

    # ---- what a task implements --------------------------------------------------------
    #: Camera used for rollout videos (:meth:`render_frame`).
    video_camera: str = ""

    @property
    def model(self) -> mujoco.MjModel:
        raise NotImplementedError

    @property
    def data(self) -> mujoco.MjData:
        raise NotImplementedError

    def _reset_task(self, rng: np.random.Generator) -> None:
        raise NotImplementedError

    def _apply_action(self, action: np.ndarray) -> None:
        raise NotImplementedError

    def _observe(self) -> dict[str, np.ndarray]:
        """Noise-free observation (state and, when cameras are on, images)."""
        raise NotImplementedError

    def _is_success(self) -> bool:
        raise NotImplementedError

    def _dense_reward(self) -> float:
        raise NotImplementedError

    # ---- gymnasium API -----------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._elapsed = 0
        self._pending.clear()
        self._last_applied = None
        self._randomize_physics()
        self._reset_task(self.np_random)
        obs = self._noisy(self._observe())
        return obs, {"is_success": self._is_success(), "task": self.task_description}

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float32).reshape(self.action_space.shape)
        if not np.all(np.isfinite(action)):
            raise RobopolicyError(f"{self.name}: action contains NaN/inf: {action}")
        action = np.clip(action, self.action_space.low, self.action_space.high)
        self._pending.append(action)
        if len(self._pending) <= self.randomization.action_latency_steps:
            applied = np.zeros_like(action) if self._last_applied is None else self._last_applied
        else:
            applied = self._pending.popleft()
        self._last_applied = applied
        self._apply_action(applied)
        self._elapsed += 1
        success = self._is_success()
        reward = self._dense_reward() if self.dense_reward else float(success)
        terminated = bool(success and self.terminate_on_success)
        truncated = self._elapsed >= self.max_episode_steps and not terminated
        obs = self._noisy(self._observe())
        return obs, reward, terminated, truncated, {"is_success": success, "task": self.task_description}

    _last_applied: np.ndarray | None = None

    def render(self) -> np.ndarray:
        """An RGB frame from the video camera (see :meth:`render_frame`)."""
        return self.render_frame()

    def render_frame(self, camera: str | None = None, size: int = 256) -> np.ndarray:
        """A ``size`` x ``size`` RGB frame for videos, independent of the observation cameras."""
        from robopolicy.sim.cameras import Cameras

        camera = camera or self.video_camera
        video = self._video_cameras
        if video is None or video.names != (camera,) or video.size != size:
            if video is not None:
                video.close()
            video = self._video_cameras = Cameras(self.model, self.data, (camera,), size, owner=self.name)
        return video.render()[camera].copy()

    def feature_spec(self) -> FeatureSpec:
        """This env's features (shapes, per-dimension names), fps and task, without statistics."""
        return spec_from_observation_space(self.observation_space, self.action_space.shape[0], self.fps,
                                           self.task_description, names=self.feature_names)

    def close(self) -> None:
        if self._video_cameras is not None:
            self._video_cameras.close()
            self._video_cameras = None
        super().close()

    _video_cameras = None

    # ---- helpers -----------------------------------------------------------------------
    def _noisy(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        std = self.randomization.obs_noise_std
        if std <= 0:
            return obs
        return {
            k: v if k.startswith(IMAGE_PREFIX) else (v + self.np_random.normal(0.0, std, v.shape)).astype(v.dtype)
            for k, v in obs.items()
        }

    def _randomize_physics(self) -> None:
        r = self.randomization
        if not r.physics:
            return
        m = self.model
        if self._nominal is None:
            self._nominal = {
                "friction": m.geom_friction.copy(),
                "mass": m.body_mass.copy(),
                "inertia": m.body_inertia.copy(),
                "gain": m.actuator_gainprm.copy(),
                "bias": m.actuator_biasprm.copy(),
            }
        n, rng = self._nominal, self.np_random

        def scale(half: float, size: int) -> np.ndarray:
            return rng.uniform(1.0 - half, 1.0 + half, size=size) if half else np.ones(size)

        m.geom_friction[:] = n["friction"] * scale(r.friction, m.ngeom)[:, None]
        s = scale(r.mass, m.nbody)
        m.body_mass[:] = n["mass"] * s
        m.body_inertia[:] = n["inertia"] * s[:, None]
        g = scale(r.actuator_gain, m.nu)
        m.actuator_gainprm[:, 0] = n["gain"][:, 0] * g
        # Position servos carry the gain in the bias too (bias = -kp * q): keep them consistent.
        m.actuator_biasprm[:, 1] = n["bias"][:, 1] * g
