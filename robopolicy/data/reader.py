"""Opening LeRobotDatasets with clear errors, and loading them whole into memory.

Training reads every frame once into contiguous numpy arrays (:func:`load_arrays`): on a
2-core CPU the per-sample ``__getitem__`` path (parquet rows, video decoding) would starve
the model, so images are decoded once per episode here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robopolicy.data.recorder import ROBOPOLICY_META, VIDEO_BACKEND, repo_id_for
from robopolicy.errors import DatasetError
from robopolicy.spec import ACTION, Feature, FeatureSpec, Stats, feature_kind



def read_info(path: Path) -> dict[str, Any]:
    """``meta/info.json`` of a dataset, or a :class:`DatasetError` saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset path {path} does not exist")
    info_path = path / "meta" / "info.json"
    if not info_path.is_file():
        raise DatasetError(f"{path} is not a LeRobotDataset: {info_path} is missing")
    try:
        info = json.loads(info_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{info_path} is corrupt: {e}") from e
    if int(info.get("total_episodes", 0)) == 0:
        raise DatasetError(f"{path} holds no episodes")
    return info


def read_robopolicy_meta(path: Path) -> dict[str, Any]:
    """What ``robopolicy collect`` recorded about the source env (empty for foreign datasets)."""
    p = Path(path) / ROBOPOLICY_META
    return json.loads(p.read_text()) if p.is_file() else {}


def open_dataset(path: Path):
    """Open a dataset with lerobot (offline), turning its failures into :class:`DatasetError`."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    read_info(path)
    try:
        return LeRobotDataset(repo_id_for(path), root=path, video_backend=VIDEO_BACKEND)
    except Exception as e:  # lerobot raises many types for damaged files
        raise DatasetError(f"{path} could not be loaded by lerobot ({type(e).__name__}: {e})") from e


def dataset_spec(ds) -> FeatureSpec:
    """The feature spec (shapes, names, statistics, fps, tasks) of an opened dataset."""
    feats: dict[str, Feature] = {}
    for key, ft in ds.meta.features.items():
        if key != ACTION and not key.startswith("observation."):
            continue
        stats = ds.meta.stats.get(key) if ds.meta.stats else None
        kind = feature_kind(key)
        feats[key] = Feature(
            name=key,
            shape=tuple(ft["shape"]),
            dtype="uint8" if kind == "image" else ft["dtype"],
            names=ft.get("names") if kind != "image" else None,
            stats=Stats.from_arrays(stats) if stats is not None and kind != "image" else None,
        )
    tasks = list(ds.meta.tasks.index) if ds.meta.tasks is not None else []
    return FeatureSpec(features=feats, fps=float(ds.meta.fps), tasks=tasks)


@dataclass
class EpisodeArrays:
    """Every frame of a dataset in memory: ``data[key]`` is ``[N, ...]``, episodes contiguous."""

    data: dict[str, np.ndarray]
    episode_starts: np.ndarray  # [E] first frame index of each episode
    episode_ends: np.ndarray  # [E] one past the last frame index
    task_index: np.ndarray  # [N] index into ``tasks``
    tasks: list[str]

    @property
    def num_frames(self) -> int:
        return int(self.episode_ends[-1])


def load_arrays(ds, keys: list[str]) -> EpisodeArrays:
    """Load ``keys`` for every frame; images become uint8 ``[N, H, W, 3]``."""
    hf = ds.hf_dataset.with_format("numpy")
    episode_index = np.asarray(hf["episode_index"])
    if np.any(np.diff(episode_index) < 0):
        raise DatasetError(f"{ds.root}: frames are not grouped by episode")
    boundaries = np.flatnonzero(np.diff(episode_index)) + 1
    starts = np.concatenate([[0], boundaries]).astype(np.int64)
    ends = np.concatenate([boundaries, [len(episode_index)]]).astype(np.int64)
    data: dict[str, np.ndarray] = {}
    for key in keys:
        if key not in ds.meta.features:
            raise DatasetError(f"{ds.root} has no feature {key!r} (it has: {', '.join(ds.meta.features)})")
        if key in ds.meta.video_keys:
            data[key] = _decode_video_feature(ds, key, episode_index, starts)
        elif ds.meta.features[key]["dtype"] == "image":
            data[key] = np.stack([_to_hwc_uint8(img) for img in hf[key]])
        else:
            data[key] = np.asarray(np.stack(hf[key]), dtype=np.float32)
    tasks = list(ds.meta.tasks.index) if ds.meta.tasks is not None else []
    return EpisodeArrays(data, starts, ends, np.asarray(hf["task_index"], dtype=np.int64), tasks)


def _to_hwc_uint8(img: Any) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8)
    return arr


def _decode_video_feature(ds, key: str, episode_index: np.ndarray, starts: np.ndarray) -> np.ndarray:
    from lerobot.datasets.video_utils import decode_video_frames

    hf = ds.hf_dataset.with_format("numpy")
    timestamps = np.asarray(hf["timestamp"], dtype=np.float64)
    out = []
    for ep_start, ep_end in zip(starts, list(starts[1:]) + [len(episode_index)]):
        ep = int(episode_index[ep_start])
        ep_meta = ds.meta.episodes[ep]
        from_ts = float(ep_meta[f"videos/{key}/from_timestamp"])
        video = ds.root / ds.meta.get_video_file_path(ep, key)
        ts = (timestamps[ep_start:ep_end] + from_ts).tolist()
        frames = decode_video_frames(video, ts, ds.tolerance_s, VIDEO_BACKEND, return_uint8=True)
        out.append(frames.permute(0, 2, 3, 1).numpy())
    return np.concatenate(out).astype(np.uint8)
