"""The safety layer between the policy and the command publisher (pure Python, no rclpy).

Every control cycle goes through :meth:`SafetyFilter.apply`, whatever the policy did:

1. **E-stop** (:class:`EStop`): latched by a trigger, cleared only by an explicit reset;
   while latched the hold command is sent at once (no rate limit).
2. **Watchdog** (:class:`Watchdog`): no observation yet, an observation older than the
   staleness limit, no plan yet, or a plan whose actions all ran out before the next chunk
   arrived (missed inference deadline) -> hold.
3. **Non-finite actions** (NaN / inf) are rejected -> hold.
4. **Clamp** to the per-dimension limits.
5. **Rate limit**: the command moves at most ``max_delta`` per cycle from the last one
   sent (holds ramp down to the hold command the same way).

"Hold" is chosen per dimension: the last command sent (``"last"``, for position-like
commands or a gripper that must keep its grasp) or zero clamped into the limits
(``"zero"``, for velocity / delta commands). Before any command was sent, a ``"last"``
dimension has nothing to hold and the cycle sends nothing.

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
CLAMPED = "clamped"
RATE_LIMITED = "rate_limited"
#: Reasons that replace the policy's command with the hold command.
HOLD_REASONS = (ESTOP, NO_OBSERVATION, STALE_OBSERVATION, WAITING_FOR_POLICY, MISSED_DEADLINE, NON_FINITE_ACTION)


@dataclass(frozen=True)
class SafetyLimits:
    """Per-dimension limits of the command and how to hold."""

    lower: np.ndarray
    upper: np.ndarray
    max_delta: np.ndarray
    hold: tuple[HoldMode, ...] = ("zero",)

    def __post_init__(self) -> None:
        lo, hi, dm = (np.asarray(a, dtype=np.float64) for a in (self.lower, self.upper, self.max_delta))
        if not (lo.shape == hi.shape == dm.shape and lo.ndim == 1):
            raise RobopolicyError(
                f"safety limits need one value per action dimension: lower has {lo.size}, "
                f"upper {hi.size}, max_delta {dm.size}"
            )
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo < hi)):
            raise RobopolicyError(
                f"safety limits need finite lower < upper, got lower={lo.tolist()} upper={hi.tolist()}")
        if not np.all(dm > 0):
            raise RobopolicyError(f"max_delta must be > 0 in every dimension (inf for no limit), got {dm.tolist()}")
        hold = tuple(self.hold) * lo.size if len(self.hold) == 1 else tuple(self.hold)
        if len(hold) != lo.size or any(h not in ("last", "zero") for h in hold):
            raise RobopolicyError(
                f"hold needs 'last' or 'zero', once or per dimension ({lo.size}), got {list(self.hold)}")
        object.__setattr__(self, "hold", hold)
        object.__setattr__(self, "lower", lo)
        object.__setattr__(self, "upper", hi)
        object.__setattr__(self, "max_delta", dm)

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
    """Applies e-stop, hold, NaN rejection, clamping and rate limiting to each command."""

    limits: SafetyLimits
    estop: EStop = field(default_factory=EStop)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    last_command: np.ndarray | None = None

    def hold_command(self) -> np.ndarray | None:
        """Zero or the last command, per dimension (``None``: a "last" dimension has no value yet)."""
        keep = np.array([h == "last" for h in self.limits.hold])
        if not keep.any():
            return self.limits.zero
        if self.last_command is None:
            return None
        return np.where(keep, self.last_command, self.limits.zero)

    def hold_now(self) -> np.ndarray | None:
        """The hold command to send at once, unlimited (deactivate, shutdown); it becomes the
        last command, from which any later command is rate limited."""
        hold = self.hold_command()
        if hold is not None:
            self.last_command = hold.copy()
        return hold

    def apply(self, proposed: np.ndarray | None, hold_reason: str | None = None) -> Decision:
        """Filter the policy's ``proposed`` command (``hold_reason`` from the :class:`Watchdog`)."""
        reasons: list[str] = []
        if self.estop.active:
            reasons.append(ESTOP)
            target = self.hold_command()
            return self._finish(target, reasons, rate_limit=False)
        if hold_reason is not None:
            reasons.append(hold_reason)
            target = self.hold_command()
        elif proposed is None or not np.all(np.isfinite(proposed)):
            reasons.append(NON_FINITE_ACTION if proposed is not None else WAITING_FOR_POLICY)
            target = self.hold_command()
        else:
            target = np.asarray(proposed, dtype=np.float64).reshape(self.limits.lower.shape)
            clamped = np.clip(target, self.limits.lower, self.limits.upper)
            if not np.array_equal(clamped, target):
                reasons.append(CLAMPED)
            target = clamped
        return self._finish(target, reasons, rate_limit=True)

    def _finish(self, target: np.ndarray | None, reasons: list[str], rate_limit: bool) -> Decision:
        if target is not None and rate_limit and self.last_command is not None:
            step = target - self.last_command
            limited = np.clip(step, -self.limits.max_delta, self.limits.max_delta)
            if not np.array_equal(limited, step):
                reasons.append(RATE_LIMITED)
                target = self.last_command + limited
        if target is not None:
            self.last_command = target.copy()
        self.counts.update(reasons)
        return Decision(target, tuple(reasons))
