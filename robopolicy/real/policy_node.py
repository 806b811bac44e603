"""The policy node: a ROS 2 lifecycle node that runs a chunking policy at control rate.

Lifecycle:

* **configure** reads the parameters, loads the model (export folder or training run),
  checks its feature spec against the parameters (a mismatch fails the transition with a
  message naming both sides, also published on ``/diagnostics``), warms the model and the
  messages up, and subscribes the observation topics (the history fills while inactive);
* **activate** starts the inference worker and the control timer;
* **deactivate** stops commanding and sends the hold command once;
* **cleanup** drops the model and the topics.

Topics: ``sensor_msgs/JointState`` per low-dimensional feature, ``sensor_msgs/Image`` per
camera, ``std_msgs/String`` instruction (optional) in; the command
(``Float64MultiArray`` or ``JointTrajectory``) out. Always available, in every state:
``~/estop`` and ``~/reset_estop`` (``std_srvs/Trigger``), the latched ``~/estopped``
(``std_msgs/Bool``), ``/diagnostics`` (interventions and their reasons, rejected
observations, deadlines, latency) and ``~/telemetry/cycles`` / ``~/telemetry/inference``
(batches of :mod:`robopolicy.real.telemetry` records).

Control: a timer at ``control_rate_hz`` runs the cycles; with ``sync_to_observation`` the
arrival of ``observation.state`` (the message that completes a frame) also runs one at once
and re-arms the timer (:class:`~robopolicy.real.schedule.ControlClock`), then wakes the
inference worker. Each cycle takes the scheduled action, has a residual-RL policy correct it
with the newest observation (``correct_action``), passes the result through the safety layer
and publishes it.

The node is thin: the logic lives in :class:`~robopolicy.real.controller.PolicyController`.
"""

from __future__ import annotations

import collections
import math
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.context import Context
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.publisher import Publisher
from rclpy.timer import Timer
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import Trigger

from robopolicy.real.config import POLICY_PARAMS, PolicyNodeConfig
from robopolicy.real.controller import PolicyController
from robopolicy.real.loader import load_predictor
from robopolicy.real.messages import (
    CommandCodec, JointStateReader, MessageError, image_to_array, s_to_stamp, stamp_to_s, table_to_msg,
)
from robopolicy.real.nodes import POLICY
from robopolicy.real.rosutil import (
    LATCHED_QOS, RECORD_QOS, declare_parameters, parameter_values, run_node, stream_qos,
)
from robopolicy.real.safety import HOLD_REASONS, WAITING_FOR_POLICY, EStop
from robopolicy.real.schedule import ControlClock
from robopolicy.real.telemetry import CYCLE_FIELDS, INFERENCE_FIELDS, summarize
from robopolicy.spec import STATE

