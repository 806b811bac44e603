"""``robopolicy dataset import-bag``: rosbag2 recordings (sqlite3 or MCAP) -> a LeRobotDataset.

The robot's policy-node parameter file is the topic mapping (:class:`TopicMapping`), so the
dataset gets the model's feature names and units through the same joint maps the node uses.
Bags are read with the pure-Python ``rosbags`` library (no ROS install, no rclpy) and its
deserialized messages are converted to numpy directly (:mod:`robopolicy.data.topic_frames`).

Each bag is read twice: the first pass checks the topics and message types, collects every
stamp and converts the low-dimensional messages (small); the second pass streams the camera
messages, decoding and resizing only those a frame uses, straight into lerobot's writer, so a
long VGA recording never sits in memory. Each bag becomes one episode; all bags are written in
one atomic commit (:class:`DatasetRecorder`), so a failure leaves the dataset as it was.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robopolicy.atomic_io import remove_quietly, replace_dir
from robopolicy.data.recorder import DatasetRecorder
from robopolicy.data.topic_frames import (
    IMAGE, Alignment, ImageConverter, TopicGaps, TopicMapping, align, stamp_of,
)
from robopolicy.errors import RobopolicyError

DEFAULT_TASK = "demonstration"
#: Seconds between progress lines of a long bag.
PROGRESS_EVERY_S = 5.0
#: Smallest image side lerobot's video encoder takes (smaller frames kill the process).
MIN_VIDEO_SIZE = 32


@dataclass
class BagImportConfig:
    bags: list[Path]
    params: Path
    out: Path
    fps: int = 10
    task: str | None = None
    #: ``(H, W)`` of the dataset's images; None: each camera's own size (of its first message).
    image_size: tuple[int, int] | None = None
    use_videos: bool = True
    overwrite: bool = False


@dataclass
class BagReport:
    bag: Path
    messages: int
    frames: int
    gaps: list[TopicGaps]


@dataclass
class BagImportResult:
    bags: list[BagReport] = field(default_factory=list)
    total_episodes: int = 0
    total_frames: int = 0
    seconds: float = 0.0

    @property
    def frames(self) -> int:
        return sum(b.frames for b in self.bags)


@dataclass
class _Scan:
    """Pass 1 of one bag: per feature, sorted stamps; low-dim values; images' receive order."""

    path: Path
    messages: int
    stamps: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    #: Per image feature: receive-order index (per topic) of each stamp-sorted sample.
    order: dict[str, np.ndarray]
    alignment: Alignment | None = None


def parse_image_size(text: str) -> tuple[int, int]:
    """``N`` (square) or ``HxW``."""
    try:
        parts = [int(p) for p in text.lower().split("x")] if text else []
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not all(8 <= p <= 4096 for p in parts):
        raise RobopolicyError(f"--image-size {text!r}: expected N or HxW, 8 to 4096 pixels")
    return parts[0], parts[1]


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


@contextlib.contextmanager
def open_bag(path: Path) -> Iterator[Any]:
    """An opened ``rosbags`` reader (closed on exit), or a one-line error."""
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not path.exists():
        raise RobopolicyError(f"bag {path} does not exist")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as e:  # rosbags raises ReaderError, OSError, yaml and sqlite errors
        raise RobopolicyError(f"{path} is not a readable rosbag2 (sqlite3 or MCAP) bag: {e}") from None
    try:
        yield reader
    finally:
        reader.close()


def _connections(reader, mapping: TopicMapping, path: Path) -> dict[str, list]:
    """Mapped topic -> its connections, every mapped topic present and of the mapped type."""
    present = {c.topic for c in reader.connections}
    missing = [c for c in mapping.converters if c.topic not in present]
    if missing:
        raise RobopolicyError(
            f"bag {path} has no topic " + ", ".join(f"{c.topic} ({c.key})" for c in missing)
            + f"; its topics: {sorted(present) or 'none'}")
    out: dict[str, list] = {}
    for conv in mapping.converters:
        conns = [c for c in reader.connections if c.topic == conv.topic]
        for c in conns:
            conv.check_type(c.msgtype)
        out[conv.topic] = conns
    return out


