"""A gamepad as a teleoperation input: ``sensor_msgs/Joy`` messages from a ROS 2 topic.

Runs its own rclpy context and executor thread (see :mod:`robopolicy.real.rosutil`), so it
can live in the teleop process beside the env. Every message is kept (button presses are
detected as edges between consecutive messages, so none is lost between two polls).
"""

from __future__ import annotations

import collections
import threading
import time

from robopolicy.data.teleop_input import Event, JoyInput
from robopolicy.errors import RobopolicyError


class JoySource:
    """``poll`` returns the Joy messages received since the last poll (never blocks)."""

    name = "joy"
    blocking = False

    def __init__(self, topic: str, domain_id: int | None = None, node_name: str = "robopolicy_teleop") -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.experimental import EventsExecutor
        from rclpy.node import Node
        from rclpy.signals import SignalHandlerOptions
        from sensor_msgs.msg import Joy

        from robopolicy.real.rosutil import spin, stream_qos

        self.topic = topic
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
        try:
            self.node = Node(node_name, context=self.context)
            # best effort matches reliable publishers too (the joy driver's default)
            self.node.create_subscription(Joy, topic, self._on_joy, stream_qos(50, "best_effort"))
        except Exception as e:  # e.g. an invalid topic name
            self.context.try_shutdown()
            raise RobopolicyError(f"--joy {topic!r}: {' '.join(str(e).split())[:200]}") from None
        self._queue: collections.deque[JoyInput] = collections.deque(maxlen=1000)
        self._lock = threading.Lock()
        self.received = 0
        self._stop = threading.Event()
        self._executor = EventsExecutor(context=self.context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=spin, args=(self._executor, self.context, self._stop), daemon=True)
        self._thread.start()

    def _on_joy(self, msg) -> None:
        ev = JoyInput(tuple(float(a) for a in msg.axes), tuple(int(b) for b in msg.buttons), time.monotonic())
        with self._lock:
            self._queue.append(ev)
            self.received += 1

    def poll(self, timeout_s: float = 0.0) -> list[Event]:
        with self._lock:
            events: list[Event] = list(self._queue)
            self._queue.clear()
        return events

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._executor.shutdown()  # a live EventsExecutor keeps the participant (see rosutil)
        self.node.destroy_node()
        self.context.try_shutdown()
