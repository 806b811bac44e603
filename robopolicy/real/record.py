"""``robopolicy record``: a ROS 2 node that records demonstrations on the robot as a LeRobotDataset.

It reads the robot's policy-node parameter file (the same file and joint maps the policy
node uses, through :class:`robopolicy.data.topic_frames.TopicMapping`) and subscribes every
observation topic it maps and the command topic (the teleoperator's or the leader arm's
commands are the dataset's ``action``). Each message is stamped with its ``header.stamp``
(its receive time where it has none or the stamp is zero) and, while an episode is under way,
converted to model units and kept in memory. Saving an episode lines the topics up at the
dataset's fps with :func:`robopolicy.data.topic_frames.align` (at each frame time the newest
sample of every feature, frames from the first command after the start to the last one),
reports each topic's rate and gaps, and commits the episode atomically
(:class:`robopolicy.data.recorder.DatasetRecorder`): a kill loses at most the episode under way.
Clocks: header stamps and this machine's receive times are compared, so the robot's and this
machine's clocks must agree (chrony / PTP), as they must for the policy node.

Episodes: ``~/start_episode``, ``~/save_episode`` and ``~/discard_episode`` (``std_srvs/Trigger``;
the response message says what happened), and keys when stdin is a terminal: ``s`` start,
Enter save, ``d`` / Backspace discard, ``q`` quit. Ctrl-C (SIGINT) or SIGTERM stops: the
episode under way is discarded, the committed ones stay.

Before recording, every mapped topic must deliver a message within ``topic_timeout_s``
(else an error naming the topics that stayed silent); the first message of each is converted,
so mismatched joint names or an unconvertible image fail at once, naming the topic.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from robopolicy.data.bag_import import DEFAULT_TASK, _features
from robopolicy.data.recorder import DatasetRecorder
from robopolicy.data.topic_frames import (
    COMPRESSED_IMAGE, IMAGE, ImageConverter, TopicGaps, TopicMapping, align, frames_from_arrays, ros_type_name,
    stamp_of,
)
from robopolicy.errors import RobopolicyError
from robopolicy.spec import ACTION

#: The recorder node's name (its services are ``/robopolicy_recorder/start_episode`` etc.).
RECORDER_NODE = "robopolicy_recorder"
#: Seconds over which the progress line's per-topic rates are measured.
RATE_WINDOW_S = 2.0
#: Seconds between progress refreshes.
REFRESH_S = 0.5
KEYS_HELP = "keys: s = start episode, Enter = save, d / Backspace = discard, q = quit"


@dataclass
class RecordConfig:
    params: Path
    out: Path
    fps: int = 10
    task: str | None = None
    #: ``(H, W)`` of the dataset's images; None: each camera's own size (of its first message).
    image_size: tuple[int, int] | None = None
    use_videos: bool = True
    overwrite: bool = False
    #: None: ``$ROS_DOMAIN_ID``, else 0 (the robot's driver is there).
    domain_id: int | None = None
    #: Every mapped topic must deliver its first message within this many seconds.
    topic_timeout_s: float = 10.0
    #: Stop after this many saved episodes (None: until q, Ctrl-C or ``stop``).
    episodes: int | None = None
    #: Keys from stdin; None: when stdin is a terminal.
    keyboard: bool | None = None
    progress: bool = True


@dataclass
class EpisodeReport:
    index: int
    frames: int
    seconds: float
    gaps: list[TopicGaps]


@dataclass
class RecordResult:
    saved: list[EpisodeReport] = field(default_factory=list)
    discarded: int = 0
    #: An episode was under way when the recorder stopped (it was discarded).
    discarded_at_exit: bool = False
    interrupted: bool = False
    total_episodes: int = 0
    total_frames: int = 0
    seconds: float = 0.0

    @property
    def frames(self) -> int:
        return sum(e.frames for e in self.saved)

    def summary(self, out: Path) -> str:
        s = (f"{'interrupted: ' if self.interrupted else ''}saved {len(self.saved)} episode(s) ({self.frames} frames), "
             f"discarded {self.discarded}")
        if self.discarded_at_exit:
            s += " (including the episode under way at exit)"
        return s + f" in {self.seconds:.0f} s; {out} holds {self.total_episodes} episodes, {self.total_frames} frames"


@dataclass
class _Topic:
    """One mapped topic: counters for the progress line, the newest message, the episode's samples."""

    key: str
    topic: str
    count: int = 0
    first_seen: bool = False
    recent: deque = field(default_factory=lambda: deque(maxlen=2000))
    latest: tuple[float, Any] | None = None
    stamps: list[float] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    def rate(self, now: float) -> float:
        while self.recent and self.recent[0] < now - RATE_WINDOW_S:
            self.recent.popleft()
        return len(self.recent) / RATE_WINDOW_S


