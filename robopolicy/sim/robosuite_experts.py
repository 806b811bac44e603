"""A scripted pick(-and-place) demonstrator for the robosuite tasks, noisy like a human.

One phased waypoint controller serves lift, stack and can: approach above the object,
descend, close, lift, and where the task has a place target, carry, lower, release and
retreat. Each step commands the end-effector toward the phase's waypoint with a
proportional gain (translation), keeps the gripper pointing down and, for objects with a
yaw symmetry (cubes), turns the fingers square to the object's faces.

Each episode draws its own style (:class:`ExpertStyle`): speed, grasp-point offset,
approach offset and hover height, gripper dwell times; every action gets small Gaussian
noise. If the object slips out of the hand, the expert goes back to the approach.
The expert reads privileged state (object pose, grasp contact) from the env.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from robopolicy.errors import RobopolicyError

if TYPE_CHECKING:
    from robopolicy.sim.base import RobopolicyEnv
    from robopolicy.sim.robosuite_tasks import RobosuiteEnv

#: OSC_POSE output scale: a unit action moves the goal 0.05 m / 0.5 rad.
POS_SCALE, ROT_SCALE = 0.05, 0.5
OPEN, CLOSED = -1.0, 1.0
_DOWN = np.array([0.0, 0.0, -1.0])


@dataclass(frozen=True)
class ExpertStyle:
    """Per-episode variation ranges (uniform) and the per-step action noise."""

    gain: tuple[float, float] = (0.8, 1.4)
    max_speed: tuple[float, float] = (0.7, 1.0)
    grasp_offset: float = 0.006
    approach_offset: float = 0.03
    hover: tuple[float, float] = (0.05, 0.1)
    lift: tuple[float, float] = (0.12, 0.18)
    dwell: tuple[int, int] = (5, 9)
    noise_std: float = 0.05


@dataclass(frozen=True)
class _Phase:
    name: str
    gripper: float
    tol: float = 0.01  # position error that ends a reaching phase
    timed: bool = False  # a gripper actuation: hold position for the episode's dwell time
    timeout: int = 60  # a reaching phase ends after this many steps regardless


_PICK = (
    _Phase("approach", OPEN, tol=0.015),
    _Phase("descend", OPEN, tol=0.008, timeout=40),
    _Phase("close", CLOSED, timed=True),
    _Phase("lift", CLOSED, tol=0.02),
)
_PLACE = (
    _Phase("carry", CLOSED, tol=0.02, timeout=150),
    _Phase("lower", CLOSED, tol=0.01, timeout=40),
    _Phase("release", OPEN, timed=True),
    _Phase("retreat", OPEN, tol=0.0, timeout=10**9),
)
_HOLD = (_Phase("hold", CLOSED, tol=0.0, timeout=10**9),)
#: Phases during which the object must stay in the hand (else: re-grasp).
_CARRYING = {"lift", "carry", "lower"}


def _wrap(angle: float, period: float) -> float:
    """``angle`` wrapped into ``[-period/2, period/2)``."""
    return (angle + period / 2) % period - period / 2


class PickPlaceExpert:
    """Scripted demonstrator for :class:`~robopolicy.sim.robosuite_tasks.RobosuiteEnv` tasks."""

    def __init__(self, style: ExpertStyle | None = None) -> None:
        self.style = style or ExpertStyle()

    def reset(self, env: RobopolicyEnv, rng: np.random.Generator) -> None:
        """Draw this episode's style and start at the approach."""
        from robopolicy.sim.robosuite_tasks import RobosuiteEnv

        if not isinstance(env, RobosuiteEnv):
            raise RobopolicyError(f"PickPlaceExpert needs a robosuite task env, got {type(env).__name__}")
        s, self._rng = self.style, rng
        self._gain = rng.uniform(*s.gain)
        self._max_speed = rng.uniform(*s.max_speed)
        self._grasp_xy = self._disc(s.grasp_offset)
        self._approach_xy = self._disc(s.approach_offset)
        self._hover = rng.uniform(*s.hover)
        self._lift = rng.uniform(*s.lift)
        self._phases = _PICK + (_HOLD if env.place_target() is None else _PLACE)
        self._start_z = env.object_pose()[0][2]
        self._goto(0, env)

    def act(self, env: RobopolicyEnv, obs: dict[str, np.ndarray]) -> np.ndarray:
        """One 7-D action: translation and rotation deltas (scaled to [-1, 1]) and the gripper."""
        scene = cast("RobosuiteEnv", env)  # checked in reset
        phase = self._phases[self._index]
        if phase.name in _CARRYING and not scene.is_grasping():
            self._lost += 1
            if self._lost >= 3:  # dropped or missed it: try again
                self._goto(0, scene)
                phase = self._phases[0]
        else:
            self._lost = 0
        eef = scene.eef_pos()
        error = self._target(phase.name, scene, eef) - eef
        self._steps += 1
        if self._phase_done(phase, error):
            self._goto(self._index + 1, scene)
        move = self._gain * error / POS_SCALE
        speed = np.linalg.norm(move)
        if speed > self._max_speed:
            move *= self._max_speed / speed
        rot = self._rotation(scene, align=phase.name in ("approach", "descend")) / ROT_SCALE
        action = np.concatenate([move, rot, [phase.gripper]])
        action[:6] += self._rng.normal(0.0, self.style.noise_std, 6)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    # ---- internals ---------------------------------------------------------------------
    def _disc(self, radius: float) -> np.ndarray:
        r, a = radius * np.sqrt(self._rng.uniform()), self._rng.uniform(0, 2 * np.pi)
        return np.array([r * np.cos(a), r * np.sin(a)])

    def _goto(self, index: int, env: RobosuiteEnv) -> None:
        self._index = min(index, len(self._phases) - 1)
        self._steps = 0
        self._lost = 0
        name = self._phases[self._index].name
        if name == "lift":  # remember how the object hangs from the hand
            self._hang = env.object_pose()[0] - env.eef_pos()
            self._anchor = env.eef_pos()
        elif name in ("close", "release"):
            self._anchor = env.eef_pos()
            self._dwell = int(self._rng.integers(self.style.dwell[0], self.style.dwell[1] + 1))

    def _phase_done(self, phase: _Phase, error: np.ndarray) -> bool:
        if phase.timed:
            return self._steps >= self._dwell
        return bool(np.linalg.norm(error) < phase.tol) or self._steps >= phase.timeout

    def _target(self, name: str, env: RobosuiteEnv, eef: np.ndarray) -> np.ndarray:
        obj = env.object_pose()[0]
        grasp = obj + np.array([*self._grasp_xy, env.task.grasp_height])
        if name == "approach":
            return grasp + np.array([*self._approach_xy, self._hover])
        if name == "descend":  # a funnel: come down only as fast as the fingers line up
            misalign = np.linalg.norm(grasp[:2] - eef[:2])
            return grasp + np.array([0.0, 0.0, min(self._hover, 2.0 * misalign)])
        if name in ("close", "release"):
            return self._anchor
        carry_z = self._start_z - self._hang[2] + self._lift
        if name in ("lift", "hold"):
            return np.array([*self._anchor[:2], carry_z])
        place = env.place_target() - self._hang
        if name == "carry":
            return np.array([*place[:2], max(carry_z, place[2] + 0.05)])
        if name == "lower":
            return place
        return self._anchor + np.array([0.0, 0.0, 0.12])  # retreat: up from where it released

    def _rotation(self, env: RobosuiteEnv, align: bool) -> np.ndarray:
        """World axis-angle that points the fingers down and, if asked, squares them to the object."""
        rot = env.eef_rotation()
        tilt = np.cross(rot[:, 2], _DOWN)
        yaw = 0.0
        symmetry = env.task.yaw_symmetry
        if align and symmetry is not None:
            fingers = env.finger_axis()
            obj_rot = env.object_pose()[1]
            yaw = _wrap(np.arctan2(obj_rot[1, 0], obj_rot[0, 0]) - np.arctan2(fingers[1], fingers[0]), symmetry)
        return np.array([tilt[0], tilt[1], tilt[2] + yaw]) * self._gain
