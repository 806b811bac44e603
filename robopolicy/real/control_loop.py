"""The control loop's own thread, fed by a coalescing inbox (pure Python, no rclpy).

Subscription callbacks run in the executor thread and do O(1) work: :meth:`Inbox.put`
keeps the newest message per topic (a burst or a flood of thousands of messages a second
coalesces into one pending message per topic) and, for the message that completes a
frame, :meth:`ControlLoop.observed` may wake the loop. The loop runs in its own thread,
so no queue of executor events can delay a cycle: each cycle takes the pending messages,
converts and files them, then computes and publishes the command.

:class:`ControlClock` decides when a cycle runs: every ``period``, and, with ``sync`` on
and observations slower than the control rate (the usual case: 10-30 Hz sensors, 50-100 Hz
control), the moment an observation arrives; the next periodic cycle then counts from
there, so a command computed from fresh data goes out within about a millisecond of its
arrival instead of up to a period later. A periodic cycle that would fall within ``guard``
(a quarter period) of the next expected observation waits for it, at most ``guard``.
Observations faster than the control rate need no sync (the newest one is never older than
their period): the clock alone runs the cycles. Times in seconds (``time.perf_counter``).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any, Callable

import numpy as np

from robopolicy.errors import RobopolicyError


class Inbox:
    """The newest message per key, put by callbacks, taken in one go by the control thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Any, float]] = {}
        #: Messages replaced by a newer one before the loop took them.
        self.coalesced = 0

    def put(self, key: str, msg: Any, arrival: float) -> None:
        with self._lock:
            if key in self._pending:
                self.coalesced += 1
            self._pending[key] = (msg, arrival)

    def take(self) -> dict[str, tuple[Any, float]]:
        """``{key: (message, arrival)}`` of everything pending, oldest arrival first."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return dict(sorted(pending.items(), key=lambda item: item[1][1]))


class ControlClock:
    """When to run a control cycle; see the module docstring. Thread-safe."""

    def __init__(self, period_s: float, sync: bool) -> None:
        if not period_s > 0:
            raise RobopolicyError(f"control period must be > 0 s, got {period_s}")
        self.period, self.sync = period_s, sync
        self.guard = 0.25 * period_s
        self.last_cycle = -math.inf
        self._lock = threading.Lock()
        self._last_observation = -math.inf
        self._intervals: collections.deque[float] = collections.deque(maxlen=15)

    def observation_period(self) -> float | None:
        """Median interval of recent observations (``None`` until two have arrived)."""
        with self._lock:
            return float(np.median(self._intervals)) if self._intervals else None

    def _synced(self) -> bool:
        obs_period = self.observation_period()
        return self.sync and (obs_period is None or obs_period >= self.period - self.guard)

    def on_observation(self, now: float) -> bool:
        """An observation arrived at ``now``: run a cycle now?"""
        with self._lock:
            if math.isfinite(self._last_observation):
                self._intervals.append(now - self._last_observation)
            self._last_observation = now
        return self._synced()

    def next_cycle(self) -> float:
        """When the next periodic cycle is due (an observation may run one earlier)."""
        due = self.last_cycle + self.period
        obs_period = self.observation_period()
        if obs_period is not None and self._synced():
            expected = self._last_observation + obs_period
            if abs(due - expected) <= self.guard:
                return max(due, expected) + self.guard  # the observation runs it, or we do if it is late
        return due

    def ran(self, now: float) -> None:
        """A cycle ran at ``now``."""
        self.last_cycle = now


class ControlLoop:
    """Runs ``cycle()`` in its own thread on the :class:`ControlClock`'s schedule."""

    def __init__(self, period_s: float, sync: bool, cycle: Callable[[], None], log: Callable[[str], None]) -> None:
        self.clock = ControlClock(period_s, sync)
        self._cycle, self._log = cycle, log
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> bool:
        """Stop after the cycle under way (if any); False if the thread did not end in time."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self._thread is None or not self._thread.is_alive()

    def observed(self, arrival: float) -> None:
        """The frame-completing observation arrived (executor thread): run a cycle now if synced."""
        if self.clock.on_observation(arrival):
            self._wake.set()

    def run_now(self) -> None:
        """Run a cycle as soon as possible (e-stop)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.clock.next_cycle() - time.perf_counter()
            woken = self._wake.wait(wait) if wait > 0 else self._wake.is_set()
            self._wake.clear()
            if self._stop.is_set():
                break
            start = time.perf_counter()
            if woken or start >= self.clock.next_cycle():
                try:
                    self._cycle()
                except Exception as e:  # noqa: BLE001  (a failing cycle is reported; the loop goes on)
                    self.errors += 1
                    self._log(f"control cycle failed: {e}")
                self.clock.ran(start)