def _message_class(ros_type: str) -> Any:
    from sensor_msgs.msg import CompressedImage, Image, JointState
    from std_msgs.msg import Float64MultiArray
    from trajectory_msgs.msg import JointTrajectory

    return {IMAGE: Image, COMPRESSED_IMAGE: CompressedImage, "sensor_msgs/msg/JointState": JointState,
            "std_msgs/msg/Float64MultiArray": Float64MultiArray,
            "trajectory_msgs/msg/JointTrajectory": JointTrajectory}[ros_type]


def make_recorder_node(context: Any, mapping: TopicMapping, qos: Any, session: "_Session") -> Any:
    """The rclpy node: subscriptions (image topics once their publisher's type, Image or
    CompressedImage, is known) and the three Trigger services, all handled by ``session``."""
    from rclpy.node import Node
    from std_srvs.srv import Trigger

    class RecorderNode(Node):
        def __init__(self) -> None:
            super().__init__(RECORDER_NODE, context=context)
            self.qos = qos
            self.pending = []
            for conv in mapping.converters:
                if isinstance(conv, ImageConverter):
                    self.pending.append(conv)  # Image or CompressedImage: the publisher tells
                else:
                    self._subscribe(conv, _message_class(conv.msg_types[0]))
            for name, fn in (("start_episode", session.start), ("save_episode", session.save),
                             ("discard_episode", session.discard)):
                self.create_service(Trigger, f"~/{name}", partial(self._trigger, fn))

        def _subscribe(self, conv: Any, cls: Any) -> None:
            self.create_subscription(cls, conv.topic, partial(session.on_message, conv), self.qos)

        def now_s(self) -> float:
            return self.get_clock().now().nanoseconds * 1e-9

        def check_graph(self) -> None:
            """Subscribe image topics whose publisher appeared; refuse a topic of the wrong type."""
            for conv in mapping.converters:
                types = {ros_type_name(i.topic_type) for i in self.get_publishers_info_by_topic(conv.topic)}
                for t in types:
                    conv.check_type(t)
                if conv in self.pending and types:
                    self.pending.remove(conv)
                    self._subscribe(conv, _message_class(sorted(types)[0]))

        def publishers(self, topic: str) -> list[str]:
            return sorted({ros_type_name(i.topic_type) for i in self.get_publishers_info_by_topic(topic)})

        @staticmethod
        def _trigger(fn: Callable[[], tuple[bool, str]], request: Any, response: Any) -> Any:
            response.success, response.message = fn()
            return response

    return RecorderNode()