class _Progress:
    def __init__(self, log: Callable[[str], None], what: str, total: int | None) -> None:
        self.log, self.what, self.total = log, what, total
        self.count, self.last = 0, time.perf_counter()

    def tick(self, unit: str) -> None:
        self.count += 1
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            self.log(f"{self.what}: {self.count}{of} {unit}")


def _deserialize(typestore, raw: bytes, conn, index: int) -> Any:
    try:
        return typestore.deserialize_cdr(raw, conn.msgtype)
    except Exception as e:
        raise RobopolicyError(f"message {index} on {conn.topic} ({conn.msgtype}) cannot be deserialized: "
                              f"{type(e).__name__}: {e}") from None


def scan_bag(path: Path, mapping: TopicMapping, log: Callable[[str], None]) -> _Scan:
    """Pass 1: topics and types checked, stamps of every mapped message, low-dim values converted,
    images' encodings checked (a camera's first image fixes its size where none is given)."""
    typestore = _typestore()
    with open_bag(path) as reader:
        conns = _connections(reader, mapping, path)
        by_topic = mapping.by_topic
        stamps: dict[str, list[float]] = {c.key: [] for c in mapping.converters}
        values: dict[str, list[np.ndarray]] = {c.key: [] for c in mapping.converters if not isinstance(c, ImageConverter)}
        wanted = [c for cs in conns.values() for c in cs]
        total = sum(c.msgcount for c in wanted)
        progress = _Progress(log, f"{path.name}: read", total)
        for conn, t_ns, raw in reader.messages(connections=wanted):
            conv = by_topic[conn.topic]
            msg = _deserialize(typestore, raw, conn, len(stamps[conv.key]))
            stamps[conv.key].append(stamp_of(msg, t_ns * 1e-9))
            if isinstance(conv, ImageConverter):
                if conn.msgtype == IMAGE:
                    _check_encoding(conv, msg)
                if conv.size is None:  # the first image of a camera sets the dataset's size
                    conv.size = conv.decode(msg).shape[:2]
            else:
                values[conv.key].append(conv.convert(msg))
            progress.tick("messages")
    order = {k: np.argsort(np.asarray(s), kind="stable") for k, s in stamps.items()}
    return _Scan(
        path, progress.count,
        {k: np.asarray(s, dtype=np.float64)[order[k]] for k, s in stamps.items()},
        {k: np.asarray(v, dtype=np.float32)[order[k]] for k, v in values.items()},
        {k: order[k] for k in mapping.image_keys},
    )


def _check_encoding(conv: ImageConverter, msg: Any) -> None:
    if str(msg.encoding).lower() not in conv.ENCODINGS:
        raise RobopolicyError(f"Image on {conv.topic} has encoding {msg.encoding!r}; "
                              f"can convert {', '.join(conv.ENCODINGS)}")


