"""The policy node: a ROS 2 lifecycle node that runs a chunking policy at control rate.

Lifecycle:

* **configure** reads the parameters, loads the model (export folder or training run),
  checks its feature spec against the parameters (a mismatch fails the transition with a
  message naming both sides, also published on ``/diagnostics``), warms the model and the
  messages up, and subscribes the observation topics;
* **activate** starts the inference worker and the control thread; the first command
  starts from the measured state (see :mod:`robopolicy.real.safety`);
* **deactivate** stops the control thread, then sends the hold command once;
* **cleanup** drops the model and the topics.

Every transition is safe under any observation traffic: callbacks only touch the
:class:`_Configured` objects they were created for, so an event queued before a cleanup
lands in a configuration that no longer commands anything.

Topics: ``sensor_msgs/JointState`` per low-dimensional feature (mapped by the joint map:
the robot's names and units), ``sensor_msgs/Image`` per camera, ``std_msgs/String``
instruction (optional) in; the command (``Float64MultiArray`` or ``JointTrajectory``) out.
Always available, in every state: ``~/estop`` and ``~/reset_estop`` (``std_srvs/Trigger``),
the latched ``~/estopped`` (``std_msgs/Bool``), ``/diagnostics`` (interventions and their
reasons, rejected observations, deadlines, latency) and ``~/telemetry/cycles`` /
``~/telemetry/inference`` (batches of :mod:`robopolicy.real.telemetry` records).

Control: subscription callbacks only keep the newest message per topic; the control loop
(:mod:`robopolicy.real.control_loop`) runs in its own thread at ``control_rate_hz`` and,
with ``sync_to_observation``, when ``observation.state`` (the message that completes a
frame) arrives. Each cycle files the pending messages, takes the scheduled action, has a
residual-RL policy correct it with the newest observation (``correct_action``), passes the
result through the safety layer and publishes it, then wakes the inference worker.

The node is thin: the logic lives in :class:`~robopolicy.real.controller.PolicyController`.
"""

from __future__ import annotations

import collections
import math
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.context import Context
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.publisher import Publisher
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import Trigger

from robopolicy.process_defaults import apply_defaults
from robopolicy.real.config import POLICY_PARAMS, PolicyNodeConfig
from robopolicy.real.control_loop import ControlLoop, Inbox
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
from robopolicy.real.telemetry import CYCLE_FIELDS, INFERENCE_FIELDS, summarize
from robopolicy.spec import STATE

Loader = Callable[[str, str, int], Any]
SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


@dataclass
class _Configured:
    """Everything one successful configure created; dropped whole at cleanup."""

    cfg: PolicyNodeConfig
    ctrl: PolicyController
    codec: CommandCodec
    publisher: Publisher
    #: Observation key -> converts a message into the feature's value (model units).
    convert: dict[str, Callable[[Any], np.ndarray]]
    topics: dict[str, str]
    trigger_key: str
    inbox: Inbox = field(default_factory=Inbox)
    entities: list[Any] = field(default_factory=list)


