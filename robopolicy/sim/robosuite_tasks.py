"""robosuite tasks (Lift, Stack, PickPlaceCan, and any other) behind the :class:`RobopolicyEnv` API.

One wrapper, :class:`RobosuiteEnv`, serves every task; a :class:`RobosuiteTask` holds what
differs between them. Besides the three built-in tasks (which have a scripted expert),
``robosuite:<Env>`` names any single-arm robosuite environment (``robosuite:Door``), wrapped
the same way without an expert (:func:`generic_entry`). The arm is a Panda under robosuite's operational-space controller
(composite ``BASIC``, arm ``OSC_POSE``, delta actions in the base frame) at 20 Hz:

* ``action`` (7): end-effector translation (3, x 0.05 m) and axis-angle rotation
  (3, x 0.5 rad) per step, then the gripper (-1 open, +1 closed);
* ``observation.state``: joint positions, end-effector position and quaternion (xyzw),
  finger positions;
* ``observation.environment_state``: robosuite's object observables for the task, each
  flattened (a 0-d observable such as Door's ``hinge_qpos`` is one element, named by its key;
  others are named ``<key>.x`` / ``<key>.qx`` / ``<key>.<i>``), in robosuite's order;
* ``observation.images.<cam>``: optional, rendered headless by :class:`Cameras`.

robosuite samples object placement with NumPy's global RNG; every robosuite reset here runs
under a global seed drawn from the env's own ``np_random``, so ``reset(seed=s)`` reproduces
the scene and the caller's global RNG state is left untouched. The robosuite model persists
across resets (``hard_reset=False``) so the base class can randomize its physics.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import gymnasium as gym
import mujoco
import numpy as np

from robopolicy.errors import RobopolicyError
from robopolicy.sim.base import Randomization, RobopolicyEnv
from robopolicy.sim.cameras import Cameras
from robopolicy.sim.registry import EnvEntry, register_env
from robopolicy.sim.robosuite_experts import PickPlaceExpert
from robopolicy.spec import ACTION, ENV_STATE, IMAGE_PREFIX, STATE

CONTROL_FREQ = 20
ROBOT = "Panda"
#: robosuite observables that make up ``observation.state``, in order.
PROPRIO_KEYS = ("robot0_joint_pos", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
ACTION_NAMES = ["delta_x", "delta_y", "delta_z", "delta_rx", "delta_ry", "delta_rz", "gripper"]
#: Cameras every robosuite scene here has (a fixed third-person view and the wrist view).
CAMERAS = ("agentview", "robot0_eye_in_hand")


@dataclass(frozen=True)
class RobosuiteTask:
    """What differs between robosuite tasks; the env and the expert read it.

    ``grasp_object`` and ``place_target`` take the robosuite env (``grasp_object`` is
    ``None`` for a task without a scripted expert). ``place_target`` is the
    world position at which the grasped object's body origin is released (``None``: a
    lift-only task). ``max_pose_scale`` caps ``Randomization.object_pose`` where the
    nominal placement range already fills the workspace (the can's bin).
    """

    name: str
    suite_env: str
    description: str
    max_episode_steps: int
    grasp_object: Callable[[Any], Any] | None = None
    place_target: Callable[[Any], np.ndarray] | None = None
    grasp_height: float = 0.0
    yaw_symmetry: float | None = math.pi / 2
    max_pose_scale: float = math.inf


def _stack_target(rs: Any) -> np.ndarray:
    # Centre of cubeA 1 cm above resting on cubeB (half sizes 0.025 and 0.02).
    return rs.sim.data.body_xpos[rs.cubeB_body_id] + np.array([0.0, 0.0, 0.025 + 0.02 + 0.01])


def _can_target(rs: Any) -> np.ndarray:
    # The can's quadrant of bin 2, pulled 5 cm toward the robot (its far corner is at the edge
    # of the Panda's reach); the can's origin sits 0.06 above its bottom: release 4 cm up.
    return rs.target_bin_placements[rs.object_id] + np.array([-0.05, -0.05, 0.06 + 0.04])


TASKS: dict[str, RobosuiteTask] = {
    t.name: t
    for t in (
        RobosuiteTask("lift", "Lift", "lift the red cube", 100, grasp_object=lambda rs: rs.cube),
        RobosuiteTask("stack", "Stack", "stack the red cube on the green cube", 250,
                      grasp_object=lambda rs: rs.cubeA, place_target=_stack_target),
        RobosuiteTask("can", "PickPlaceCan", "put the can in its bin", 300,
                      grasp_object=lambda rs: rs.objects[rs.object_id], place_target=_can_target,
                      grasp_height=0.01, yaw_symmetry=None, max_pose_scale=1.0),
    )
}


@functools.cache
def _robosuite() -> Any:
    """Import robosuite once, without its import-time warnings (private macros, optional extras)."""
    logger = logging.getLogger("robosuite_logs")
    logger.disabled = True
    try:
        import robosuite
    finally:
        logger.disabled = False
    logger.setLevel(logging.WARNING)
    return robosuite


@contextlib.contextmanager
def _global_seed(seed: int) -> Iterator[None]:
    """Seed NumPy's and Python's global RNGs (which robosuite samples from) for one block."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _dim_names(key: str, shape: tuple[int, ...]) -> list[str]:
    key = key.removeprefix("robot0_").lower()
    if len(shape) == 0:  # a scalar observable (a hinge angle): one element, named by its key
        return [key]
    size = math.prod(shape)
    if size == 4 and key.endswith("quat"):
        axes: Any = ("qx", "qy", "qz", "qw")
    elif size == 3:
        axes = ("x", "y", "z")
    else:
        axes = range(size)
    return [f"{key}.{a}" for a in axes]


def _placement_samplers(initializer: Any) -> list[Any]:
    samplers = list(initializer.samplers.values()) if hasattr(initializer, "samplers") else [initializer]
    # Only samplers with a placement range can be scaled (some environments have none).
    return [s for s in samplers if hasattr(s, "x_range") and hasattr(s, "y_range")]


def _flat(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float64).reshape(-1)


class RobosuiteEnv(RobopolicyEnv):
    """A robosuite manipulation task with a Panda arm; see the module docstring."""

    fps = float(CONTROL_FREQ)
    video_camera = "agentview"

    def __init__(
        self,
        task: RobosuiteTask,
        max_episode_steps: int | None = None,
        dense_reward: bool = False,
        terminate_on_success: bool = True,
        randomization: Randomization | None = None,
        cameras: tuple[str, ...] = (),
        image_size: int = 84,
    ) -> None:
        super().__init__(max_episode_steps or task.max_episode_steps, dense_reward, terminate_on_success,
                         randomization, cameras, image_size)
        self.task = task
        self.name = task.name
        self.task_description = task.description
        suite = _robosuite()
        with _global_seed(0):  # robosuite draws object sizes at construction: same scene everywhere
            self.rs = suite.make(
                task.suite_env, robots=ROBOT,
                controller_configs=suite.load_composite_controller_config(robot=ROBOT),
                has_renderer=False, has_offscreen_renderer=False, use_camera_obs=False,
                control_freq=CONTROL_FREQ, horizon=self.max_episode_steps, ignore_done=True,
                hard_reset=False, reward_shaping=True,
            )
            self._rs_obs: dict[str, np.ndarray] = self.rs.reset()
        self._rs_reward = 0.0
        self._data: mujoco.MjData = self.rs.sim.data._data
        try:
            self._cameras = Cameras(self.model, self._data, self.cameras, self.image_size, owner=self.name)
        except RobopolicyError:
            self.rs.close()
            raise
        self._samplers = _placement_samplers(getattr(self.rs, "placement_initializer", None))
        self._nominal_ranges = [(tuple(s.x_range), tuple(s.y_range)) for s in self._samplers]
        self._object_keys = [k for k, o in self.rs._observables.items()
                             if o.modality == "object" and o.is_enabled() and o.is_active()]
        self._eef_site = self.rs.robots[0].eef_site_id["right"]
        self._object = task.grasp_object(self.rs) if task.grasp_object is not None else None
        self._object_body = self.model.body(self._object.root_body).id if self._object is not None else -1
        # The fingers matter to the scripted expert only (Wipe's wiping gripper has none).
        self._fingers = ([self.model.body(f"gripper0_right_{f}").id for f in ("leftfinger", "rightfinger")]
                         if self._object is not None else [])
        # Proprioception robosuite provides here (a gripper without fingers has no gripper_qpos).
        self._proprio_keys = [k for k in PROPRIO_KEYS if k in self._rs_obs]
        # A gripper without an actuator (Wipe's) takes no gripper action.
        action_names = ACTION_NAMES[: int(self.rs.action_dim)]
        if len(action_names) != int(self.rs.action_dim):
            self.close()
            raise RobopolicyError(f"{self.name}: robosuite expects {self.rs.action_dim} action dimensions; "
                                  f"the wrapper drives one arm ({len(ACTION_NAMES)})")

        state_names = [n for k in self._proprio_keys for n in _dim_names(k, np.shape(self._rs_obs[k]))]
        env_names = [n for k in self._object_keys for n in _dim_names(k, np.shape(self._rs_obs[k]))]
        self.feature_names = {STATE: state_names, ACTION: list(action_names)}
        self.action_space = gym.spaces.Box(-1.0, 1.0, (len(action_names),), np.float32)
        spaces: dict[str, gym.spaces.Space] = {
            STATE: gym.spaces.Box(-np.inf, np.inf, (len(state_names),), np.float32),
        }
        if env_names:  # an environment without object observables has no environment state
            self.feature_names[ENV_STATE] = env_names
            spaces[ENV_STATE] = gym.spaces.Box(-np.inf, np.inf, (len(env_names),), np.float32)
        for cam in self.cameras:
            spaces[IMAGE_PREFIX + cam] = gym.spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)

    # ---- RobopolicyEnv hooks -----------------------------------------------------------
    @property
    def model(self) -> mujoco.MjModel:
        return self.rs.sim.model._model

    @property
    def data(self) -> mujoco.MjData:
        return self._data

    def _reset_task(self, rng: np.random.Generator) -> None:
        scale = min(self.randomization.object_pose, self.task.max_pose_scale)
        for sampler, ranges in zip(self._samplers, self._nominal_ranges):
            sampler.x_range, sampler.y_range = (self._scaled(r, scale) for r in ranges)
        from robosuite.utils.errors import RandomizationError

        with _global_seed(int(rng.integers(2**32))):
            try:
                self._rs_obs = self.rs.reset()
            except RandomizationError as e:
                raise RobopolicyError(
                    f"{self.name}: objects do not fit the placement range at object_pose={scale}: {e}") from e
        self._rs_reward = 0.0

    def _apply_action(self, action: np.ndarray) -> None:
        self._rs_obs, self._rs_reward, _, _ = self.rs.step(action.astype(np.float64))

    def _observe(self) -> dict[str, np.ndarray]:
        obs = {STATE: np.concatenate([_flat(self._rs_obs[k]) for k in self._proprio_keys]).astype(np.float32)}
        if self._object_keys:
            obs[ENV_STATE] = np.concatenate([_flat(self._rs_obs[k]) for k in self._object_keys]).astype(np.float32)
        for cam, frame in self._cameras.render().items():
            obs[IMAGE_PREFIX + cam] = frame
        return obs

    def _is_success(self) -> bool:
        return bool(self.rs._check_success())

    def _dense_reward(self) -> float:
        """robosuite's shaped reward (normalized so that success scores 1)."""
        return float(self._rs_reward)

    def close(self) -> None:
        self._cameras.close()
        self.rs.close()
        super().close()

    # ---- privileged state for scripted experts -----------------------------------------
    def eef_pos(self) -> np.ndarray:
        """World position of the end-effector site (between the fingertips)."""
        return self._data.site_xpos[self._eef_site].copy()

    def eef_rotation(self) -> np.ndarray:
        """World rotation matrix of the end-effector site (its z axis points along the fingers)."""
        return self._data.site_xmat[self._eef_site].reshape(3, 3).copy()

    def finger_axis(self) -> np.ndarray:
        """Unit vector from the left to the right finger (the closing direction)."""
        d = self._data.xpos[self._fingers[1]] - self._data.xpos[self._fingers[0]]
        return d / max(np.linalg.norm(d), 1e-9)

    def _grasp_object(self) -> Any:
        if self._object is None:
            raise RobopolicyError(f"{self.name}: the task names no object to grasp (it has no scripted expert)")
        return self._object

    def object_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """World position and rotation matrix of the object to grasp."""
        self._grasp_object()
        b = self._object_body
        return self._data.xpos[b].copy(), self._data.xmat[b].reshape(3, 3).copy()

    def place_target(self) -> np.ndarray | None:
        """Where the grasped object's origin is released, or ``None`` for a lift-only task."""
        return None if self.task.place_target is None else self.task.place_target(self.rs)

    def is_grasping(self) -> bool:
        """Both finger pads touch the object."""
        return bool(self.rs._check_grasp(self.rs.robots[0].gripper, self._grasp_object()))

    @staticmethod
    def _scaled(bounds: tuple[float, float], scale: float) -> tuple[float, float]:
        centre, half = (bounds[0] + bounds[1]) / 2, (bounds[1] - bounds[0]) / 2 * scale
        return centre - half, centre + half


