"""Control-loop telemetry: per-cycle and per-inference records and their summary (pure Python).

Per control cycle: the interval since the previous cycle, the **obs-to-command latency**
(from the arrival, in the node, of the newest observation to the publish of the first
command computed with it; cycles that reuse an older observation have none), the
stamp-to-command latency (from the observation's header stamp, i.e. including transport
when the source stamps at publish time), the time spent in the cycle and, within it, in the
per-step correction of a residual-RL policy (NaN without one), and whether the safety layer
held. Per inference: its duration, the slack to the previous chunk's switch
time (negative: a late chunk, covered by the previous chunk's reserve actions while they
last), and how many of its actions were already stale.

The node publishes the records in batches; ``robopolicy deploy`` keeps them all and
summarizes them with :func:`summarize`.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from robopolicy.stats import percentiles

CYCLE_FIELDS = ("time_s", "period_ms", "obs_to_command_ms", "stamp_to_command_ms", "cycle_ms", "correction_ms", "held")
INFERENCE_FIELDS = ("time_s", "inference_ms", "slack_ms", "stale_actions")
#: A cycle interval above this many nominal periods is a missed control deadline.
MISSED_PERIOD_FACTOR = 1.5
#: Records kept in the node for its own diagnostics summary.
WINDOW = 2000


class Telemetry:
    """Thread-safe record keeper: a rolling window plus the rows not yet published."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[tuple[float, ...]]] = {"cycles": [], "inference": []}
        self._window: dict[str, collections.deque[tuple[float, ...]]] = {
            "cycles": collections.deque(maxlen=WINDOW), "inference": collections.deque(maxlen=WINDOW)}

    def record_cycle(self, time_s: float, period_ms: float, obs_to_command_ms: float, stamp_to_command_ms: float,
                     cycle_ms: float, correction_ms: float, held: bool) -> None:
        self._add("cycles", (time_s, period_ms, obs_to_command_ms, stamp_to_command_ms, cycle_ms, correction_ms,
                             float(held)))

    def record_inference(self, time_s: float, inference_ms: float, slack_ms: float, stale_actions: int) -> None:
        self._add("inference", (time_s, inference_ms, slack_ms, float(stale_actions)))

    def _add(self, kind: str, row: tuple[float, ...]) -> None:
        with self._lock:
            self._pending[kind].append(row)
            self._window[kind].append(row)

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows recorded since the last drain: (cycles, inference)."""
        with self._lock:
            cycles, inference = self._pending["cycles"], self._pending["inference"]
            self._pending = {"cycles": [], "inference": []}
        return _rows(cycles, CYCLE_FIELDS), _rows(inference, INFERENCE_FIELDS)

    def window(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return _rows(list(self._window["cycles"]), CYCLE_FIELDS), _rows(list(self._window["inference"]),
                                                                              INFERENCE_FIELDS)


def _rows(rows: list[tuple[float, ...]], fields: tuple[str, ...]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(fields))


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p99: float
    max: float
    n: int

    @classmethod
    def of(cls, values: np.ndarray) -> "Percentiles":
        v = values[np.isfinite(values)]
        if v.size == 0:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(*percentiles(v), float(v.max()), int(v.size))


@dataclass(frozen=True)
class TimingSummary:
    """What the deploy report and the diagnostics show about the control loop's timing."""

    control_rate_hz: float
    cycles: int
    period_ms_mean: float
    period_jitter_ms: float
    missed_control_deadlines: int
    held_cycles: int
    obs_to_command_ms: Percentiles
    stamp_to_command_ms: Percentiles
    cycle_ms: Percentiles
    correction_ms: Percentiles
    inference_ms: Percentiles
    chunks: int
    late_chunks: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(cycles: np.ndarray, inference: np.ndarray, control_rate_hz: float) -> TimingSummary:
    """Summary of cycle rows (:data:`CYCLE_FIELDS`) and inference rows (:data:`INFERENCE_FIELDS`)."""
    c = {f: cycles[:, i] for i, f in enumerate(CYCLE_FIELDS)}
    periods = c["period_ms"][np.isfinite(c["period_ms"])]
    nominal_ms = 1e3 / control_rate_hz
    slack = inference[:, INFERENCE_FIELDS.index("slack_ms")]
    return TimingSummary(
        control_rate_hz=control_rate_hz,
        cycles=int(cycles.shape[0]),
        period_ms_mean=float(periods.mean()) if periods.size else float("nan"),
        period_jitter_ms=float(periods.std()) if periods.size else float("nan"),
        missed_control_deadlines=int(np.sum(periods > MISSED_PERIOD_FACTOR * nominal_ms)),
        held_cycles=int(np.sum(c["held"] > 0)),
        obs_to_command_ms=Percentiles.of(c["obs_to_command_ms"]),
        stamp_to_command_ms=Percentiles.of(c["stamp_to_command_ms"]),
        cycle_ms=Percentiles.of(c["cycle_ms"]),
        correction_ms=Percentiles.of(c["correction_ms"]),
        inference_ms=Percentiles.of(inference[:, INFERENCE_FIELDS.index("inference_ms")]),
        chunks=int(inference.shape[0]),
        late_chunks=int(np.sum(slack < 0)),
    )
