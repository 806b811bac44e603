"""Timestamped ROS messages of mapped topics -> dataset frames at a fixed fps.

The reusable core of turning robot recordings into a LeRobotDataset, shared by
``robopolicy dataset import-bag`` (rosbag2 files, :mod:`robopolicy.data.bag_import`) and
any live recorder: it knows nothing about where messages come from.

* :class:`TopicMapping` reads the robot's policy-node parameter file (``real/config/*.yaml``):
  which topic feeds which feature, with the *same* joint maps the policy node applies
  (robot joint names / units -> the model's feature names / units).
* :class:`Converter` subclasses turn one message into numpy, in model units: JointState
  (by joint name), Image (``rgb8`` / ``bgr8`` / ``mono8``), CompressedImage (JPEG / PNG),
  Float64MultiArray and JointTrajectory commands. Messages are duck-typed, so rosbags'
  deserialized dataclasses and rclpy messages both work; nothing here needs rclpy.
* :func:`align` picks, at each frame time, the newest sample of every feature at or before it
  (nearest previous), and reports the gaps of each topic.

Frames start when every mapped feature has a sample and end at the last action message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robopolicy.errors import RobopolicyError
from robopolicy.spec import ACTION, IMAGE_PREFIX

JOINT_STATE = "sensor_msgs/msg/JointState"
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
FLOAT64_MULTI_ARRAY = "std_msgs/msg/Float64MultiArray"
JOINT_TRAJECTORY = "trajectory_msgs/msg/JointTrajectory"
#: ``action.message_type`` parameter -> ROS type name.
COMMAND_MSG_TYPES = {"float64_multi_array": FLOAT64_MULTI_ARRAY, "joint_trajectory": JOINT_TRAJECTORY}
#: A placeholder for the ``model`` parameter: the mapping needs no model.
NO_MODEL = "<no model: topic mapping only>"


def ros_type_name(name: str) -> str:
    """``pkg/msg/Type`` for ``pkg/msg/Type`` or ``pkg/Type`` (both spellings occur)."""
    parts = name.split("/")
    return f"{parts[0]}/msg/{parts[1]}" if len(parts) == 2 else name


def stamp_of(msg: Any, receive_time_s: float) -> float:
    """The message's ``header.stamp`` in seconds, or ``receive_time_s`` where it has no header
    or the stamp is zero (an unstamped message, e.g. a JointTrajectory meaning "now")."""
    header = getattr(msg, "header", None)
    if header is not None:
        t = int(header.stamp.sec) + int(header.stamp.nanosec) * 1e-9
        if t != 0.0:
            return t
    return receive_time_s


class Converter:
    """Turns one message of one topic into a numpy array (model units)."""

    msg_types: tuple[str, ...] = ()

    def __init__(self, key: str, topic: str) -> None:
        self.key, self.topic = key, topic

    def check_type(self, msg_type: str) -> None:
        if ros_type_name(msg_type) not in self.msg_types:
            raise RobopolicyError(
                f"topic {self.topic} ({self.key}) carries {ros_type_name(msg_type)}; the parameter file maps it "
                f"as {' or '.join(self.msg_types)}")

    def convert(self, msg: Any) -> np.ndarray:
        raise NotImplementedError


class JointStateConverter(Converter):
    """``sensor_msgs/JointState`` -> float32 vector, picked by joint name, in model units."""

    msg_types = (JOINT_STATE,)

    def __init__(self, key: str, topic: str, joints) -> None:
        from robopolicy.real.messages import JointStateReader, MessageError

        super().__init__(key, topic)
        self.names = list(joints.ros_names)
        self._reader, self._error = JointStateReader(topic, joints), MessageError

    def convert(self, msg: Any) -> np.ndarray:
        try:
            return self._reader.read(msg)
        except self._error as e:
            raise RobopolicyError(f"{self.key}: {e}") from None


class ImageConverter(Converter):
    """``sensor_msgs/Image`` (rgb8, bgr8, mono8) or ``sensor_msgs/CompressedImage`` (JPEG, PNG)
    -> uint8 ``(H, W, 3)`` RGB, resized to ``size`` (``(H, W)``; None: the camera's size)."""

    msg_types = (IMAGE, COMPRESSED_IMAGE)
    ENCODINGS = ("rgb8", "bgr8", "mono8")

    def __init__(self, key: str, topic: str, size: tuple[int, int] | None = None) -> None:
        super().__init__(key, topic)
        self.size = size

    def decode(self, msg: Any) -> np.ndarray:
        """The image at the camera's own size."""
        import cv2

        if hasattr(msg, "format"):  # CompressedImage
            buf = np.frombuffer(bytes(msg.data) if not isinstance(msg.data, np.ndarray) else msg.data, np.uint8)
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
            if img is None:
                raise RobopolicyError(f"CompressedImage on {self.topic} (format {msg.format!r}, {buf.size} bytes) "
                                      "cannot be decoded: corrupt or not JPEG / PNG")
            return np.ascontiguousarray(img[..., ::-1])
        enc = str(msg.encoding).lower()
        if enc not in self.ENCODINGS:
            raise RobopolicyError(f"Image on {self.topic} has encoding {msg.encoding!r}; "
                                  f"can convert {', '.join(self.ENCODINGS)}")
        h, w, ch = int(msg.height), int(msg.width), 1 if enc == "mono8" else 3
        data = np.frombuffer(msg.data, dtype=np.uint8) if isinstance(msg.data, (bytes, bytearray, memoryview)) \
            else np.asarray(msg.data, dtype=np.uint8)
        if h == 0 or w == 0 or msg.step < ch * w or data.size < msg.step * h:
            raise RobopolicyError(f"Image on {self.topic} has step {msg.step} and {data.size} bytes "
                                  f"for {h}x{w} {enc}")
        img = data[: msg.step * h].reshape(h, msg.step)[:, : ch * w].reshape(h, w, ch)
        if enc == "mono8":
            return np.repeat(img, 3, axis=2)
        return np.ascontiguousarray(img[..., ::-1] if enc == "bgr8" else img)

    def convert(self, msg: Any) -> np.ndarray:
        img = self.decode(msg)
        if self.size is None or img.shape[:2] == self.size:
            return img
        import cv2

        h, w = self.size
        shrink = h < img.shape[0] or w < img.shape[1]
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class CommandConverter(Converter):
    """The command topic (``std_msgs/Float64MultiArray`` or ``trajectory_msgs/JointTrajectory``,
    first point's positions by joint name) -> float32 action in model units."""

    def __init__(self, key: str, topic: str, message_type: str, joints) -> None:
        super().__init__(key, topic)
        self.msg_types = (COMMAND_MSG_TYPES[message_type],)
        self.joints, self.names = joints, list(joints.ros_names)
        self._index: tuple[tuple[str, ...], np.ndarray] | None = None

    def convert(self, msg: Any) -> np.ndarray:
        if self.msg_types[0] == FLOAT64_MULTI_ARRAY:
            values = np.asarray(msg.data, dtype=np.float64)
            if values.size != len(self.names):
                raise RobopolicyError(f"Float64MultiArray on {self.topic} has {values.size} values; "
                                      f"the action has {len(self.names)} ({self.names})")
        else:
            if not len(msg.points):
                raise RobopolicyError(f"JointTrajectory on {self.topic} has no points")
            key, positions = tuple(msg.joint_names), np.asarray(msg.points[0].positions, dtype=np.float64)
            if positions.size != len(key):
                raise RobopolicyError(f"JointTrajectory on {self.topic} names {len(key)} joints but its first "
                                      f"point has {positions.size} positions")
            if self._index is None or self._index[0] != key:
                where = {n: i for i, n in enumerate(key)}
                missing = [n for n in self.names if n not in where]
                if missing:
                    raise RobopolicyError(f"JointTrajectory on {self.topic} lacks joints {missing}; it has "
                                          f"{list(key)}, the action needs {self.names}")
                self._index = (key, np.array([where[n] for n in self.names], dtype=np.int64))
            values = positions[self._index[1]]
        return self.joints.to_model(values).astype(np.float32)


@dataclass(frozen=True)
class TopicMapping:
    """Which topic feeds which dataset feature, and how (from a policy-node parameter file)."""

    converters: tuple[Converter, ...]
    #: Per-dimension names of the low-dimensional features and the action (model names).
    names: Mapping[str, list[str]]
    task: str
    params_path: Path | None = None

    @classmethod
    def from_params_file(cls, path: str | Path, image_size: tuple[int, int] | None = None) -> "TopicMapping":
        """Read and validate ``path`` exactly as the policy node does (placeholder model)."""
        from robopolicy.real.config import PolicyNodeConfig
        from robopolicy.real.nodes import POLICY, check_params_file

        path = Path(path)
        if not path.is_file():
            raise RobopolicyError(f"parameter file {path} does not exist")
        values = dict(check_params_file(path)[POLICY.name])
        values["model"] = NO_MODEL
        return cls.from_config(PolicyNodeConfig.from_params(values), image_size, path)

    @classmethod
    def from_config(cls, cfg, image_size: tuple[int, int] | None = None,
                    params_path: Path | None = None) -> "TopicMapping":
        """From a validated :class:`robopolicy.real.config.PolicyNodeConfig`."""
        where = f"parameter file {params_path}" if params_path else "the parameters"
        converters: list[Converter] = []
        names: dict[str, list[str]] = {}
        for f in cfg.low_dim:
            if not f.names:
                raise RobopolicyError(f"{where} sets {f.key}.topic but no {f.key}.names: the dataset needs the "
                                      "per-dimension names")
            converters.append(JointStateConverter(f.key, f.topic, f.joints))
            names[f.key] = list(f.names)
        converters += [ImageConverter(f.key, f.topic, image_size) for f in cfg.images]
        converters.append(CommandConverter(ACTION, cfg.action_topic, cfg.message_type, cfg.action_joints))
        names[ACTION] = list(cfg.action_names)
        topics = [c.topic for c in converters]
        dupes = sorted({t for t in topics if topics.count(t) > 1})
        if dupes:
            raise RobopolicyError(f"{where} maps topic(s) {dupes} to more than one feature")
        return cls(tuple(converters), names, cfg.task, params_path)

    @property
    def by_topic(self) -> dict[str, Converter]:
        return {c.topic: c for c in self.converters}

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.converters]

    @property
    def image_keys(self) -> list[str]:
        return [c.key for c in self.converters if c.key.startswith(IMAGE_PREFIX)]