Loader = Callable[[str, str, int], Any]
SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class PolicyNode(LifecycleNode):
    """See the module docstring. ``loader(model, backend, threads)`` opens the model."""

    def __init__(self, context: Context | None = None, loader: Loader = load_predictor,
                 parameter_overrides: list[Parameter] | None = None) -> None:
        super().__init__(POLICY.name, context=context, parameter_overrides=parameter_overrides or [])
        declare_parameters(self, POLICY_PARAMS)
        self._loader = loader
        self._estop = EStop()
        self._cfg: PolicyNodeConfig | None = None
        self._ctrl: PolicyController | None = None
        self._codec: CommandCodec | None = None
        self._command_pub: Publisher | None = None
        self._control_clock: ControlClock | None = None
        self._timer: Timer | None = None
        self._fallback: Timer | None = None
        self._entities: list[Any] = []
        self._trigger_key = ""
        self._status, self._error = "unconfigured", ""
        self._reasons: tuple[str, ...] = ()
        self._rejections: collections.Counter[str] = collections.Counter()
        self._last_rejection = ""
        self._rejections_reported = 0
        self._last_cycle = math.nan
        self._published_rows = {"cycles": 0, "inference": 0}
        self._estop_pub = self.create_publisher(Bool, "~/estopped", LATCHED_QOS)
        self._estop_pub.publish(Bool(data=False))
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._cycles_pub = self.create_publisher(Float64MultiArray, "~/telemetry/cycles", RECORD_QOS)
        self._inference_pub = self.create_publisher(Float64MultiArray, "~/telemetry/inference", RECORD_QOS)
        self.create_service(Trigger, "~/estop", self._on_estop)
        self.create_service(Trigger, "~/reset_estop", self._on_reset_estop)
        self.create_timer(self.get_parameter("diagnostics_period_s").value, self._publish_diagnostics)

    # ---- lifecycle -----------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as e:  # noqa: BLE001  (report any failure; the node stays up, unconfigured)
            self._error = f"configure failed: {e}"
            self.get_logger().error(self._error)
            self.get_logger().debug(traceback.format_exc())
            self._release()
            self._publish_diagnostics()
            return FAILURE
        self._error, self._status = "", "inactive"
        self.get_logger().info(f"configured: {self._cfg.model} ({self._ctrl.spec.fps:g} fps policy, "
                               f"{self._cfg.control_rate_hz:g} Hz control)")
        return SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        assert self._ctrl is not None and self._cfg is not None
        if self._ctrl.busy:
            self._error = "cannot activate: the previous inference has not returned (hung model?)"
            self.get_logger().error(self._error)
            return FAILURE
        self._ctrl.start()
        period = 1.0 / self._cfg.control_rate_hz
        self._control_clock = ControlClock(period, self._cfg.sync_to_observation)
        self._last_cycle = math.nan
        self._reasons = (WAITING_FOR_POLICY,)  # until the first cycle says otherwise
        self._timer = self.create_timer(period, self._on_timer)
        self._fallback = self.create_timer(self._control_clock.guard, self._on_fallback, autostart=False)
        self._status = "active"
        return SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_commanding()
        return SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._timer is not None:
            self._stop_commanding()
        self._release()
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return SUCCESS

    def destroy_node(self) -> None:
        super().destroy_node()
        # rclpy's LifecycleNode keeps its state machine, which keeps the node handle and with it
        # the DDS participant (and Fast DDS' shared-memory segments) alive: free it too.
        self._state_machine.destroy_when_not_in_use()

    # ---- configure / release -------------------------------------------------------------
    def _configure(self) -> None:
        cfg = PolicyNodeConfig.from_params(parameter_values(self, POLICY_PARAMS))
        sys.setswitchinterval(cfg.switch_interval_s)
        predictor = self._loader(cfg.model, cfg.backend, cfg.inference_threads)
        spec = predictor.spec
        cfg.check_spec(spec, f"model {cfg.model}", f"the parameters of node {self.get_name()}")
        ctrl = PolicyController(
            predictor, cfg.observation_keys, cfg.horizon(spec), cfg.blend_s, cfg.staleness_s, cfg.limits,
            self._estop, cfg.default_task(spec), self._now,
            lambda m: self.get_logger().error(m, throttle_duration_sec=5.0))
        ctrl.warm_up()
        self._cfg, self._ctrl = cfg, ctrl
        self._codec = CommandCodec(cfg.message_type, list(cfg.action_names), 1.0 / cfg.control_rate_hz)
        # The first message construction in a process is slow: do it now, not in the first cycle.
        self._codec.encode(cfg.limits.zero, s_to_stamp(self._now()))
        qos = stream_qos(cfg.qos_depth, cfg.qos_reliability)
        self._command_pub = self.create_publisher(self._codec.msg_type, cfg.action_topic, qos)
        self._entities.append(self._command_pub)
        keys = [f.key for f in cfg.low_dim]
        self._trigger_key = STATE if STATE in keys else (keys or [f.key for f in cfg.images])[0]
        for f in cfg.low_dim:
            reader = JointStateReader(f.topic, list(f.names))
            self._entities.append(self.create_subscription(
                JointState, f.topic, lambda m, k=f.key, r=reader: self._on_joint_state(k, r, m), qos))
        for f in cfg.images:
            shape = tuple(spec.features[f.key].shape)
            self._entities.append(self.create_subscription(
                Image, f.topic, lambda m, k=f.key, t=f.topic, s=shape: self._on_image(k, t, s, m), qos))
        if cfg.language_topic:
            self._entities.append(self.create_subscription(
                String, cfg.language_topic, self._on_instruction, stream_qos(1, "reliable")))

    def _release(self) -> None:
        if self._ctrl is not None:
            self._publish_diagnostics()
        for entity in self._entities:
            if isinstance(entity, Publisher):
                self.destroy_publisher(entity)
            else:
                self.destroy_subscription(entity)
        self._entities.clear()
        self._cfg = self._ctrl = self._codec = self._command_pub = None
        self._status = "unconfigured"

    def _stop_commanding(self) -> None:
        assert self._ctrl is not None
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self.destroy_timer(self._fallback)
            self._timer = self._fallback = None
        if not self._ctrl.stop():
            self.get_logger().warning("the inference thread is still in the model; it is abandoned")
        hold = self._ctrl.safety.hold_now()
        if hold is not None:
            self._command_pub.publish(self._codec.encode(hold, s_to_stamp(self._now())))
        self._status = "inactive"
        self._publish_diagnostics()

    # ---- observations ----------------------------------------------------------------------
    def _on_joint_state(self, key: str, reader: JointStateReader, msg: JointState) -> None:
        arrival = time.perf_counter()
        try:
            value = reader.read(msg)
        except MessageError as e:
            self._reject(e.reason, str(e))
            return
        self._accept(key, reader.topic, stamp_to_s(msg.header.stamp), value, arrival)

    def _on_image(self, key: str, topic: str, shape: tuple[int, ...], msg: Image) -> None:
        arrival = time.perf_counter()
        try:
            value = image_to_array(msg, topic, shape)
        except MessageError as e:
            self._reject(e.reason, str(e))
            return
        self._accept(key, topic, stamp_to_s(msg.header.stamp), value, arrival)

    def _on_instruction(self, msg: String) -> None:
        """Switch the instruction live; an empty or unknown one holds until a valid one arrives."""
        if self._ctrl is None:
            return
        refused = self._ctrl.set_task(msg.data)
        if refused is not None:
            self._reject("instruction", f"{self._cfg.language_topic}: {refused}; holding until a valid instruction")

    def _accept(self, key: str, topic: str, stamp: float, value: np.ndarray, arrival: float) -> None:
        assert self._ctrl is not None
        reason = self._ctrl.observe(key, stamp, value, arrival)
        if reason is not None:
            self._reject(reason, f"{topic}: sample stamped {self._now() - stamp:+.3f} s ago rejected ({reason})")
        elif key == self._trigger_key:
            if self._timer is not None and self._control_clock.on_observation(arrival):
                self._cycle()
                self._timer.reset()
            self._ctrl.wake()

    def _reject(self, reason: str, message: str) -> None:
        self._rejections[reason] += 1
        self._last_rejection = message
        self.get_logger().warning(message, throttle_duration_sec=5.0)

    # ---- control -------------------------------------------------------------------------
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_timer(self) -> None:
        if self._timer is None:  # an event queued before deactivate destroyed the timer
            return
        action = self._control_clock.on_timer(time.perf_counter())
        if action == "run":
            self._cycle()
        elif action == "skip":  # the observation due now runs this cycle; the fallback, if it is late
            self._fallback.reset()
        else:
            self._timer.reset()

    def _on_fallback(self) -> None:
        if self._fallback is None:
            return
        self._fallback.cancel()
        if self._control_clock.overdue(time.perf_counter()):
            self._cycle()
            self._timer.reset()

    def _cycle(self) -> None:
        start = time.perf_counter()
        now = self._now()
        decision, used, correction_ms = self._ctrl.cycle(now)
        if decision.command is not None:
            self._command_pub.publish(self._codec.encode(decision.command, s_to_stamp(now)))
        end = time.perf_counter()
        latency = (end - used[0]) * 1e3 if used else math.nan
        stamp_latency = (now + end - start - used[1]) * 1e3 if used else math.nan
        self._ctrl.telemetry.record_cycle(now, (start - self._last_cycle) * 1e3, latency, stamp_latency,
                                          (end - start) * 1e3, correction_ms, decision.held)
        self._reasons = decision.reasons
        self._last_cycle = start
        self._control_clock.ran(start)

    # ---- e-stop --------------------------------------------------------------------------
    def _on_estop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        latched = self._estop.trigger("e-stop service called")
        self._estop_pub.publish(Bool(data=True))
        if self._timer is not None:
            self._cycle()  # send the hold command now, not at the next tick
        self.get_logger().warning("e-stop latched" if latched else "e-stop triggered again (already latched)")
        response.success, response.message = True, "e-stop latched" if latched else "e-stop already latched"
        return response

    def _on_reset_estop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        was = self._estop.reset()
        self._estop_pub.publish(Bool(data=False))
        self.get_logger().info("e-stop reset" if was else "e-stop reset requested but it was not latched")
        response.success, response.message = True, "e-stop cleared" if was else "e-stop was not latched"
        return response

    # ---- diagnostics ---------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        values: dict[str, Any] = {"state": self._status, "estop": self._estop.reason or "clear",
                                  "estop_triggers": self._estop.triggers}
        ctrl = self._ctrl
        if ctrl is not None:
            streams = zip(("cycles", "inference"), ctrl.telemetry.drain(), (CYCLE_FIELDS, INFERENCE_FIELDS),
                          (self._cycles_pub, self._inference_pub))
            for kind, rows, fields, pub in streams:
                if rows.size:
                    pub.publish(table_to_msg(fields, rows))
                    self._published_rows[kind] += rows.shape[0]
            timing = summarize(*ctrl.telemetry.window(), self._cfg.control_rate_hz)
            values.update({f"intervention.{k}": v for k, v in sorted(ctrl.safety.counts.items())})
            values.update({
                "model": self._cfg.model, "task": ctrl.task,
                "missed_inference_deadlines": ctrl.watchdog.missed_deadlines,
                "chunks": ctrl.chunks, "stale_chunks": ctrl.stale_chunks, "inference_errors": ctrl.inference_errors,
                "last_inference_error": ctrl.last_error,
                "recent.obs_to_command_ms_p99": round(timing.obs_to_command_ms.p99, 3),
                "recent.inference_ms_p99": round(timing.inference_ms.p99, 3),
                "recent.period_jitter_ms": round(timing.period_jitter_ms, 3),
                "recent.missed_control_deadlines": timing.missed_control_deadlines,
            })
            if ctrl.corrects:
                values.update({"correction_errors": ctrl.correction_errors,
                               "recent.correction_ms_p99": round(timing.correction_ms.p99, 3)})
        values.update({f"telemetry.{k}": v for k, v in self._published_rows.items()})
        values.update({f"rejected.{k}": v for k, v in sorted(self._rejections.items())})
        if self._last_rejection:
            values["rejected.last"] = self._last_rejection
        new_rejections = sum(self._rejections.values()) - self._rejections_reported
        self._rejections_reported += new_rejections
        level, message = self._health(new_rejections)
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: policy", message=message,
                                  hardware_id=self.get_fully_qualified_name(),
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = s_to_stamp(self._now())
        self._diag_pub.publish(array)

    def _health(self, new_rejections: int) -> tuple[bytes, str]:
        if self._estop.active:
            return DiagnosticStatus.ERROR, f"e-stop latched ({self._estop.reason}); call ~/reset_estop"
        if self._error:
            return DiagnosticStatus.ERROR, self._error
        if new_rejections:
            return DiagnosticStatus.WARN, f"rejecting observations: {self._last_rejection}"
        holds = [r for r in self._reasons if r in HOLD_REASONS]
        if self._status == "active" and holds:
            return DiagnosticStatus.WARN, f"holding: {', '.join(holds)}"
        return DiagnosticStatus.OK, "commanding" if self._status == "active" else self._status


def main(args: list[str] | None = None) -> int:
    """``python -m robopolicy.real.policy_node --ros-args --params-file P -p model:=M``."""
    return run_node(lambda context: PolicyNode(context=context), on_exit=lambda node: node.trigger_shutdown(),
                    args=args)


if __name__ == "__main__":
    sys.exit(main())