class PolicyNode(LifecycleNode):
    """See the module docstring. ``loader(model, backend, threads)`` opens the model."""

    def __init__(self, context: Context | None = None, loader: Loader = load_predictor,
                 parameter_overrides: list[Parameter] | None = None) -> None:
        self._loop: ControlLoop | None = None  # before anything can fail: destroy_node reads it
        super().__init__(POLICY.name, context=context, parameter_overrides=parameter_overrides or [])
        declare_parameters(self, POLICY_PARAMS)
        self._loader = loader
        self._estop = EStop()
        self._conf: _Configured | None = None
        self._status, self._error = "unconfigured", ""
        self._reasons: tuple[str, ...] = ()
        self._rejections_lock = threading.Lock()
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
        self.create_timer(self.get_parameter("diagnostics_period_s").value, lambda: self._publish_diagnostics())

    # ---- lifecycle -----------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._conf = self._configure()
        except Exception as e:  # noqa: BLE001  (report any failure; the node stays up, unconfigured)
            self._error = f"configure failed: {e}"
            self.get_logger().error(self._error)
            self.get_logger().debug(traceback.format_exc())
            self._publish_diagnostics()
            return FAILURE
        self._error, self._status = "", "inactive"
        cfg = self._conf.cfg
        self.get_logger().info(f"configured: {cfg.model} ({self._conf.ctrl.spec.fps:g} fps policy, "
                               f"{cfg.control_rate_hz:g} Hz control)")
        return SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        conf = self._conf
        if conf is None or conf.ctrl.busy:
            self._error = ("cannot activate: not configured" if conf is None else
                           "cannot activate: the previous inference has not returned (hung model?)")
            self.get_logger().error(self._error)
            return FAILURE
        conf.inbox.take()  # the history starts now, from fresh samples
        conf.ctrl.start()
        self._last_cycle = math.nan
        self._reasons = (WAITING_FOR_POLICY,)  # until the first cycle says otherwise
        self._loop = ControlLoop(1.0 / conf.cfg.control_rate_hz, conf.cfg.sync_to_observation,
                                 lambda: self._cycle(conf), self._log_error)
        self._loop.start()
        self._status = "active"
        return SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_commanding()
        return SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_commanding()
        self._release()
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_commanding()
        self._release()
        return SUCCESS

    def destroy_node(self) -> None:
        if self._loop is not None:
            self._loop.stop()
        super().destroy_node()
        # rclpy's LifecycleNode keeps its state machine, which keeps the node handle and with it
        # the DDS participant (and Fast DDS' shared-memory segments) alive: free it too.
        self._state_machine.destroy_when_not_in_use()

    # ---- configure / release -------------------------------------------------------------
    def _configure(self) -> _Configured:
        cfg = PolicyNodeConfig.from_params(parameter_values(self, POLICY_PARAMS))
        sys.setswitchinterval(cfg.switch_interval_s)
        predictor = self._loader(cfg.model, cfg.backend, cfg.inference_threads)
        spec = predictor.spec
        cfg.check_spec(spec, f"model {cfg.model}", f"the parameters of node {self.get_name()}")
        period = 1.0 / cfg.control_rate_hz
        ctrl = PolicyController(
            predictor, cfg.observation_keys, cfg.horizon(spec), cfg.blend_s, cfg.staleness_s, cfg.limits,
            self._estop, cfg.default_task(spec), self._now, self._log_error, period_s=period,
            future_tolerance_s=cfg.future_tolerance_s, measured_index=cfg.measured_index)
        ctrl.warm_up()
        codec = CommandCodec(cfg.message_type, cfg.action_joints, period)
        # The first message construction in a process is slow: do it now, not in the first cycle.
        codec.encode(cfg.limits.zero, s_to_stamp(self._now()))
        qos = stream_qos(cfg.qos_depth, cfg.qos_reliability)
        convert: dict[str, Callable[[Any], np.ndarray]] = {}
        topics = {f.key: f.topic for f in cfg.low_dim + cfg.images}
        for f in cfg.low_dim:
            convert[f.key] = JointStateReader(f.topic, f.joints).read
        for f in cfg.images:
            shape = tuple(spec.features[f.key].shape)
            convert[f.key] = lambda m, t=f.topic, s=shape: image_to_array(m, t, s)
        keys = [f.key for f in cfg.low_dim]
        trigger = STATE if STATE in keys else (keys or [f.key for f in cfg.images])[0]
        conf = _Configured(cfg, ctrl, codec, self.create_publisher(codec.msg_type, cfg.action_topic, qos),
                           convert, topics, trigger)
        conf.entities.append(conf.publisher)
        for f in cfg.low_dim + cfg.images:
            msg_type = JointState if f.joints is not None else Image
            conf.entities.append(self.create_subscription(
                msg_type, f.topic, lambda m, c=conf, k=f.key: self._on_observation(c, k, m), qos))
        if cfg.language_topic:
            conf.entities.append(self.create_subscription(
                String, cfg.language_topic, lambda m, c=conf: self._on_instruction(c, m), stream_qos(1, "reliable")))
        return conf

    def _release(self) -> None:
        conf, self._conf = self._conf, None
        if conf is not None:
            self._publish_diagnostics(conf)
            for entity in conf.entities:
                if isinstance(entity, Publisher):
                    self.destroy_publisher(entity)
                else:
                    self.destroy_subscription(entity)
        self._status = "unconfigured"

    def _stop_commanding(self) -> None:
        """Stop the control thread and the worker, then send the hold command once."""
        loop, self._loop, conf = self._loop, None, self._conf
        if loop is None or conf is None:
            return
        if not loop.stop():
            self.get_logger().error("the control thread did not stop in time")
        if not conf.ctrl.stop():
            self.get_logger().warning("the inference thread is still in the model; it is abandoned")
        now = self._now()
        hold = conf.ctrl.safety.hold_now(now)
        if hold is not None:
            conf.publisher.publish(conf.codec.encode(hold, s_to_stamp(now)))
        self._status = "inactive"
        self._publish_diagnostics()

    # ---- observations (executor thread: O(1) per message) ----------------------------------
    def _on_observation(self, conf: _Configured, key: str, msg: Any) -> None:
        arrival = time.perf_counter()
        conf.inbox.put(key, msg, arrival)
        loop = self._loop
        if key == conf.trigger_key and loop is not None and conf is self._conf:
            loop.observed(arrival)

    def _on_instruction(self, conf: _Configured, msg: String) -> None:
        """Switch the instruction live; an empty or unknown one holds until a valid one arrives."""
        refused = conf.ctrl.set_task(msg.data)
        if refused is not None:
            self._reject("instruction", f"{conf.cfg.language_topic}: {refused}; holding until a valid instruction")

    def _file(self, conf: _Configured) -> bool:
        """File the pending messages (newest per topic); True if a sample was accepted."""
        accepted = False
        for key, (msg, arrival) in conf.inbox.take().items():
            try:
                value = conf.convert[key](msg)
            except MessageError as e:
                self._reject(e.reason, str(e))
                continue
            rejection = conf.ctrl.observe(key, stamp_to_s(msg.header.stamp), value, arrival)
            if rejection is not None:
                self._reject(rejection.reason, f"{conf.topics[key]}: sample {rejection.detail} ({rejection.reason})")
            accepted |= rejection is None or rejection.kept
        return accepted

    def _reject(self, reason: str, message: str) -> None:
        with self._rejections_lock:
            self._rejections[reason] += 1
            self._last_rejection = message
        self.get_logger().warning(message, throttle_duration_sec=5.0)

    def _log_error(self, message: str) -> None:
        self.get_logger().error(message, throttle_duration_sec=5.0)

    # ---- control (the control thread) -------------------------------------------------------
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _cycle(self, conf: _Configured) -> None:
        start = time.perf_counter()
        accepted = self._file(conf)
        now = self._now()
        decision, used, correction_ms = conf.ctrl.cycle(now)
        if decision.command is not None:
            conf.publisher.publish(conf.codec.encode(decision.command, s_to_stamp(now)))
        end = time.perf_counter()
        latency = (end - used[0]) * 1e3 if used else math.nan
        stamp_latency = (now + end - start - used[1]) * 1e3 if used else math.nan
        conf.ctrl.telemetry.record_cycle(now, (start - self._last_cycle) * 1e3, latency, stamp_latency,
                                         (end - start) * 1e3, correction_ms, decision.held)
        self._reasons = decision.reasons
        self._last_cycle = start
        if accepted:
            conf.ctrl.wake()

    # ---- e-stop --------------------------------------------------------------------------
    def _on_estop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        latched = self._estop.trigger("e-stop service called")
        self._estop_pub.publish(Bool(data=True))
        loop = self._loop
        if loop is not None:
            loop.run_now()  # send the hold command now, not at the next cycle
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
    def _publish_diagnostics(self, conf: _Configured | None = None) -> None:
        values: dict[str, Any] = {"state": self._status, "estop": self._estop.reason or "clear",
                                  "estop_triggers": self._estop.triggers}
        conf = conf or self._conf
        if conf is not None:
            ctrl, cfg = conf.ctrl, conf.cfg
            streams = zip(("cycles", "inference"), ctrl.telemetry.drain(), (CYCLE_FIELDS, INFERENCE_FIELDS),
                          (self._cycles_pub, self._inference_pub))
            for kind, rows, fields, pub in streams:
                if rows.size:
                    pub.publish(table_to_msg(fields, rows))
                    self._published_rows[kind] += rows.shape[0]
            timing = summarize(*ctrl.telemetry.window(), cfg.control_rate_hz)
            values.update({f"intervention.{k}": v for k, v in sorted(ctrl.safety.counts.items())})
            values.update({
                "model": cfg.model, "task": ctrl.task, "observations.coalesced": conf.inbox.coalesced,
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
        loop = self._loop
        if loop is not None:
            values["control_errors"] = loop.errors
        with self._rejections_lock:
            rejections, last_rejection = dict(self._rejections), self._last_rejection
        values.update({f"rejected.{k}": v for k, v in sorted(rejections.items())})
        if last_rejection:
            values["rejected.last"] = last_rejection
        new_rejections = sum(rejections.values()) - self._rejections_reported
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
    # Before rclpy.init and the model load (torch, onnxruntime); this module imports neither
    # torch nor mujoco at module level, and rclpy reads the ROS 2 values at init.
    apply_defaults()
    return run_node(lambda context: PolicyNode(context=context), on_exit=lambda node: node.trigger_shutdown(),
                    args=args)


if __name__ == "__main__":
    sys.exit(main())