@dataclass
class TopicGaps:
    """How evenly one topic arrived over the frames."""

    key: str
    topic: str
    messages: int
    rate_hz: float
    longest_gap_s: float
    #: Gaps longer than the threshold (``(start time, duration)``, seconds).
    gaps: list[tuple[float, float]] = field(default_factory=list)

    def line(self) -> str:
        s = f"{self.topic} ({self.key}): {self.messages} msgs, {self.rate_hz:.1f} Hz, longest gap {self.longest_gap_s:.3f} s"
        return s + (f", {len(self.gaps)} gap(s) over threshold" if self.gaps else "")


@dataclass
class Alignment:
    """Frame times and, per feature, which sample (index into its stamp-sorted samples) each frame uses."""

    times: np.ndarray
    index: dict[str, np.ndarray]
    gaps: list[TopicGaps]

    @property
    def num_frames(self) -> int:
        return int(self.times.size)


def align(stamps: Mapping[str, np.ndarray], topics: Mapping[str, str], fps: float,
          end_key: str = ACTION, gap_factor: float = 3.0, phase_s: float = 0.0) -> Alignment:
    """Frames at ``fps`` from when every feature has a sample to the last ``end_key`` sample,
    both moved ``phase_s`` later (the live recorder passes half a frame period: a command stream
    at the frame rate is then sampled midway between its messages, not on their edges, where
    a late message would shift a frame onto the previous command).

    ``stamps[key]`` must be sorted (seconds). A gap is an interval between consecutive samples
    of a topic, within the frames, longer than ``max(2 / fps, gap_factor * the topic's median interval)``.
    """
    empty = [k for k, s in stamps.items() if len(s) == 0]
    if empty:
        raise RobopolicyError("no messages on " + ", ".join(f"{topics[k]} ({k})" for k in empty))
    start = max(float(s[0]) for s in stamps.values()) + phase_s
    end = float(stamps[end_key][-1]) + phase_s
    if end < start:
        late = max(stamps, key=lambda k: float(stamps[k][0]))
        raise RobopolicyError(f"no frames: the last {end_key} message ({topics[end_key]}, t={end - phase_s:.3f}) comes "
                              f"before every feature has a sample ({topics[late]} starts at t={start - phase_s:.3f})")
    n = int(np.floor((end - start) * fps + 1e-6)) + 1
    times = start + np.arange(n) / fps
    index = {k: np.searchsorted(s, times + 1e-9, side="right") - 1 for k, s in stamps.items()}
    gaps = []
    for k, s in stamps.items():
        s = np.asarray(s, dtype=np.float64)
        window = s[max(int(index[k][0]), 0): int(index[k][-1]) + 1]
        window = np.append(window, times[-1]) if window[-1] < times[-1] else window
        d = np.diff(window)
        median = float(np.median(np.diff(s))) if s.size > 1 else 0.0  # the topic's usual interval
        threshold = max(2.0 / fps, gap_factor * median)
        over = np.flatnonzero(d > threshold)
        rate = (s.size - 1) / (s[-1] - s[0]) if s.size > 1 and s[-1] > s[0] else 0.0
        gaps.append(TopicGaps(k, topics[k], int(s.size), float(rate), float(d.max()) if d.size else 0.0,
                              [(float(window[i]), float(d[i])) for i in over]))
    return Alignment(times, index, gaps)


def frames_from_arrays(alignment: Alignment, values: Mapping[str, Sequence[np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The frames, from every feature's stamp-sorted converted samples held in memory (a live
    recorder's short episodes; :mod:`robopolicy.data.bag_import` streams images instead)."""
    return [{k: np.asarray(values[k][int(alignment.index[k][i])]) for k in values}
            for i in range(alignment.num_frames)]
