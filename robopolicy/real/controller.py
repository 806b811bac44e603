"""The policy node's logic without ROS: observations in, safe commands out.

:class:`PolicyController` ties the pieces together:

* :meth:`observe` (control thread) files a checked sample into the
  :class:`~robopolicy.real.observations.ObservationBuffer`; :meth:`wake` wakes the
  inference worker once a frame is complete;
* the inference worker (a thread; the predictor releases the GIL in its kernels) predicts
  the next chunk from the newest ``To``-step frame so that it lands before the current
  chunk's execution horizon ends: it starts once the time left to that switch is below the
  recent worst inference time (x1.5) plus one policy period, and hands the timestamped
  chunk to the :class:`~robopolicy.real.schedule.ActionSchedule` (a late chunk is covered by
  the current chunk's remaining actions);
* :meth:`cycle` (control thread) asks the :class:`~robopolicy.real.safety.Watchdog`
  whether the policy may command, takes the scheduled (cross-faded) action, lets a
  predictor with ``correct_action`` (a residual-RL policy) correct it with the newest
  observation, and passes the result through the
  :class:`~robopolicy.real.safety.SafetyFilter` with the measured value of each position
  command (``measured_index`` into ``observation.state``): the safety layer sees the final
  command.
  A correction that fails or is not finite becomes a NaN proposal, which the safety layer
  rejects (hold, counted as ``non_finite_action``).

Times: ``now`` / stamps are ROS time in seconds (the node's clock, what sources stamp
with); arrivals and durations are ``time.perf_counter`` seconds.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any, Callable, NamedTuple

import numpy as np

from robopolicy.errors import InstructionError
from robopolicy.real.observations import Frame, ObservationBuffer, Rejection
from robopolicy.real.safety import Decision, EStop, SafetyFilter, SafetyLimits, Watchdog
from robopolicy.real.schedule import ActionSchedule, Chunk
from robopolicy.real.telemetry import Telemetry
from robopolicy.spec import STATE, FeatureSpec, check_instruction

#: How often an idle worker re-checks its stop flag (it is woken by every complete frame).
WAKE_TIMEOUT_S = 0.1
#: Inference durations remembered for the start-early margin.
DURATION_WINDOW = 20
#: The worker starts this many times the recent worst inference time before the plan ends.
LEAD_FACTOR = 1.5


class Cycle(NamedTuple):
    """One control cycle's outcome."""

    decision: Decision
    #: (arrival, stamp) of an observation this cycle is the first to use.
    used: tuple[float, float] | None
    #: Time spent in the per-step correction (NaN when none ran).
    correction_ms: float