class _Session:
    """Episode state and the dataset: what the services and keys act on (executor thread only)."""

    def __init__(self, cfg: RecordConfig, mapping: TopicMapping, log: Callable[[str], None]) -> None:
        self.cfg, self.mapping, self.log = cfg, mapping, log
        self.task = cfg.task or mapping.task or DEFAULT_TASK
        self.topics = {c.key: _Topic(c.key, c.topic) for c in mapping.converters}
        self.error: RobopolicyError | None = None
        self.recording = False
        self.started_at = 0.0
        self.now: Callable[[], float] = time.time
        self.recorder: DatasetRecorder | None = None
        self.result = RecordResult()
        self.meta: dict[str, Any] = {}

    # -- messages -------------------------------------------------------------------------
    def on_message(self, conv: Any, msg: Any) -> None:
        now = self.now()
        t = self.topics[conv.key]
        t.count += 1
        t.recent.append(now)
        if self.error is not None:
            return
        stamp = stamp_of(msg, now)
        try:
            if not t.first_seen:  # checks joint names / encodings now; fixes a camera's size
                if isinstance(conv, ImageConverter) and conv.size is None:
                    conv.size = conv.decode(msg).shape[:2]
                conv.convert(msg)
                t.first_seen = True
            t.latest = (stamp, msg)
            if self.recording:
                t.stamps.append(stamp)
                t.values.append(conv.convert(msg))
        except RobopolicyError as e:
            self.error = e

    # -- episodes -------------------------------------------------------------------------
    def _clear(self) -> None:
        for t in self.topics.values():
            t.stamps.clear()
            t.values.clear()

    def frames_so_far(self) -> int:
        a = self.topics[ACTION].stamps
        return int((max(a) - min(a)) * self.cfg.fps) + 1 if self.recording and a else 0

    def start(self) -> tuple[bool, str]:
        if self.recording:
            return False, f"episode {self.episode_index} is already under way ({self.frames_so_far()} frames)"
        self._clear()
        by_key = {c.key: c for c in self.mapping.converters}
        try:  # observations hold their newest sample from before the start; commands count from now
            for key, t in self.topics.items():
                if key != ACTION and t.latest is not None:
                    t.stamps.append(t.latest[0])
                    t.values.append(by_key[key].convert(t.latest[1]))
        except RobopolicyError as e:
            self.error = e
            return False, str(e)
        self.recording, self.started_at = True, time.monotonic()
        msg = f"episode {self.episode_index} started"
        self.log(msg)
        return True, msg

    @property
    def episode_index(self) -> int:
        return self.result.total_episodes

    def discard(self, why: str = "discarded") -> tuple[bool, str]:
        if not self.recording:
            return False, "no episode under way"
        self.recording = False
        self._clear()
        self.result.discarded += 1
        msg = f"episode {self.episode_index} {why} ({time.monotonic() - self.started_at:.1f} s)"
        self.log(msg)
        return True, msg

    def save(self) -> tuple[bool, str]:
        if not self.recording:
            return False, "no episode under way"
        keys = list(self.topics)
        stamps, values = {}, {}
        for k in keys:
            t = self.topics[k]
            order = np.argsort(np.asarray(t.stamps, dtype=np.float64), kind="stable")
            stamps[k] = np.asarray(t.stamps, dtype=np.float64)[order]
            values[k] = [t.values[i] for i in order]
        try:
            al = align(stamps, {k: t.topic for k, t in self.topics.items()}, self.cfg.fps, phase_s=0.5 / self.cfg.fps)
        except RobopolicyError as e:  # e.g. no command yet: the episode stays under way
            return False, f"episode {self.episode_index} not saved (still under way): {e}"
        self.recording = False
        frames = frames_from_arrays(al, values)
        self._clear()
        index, seconds = self.episode_index, time.monotonic() - self.started_at
        self._commit(frames)
        self.result.saved.append(EpisodeReport(index, al.num_frames, seconds, al.gaps))
        msg = (f"episode {index} saved: {al.num_frames} frames "
               f"({al.num_frames / self.cfg.fps:.1f} s at {self.cfg.fps} fps)")
        self.log(msg)
        for g in al.gaps:
            self.log(f"  {'gap: ' if g.gaps else ''}{g.line()}")
        return True, msg

    def _commit(self, frames: list[dict[str, np.ndarray]]) -> None:
        if self.recorder is None:
            self.recorder = self.new_recorder(self.cfg.overwrite)
        self.recorder.commit_episodes([(frames, [self.task] * len(frames))])
        self.result.total_episodes, self.result.total_frames = self.recorder.on_disk()

    def new_recorder(self, overwrite: bool) -> DatasetRecorder:
        return DatasetRecorder(Path(self.cfg.out), _features(self.mapping, self.cfg.use_videos), self.cfg.fps,
                               robot_type=Path(self.cfg.params).stem, extra_meta=self.meta, overwrite=overwrite)

    def status(self) -> dict[str, Any]:
        now = self.now()
        rates = " ".join(f"{t.topic}={t.rate(now):.1f}Hz" for t in self.topics.values())
        state = f"rec {self.frames_so_far()} frames" if self.recording else "idle"
        return {"episode": self.episode_index, "state": state, "rates": rates}


