"""``robopolicy dataset import-bag``: rosbag2 (sqlite3 and MCAP, written here with rosbags'
own writer) -> LeRobotDataset, through a robot parameter file's topics and joint maps."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from robopolicy.cli import main
from robopolicy.data.bag_import import BagImportConfig, import_bags
from robopolicy.data.topic_frames import align
from robopolicy.errors import RobopolicyError

TS = get_typestore(Stores.ROS2_KILTED)
T = TS.types
DEG = math.pi / 180
FPS = 10
H, W = 24, 32
CAMS = {"front": "/cam/front/image_raw", "wrist": "/cam/wrist/image_raw", "top": "/cam/top/image_mono",
        "side": "/cam/side/image/compressed"}
STATE_NAMES = ["shoulder.pos", "elbow.pos", "gripper.pos"]
ROS_JOINTS = ["shoulder", "elbow", "gripper"]
ROS_SCALE = [DEG, DEG, 0.0004]  # degrees -> radians; gripper 0-100 -> 0-0.04 m


def write_params(path: Path, message_type: str = "float64_multi_array", **extra) -> Path:
    common = {
        "observation": {"state": {"topic": "/joint_states"}, "environment_state": {"topic": "/object_state"},
                        "images": {"cameras": list(CAMS), "topics": list(CAMS.values())}},
        "action": {"topic": "/command", "message_type": message_type},
    }
    policy = {
        "observation": {
            "state": {"names": STATE_NAMES, "ros_names": ROS_JOINTS, "ros_scale": ROS_SCALE},
            "environment_state": {"names": ["cube.x", "cube.y"]},
        },
        "action": {"names": STATE_NAMES, "ros_names": ROS_JOINTS, "ros_scale": ROS_SCALE,
                   "lower": [-180.0, -180.0, 0.0], "upper": [180.0, 180.0, 100.0],
                   "max_delta": [5.0, 5.0, 10.0], "max_rate": [90.0, 90.0, 200.0]},
        **extra,
    }
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": common}, "robopolicy_policy": {"ros__parameters": policy}}))
    return path


def _time(t: float):
    ns = int(round(t * 1e9))
    return T["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)


def _header(t: float):
    return T["std_msgs/msg/Header"](stamp=_time(t), frame_id="")


def state_deg(t: float) -> np.ndarray:
    """The arm's state in model units (degrees, gripper 0-100) at time t."""
    return np.array([10 + 20 * t, -30 + 5 * t, 50 + 10 * t])


def action_deg(k: int) -> np.ndarray:
    return np.array([1.0 + k, -2.0 - k, 40.0 + k])


def _image(k: int, c: int) -> np.ndarray:
    """RGB frame k of camera c: channel values encode the frame number."""
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 8 * k + c, 100, 200 - 8 * k
    return img


def write_bag(path: Path, storage: str = "sqlite3", message_type: str = "float64_multi_array", *,
              duration: float = 2.0, skip_topic: str | None = None, drop_joint: str | None = None,
              encoding: str | None = None, corrupt_jpeg_at: int | None = None) -> Path:
    """A bag: joint states (50 Hz, radians, shuffled + an extra joint), object state (20 Hz), four
    cameras (10 Hz: rgb8, bgr8, mono8, JPEG) and commands (10 Hz, from t=0.05)."""
    msgs: list[tuple[float, str, object]] = []  # (receive time, topic, message)
    n_js = int(round(duration / 0.02)) + 1
    order, names = [2, 0, 3, 1], ROS_JOINTS + ["extra_joint"]
    for i in range(n_js):
        t = i * 0.02
        rad = np.append(state_deg(t) * np.array(ROS_SCALE), 9.9)
        js_names = [names[j] for j in order if names[j] != drop_joint]
        js_pos = np.array([rad[j] for j in order if names[j] != drop_joint])
        msgs.append((t + 0.001, "/joint_states", T["sensor_msgs/msg/JointState"](
            header=_header(t), name=js_names, position=js_pos, velocity=np.zeros(0), effort=np.zeros(0))))
    for i in range(int(round(duration / 0.05)) + 1):
        t = i * 0.05
        msgs.append((t + 0.001, "/object_state", T["sensor_msgs/msg/JointState"](
            header=_header(t), name=["cube.y", "cube.x"], position=np.array([-t, t]), velocity=np.zeros(0),
            effort=np.zeros(0))))
    for k in range(int(round(duration / 0.1)) + 1):
        t = k * 0.1
        for c, (cam, topic) in enumerate(CAMS.items()):
            rgb = _image(k, c)
            if cam == "side":
                ok, jpg = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                data = np.frombuffer(jpg.tobytes()[:40] if k == corrupt_jpeg_at else jpg.tobytes(), np.uint8)
                msg = T["sensor_msgs/msg/CompressedImage"](header=_header(t), format="jpeg", data=data)
            else:
                enc = {"front": "rgb8", "wrist": "bgr8", "top": "mono8"}[cam]
                px = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "mono8": rgb[..., :1]}[enc]
                ch = px.shape[2]
                msg = T["sensor_msgs/msg/Image"](header=_header(t), height=H, width=W,
                                                 encoding=encoding if (encoding and cam == "front") else enc,
                                                 is_bigendian=0, step=W * ch,
                                                 data=np.ascontiguousarray(px).reshape(-1))
            msgs.append((t + 0.002, topic, msg))
    for k in range(int((duration - 0.05) / 0.1 + 1e-9) + 1):
        t = 0.05 + k * 0.1
        ros = action_deg(k) * np.array(ROS_SCALE)
        if message_type == "float64_multi_array":
            layout = T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
            msg = T["std_msgs/msg/Float64MultiArray"](layout=layout, data=ros)
            msgs.append((t, "/command", msg))  # no header: the bag's receive time is the stamp
        else:
            point = T["trajectory_msgs/msg/JointTrajectoryPoint"](
                positions=np.append(ros[::-1], 7.0), velocities=np.zeros(0), accelerations=np.zeros(0),
                effort=np.zeros(0), time_from_start=T["builtin_interfaces/msg/Duration"](sec=0, nanosec=20_000_000))
            msg = T["trajectory_msgs/msg/JointTrajectory"](header=_header(t), joint_names=ROS_JOINTS[::-1] + ["x"],
                                                           points=[point])
            msgs.append((t + 0.003, "/command", msg))
    msgs.sort(key=lambda m: m[0])
    plugin = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}[storage]
    with Writer(path, version=9, storage_plugin=plugin) as w:
        conns = {}
        for _, topic, msg in msgs:
            if topic == skip_topic or topic in conns:
                continue
            conns[topic] = w.add_connection(topic, msg.__msgtype__, typestore=TS)
        for t, topic, msg in msgs:
            if topic in conns:
                w.write(conns[topic], int(round(t * 1e9)), TS.serialize_cdr(msg, msg.__msgtype__))
    return path