for _task in TASKS.values():
    register_env(EnvEntry(
        name=_task.name,
        make=functools.partial(RobosuiteEnv, _task),
        make_expert=PickPlaceExpert,
        description=f"robosuite {_task.suite_env} (Panda, OSC_POSE): {_task.description}",
        cameras=CAMERAS,
    ))


#: Default episode length of a generic robosuite environment whose constructor has no ``horizon`` default.
GENERIC_MAX_EPISODE_STEPS = 500


@functools.cache
def generic_entry(suite_env: str) -> EnvEntry:
    """The entry for ``robosuite:<suite_env>``: any single-arm robosuite environment, with a
    Panda under the same controller, its proprioception as ``observation.state`` and its
    object observables (any shape) as ``observation.environment_state``; no scripted expert."""
    from robopolicy.errors import UnknownNameError

    name = f"robosuite:{suite_env}"
    _robosuite()
    from robosuite.environments.base import REGISTERED_ENVS

    single_arm = sorted(k for k, cls in REGISTERED_ENVS.items() if _is_single_arm(cls))
    if suite_env not in REGISTERED_ENVS:
        raise UnknownNameError("robosuite environment", suite_env, single_arm)
    cls = REGISTERED_ENVS[suite_env]
    if suite_env not in single_arm:
        raise RobopolicyError(f"{name} is not a single-arm manipulation environment (the wrapper drives one Panda "
                              f"arm); single-arm ones: {', '.join(single_arm)}")
    horizon = inspect.signature(cls.__init__).parameters.get("horizon")
    steps = horizon.default if horizon is not None and isinstance(horizon.default, int) else GENERIC_MAX_EPISODE_STEPS
    doc = (inspect.getdoc(cls) or "").split("\n")[0].strip().rstrip(".").removeprefix("This class corresponds to the ")
    task = RobosuiteTask(name, suite_env, f"robosuite {suite_env}", steps)
    return EnvEntry(
        name=name,
        make=functools.partial(RobosuiteEnv, task),
        make_expert=None,
        description=f"robosuite {suite_env} (Panda, OSC_POSE){': ' + doc if doc else ''}",
        cameras=CAMERAS,
        source="robosuite",
    )


def _is_single_arm(cls: type) -> bool:
    names = {c.__name__ for c in cls.__mro__}
    return "ManipulationEnv" in names and "TwoArmEnv" not in names