def stream_frames(scan: _Scan, mapping: TopicMapping, log: Callable[[str], None]) -> Iterator[dict[str, np.ndarray]]:
    """Pass 2: the frames in order; camera messages decoded only where a frame uses them and
    dropped as soon as no later frame does."""
    al = scan.alignment
    assert al is not None
    n = al.num_frames
    low = {k: scan.values[k][al.index[k]] for k in scan.values}
    need = {k: scan.order[k][al.index[k]] for k in mapping.image_keys}  # receive index per frame
    progress = _Progress(log, f"{scan.path.name}: wrote", n)

    def frame(i: int, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        progress.tick("frames")
        return {**{k: v[i] for k, v in low.items()}, **images}

    if not need:
        for i in range(n):
            yield frame(i, {})
        return
    typestore = _typestore()
    wanted = {k: set(v.tolist()) for k, v in need.items()}
    cache: dict[str, dict[int, np.ndarray]] = {k: {} for k in need}
    seen = {k: 0 for k in need}
    next_frame = 0
    by_topic = mapping.by_topic
    with open_bag(scan.path) as reader:
        conns = [c for c in reader.connections if c.topic in by_topic and by_topic[c.topic].key in need]
        for conn, _, raw in reader.messages(connections=conns):
            conv = by_topic[conn.topic]
            idx = seen[conv.key]
            seen[conv.key] += 1
            if idx not in wanted[conv.key]:
                continue
            cache[conv.key][idx] = conv.convert(_deserialize(typestore, raw, conn, idx))
            while next_frame < n and all(int(need[k][next_frame]) in cache[k] for k in need):
                i = next_frame
                yield frame(i, {k: cache[k][int(need[k][i])] for k in need})
                next_frame += 1
                for k in need:  # equal indices are contiguous: drop an image after its last frame
                    if next_frame == n or need[k][next_frame] != need[k][i]:
                        cache[k].pop(int(need[k][i]), None)
    if next_frame < n:
        raise RobopolicyError(f"bag {scan.path} changed while importing: frame {next_frame} of {n} lacks its images")


def _features(mapping: TopicMapping, use_videos: bool) -> dict[str, dict]:
    feats: dict[str, dict] = {}
    for conv in mapping.converters:
        if isinstance(conv, ImageConverter):
            assert conv.size is not None
            if use_videos and min(conv.size) < MIN_VIDEO_SIZE:  # lerobot's AV1 encoder crashes (SIGFPE) below
                raise RobopolicyError(
                    f"{conv.key} is {conv.size[0]}x{conv.size[1]}: video needs at least {MIN_VIDEO_SIZE} pixels a "
                    "side; pass --image-size, or --images to store PNG frames")
            feats[conv.key] = {"dtype": "video" if use_videos else "image", "shape": (*conv.size, 3),
                               "names": ["height", "width", "channels"]}
        else:
            names = mapping.names[conv.key]
            feats[conv.key] = {"dtype": "float32", "shape": (len(names),), "names": names}
    return feats


def import_bags(cfg: BagImportConfig, log: Callable[[str], None] | None = None) -> BagImportResult:
    """Import ``cfg.bags`` (one episode each) into the dataset at ``cfg.out``: appended when it
    exists with the same features and fps, replaced with ``overwrite`` (only once all succeeded)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if not cfg.bags:
        raise RobopolicyError("no bag given")
    if not 1 <= cfg.fps <= 1000:
        raise RobopolicyError(f"--fps must be in [1, 1000], got {cfg.fps}")
    start = time.perf_counter()
    mapping = TopicMapping.from_params_file(cfg.params, cfg.image_size)
    task = cfg.task or mapping.task or DEFAULT_TASK
    topics = {c.key: c.topic for c in mapping.converters}
    result = BagImportResult()
    scans = []
    for bag in cfg.bags:  # pass 1 over every bag first: bad input fails before anything is written
        scan = scan_bag(Path(bag), mapping, log)
        try:
            scan.alignment = align(scan.stamps, topics, cfg.fps)
        except RobopolicyError as e:
            raise RobopolicyError(f"bag {bag}: {e}") from None
        scans.append(scan)
        result.bags.append(BagReport(Path(bag), scan.messages, scan.alignment.num_frames, scan.alignment.gaps))
        log(f"{Path(bag).name}: {scan.messages} messages -> {scan.alignment.num_frames} frames "
            f"({scan.alignment.num_frames / cfg.fps:.1f} s at {cfg.fps} fps)")
        for g in scan.alignment.gaps:
            if g.gaps:
                log(f"  gap: {g.line()}")

    out = Path(cfg.out).resolve()
    target = out.with_name(f".{out.name}.import") if cfg.overwrite and out.exists() else out
    if target != out:
        remove_quietly(target)
    meta = {
        "source": "rosbag2 import",
        "params": str(Path(cfg.params).resolve()),
        "bags": [str(Path(b).resolve()) for b in cfg.bags],
        "topics": topics,
        "fps": cfg.fps,
        "image_size": list(cfg.image_size) if cfg.image_size else None,
    }
    recorder = DatasetRecorder(target, _features(mapping, cfg.use_videos), cfg.fps,
                               robot_type=Path(cfg.params).stem, extra_meta=meta)
    try:
        recorder.commit_episodes([(stream_frames(s, mapping, log), [task] * s.alignment.num_frames) for s in scans])
        if target != out:
            replace_dir(target, out)
    finally:
        if target != out:
            shutil.rmtree(target, ignore_errors=True)
    result.total_episodes, result.total_frames = _on_disk(out)
    result.seconds = time.perf_counter() - start
    return result


def _on_disk(root: Path) -> tuple[int, int]:
    info = json.loads((root / "meta" / "info.json").read_text())
    return int(info["total_episodes"]), int(info["total_frames"])