def _load(path: Path) -> LeRobotDataset:
    return LeRobotDataset(f"local/{path.name}", root=path, video_backend="pyav")


def _img(item, cam: str) -> np.ndarray:
    """(H, W, 3) uint8 of a dataset item's camera frame (lerobot gives CHW float in [0, 1])."""
    return np.round(item[f"observation.images.{cam}"].numpy().transpose(1, 2, 0) * 255).astype(np.int64)


@pytest.mark.parametrize("storage,message_type", [("sqlite3", "float64_multi_array"), ("mcap", "joint_trajectory")])
def test_bag_imports_aligned_converted_frames(tmp_path: Path, storage: str, message_type: str) -> None:
    bag = write_bag(tmp_path / "bag", storage, message_type)
    params = write_params(tmp_path / "robot.yaml", message_type, task="stack the cube")
    out = tmp_path / "ds"
    r = import_bags(BagImportConfig([bag], params, out, fps=FPS, use_videos=False), log=lambda _: None)
    assert r.total_episodes == 1 and r.frames == 20 == r.total_frames  # t = 0.05 .. 1.95 at 10 fps
    ds = _load(out)
    assert ds.meta.info["codebase_version"] == "v3.0" and ds.fps == FPS
    assert ds.meta.features["observation.state"]["names"] == STATE_NAMES
    assert tuple(ds.meta.features["observation.images.front"]["shape"]) == (H, W, 3)
    for k in (0, 7, 19):
        item, t = ds[k], 0.05 + 0.1 * k
        assert item["task"] == "stack the cube"
        # nearest previous joint state (50 Hz): stamped at 0.04 + 0.1 k; degrees back from radians
        np.testing.assert_allclose(item["observation.state"].numpy(), state_deg(0.04 + 0.1 * k), atol=1e-3)
        js_t = np.floor(t / 0.05 + 1e-9) * 0.05
        np.testing.assert_allclose(item["observation.environment_state"].numpy(), [js_t, -js_t], atol=1e-5)
        np.testing.assert_allclose(item["action"].numpy(), action_deg(k), atol=1e-3)
        for c, cam in enumerate(CAMS):
            want = _image(k, c)
            if cam == "top":
                want = np.repeat(want[..., :1], 3, axis=2)
            tol = 3 if cam == "side" else 0  # JPEG
            assert np.abs(_img(item, cam) - want).max() <= tol, (cam, k)


def test_two_bags_resized_as_video_episodes_and_appended(tmp_path: Path, capsys) -> None:
    bags = [write_bag(tmp_path / "a", "sqlite3", duration=1.0), write_bag(tmp_path / "b", "mcap", duration=0.6)]
    params = write_params(tmp_path / "robot.yaml")
    out = tmp_path / "ds"
    rc = main(["dataset", "import-bag", *map(str, bags), "--params", str(params), "--out", str(out),
               "--image-size", "32x48", "--fps", "10"])
    assert rc == 0
    assert "2 episode(s), 16 frames" in capsys.readouterr().out
    ds = _load(out)
    assert ds.num_episodes == 2 and ds.meta.total_frames == 10 + 6
    assert ds.meta.features["observation.images.front"]["dtype"] == "video"
    item = ds[10]  # episode 1, frame 0
    assert item["task"] == "demonstration"
    assert tuple(item["observation.images.front"].shape) == (3, 32, 48)
    assert abs(int(_img(item, "front")[16, 24, 1]) - 100) <= 3
    # appended: the same features, a third episode
    assert main(["dataset", "import-bag", str(bags[1]), "--params", str(params), "--out", str(out),
                 "--image-size", "32x48"]) == 0
    assert _load(out).num_episodes == 3
    capsys.readouterr()
    assert main(["dataset", "info", str(out)]) == 0
    assert "(rosbag2 import)" in capsys.readouterr().out


