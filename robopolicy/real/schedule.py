"""Timestamped action chunks, seam blending and the control-cycle clock (pure Python).

A :class:`Chunk` is one policy output: ``Ta`` actions, action ``k`` valid during
``[start + k/fps, start + (k+1)/fps)`` where ``start`` is the stamp of the newest
observation the policy saw (the executable chunk starts at that step, see
``robopolicy.policies.base``). The next chunk should take over after ``horizon`` actions
(the *switch* time, which inference aims for); the remaining actions are a reserve that
covers a late inference and that seams are blended into. When they run out too, the plan
is exhausted (the watchdog holds). Actions whose slot has passed are never sent.

:class:`ActionSchedule` answers "what should be commanded at time t": the current chunk's
action, cross-faded linearly from the previous chunk's during ``blend_s`` after a switch,
so the command does not jump at a seam.

:class:`ControlClock` decides when a control cycle runs: on the control timer, and, with
``sync`` on, right when a new observation arrives (the timer is then re-armed from that
moment), so the command computed from an observation goes out within about a millisecond
of its arrival instead of up to a full timer period later.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from robopolicy.errors import RobopolicyError

TimerAction = Literal["run", "skip", "rearm"]


@dataclass(frozen=True)
class Chunk:
    """``actions`` ``[Ta, Da]``; action ``k`` is valid from ``start + k / fps``."""

    start: float
    actions: np.ndarray
    fps: float
    horizon: int

    def __post_init__(self) -> None:
        if self.actions.ndim != 2 or not 1 <= self.horizon <= len(self.actions):
            raise RobopolicyError(
                f"chunk of shape {self.actions.shape} cannot execute {self.horizon} actions"
            )

    @property
    def switch(self) -> float:
        """End of the execution horizon: the next chunk should be in place by then."""
        return self.start + self.horizon / self.fps

    @property
    def end(self) -> float:
        """When the last action (reserve included) runs out."""
        return self.start + len(self.actions) / self.fps

    def index(self, t: float) -> int:
        """Index of the action valid at ``t`` (may be outside the chunk)."""
        return math.floor((t - self.start) * self.fps + 1e-9)

    def action_at(self, t: float) -> np.ndarray | None:
        """The action valid at ``t`` (reserve included), or ``None`` outside the chunk."""
        k = max(self.index(t), 0)
        return self.actions[k] if k < len(self.actions) else None


class ActionSchedule:
    """The current chunk plus a linear cross-fade from the previous one at each seam."""

    def __init__(self, blend_s: float) -> None:
        if blend_s < 0:
            raise RobopolicyError(f"blend time must be >= 0 s, got {blend_s}")
        self.blend_s = blend_s
        self.clear()

    def clear(self) -> None:
        self.current: Chunk | None = None
        self._previous: Chunk | None = None
        self._switched_at = -math.inf

    @property
    def plan_switch(self) -> float | None:
        return None if self.current is None else self.current.switch

    @property
    def plan_end(self) -> float | None:
        return None if self.current is None else self.current.end

    def install(self, chunk: Chunk, now: float) -> int:
        """Switch to ``chunk`` at ``now``; returns how many of its actions were already stale.

        A chunk whose actions are all in the past is not installed (returns ``Ta``).
        """
        stale = min(max(chunk.index(now), 0), len(chunk.actions))
        if stale >= len(chunk.actions):
            return stale
        if self.current is not None and now < self.current.end:
            self._previous = self.current
        else:
            self._previous = None
        self.current, self._switched_at = chunk, now
        return stale

    def action(self, now: float) -> np.ndarray | None:
        """The action to command at ``now``, or ``None`` when the plan has run out."""
        if self.current is None or now >= self.current.end:
            return None
        new = self.current.action_at(now)
        w = (now - self._switched_at) / self.blend_s if self.blend_s > 0 else 1.0
        if self._previous is None or w >= 1.0:
            return new
        old = self._previous.action_at(now)
        if old is None:
            return new
        return (1.0 - w) * old + w * new


class ControlClock:
    """When to run a control cycle: every timer tick, and at observation arrival when ``sync``.

    With ``sync`` and observations slower than the control rate (the usual case: 10-30 Hz
    perception, 50-100 Hz control), a new observation runs a cycle at once and the caller
    re-arms the timer, so the timer phase follows the observation stream; a tick that falls
    within ``guard`` (a quarter period) of the next expected observation is skipped, the
    observation runs that cycle, or, if it is late, a fallback ``guard`` after the skipped tick
    (:meth:`overdue`). A tick that was already queued when an observation re-armed the timer
    is not run but re-arms it again (the executor would otherwise run it right after the
    observation's cycle and push the next tick a whole period later). Observations faster
    than the control rate need no sync (the newest one is never older than their period):
    the timer alone runs the cycles. Times in seconds (monotonic).
    """

    def __init__(self, period_s: float, sync: bool) -> None:
        if not period_s > 0:
            raise RobopolicyError(f"control period must be > 0 s, got {period_s}")
        self.period, self.sync = period_s, sync
        self.guard = 0.25 * period_s
        self.last_cycle = -math.inf
        self._last_observation = self._last_sync = -math.inf
        self._intervals: collections.deque[float] = collections.deque(maxlen=15)

    def observation_period(self) -> float | None:
        """Median interval of recent observations (None until two have arrived)."""
        return float(np.median(self._intervals)) if self._intervals else None

    def _slow_observations(self) -> bool:
        obs_period = self.observation_period()
        return obs_period is None or obs_period >= self.period - self.guard

    def on_observation(self, now: float) -> bool:
        """A new observation arrived at ``now``: run a cycle now?"""
        if math.isfinite(self._last_observation):
            self._intervals.append(now - self._last_observation)
        self._last_observation = now
        if self.sync and self._slow_observations():
            self._last_sync = now
            return True
        return False

    def on_timer(self, now: float) -> TimerAction:
        """The control timer fired at ``now``: ``"run"`` a cycle, ``"skip"`` it (arm the
        fallback: the observation due within the guard runs it) or ``"rearm"`` the timer."""
        if self.sync and self._slow_observations():
            if now - self._last_sync < self.period - self.guard:  # re-armed since this tick was queued
                return "rearm"
            if self._intervals:
                expected = self._last_observation + self.observation_period()
                if abs(now - expected) <= self.guard and now - self.last_cycle < self.period + self.guard:
                    return "skip"
        return "run"

    def overdue(self, now: float) -> bool:
        """The fallback after a skipped tick: no cycle has run for a period?"""
        return now - self.last_cycle >= self.period

    def ran(self, now: float) -> None:
        """A cycle ran at ``now``."""
        self.last_cycle = now
