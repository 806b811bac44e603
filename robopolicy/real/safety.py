"""The safety layer between the policy and the command publisher (pure Python, no rclpy).

Every control cycle goes through :meth:`SafetyFilter.apply`, whatever the policy did:

1. **E-stop** (:class:`EStop`): latched by a trigger, cleared only by an explicit reset;
   while latched the hold command is sent at once (no rate limit).
2. **Watchdog** (:class:`Watchdog`): no observation yet, an observation older than the
   staleness limit, no plan yet, or a plan whose actions all ran out before the next chunk
   arrived (missed inference deadline) -> hold.
3. **Non-finite actions** (NaN / inf) are rejected -> hold.
4. **Clamp** to the per-dimension limits.
5. **Slew limit**: the command moves at most ``max_rate`` per second (times the time since
   the last command sent) and at most ``max_delta`` per cycle, so a burst of cycles a
   millisecond apart moves it a millisecond's worth. Holds ramp to the hold command the
   same way.

**Where a command starts from.** Position-like dimensions (``position``: a position
controller's setpoint, measured by the robot) start from the *measured* value whenever the
policy takes over: the first command after activation, after an e-stop reset and after any
hold ramps from where the robot is, not from an old command or from zero. Velocity-like
dimensions start from the last command sent (zero at first), so they ramp up from rest.

"Hold" is chosen per dimension: the last command sent (``"last"``, which every position
dimension uses, and a gripper that must keep its grasp) or zero clamped into the limits
(``"zero"``, for velocity / delta commands). Before any command was sent, a ``"last"``
dimension has nothing to hold and the cycle sends nothing (the robot's own controller
keeps holding).

Every intervention is counted per reason (one count per cycle it applied) so diagnostics
can say what the layer did and why.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from robopolicy.errors import RobopolicyError

HoldMode = Literal["last", "zero"]

# Reasons, as reported in diagnostics and telemetry.
ESTOP = "estop"
NO_OBSERVATION = "no_observation"
STALE_OBSERVATION = "stale_observation"
WAITING_FOR_POLICY = "waiting_for_policy"
MISSED_DEADLINE = "missed_deadline"
NON_FINITE_ACTION = "non_finite_action"
NO_MEASURED_STATE = "no_measured_state"
CLAMPED = "clamped"
RATE_LIMITED = "rate_limited"
#: Reasons that replace the policy's command with the hold command.
HOLD_REASONS = (ESTOP, NO_OBSERVATION, STALE_OBSERVATION, WAITING_FOR_POLICY, MISSED_DEADLINE, NON_FINITE_ACTION,
                NO_MEASURED_STATE)


@dataclass(frozen=True)
class SafetyLimits:
    """Per-dimension limits of the command, how to hold, and which dimensions are positions.

    ``max_rate`` is per second, ``max_delta`` per control cycle (``inf``: no limit of that
    kind). ``position[i]``: dimension ``i`` is a position setpoint that the robot measures; it
    must hold ``"last"``.
    """

    lower: np.ndarray
    upper: np.ndarray
    max_delta: np.ndarray
    max_rate: np.ndarray
    hold: tuple[HoldMode, ...] = ("zero",)
    position: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        arrays = {k: np.asarray(getattr(self, k), dtype=np.float64)
                  for k in ("lower", "upper", "max_delta", "max_rate")}
        lo, hi, dm, rate = arrays.values()
        if not (lo.ndim == 1 and all(a.shape == lo.shape for a in arrays.values())):
            raise RobopolicyError(
                "safety limits need one value per action dimension: "
                + ", ".join(f"{k} has {a.size}" for k, a in arrays.items()))
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo < hi)):
            raise RobopolicyError(
                f"safety limits need finite lower < upper, got lower={lo.tolist()} upper={hi.tolist()}")
        for name, a in (("max_delta", dm), ("max_rate", rate)):
            if not np.all(a > 0):
                raise RobopolicyError(f"{name} must be > 0 in every dimension (inf for no limit), got {a.tolist()}")
        hold = tuple(self.hold) * lo.size if len(self.hold) == 1 else tuple(self.hold)
        if len(hold) != lo.size or any(h not in ("last", "zero") for h in hold):
            raise RobopolicyError(
                f"hold needs 'last' or 'zero', once or per dimension ({lo.size}), got {list(self.hold)}")
        position = tuple(bool(p) for p in self.position) or (False,) * lo.size
        if len(position) != lo.size:
            raise RobopolicyError(f"position needs one flag per action dimension ({lo.size}), got {len(position)}")
        held_at_zero = [i for i in range(lo.size) if position[i] and hold[i] != "last"]
        if held_at_zero:
            raise RobopolicyError(f"position dimensions {held_at_zero} must hold 'last' (zero is a place, not a stop)")
        for k, a in arrays.items():
            object.__setattr__(self, k, a)
        object.__setattr__(self, "hold", hold)
        object.__setattr__(self, "position", position)

    @property
    def zero(self) -> np.ndarray:
        """Zero, clamped into the limits."""
        return np.clip(np.zeros_like(self.lower), self.lower, self.upper)


class EStop:
    """A latched emergency stop: :meth:`trigger` latches, only :meth:`reset` clears. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = None
        self.triggers = 0

    @property
    def active(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        return self._reason

    def trigger(self, reason: str) -> bool:
        """Latch (returns False if it already was latched; the first reason is kept)."""
        with self._lock:
            self.triggers += 1
            if self._reason is not None:
                return False
            self._reason = reason or "triggered"
            return True

    def reset(self) -> bool:
        """Clear the latch (returns False if it was not latched)."""
        with self._lock:
            was = self._reason is not None
            self._reason = None
            return was


class Watchdog:
    """Decides whether the policy may command this cycle, from timestamps alone.

    ``observation_time`` is the stamp of the *oldest* of the newest observations of every
    required feature (so every feature must be fresh); ``plan_end`` is when the current
    chunk's last action runs out (``None`` before the first chunk): reaching it means the
    next chunk missed its deadline. Times in seconds.
    """

    def __init__(self, staleness_s: float) -> None:
        if not staleness_s > 0:
            raise RobopolicyError(f"observation staleness limit must be > 0 s, got {staleness_s}")
        self.staleness_s = staleness_s
        self.missed_deadlines = 0
        self._in_miss = False

    def check(self, now: float, observation_time: float | None, plan_end: float | None) -> str | None:
        """The hold reason for this cycle, or ``None`` when the policy may command."""
        missed = plan_end is not None and now >= plan_end
        if missed and not self._in_miss:
            self.missed_deadlines += 1
        self._in_miss = missed
        if observation_time is None:
            return NO_OBSERVATION
        if now - observation_time > self.staleness_s:
            return STALE_OBSERVATION
        if plan_end is None:
            return WAITING_FOR_POLICY
        if missed:
            return MISSED_DEADLINE
        return None


@dataclass
class Decision:
    """What one cycle sends (``None``: nothing) and every rule that intervened."""

    command: np.ndarray | None
    reasons: tuple[str, ...] = ()

    @property
    def held(self) -> bool:
        return any(r in HOLD_REASONS for r in self.reasons)


@dataclass
class SafetyFilter:
    """Applies e-stop, hold, NaN rejection, clamping and slew limiting to each command.

    Times (``now``) are the commands' stamps (ROS time, seconds), so the robot sees the slew
    limit hold between the stamps it receives; a clock that steps back allows no motion until
    it catches up. ``period_s`` is the nominal control period: the slew allowance of the first
    command after a (re)start, which has no previous one.
    """

    limits: SafetyLimits
    period_s: float
    estop: EStop = field(default_factory=EStop)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    last_command: np.ndarray | None = None
    last_time: float | None = None
    #: The policy takes over from the measured state at its next command (start, hold, e-stop).
    restart: bool = True

    def reset(self) -> None:
        """Forget the last command: the next command starts from the measured state (activation)."""
        self.last_command = self.last_time = None
        self.restart = True

    def hold_command(self) -> np.ndarray | None:
        """Zero or the last command, per dimension (``None``: a "last" dimension has no value yet)."""
        keep = np.array([h == "last" for h in self.limits.hold])
        if not keep.any():
            return self.limits.zero
        if self.last_command is None:
            return None
        return np.where(keep, self.last_command, self.limits.zero)

    def hold_now(self, now: float) -> np.ndarray | None:
        """The hold command to send at once, unlimited (deactivate, shutdown); it becomes the
        last command, from which any later command is slew limited."""
        hold = self.hold_command()
        if hold is not None:
            self.last_command, self.last_time = hold.copy(), now
        self.restart = True
        return hold

    def apply(self, proposed: np.ndarray | None, now: float, hold_reason: str | None = None,
              measured: np.ndarray | None = None) -> Decision:
        """Filter the policy's ``proposed`` command at ``now``.

        ``hold_reason`` comes from the :class:`Watchdog`; ``measured`` is the robot's measured
        value of each position dimension (NaN elsewhere; ``None`` when unknown): where the
        policy's command starts from after a (re)start. Without it, a (re)start with position
        dimensions holds.
        """
        reasons: list[str] = []
        if self.estop.active:
            reasons.append(ESTOP)
            return self._finish(self.hold_command(), reasons, now, origin=None, dt=0.0)
        if hold_reason is None and (proposed is None or not np.all(np.isfinite(proposed))):
            hold_reason = NON_FINITE_ACTION if proposed is not None else WAITING_FOR_POLICY
        if self.last_command is None:
            origin, dt = self.limits.zero, self.period_s
        else:
            origin, dt = self.last_command, now - (self.last_time if self.last_time is not None else now)
        if hold_reason is None and self.restart and any(self.limits.position):
            measured_origin = self._measured_origin(measured)
            if measured_origin is None:
                hold_reason = NO_MEASURED_STATE
            else:  # from where the robot is; no faster than the last command allows either
                origin, dt = measured_origin, min(dt, self.period_s)
        if hold_reason is not None:
            reasons.append(hold_reason)
            return self._finish(self.hold_command(), reasons, now, origin, dt)
        target = np.asarray(proposed, dtype=np.float64).reshape(self.limits.lower.shape)
        clamped = np.clip(target, self.limits.lower, self.limits.upper)
        if not np.array_equal(clamped, target):
            reasons.append(CLAMPED)
        self.restart = False
        return self._finish(clamped, reasons, now, origin, dt)

    def _measured_origin(self, measured: np.ndarray | None) -> np.ndarray | None:
        """Where a restart begins: measured positions, the last command (or zero) elsewhere."""
        pos = np.asarray(self.limits.position)
        if measured is None or not np.all(np.isfinite(np.asarray(measured)[pos])):
            return None
        last = self.last_command if self.last_command is not None else self.limits.zero
        return np.where(pos, np.clip(measured, self.limits.lower, self.limits.upper), last)

    def _finish(self, target: np.ndarray | None, reasons: list[str], now: float,
                origin: np.ndarray | None, dt: float) -> Decision:
        """Slew-limit ``target`` from ``origin`` over ``dt`` seconds (no limit without an origin)."""
        if target is not None and origin is not None:
            allowed = np.minimum(self.limits.max_delta, self.limits.max_rate * max(dt, 0.0))
            step = target - origin
            limited = np.clip(step, -allowed, allowed)
            if not np.array_equal(limited, step):
                reasons.append(RATE_LIMITED)
                target = origin + limited
        if target is not None:
            self.last_command, self.last_time = target.copy(), now
        if any(r in HOLD_REASONS for r in reasons):
            self.restart = True
        self.counts.update(reasons)
        return Decision(target, tuple(reasons))