def test_align_reports_gaps_and_starts_when_every_feature_has_a_sample() -> None:
    stamps = {"observation.state": np.array([0.0, 0.1, 0.2, 0.9, 1.0]), "action": np.array([0.3, 0.5, 1.0])}
    al = align(stamps, {"observation.state": "/js", "action": "/cmd"}, fps=10)
    np.testing.assert_allclose(al.times, np.arange(3, 11) / 10)
    assert al.index["observation.state"].tolist() == [2, 2, 2, 2, 2, 2, 3, 4]
    gaps = {g.topic: g for g in al.gaps}
    assert gaps["/js"].longest_gap_s == pytest.approx(0.7) and len(gaps["/js"].gaps) == 1


def _fails(tmp_path: Path, bag: Path, match: str, params: Path | None = None) -> None:
    params = params or write_params(tmp_path / "robot.yaml")
    with pytest.raises(RobopolicyError, match=match):
        import_bags(BagImportConfig([bag], params, tmp_path / "ds", use_videos=False), log=lambda _: None)
    assert not (tmp_path / "ds").exists()
    assert not list(tmp_path.glob(".ds*"))  # nothing staged is left behind


def test_images_too_small_for_video_are_refused_before_writing(tmp_path: Path) -> None:
    bag, params = write_bag(tmp_path / "bag", duration=0.3), write_params(tmp_path / "robot.yaml")
    with pytest.raises(RobopolicyError, match="video needs at least 32 pixels"):
        import_bags(BagImportConfig([bag], params, tmp_path / "ds"), log=lambda _: None)  # 24x32 cameras
    assert not (tmp_path / "ds").exists()


def test_missing_and_non_bags_are_one_line_errors(tmp_path: Path, capsys) -> None:
    _fails(tmp_path, tmp_path / "nope", "bag .*nope does not exist")
    (tmp_path / "empty").mkdir()
    _fails(tmp_path, tmp_path / "empty", "not a readable rosbag2")
    (tmp_path / "x.mcap").write_text("not mcap")
    _fails(tmp_path, tmp_path / "x.mcap", "not a readable rosbag2")
    rc = main(["dataset", "import-bag", str(tmp_path / "empty"), "--params", str(tmp_path / "robot.yaml"),
               "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err and "error:" in err


def test_bag_without_a_mapped_topic_names_it_and_lists_the_bags_topics(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / "bag", duration=0.3, skip_topic="/object_state")
    _fails(tmp_path, bag, r"no topic /object_state \(observation.environment_state\); its topics: .*/joint_states")


def test_joint_state_without_a_mapped_joint_names_it(tmp_path: Path) -> None:
    _fails(tmp_path, write_bag(tmp_path / "bag", duration=0.3, drop_joint="elbow"), r"lacks \['elbow'\]")


def test_unconvertible_encoding_and_corrupt_jpeg(tmp_path: Path) -> None:
    _fails(tmp_path, write_bag(tmp_path / "enc", duration=0.3, encoding="16UC1"), "encoding '16UC1'")
    _fails(tmp_path, write_bag(tmp_path / "jpg", duration=0.5, corrupt_jpeg_at=2), "cannot be decoded")


def test_corrupt_jpeg_leaves_an_existing_dataset_as_it_was(tmp_path: Path) -> None:
    params, out = write_params(tmp_path / "robot.yaml"), tmp_path / "ds"
    import_bags(BagImportConfig([write_bag(tmp_path / "ok", duration=0.5)], params, out, use_videos=False),
                log=lambda _: None)
    bad = write_bag(tmp_path / "bad", duration=0.5, corrupt_jpeg_at=3)
    for overwrite in (False, True):
        with pytest.raises(RobopolicyError, match="cannot be decoded"):
            import_bags(BagImportConfig([bad], params, out, use_videos=False, overwrite=overwrite),
                        log=lambda _: None)
        assert _load(out).num_episodes == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "ds", "ok", "robot.yaml"]


def test_message_type_that_does_not_match_the_mapping(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / "bag", duration=0.3)  # Float64MultiArray commands
    _fails(tmp_path, bag, r"/command \(action\) carries std_msgs/msg/Float64MultiArray; .* maps it as "
                          r"trajectory_msgs/msg/JointTrajectory", write_params(tmp_path / "jt.yaml", "joint_trajectory"))
