"""The observation history the policy is fed from (pure Python, thread-safe).

Each feature (``observation.state``, ``observation.environment_state``,
``observation.images.<cam>``) arrives on its own topic, at its own rate, stamped by its
source. :class:`ObservationBuffer` keeps the recent samples of each and builds the policy
input ``[1, To, ...]`` at the *policy's* fps, whatever the topic rates: step ``k`` back
from the reference time ``t_ref`` takes each feature's sample stamped nearest to
``t_ref - k / fps`` (never one after ``t_ref``), which repeats the oldest sample while the
history is shorter than ``To`` like the training windows' padding does. ``t_ref`` is the
oldest of the features' newest stamps, so every feature has a sample there.

Samples are checked as they arrive, per feature (each feature is one source):

* older than the staleness limit -> ``stale_stamp``; ahead of the node's clock by more than
  ``future_tolerance_s`` (clock skew) -> ``future_stamp``; non-finite values ->
  ``non_finite_observation``;
* stamps are monotonic per source: a sample stamped before the feature's newest one is
  ``out_of_order``, unless that newest one is still ahead of the node's clock: then *it*
  was the outlier (a source stamps nothing after now) and is dropped
  (``future_outlier``), so one bad stamp cannot blind the stream that follows it.

A sample counts as fresh from ``min(stamp, received)``: a future stamp cannot make a frozen
sample look fresh to the watchdog.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

#: Rejection reasons (counted and reported in diagnostics).
STALE_STAMP = "stale_stamp"
FUTURE_STAMP = "future_stamp"
OUT_OF_ORDER = "out_of_order"
FUTURE_OUTLIER = "future_outlier"
NON_FINITE_OBSERVATION = "non_finite_observation"
#: Samples kept per feature beyond the To-step window (covers sensors faster than the policy).
MAX_SAMPLES = 512


@dataclass(frozen=True)
class Sample:
    stamp: float
    #: ROS time when it was filed (freshness never counts from later than this).
    received: float
    arrival: float
    value: np.ndarray

    @property
    def fresh_from(self) -> float:
        return min(self.stamp, self.received)


class Rejection(NamedTuple):
    """Why a sample was not kept: a counter ``reason`` and a sentence for people."""

    reason: str
    detail: str

    @property
    def kept(self) -> bool:
        """The new sample was kept all the same (the rejected one was the previous outlier)."""
        return self.reason == FUTURE_OUTLIER


@dataclass(frozen=True)
class Frame:
    """One policy input: ``obs`` ``[1, To, ...]`` per feature plus ``"task"``."""

    obs: dict[str, Any]
    stamp: float


class ObservationBuffer:
    """Recent samples per feature; see the module docstring."""

    def __init__(self, keys: list[str], n_obs_steps: int, fps: float, staleness_s: float,
                 future_tolerance_s: float) -> None:
        self.keys = list(keys)
        self.n_obs_steps, self.fps = n_obs_steps, fps
        self.staleness_s, self.future_tolerance_s = staleness_s, future_tolerance_s
        self._lock = threading.Lock()
        self._samples: dict[str, collections.deque[Sample]] = {k: collections.deque(maxlen=MAX_SAMPLES) for k in keys}
        self.rejected: collections.Counter[str] = collections.Counter()
        #: (arrival, stamp) of the newest accepted sample of any feature.
        self.newest: tuple[float, float] | None = None

    def add(self, key: str, stamp: float, value: np.ndarray, now: float, arrival: float) -> Rejection | None:
        """File a sample stamped ``stamp`` (ROS time) arriving at ``arrival`` (monotonic) when the
        node's clock reads ``now``.

        Returns ``None`` when it was kept, else the :class:`Rejection` of this sample or, when
        it showed the previous one to be a future outlier (``kept``), of that one.
        """
        with self._lock:
            rejection = self._check(self._samples[key], stamp, value, now)
            if rejection is not None and not rejection.kept:
                self.rejected[rejection.reason] += 1
                return rejection
            samples = self._samples[key]
            if rejection is not None:  # the newest samples were the outliers: drop them, keep this one
                self.rejected[FUTURE_OUTLIER] += 1
                while samples and samples[-1].stamp >= stamp:
                    samples.pop()
            samples.append(Sample(stamp, now, arrival, value))
            horizon = stamp - (self.n_obs_steps + 1) / self.fps
            while len(samples) > self.n_obs_steps and samples[1].stamp <= horizon:
                samples.popleft()
            if self.newest is None or arrival > self.newest[0]:
                self.newest = (arrival, stamp)
        return rejection

    def _check(self, samples: collections.deque[Sample], stamp: float, value: np.ndarray,
               now: float) -> Rejection | None:
        age = now - stamp
        if age > self.staleness_s:
            return Rejection(STALE_STAMP, f"stamped {age:.3f} s ago, beyond the {self.staleness_s:g} s staleness limit")
        if -age > self.future_tolerance_s:
            return Rejection(FUTURE_STAMP, f"stamped {-age:.3f} s in the future, beyond the "
                                           f"{self.future_tolerance_s:g} s clock-skew tolerance")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            return Rejection(NON_FINITE_OBSERVATION, "has non-finite values")
        if samples and stamp < samples[-1].stamp:
            back = samples[-1].stamp - stamp
            if samples[-1].stamp > now:
                return Rejection(FUTURE_OUTLIER, f"the previous sample, stamped {samples[-1].stamp - now:.3f} s "
                                                 "ahead of the clock, was dropped as an outlier")
            return Rejection(OUT_OF_ORDER, f"stamped {back:.3f} s before the previous sample (out of order)")
        return None

    def observation_time(self) -> float | None:
        """When the least fresh feature's newest sample became fresh: ``min(stamp, received)``
        (``None`` until every feature has a sample)."""
        with self._lock:
            if not all(self._samples.values()):
                return None
            return min(s[-1].fresh_from for s in self._samples.values())

    def latest(self) -> dict[str, np.ndarray]:
        """The newest sample of each feature that has one (the current observation, unbatched)."""
        with self._lock:
            return {key: samples[-1].value for key, samples in self._samples.items() if samples}

    def frame(self, task: str) -> Frame | None:
        """The policy input at the reference time (``None`` until every feature has a sample)."""
        with self._lock:
            if not all(self._samples.values()):
                return None
            t_ref = min(s[-1].stamp for s in self._samples.values())
            obs: dict[str, Any] = {}
            for key, samples in self._samples.items():
                steps = [self._nearest(samples, t_ref - k / self.fps, t_ref) for k in range(self.n_obs_steps)]
                obs[key] = np.stack(steps[::-1])[None]
        obs["task"] = [task]
        return Frame(obs, t_ref)

    @staticmethod
    def _nearest(samples: collections.deque[Sample], t: float, latest: float) -> np.ndarray:
        """The value stamped nearest to ``t`` among samples stamped at or before ``latest``."""
        best, best_gap = samples[0], np.inf
        for s in reversed(samples):
            if s.stamp > latest:
                continue
            gap = abs(s.stamp - t)
            if gap < best_gap:
                best, best_gap = s, gap
            elif s.stamp < t:
                break
        return best.value