class PolicyController:
    """One loaded model driving the robot; see the module docstring."""

    def __init__(
        self,
        predictor: Any,
        keys: list[str],
        horizon: int,
        blend_s: float,
        staleness_s: float,
        limits: SafetyLimits,
        estop: EStop,
        task: str,
        clock: Callable[[], float],
        log: Callable[[str], None],
        period_s: float,
        future_tolerance_s: float = 0.05,
        measured_index: tuple[int, ...] = (),
    ) -> None:
        self.predictor = predictor
        self.spec: FeatureSpec = predictor.spec
        self._correct: Callable[[dict[str, np.ndarray], np.ndarray], Any] | None = getattr(
            predictor, "correct_action", None)
        self.horizon = horizon
        self.task: str | None = task  # None: no valid instruction, hold
        self.buffer = ObservationBuffer(keys, self.spec.n_obs_steps, self.spec.fps, staleness_s, future_tolerance_s)
        self.schedule = ActionSchedule(blend_s)
        self.watchdog = Watchdog(staleness_s)
        self.safety = SafetyFilter(limits, period_s, estop)
        self._measured = np.asarray(measured_index or (-1,) * limits.lower.size)
        self.telemetry = Telemetry()
        self._clock, self._log = clock, log
        self._lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._durations: collections.deque[float] = collections.deque(maxlen=DURATION_WINDOW)
        self._last_frame_stamp = -math.inf
        self._used_arrival = -math.inf
        self.chunks = self.stale_chunks = self.inference_errors = self.correction_errors = 0
        self.last_error = ""

    @property
    def corrects(self) -> bool:
        """The predictor corrects every executed action (a residual-RL policy)."""
        return self._correct is not None

    # ---- control thread ----------------------------------------------------------------
    def observe(self, key: str, stamp: float, value: np.ndarray, arrival: float) -> Rejection | None:
        """File one observation sample; returns what was rejected (see ``ObservationBuffer.add``)."""
        return self.buffer.add(key, stamp, value, self._clock(), arrival)

    def set_task(self, task: str) -> str | None:
        """Switch the instruction live; returns why it was refused, else ``None``.

        For a model trained on instructions (``spec.tasks``) an empty or unknown one is
        refused: the plan is dropped and the controller holds (``waiting_for_policy``) until a
        valid one arrives. A valid new one drops the old instruction's plan too, so the next
        chunk follows it at once; a chunk still being inferred for the old one is discarded.
        """
        refused = None
        if self.spec.tasks:
            try:
                check_instruction(task, self.spec.tasks)
            except InstructionError as e:
                task, refused = None, str(e)
        with self._lock:
            if task != self.task:
                self.schedule.clear()
            self.task = task
        return refused

    def wake(self) -> None:
        """A frame is complete: let the worker check whether to infer (after the control cycle
        it triggers ran, so the two do not compete for the GIL)."""
        self._wake.set()

    def cycle(self, now: float) -> Cycle:
        """This cycle's safe command (the scheduled action, corrected, through the safety layer) at
        ROS time ``now``: the command's stamp, and the clock its slew limit per second runs on."""
        observation_time = self.buffer.observation_time()
        with self._lock:
            reason = self.watchdog.check(now, observation_time, self.schedule.plan_end)
            proposed = self.schedule.action(now) if reason is None else None
        correction_ms = math.nan
        if proposed is not None and self._correct is not None and np.all(np.isfinite(proposed)):
            start = time.perf_counter()
            proposed = self._corrected(proposed)
            correction_ms = (time.perf_counter() - start) * 1e3
        decision = self.safety.apply(proposed, now, reason, self._measured_positions())
        newest = self.buffer.newest
        if newest is not None and newest[0] > self._used_arrival:
            self._used_arrival = newest[0]
            return Cycle(decision, newest, correction_ms)
        return Cycle(decision, None, correction_ms)

    def _measured_positions(self) -> np.ndarray | None:
        """The measured value of each position command dimension (NaN elsewhere), from the newest
        ``observation.state``; ``None`` before one arrived or without position dimensions."""
        if not np.any(self._measured >= 0):
            return None
        state = self.buffer.latest().get(STATE)
        if state is None:
            return None
        return np.where(self._measured >= 0, np.asarray(state, dtype=np.float64)[np.maximum(self._measured, 0)], np.nan)

    def _corrected(self, planned: np.ndarray) -> np.ndarray:
        """The corrected action, or NaN (the safety layer holds) when the correction fails."""
        try:
            return self._correction(self.buffer.latest(), planned)
        except Exception as e:  # noqa: BLE001  (a failing model must not take the node down)
            self.correction_errors += 1
            self.last_error = f"correction failed: {e}"
            self._log(self.last_error)
            return np.full_like(planned, np.nan)

    def _correction(self, obs: dict[str, np.ndarray], planned: np.ndarray) -> np.ndarray:
        corrected = np.asarray(self._correct(obs, planned.astype(np.float32)), dtype=np.float64)
        if corrected.shape != planned.shape:
            raise ValueError(f"the predictor corrected an action of shape {planned.shape} into {corrected.shape}")
        return corrected

    # ---- inference worker --------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """An inference thread is still running (e.g. stuck in a hung predictor)."""
        return self._thread is not None and self._thread.is_alive()

    def warm_up(self, runs: int = 2) -> float:
        """Run the predictor (and its correction) on a synthetic frame (first calls are slow; a model
        that fails here fails configure); returns the last chunk inference duration (s)."""
        obs: dict[str, Any] = {"task": [self.task]}
        for key in self.buffer.keys:
            f = self.spec.features[key]
            if f.kind == "image":
                obs[key] = np.zeros((1, self.spec.n_obs_steps, *f.shape), dtype=np.uint8)
            else:
                mean = np.asarray(f.stats.mean if f.stats else np.zeros(f.dim), dtype=np.float32)
                obs[key] = np.broadcast_to(mean, (1, self.spec.n_obs_steps, f.dim)).copy()
        for _ in range(runs):
            start = time.perf_counter()
            actions = self._check_chunk(np.asarray(self.predictor.predict_chunk(obs)))
            self._durations.append(time.perf_counter() - start)
        if self._correct is not None:
            step = {key: obs[key][0, -1] for key in self.buffer.keys}
            for _ in range(runs):
                self._correction(step, actions[0])
        return self._durations[-1]

    def start(self) -> None:
        """Start commanding: a fresh plan, the first command from the measured state, an inference worker."""
        with self._lock:
            self.schedule.clear()
        self.safety.reset()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> bool:
        """Stop the worker and drop the plan; False if the worker is stuck in the predictor."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            self.schedule.clear()
        return not self.busy

    def _due(self, now: float) -> Frame | None:
        with self._lock:
            switch = self.schedule.plan_switch
        lead = LEAD_FACTOR * max(self._durations, default=0.0) + 1.0 / self.spec.fps
        if self.task is None or (switch is not None and switch - now > lead):
            return None
        frame = self.buffer.frame(self.task)
        if frame is None or frame.stamp <= self._last_frame_stamp or now - frame.stamp > self.watchdog.staleness_s:
            return None
        return frame

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(WAKE_TIMEOUT_S)
            self._wake.clear()
            frame = None if self._stop.is_set() else self._due(self._clock())
            if frame is None:
                continue
            self._last_frame_stamp = frame.stamp
            start = time.perf_counter()
            try:
                actions = self._check_chunk(np.asarray(self.predictor.predict_chunk(frame.obs)))
            except Exception as e:  # noqa: BLE001  (a failing model must not take the node down)
                self.inference_errors += 1
                self.last_error = f"inference failed: {e}"
                self._log(self.last_error)
                continue
            duration = time.perf_counter() - start
            self._durations.append(duration)
            if not self._stop.is_set() and frame.obs["task"] == [self.task]:
                self._install(Chunk(frame.stamp, actions, self.spec.fps, self.horizon), duration)

    def _check_chunk(self, actions: np.ndarray) -> np.ndarray:
        da = self.spec.action.dim
        if actions.ndim != 3 or actions.shape[0] != 1 or actions.shape[1] < self.horizon or actions.shape[2] != da:
            raise ValueError(f"the predictor returned actions of shape {actions.shape}; expected "
                             f"[1, >= {self.horizon}, {da}]")
        return actions[0].astype(np.float64)

    def _install(self, chunk: Chunk, duration: float) -> None:
        now = self._clock()
        with self._lock:
            switch = self.schedule.plan_switch
            stale = self.schedule.install(chunk, now)
        self.chunks += 1
        if stale >= len(chunk.actions):
            self.stale_chunks += 1
        slack_ms = (switch - now) * 1e3 if switch is not None else float("nan")
        self.telemetry.record_inference(now, duration * 1e3, slack_ms, stale)
