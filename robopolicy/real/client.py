"""A client of a running policy node (and sim bridge) over DDS: lifecycle, e-stop, records.

``robopolicy deploy`` drives the policy node through it (the node runs in its own
process); the ROS tests use it the same way. It spins its own node in a background
thread and keeps what it hears: the latest diagnostics of the policy node, every
telemetry batch, episode results of a sim bridge, the e-stop state and, optionally, the
commands.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.context import Context
from rclpy.experimental import EventsExecutor
from rclpy.node import Node
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import Trigger

from robopolicy.errors import RobopolicyError
from robopolicy.real.messages import CommandCodec, msg_to_table
from robopolicy.real.nodes import POLICY
from robopolicy.real.rosutil import LATCHED_QOS, RECORD_QOS, spin, stream_qos
from robopolicy.real.telemetry import CYCLE_FIELDS, INFERENCE_FIELDS

TRANSITIONS = {
    "configure": Transition.TRANSITION_CONFIGURE,
    "cleanup": Transition.TRANSITION_CLEANUP,
    "activate": Transition.TRANSITION_ACTIVATE,
    "deactivate": Transition.TRANSITION_DEACTIVATE,
    "shutdown": Transition.TRANSITION_UNCONFIGURED_SHUTDOWN,
}


class PolicyClient:
    """Talks to the policy node ``/<node_name>``; see the module docstring."""

    def __init__(self, context: Context, node_name: str = POLICY.name, bridge: str | None = None,
                 result_topic: str = "", command: CommandCodec | None = None, command_topic: str = "") -> None:
        self.node = Node(f"robopolicy_client_{os.getpid()}_{id(self) % 10000}", context=context)
        base = f"/{node_name}"
        self._change = self.node.create_client(ChangeState, f"{base}/change_state")
        self._get = self.node.create_client(GetState, f"{base}/get_state")
        self._triggers = {name: self.node.create_client(Trigger, f"{base}/{name}") for name in ("estop", "reset_estop")}
        if bridge:
            self._triggers["reset"] = self.node.create_client(Trigger, f"/{bridge}/reset")
        self._lock = threading.Condition()
        self._status_name = f"{node_name}: policy"
        self.diagnostics: DiagnosticStatus | None = None
        self.diagnostics_received = 0
        self.cycles: list[np.ndarray] = []
        self.inference: list[np.ndarray] = []
        self.episodes: list[dict[str, Any]] = []
        self.estopped: bool | None = None
        self.commands: list[tuple[float, np.ndarray]] = []
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, RECORD_QOS)
        self.node.create_subscription(Float64MultiArray, f"{base}/telemetry/cycles",
                                      lambda m: self._on_table(m, CYCLE_FIELDS, self.cycles), RECORD_QOS)
        self.node.create_subscription(Float64MultiArray, f"{base}/telemetry/inference",
                                      lambda m: self._on_table(m, INFERENCE_FIELDS, self.inference), RECORD_QOS)
        self.node.create_subscription(Bool, f"{base}/estopped", self._on_estopped, LATCHED_QOS)
        if result_topic:
            self.node.create_subscription(String, result_topic, self._on_result, RECORD_QOS)
        if command is not None:
            self._codec = command
            self.node.create_subscription(command.msg_type, command_topic, self._on_command, stream_qos(10, "reliable"))
        self._stop = threading.Event()
        self._executor: EventsExecutor | None = EventsExecutor(context=context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=spin, args=(self._executor, context, self._stop), daemon=True)
        self._thread.start()

    # ---- calls ---------------------------------------------------------------------------
    def _call(self, client: Any, request: Any, timeout_s: float) -> Any:
        if not client.wait_for_service(timeout_sec=timeout_s):
            raise RobopolicyError(f"service {client.srv_name} is not available after {timeout_s:.0f} s")
        done = threading.Event()
        future = client.call_async(request)
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout_s):
            client.remove_pending_request(future)
            raise RobopolicyError(f"service {client.srv_name} did not answer within {timeout_s:.0f} s")
        return future.result()

    def transition(self, name: str, timeout_s: float = 60.0) -> bool:
        """Request a lifecycle transition (``configure``, ``activate``, ...); True on success."""
        request = ChangeState.Request(transition=Transition(id=TRANSITIONS[name]))
        return bool(self._call(self._change, request, timeout_s).success)

    def state(self, timeout_s: float = 10.0) -> str:
        return self._call(self._get, GetState.Request(), timeout_s).current_state.label

    def ready(self, timeout_s: float) -> bool:
        """The policy node's lifecycle service is up (and the bridge's reset service, if any)."""
        return all(c.wait_for_service(timeout_sec=timeout_s) for c in (self._change, *self._triggers.values()))

    def trigger(self, name: str, timeout_s: float = 10.0) -> Trigger.Response:
        """Call ``estop`` / ``reset_estop`` of the policy node, or ``reset`` of the sim bridge."""
        return self._call(self._triggers[name], Trigger.Request(), timeout_s)

    # ---- records -------------------------------------------------------------------------
    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == self._status_name:
                with self._lock:
                    self.diagnostics = status
                    self.diagnostics_received += 1
                    self._lock.notify_all()

    def _on_table(self, msg: Float64MultiArray, fields: tuple[str, ...], into: list[np.ndarray]) -> None:
        got, rows = msg_to_table(msg)
        if got == fields:
            with self._lock:
                into.append(rows)
                self._lock.notify_all()

    def _on_result(self, msg: String) -> None:
        with self._lock:
            self.episodes.append(json.loads(msg.data))
            self._lock.notify_all()

    def _on_estopped(self, msg: Bool) -> None:
        with self._lock:
            self.estopped = msg.data
            self._lock.notify_all()

    def _on_command(self, msg: Any) -> None:
        values = self._codec.decode(msg, "command")
        with self._lock:
            self.commands.append((time.monotonic(), values))
            self._lock.notify_all()

    def diagnostic_values(self) -> dict[str, str]:
        """Key/values of the latest diagnostics of the policy node (empty before any)."""
        status = self.diagnostics
        return {} if status is None else {kv.key: kv.value for kv in status.values}

    def wait_for(self, predicate: Callable[["PolicyClient"], bool], timeout_s: float) -> bool:
        """Wait until ``predicate(self)`` holds (re-checked whenever something arrives)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.1))
        return True

    def all_telemetry_received(self) -> bool:
        """Every telemetry row the latest diagnostics say were published has arrived."""
        published = self.diagnostic_values()
        with self._lock:
            got = {"cycles": sum(len(r) for r in self.cycles), "inference": sum(len(r) for r in self.inference)}
        return all(got[k] >= int(published.get(f"telemetry.{k}", "0")) for k in got)

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Every telemetry row received: (cycles, inference)."""
        with self._lock:
            cycles = np.concatenate(self.cycles) if self.cycles else np.zeros((0, len(CYCLE_FIELDS)))
            inference = np.concatenate(self.inference) if self.inference else np.zeros((0, len(INFERENCE_FIELDS)))
        return cycles, inference

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._executor.shutdown()
        self._executor = None  # a live EventsExecutor keeps the participant (see rosutil)
        self.node.destroy_node()
