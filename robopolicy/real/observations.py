"""The observation history the policy is fed from (pure Python, thread-safe).

Each feature (``observation.state``, ``observation.environment_state``,
``observation.images.<cam>``) arrives on its own topic, at its own rate, stamped by its
source. :class:`ObservationBuffer` keeps the recent samples of each and builds the policy
input ``[1, To, ...]`` at the *policy's* fps, whatever the topic rates: step ``k`` back
from the reference time ``t_ref`` takes each feature's sample stamped nearest to
``t_ref - k / fps`` (never one after ``t_ref``), which repeats the oldest sample while the
history is shorter than ``To`` like the training windows' padding does. ``t_ref`` is the
oldest of the features' newest stamps, so every feature has a sample there.

Samples are checked as they arrive: a stamp older than the staleness limit or from the
future (beyond the same limit) and non-finite values are rejected with a reason.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Rejection reasons (counted and reported in diagnostics).
STALE_STAMP = "stale_stamp"
FUTURE_STAMP = "future_stamp"
NON_FINITE_OBSERVATION = "non_finite_observation"
#: Samples kept per feature beyond the To-step window (covers sensors faster than the policy).
MAX_SAMPLES = 512


@dataclass(frozen=True)
class Sample:
    stamp: float
    arrival: float
    value: np.ndarray


@dataclass(frozen=True)
class Frame:
    """One policy input: ``obs`` ``[1, To, ...]`` per feature plus ``"task"``."""

    obs: dict[str, Any]
    stamp: float


class ObservationBuffer:
    """Recent samples per feature; see the module docstring."""

    def __init__(self, keys: list[str], n_obs_steps: int, fps: float, staleness_s: float) -> None:
        self.keys = list(keys)
        self.n_obs_steps, self.fps, self.staleness_s = n_obs_steps, fps, staleness_s
        self._lock = threading.Lock()
        self._samples: dict[str, collections.deque[Sample]] = {k: collections.deque(maxlen=MAX_SAMPLES) for k in keys}
        self.rejected: collections.Counter[str] = collections.Counter()
        #: (arrival, stamp) of the newest accepted sample of any feature.
        self.newest: tuple[float, float] | None = None

    def add(self, key: str, stamp: float, value: np.ndarray, now: float, arrival: float) -> str | None:
        """Add a sample stamped ``stamp`` (ROS time) arriving at ``arrival`` (monotonic).

        Returns the rejection reason, or ``None`` when the sample was kept.
        """
        reason = None
        if now - stamp > self.staleness_s:
            reason = STALE_STAMP
        elif stamp - now > self.staleness_s:
            reason = FUTURE_STAMP
        elif value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            reason = NON_FINITE_OBSERVATION
        with self._lock:
            if reason is not None:
                self.rejected[reason] += 1
                return reason
            samples = self._samples[key]
            if samples and stamp < samples[-1].stamp:
                self.rejected[STALE_STAMP] += 1
                return STALE_STAMP
            samples.append(Sample(stamp, arrival, value))
            horizon = stamp - (self.n_obs_steps + 1) / self.fps
            while len(samples) > self.n_obs_steps and samples[1].stamp <= horizon:
                samples.popleft()
            if self.newest is None or arrival > self.newest[0]:
                self.newest = (arrival, stamp)
        return None

    def observation_time(self) -> float | None:
        """The oldest of the newest stamps (``None`` until every feature has a sample)."""
        with self._lock:
            if not all(self._samples.values()):
                return None
            return min(s[-1].stamp for s in self._samples.values())

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