class _Keyboard:
    """Single keys from a terminal's stdin (cbreak mode, restored on close); never blocks."""

    def __init__(self) -> None:
        import termios
        import tty

        self.fd = sys.stdin.fileno()
        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)

    def keys(self) -> str:
        out = ""
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 64)
            if not data:
                break
            out += data.decode(errors="ignore")
        return out

    def close(self) -> None:
        import termios

        termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):
        return False


class _Stop:
    """SIGINT / SIGTERM set the flag (main thread only); the loop then discards the episode under way."""

    def __init__(self, external: threading.Event | None) -> None:
        self.event = external or threading.Event()
        self.signalled = False

    def _handle(self, signum: int, frame: object) -> None:
        self.signalled = True
        self.event.set()

    @contextlib.contextmanager
    def installed(self) -> Iterator["_Stop"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def record(cfg: RecordConfig, stop: threading.Event | None = None,
           log: Callable[[str], None] | None = None) -> RecordResult:
    """Run the recorder until ``q``, Ctrl-C / SIGTERM, ``stop`` or ``cfg.episodes`` saved episodes."""
    import rclpy
    from rclpy.context import Context
    from rclpy.experimental import EventsExecutor
    from rclpy.signals import SignalHandlerOptions

    from robopolicy import progress as progress_mod
    from robopolicy.real.nodes import check_params_file, pick_domain_id
    from robopolicy.real.rosutil import stream_qos

    if not 1 <= cfg.fps <= 1000:
        raise RobopolicyError(f"--fps must be in [1, 1000], got {cfg.fps}")
    if cfg.topic_timeout_s <= 0:
        raise RobopolicyError(f"--topic-timeout must be > 0 seconds, got {cfg.topic_timeout_s}")
    start = time.monotonic()
    mapping = TopicMapping.from_params_file(cfg.params, cfg.image_size)
    shared = check_params_file(cfg.params)["robopolicy_policy"]
    # A recorder would rather queue than drop: at least 10 deep, the file's reliability (it must match).
    qos = stream_qos(max(int(shared["qos.depth"]), 10), shared["qos.reliability"])
    domain = pick_domain_id(cfg.domain_id, robot=True)
    keyboard_on = _stdin_is_tty() if cfg.keyboard is None else cfg.keyboard
    bar = progress_mod.progress(desc="record", unit="frame", disable=not cfg.progress)

    def say(line: str) -> None:
        (log or (lambda s: bar.write(s, file=sys.stderr)))(line)

    session = _Session(cfg, mapping, say)
    session.meta = {"source": "robopolicy record", "params": str(Path(cfg.params).resolve()),
                    "topics": {c.key: c.topic for c in mapping.converters}, "fps": cfg.fps,
                    "image_size": list(cfg.image_size) if cfg.image_size else None, "domain_id": domain}
    context = Context()
    rclpy.init(context=context, domain_id=domain, signal_handler_options=SignalHandlerOptions.NO)
    node = executor = keyboard = None
    stopper = _Stop(stop)
    try:
        with stopper.installed():
            node = make_recorder_node(context, mapping, qos, session)
            session.now = node.now_s
            executor = EventsExecutor(context=context)
            executor.add_node(node)
            _wait_for_topics(node, executor, session, cfg.topic_timeout_s, stopper.event, domain)
            if not stopper.event.is_set():
                if not cfg.overwrite:  # refuse an incompatible dataset now, not at the first save
                    session.recorder = session.new_recorder(False)
                    session.result.total_episodes, session.result.total_frames = session.recorder.on_disk()
                if keyboard_on:
                    keyboard = _Keyboard()
                say(f"recording {', '.join(f'{c.topic} -> {c.key}' for c in mapping.converters)} at {cfg.fps} fps "
                    f"into {cfg.out} (ROS_DOMAIN_ID {domain}); services ~/start_episode, ~/save_episode, "
                    f"~/discard_episode of node {RECORDER_NODE}" + (f"; {KEYS_HELP}" if keyboard else ""))
            last_refresh = 0.0
            while not stopper.event.is_set():
                executor.spin_once(timeout_sec=0.05)
                if session.error is not None:
                    raise session.error
                if keyboard is not None and _handle_keys(keyboard.keys(), session):
                    break
                if cfg.episodes is not None and len(session.result.saved) >= cfg.episodes:
                    break
                if time.monotonic() - last_refresh >= REFRESH_S:
                    last_refresh = time.monotonic()
                    bar.set_postfix(session.status())
                    bar.update_to(session.result.total_frames + session.frames_so_far())
    finally:
        if session.recording:
            session.discard("discarded (stopped while under way)")
            session.result.discarded_at_exit = True
        session.result.interrupted = stopper.signalled
        if keyboard is not None:
            keyboard.close()
        bar.close()
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        context.try_shutdown()
        if session.recorder is not None:
            session.result.total_episodes, session.result.total_frames = session.recorder.on_disk()
        session.result.seconds = time.monotonic() - start
    return session.result


def _handle_keys(keys: str, session: _Session) -> bool:
    """Act on typed keys; True to quit."""
    for k in keys:
        if k in "sS":
            _, msg = session.start()
        elif k in "\r\n":
            _, msg = session.save()
        elif k in "dD\x7f\x08":
            _, msg = session.discard()
        elif k in "qQ":
            return True
        else:
            continue
        session.log(msg)
    return False


def _wait_for_topics(node: Any, executor: Any, session: _Session, timeout_s: float, stop: threading.Event,
                     domain: int) -> None:
    """Every mapped topic's first message (converted once: names and encodings checked), or a clear error."""
    deadline = time.monotonic() + timeout_s
    next_graph_check = 0.0
    while not stop.is_set():
        if time.monotonic() >= next_graph_check:
            node.check_graph()
            next_graph_check = time.monotonic() + 0.2
        executor.spin_once(timeout_sec=0.05)
        if session.error is not None:
            raise session.error
        silent = [t for t in session.topics.values() if not t.first_seen]
        if not silent:
            return
        if time.monotonic() > deadline:
            parts = []
            for t in silent:
                pubs = node.publishers(t.topic)
                why = (f"{len(pubs)} publisher type(s) {pubs} but no message (QoS reliability?)" if pubs
                       else "no publisher")
                parts.append(f"{t.topic} ({t.key}): {why}")
            raise RobopolicyError(f"nothing arrived within {timeout_s:g} s on " + "; ".join(parts)
                                  + f" (ROS_DOMAIN_ID {domain}); is the robot's "
                                  "driver / teleop running, and does the parameter file name its topics?")


def main(args: list[str] | None = None) -> int:
    """``python -m robopolicy.real.record PARAMS OUT``: the same as ``robopolicy record``.

    The process defaults are applied by ``robopolicy.cli.main``, first.
    """
    from robopolicy.cli import main as cli_main

    return cli_main(["record", *(sys.argv[1:] if args is None else args)])


if __name__ == "__main__":
    sys.exit(main())
