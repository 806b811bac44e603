"""rclpy plumbing shared by the nodes: QoS profiles, the executor loop, a process ``main``.

The executor is rclpy's ``EventsExecutor`` (about half the latency of the single-threaded
one here), driven by ``spin_once`` in a loop: its blocking ``spin()`` keeps the GIL while
it waits, which starves every other Python thread (the inference worker). Shut executors
down explicitly when done: a live ``EventsExecutor`` keeps the DDS participant, and with it
Fast DDS' shared-memory segments in ``/dev/shm``, alive past the context's shutdown (and
past the process, if it is still alive at exit). Signals are
handled here, not by rclpy: SIGINT / SIGTERM end the loop, and the node gets to shut down
cleanly (the policy node sends its hold command) before the context goes away.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Callable

import rclpy
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.context import Context
from rclpy.exceptions import InvalidParameterTypeException, ParameterUninitializedException
from rclpy.executors import Executor, ExternalShutdownException
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.experimental import EventsExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions

from robopolicy.errors import RobopolicyError
from robopolicy.real.config import Param

RELIABILITY = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}
#: How long one ``spin_once`` may wait before the loop checks its stop flag.
SPIN_TIMEOUT_S = 0.1


def stream_qos(depth: int, reliability: str) -> QoSProfile:
    """QoS of the observation / command streams (keep-last ``depth``, volatile)."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=RELIABILITY[reliability],
                      durability=DurabilityPolicy.VOLATILE)


#: A latched topic: late subscribers get the last message (e-stop state).
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
#: Telemetry and episode results: reliable, deep enough for bursts.
RECORD_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)


_TYPES = {
    "bool": (ParameterType.PARAMETER_BOOL, Parameter.Type.BOOL),
    "integer": (ParameterType.PARAMETER_INTEGER, Parameter.Type.INTEGER),
    "double": (ParameterType.PARAMETER_DOUBLE, Parameter.Type.DOUBLE),
    "string": (ParameterType.PARAMETER_STRING, Parameter.Type.STRING),
    "string_array": (ParameterType.PARAMETER_STRING_ARRAY, Parameter.Type.STRING_ARRAY),
    "double_array": (ParameterType.PARAMETER_DOUBLE_ARRAY, Parameter.Type.DOUBLE_ARRAY),
}


def declare_parameters(node: Node, params: tuple[Param, ...]) -> None:
    """Declare ``params`` with typed descriptors (values from overrides / YAML where given).

    Raises :class:`RobopolicyError` for a wrongly typed value or a name the node does not
    declare (rclpy would silently ignore a misspelt one), whichever way it was given:
    ``--params-file``, ``-p``, a launch file or ``parameter_overrides``.
    """
    for p in params:
        ros_type, py_type = _TYPES[p.type]
        constraints = f"one of {list(p.choices)}" if p.choices else ""
        if p.minimum is not None:
            constraints = f">= {p.minimum:g}"
        descriptor = ParameterDescriptor(type=ros_type, description=p.description, additional_constraints=constraints)
        # An empty list would be declared as a byte array: declare those typed but unset.
        default = py_type if p.default == [] else p.default
        try:
            node.declare_parameter(p.name, default, descriptor)
        except InvalidParameterTypeException as e:
            raise RobopolicyError(f"parameter {p.name} of node {node.get_name()} must be a {p.type}: {e}") from None
    unknown = sorted(name for name in node._parameter_overrides if not node.has_parameter(name))
    if unknown:
        raise RobopolicyError(f"node {node.get_name()} has no parameter(s) {unknown} (misspelt? its parameters "
                              "are listed in real/README.md)")


def parameter_values(node: Node, params: tuple[Param, ...]) -> dict[str, Any]:
    """``{name: value}`` of declared ``params`` (``None`` for unset arrays)."""
    values: dict[str, Any] = {}
    for p in params:
        try:
            values[p.name] = node.get_parameter(p.name).value
        except ParameterUninitializedException:
            values[p.name] = None
    return values


def spin(executor: Executor, context: Context, stop: threading.Event | None = None) -> None:
    """Run ``executor`` until ``stop`` is set or ``context`` shuts down."""
    try:
        while context.ok() and not (stop is not None and stop.is_set()):
            executor.spin_once(timeout_sec=SPIN_TIMEOUT_S)
    except ExternalShutdownException:
        pass


def run_node(make_node: Callable[[Context], Node], on_exit: Callable[[Node], None] | None = None,
             args: list[str] | None = None) -> int:
    """Process entry point: init rclpy with ``args`` (``--ros-args ...``), spin the node.

    SIGINT and SIGTERM stop the loop; ``on_exit(node)`` runs while the context is still
    up, then the node is destroyed and rclpy shut down.
    A :class:`RobopolicyError` while the node starts (a parameter of the wrong type, an
    unknown parameter name) or a parameter file rcl cannot parse is one line on stderr and
    exit status 2, not a traceback.
    """
    context = Context()
    try:
        rclpy.init(args=sys.argv if args is None else args, context=context,
                   signal_handler_options=SignalHandlerOptions.NO)
    except _rclpy.RCLError as e:  # e.g. a parameter file rcl cannot parse
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        node = make_node(context)
    except RobopolicyError as e:
        print(f"error: {e}", file=sys.stderr)
        context.try_shutdown()
        return 2
    executor = EventsExecutor(context=context)
    executor.add_node(node)
    try:
        spin(executor, context, stop)
        if on_exit is not None:
            on_exit(node)
    finally:
        executor.shutdown()
        node.destroy_node()
        context.try_shutdown()
    return 0
