"""Writing demonstrations as LeRobotDatasets (v3.0 layout) with lerobot's own API.

Episodes are committed atomically, a batch at a time: the dataset is staged in a hidden
sibling directory (a copy of the current dataset plus the new episodes, finalized by
lerobot) and swapped in with one ``renameat2(RENAME_EXCHANGE)``. A collect run that is
interrupted or killed therefore leaves a dataset that lerobot loads, holding every
committed episode.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robopolicy.atomic_io import recover_swap, remove_quietly, replace_dir, write_json_atomic
from robopolicy.errors import DatasetError
from robopolicy.spec import IMAGE_PREFIX

ROBOPOLICY_META = "meta/robopolicy.json"
#: pyav decodes without system FFmpeg libraries (torchcodec needs them).
VIDEO_BACKEND = "pyav"


def repo_id_for(root: Path) -> str:
    """The repo id we give local datasets (lerobot only uses it as a label with ``root``)."""
    return f"local/{Path(root).name}"


def lerobot_features(
    observation_space: Mapping[str, Any],
    action_dim: int,
    feature_names: Mapping[str, list[str]],
    use_videos: bool,
) -> dict[str, dict]:
    """The lerobot ``features`` dict for an env's observation/action spaces."""
    feats: dict[str, dict] = {}
    for key, space in observation_space.items():
        if key.startswith(IMAGE_PREFIX):
            feats[key] = {
                "dtype": "video" if use_videos else "image",
                "shape": tuple(space.shape),
                "names": ["height", "width", "channels"],
            }
        else:
            feats[key] = {"dtype": "float32", "shape": tuple(space.shape), "names": feature_names.get(key)}
    feats["action"] = {"dtype": "float32", "shape": (action_dim,), "names": feature_names.get("action")}
    return feats


def _comparable(features: Mapping[str, dict]) -> dict[str, tuple]:
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in features.items() if k in _user_keys(features)}


def _user_keys(features: Mapping[str, dict]) -> list[str]:
    return [k for k in features if k == "action" or k.startswith("observation.")]


class DatasetRecorder:
    """Appends whole episodes to a LeRobotDataset at ``root``, one atomic commit per batch of episodes."""

    def __init__(
        self,
        root: Path,
        features: dict[str, dict],
        fps: int,
        robot_type: str,
        extra_meta: dict[str, Any],
        overwrite: bool = False,
    ) -> None:
        self.root = Path(root).resolve()
        self.features = features
        self.fps = int(fps)
        self.robot_type = robot_type
        self.extra_meta = extra_meta
        self.stage = self.root.with_name(f".{self.root.name}.staging")
        recover_swap(self.root)
        remove_quietly(self.stage)
        if self.root.exists() and overwrite:
            shutil.rmtree(self.root)
        self._check_existing()

    def _check_existing(self) -> None:
        """Refuse a folder that is not a LeRobotDataset, or one with other features or fps."""
        if not self.root.exists():
            return
        info_path = self.root / "meta" / "info.json"
        if not info_path.exists():
            if any(self.root.iterdir()):
                raise DatasetError(
                    f"{self.root} exists and is not a LeRobotDataset (no meta/info.json); "
                    "choose another --out or pass --overwrite to replace it"
                )
            self.root.rmdir()
            return
        info = json.loads(info_path.read_text())
        have, want = _comparable(info["features"]), _comparable(self.features)
        if have != want or int(info["fps"]) != self.fps:
            raise DatasetError(
                f"{self.root} already holds a dataset with other features or fps "
                f"(it has fps={info['fps']}, {have}; this run writes fps={self.fps}, {want}); "
                "choose another --out or pass --overwrite to replace it"
            )

    def on_disk(self) -> tuple[int, int]:
        """``(episodes, frames)`` the committed dataset holds."""
        info = self.root / "meta" / "info.json"
        if not info.exists():
            return 0, 0
        meta = json.loads(info.read_text())
        return int(meta["total_episodes"]), int(meta["total_frames"])

    def commit_episodes(self, episodes: Sequence[tuple[Iterable[dict[str, np.ndarray]], list[str]]]) -> None:
        """Write finished episodes (``(frames, task per frame)`` each; frames may be an iterator that
        streams them, as ``dataset import-bag`` does) in one commit; on return they
        are durable and loadable. A commit's cost grows with the dataset (lerobot's resume reads
        every metadata file, and each commit adds one data file), so callers batch episodes."""
        remove_quietly(self.stage)
        try:
            self._write_staged(episodes)
            replace_dir(self.stage, self.root)
        except OSError as e:
            if e.errno != errno.ENOSPC and "No space left on device" not in str(e):
                raise
            kept, frames = self.on_disk()
            raise DatasetError(f"no space left on the device of {self.root}: {len(episodes)} finished episode(s) were "
                               f"not written; the dataset keeps its {kept} committed episodes ({frames} frames), "
                               "loadable as they were") from None
        finally:  # interrupted or not, nothing staged outlives the commit
            remove_quietly(self.stage)

    def _write_staged(self, episodes: Sequence[tuple[Iterable[dict[str, np.ndarray]], list[str]]]) -> None:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset as dataset_cls

        if self.root.exists():
            shutil.copytree(self.root, self.stage)
            ds = dataset_cls.resume(repo_id_for(self.root), root=self.stage, video_backend=VIDEO_BACKEND)
        else:
            ds = dataset_cls.create(
                repo_id_for(self.root), fps=self.fps, features=self.features, root=self.stage,
                robot_type=self.robot_type, use_videos=any(v["dtype"] == "video" for v in self.features.values()),
                video_backend=VIDEO_BACKEND,
            )
        for frames, tasks in episodes:
            for frame, task in zip(frames, tasks, strict=True):
                ds.add_frame({**frame, "task": task})
            ds.save_episode(parallel_encoding=False)
        ds.finalize()
        shutil.rmtree(self.stage / "images", ignore_errors=True)
        write_json_atomic(self.stage / ROBOPOLICY_META, self.extra_meta)
