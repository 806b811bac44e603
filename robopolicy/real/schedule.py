"""Timestamped action chunks and seam blending (pure Python).

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from robopolicy.errors import RobopolicyError


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
