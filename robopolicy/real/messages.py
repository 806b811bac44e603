"""ROS 2 message <-> numpy conversion, by hand (no cv_bridge), with errors that say why.

* Low-dimensional features travel as ``sensor_msgs/JointState``: one entry per dimension,
  the value in ``position``. Readers map by name, so a robot may publish more joints, in any
  order. A :class:`JointMap` ties each feature dimension to the robot's joint name and
  units (``ros = scale * model + offset``: degrees <-> radians, gripper 0-100 <-> metres);
  the identity map uses the feature's own per-dimension names (``env.feature_names``).
* Images travel as ``sensor_msgs/Image`` (``rgb8`` or ``bgr8``), checked against the
  policy's ``(H, W, 3)``.
* Commands are ``std_msgs/Float64MultiArray`` (values in the configured action order) or
  ``trajectory_msgs/JointTrajectory`` (one point, values in ``positions``, joints named by
  the action's joint map), in the robot's units.
* Telemetry batches are ``std_msgs/Float64MultiArray`` with a 2-D layout whose column
  dimension is labelled with the comma-separated field names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from builtin_interfaces.msg import Duration, Time
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

CommandType = Literal["float64_multi_array", "joint_trajectory"]
COMMAND_TYPES: tuple[str, ...] = ("float64_multi_array", "joint_trajectory")

# Observation rejection reasons (besides those of robopolicy.real.observations).
WRONG_NAMES = "wrong_names"
WRONG_SIZE = "wrong_size"
WRONG_ENCODING = "wrong_encoding"


class MessageError(ValueError):
    """A message that cannot be converted; ``reason`` is a short code for counters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def stamp_to_s(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def s_to_stamp(t: float) -> Time:
    ns = int(round(t * 1e9))
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


@dataclass(frozen=True)
class JointMap:
    """Per feature dimension: the robot's joint name, and ``ros = scale * model + offset``."""

    ros_names: tuple[str, ...]
    scale: np.ndarray
    offset: np.ndarray

    @classmethod
    def identity(cls, names: list[str]) -> "JointMap":
        return cls(tuple(names), np.ones(len(names)), np.zeros(len(names)))

    @property
    def is_identity(self) -> bool:
        return bool(np.all(self.scale == 1.0) and np.all(self.offset == 0.0))

    def to_model(self, ros_values: np.ndarray) -> np.ndarray:
        return (ros_values - self.offset) / self.scale

    def to_ros(self, model_values: np.ndarray) -> np.ndarray:
        return self.scale * model_values + self.offset


class JointStateReader:
    """Picks a feature's dimensions out of ``JointState.position`` by joint name, in model units."""

    def __init__(self, topic: str, joints: JointMap) -> None:
        self.topic, self.joints = topic, joints
        self.names = list(joints.ros_names)
        self._index: tuple[tuple[str, ...], np.ndarray] | None = None

    def read(self, msg: JointState) -> np.ndarray:
        if len(msg.position) != len(msg.name):
            raise MessageError(WRONG_SIZE, f"JointState on {self.topic} has {len(msg.name)} names "
                                           f"but {len(msg.position)} positions")
        key = tuple(msg.name)
        if self._index is None or self._index[0] != key:
            where = {n: i for i, n in enumerate(key)}
            missing = [n for n in self.names if n not in where]
            if missing:
                raise MessageError(WRONG_NAMES, f"JointState on {self.topic} lacks {missing}; "
                                                f"it has {list(key)}, the policy needs {self.names}")
            self._index = (key, np.array([where[n] for n in self.names]))
        values = np.asarray(msg.position, dtype=np.float64)[self._index[1]]
        return (values if self.joints.is_identity else self.joints.to_model(values)).astype(np.float32)


def joint_state(names: list[str], values: np.ndarray, stamp: Time) -> JointState:
    msg = JointState(name=list(names), position=np.asarray(values, dtype=np.float64).tolist())
    msg.header.stamp = stamp
    return msg


def image_to_array(msg: Image, topic: str, shape: tuple[int, ...]) -> np.ndarray:
    """``rgb8`` / ``bgr8`` Image -> ``(H, W, 3)`` uint8 RGB, checked against ``shape``."""
    if msg.encoding not in ("rgb8", "bgr8"):
        raise MessageError(WRONG_ENCODING, f"Image on {topic} has encoding {msg.encoding!r}; expected rgb8 or bgr8")
    h, w = int(msg.height), int(msg.width)
    if (h, w, 3) != tuple(shape):
        raise MessageError(WRONG_SIZE, f"Image on {topic} is {h}x{w}; the policy needs {shape[0]}x{shape[1]}")
    if msg.step < 3 * w or len(msg.data) < msg.step * h:
        raise MessageError(WRONG_SIZE, f"Image on {topic} has step {msg.step} and {len(msg.data)} bytes "
                                       f"for {h}x{w} rgb8")
    rows = np.frombuffer(msg.data, dtype=np.uint8, count=msg.step * h).reshape(h, msg.step)
    img = rows[:, : 3 * w].reshape(h, w, 3)
    return np.ascontiguousarray(img[..., ::-1] if msg.encoding == "bgr8" else img)


def array_to_image(img: np.ndarray, stamp: Time, frame_id: str = "") -> Image:
    """``(H, W, 3)`` uint8 RGB -> ``rgb8`` Image."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w = img.shape[:2]
    msg = Image(height=h, width=w, encoding="rgb8", is_bigendian=0, step=3 * w, data=img.tobytes())
    msg.header.stamp, msg.header.frame_id = stamp, frame_id
    return msg


class CommandCodec:
    """Encodes / decodes an action vector (model units) as the configured command message type
    (robot names and units, through ``joints``)."""

    def __init__(self, kind: str, joints: JointMap, period_s: float) -> None:
        if kind not in COMMAND_TYPES:
            raise ValueError(f"command message type must be one of {COMMAND_TYPES}, got {kind!r}")
        self.kind, self.joints, self.names = kind, joints, list(joints.ros_names)
        self.msg_type: Any = Float64MultiArray if kind == "float64_multi_array" else JointTrajectory
        ns = int(round(period_s * 1e9))
        self._time_from_start = Duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)
        self._reader = JointStateReader("", joints)

    def encode(self, values: np.ndarray, stamp: Time) -> Any:
        data = self.joints.to_ros(np.asarray(values, dtype=np.float64)).tolist()
        if self.kind == "float64_multi_array":
            msg = Float64MultiArray(data=data)
            msg.layout.dim = [MultiArrayDimension(label="action", size=len(data), stride=len(data))]
            return msg
        msg = JointTrajectory(joint_names=self.names,
                              points=[JointTrajectoryPoint(positions=data, time_from_start=self._time_from_start)])
        msg.header.stamp = stamp
        return msg

    def decode(self, msg: Any, topic: str) -> np.ndarray:
        """The command in model units."""
        if self.kind == "float64_multi_array":
            if len(msg.data) != len(self.names):
                raise MessageError(WRONG_SIZE, f"command on {topic} has {len(msg.data)} values; "
                                               f"expected {len(self.names)} ({self.names})")
            return self.joints.to_model(np.asarray(msg.data, dtype=np.float64))
        if not msg.points:
            raise MessageError(WRONG_SIZE, f"JointTrajectory on {topic} has no points")
        js = JointState(name=list(msg.joint_names), position=list(msg.points[0].positions))
        self._reader.topic = topic
        return self._reader.read(js).astype(np.float64)


def table_to_msg(fields: tuple[str, ...], rows: np.ndarray) -> Float64MultiArray:
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(fields))
    msg = Float64MultiArray(data=rows.ravel().tolist())
    msg.layout.dim = [
        MultiArrayDimension(label="rows", size=rows.shape[0], stride=rows.size),
        MultiArrayDimension(label=",".join(fields), size=len(fields), stride=len(fields)),
    ]
    return msg


def msg_to_table(msg: Float64MultiArray) -> tuple[tuple[str, ...], np.ndarray]:
    if len(msg.layout.dim) != 2:
        raise MessageError(WRONG_SIZE, "telemetry message needs a 2-D layout")
    fields = tuple(msg.layout.dim[1].label.split(","))
    return fields, np.asarray(msg.data, dtype=np.float64).reshape(-1, len(fields))
