"""Collecting demonstrations into real LeRobotDatasets, appending, inspecting, and
surviving interruption (Ctrl-C and SIGKILL)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from robopolicy.cli import main
from robopolicy.data.collect import CollectConfig, collect
from robopolicy.data.reader import dataset_spec, load_arrays, open_dataset
from robopolicy.errors import DatasetError

ENV = "push"  # the light own-MJCF task: thousands of steps/s


def _load(path: Path) -> LeRobotDataset:
    return LeRobotDataset(f"local/{path.name}", root=path, video_backend="pyav")


@pytest.fixture(scope="module")
def push_ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "push"
    r = collect(CollectConfig(env=ENV, episodes=3, out=out, seed=1))
    assert r.kept == 3 and r.total_episodes == 3
    return out


def test_collect_writes_a_dataset_lerobot_loads_offline(push_ds: Path) -> None:
    ds = _load(push_ds)
    assert ds.num_episodes == 3
    assert ds.meta.info["codebase_version"] == "v3.0"
    assert {"observation.state", "observation.environment_state", "action"} <= set(ds.meta.features)
    item = ds[0]
    assert item["action"].shape == (2,)
    assert item["task"] == "push the red block to the goal"
    assert set(ds.meta.stats["action"]) >= {"min", "max", "mean", "std"}


def test_spec_and_arrays_match_the_dataset(push_ds: Path) -> None:
    ds = open_dataset(push_ds)
    spec = dataset_spec(ds)
    assert spec.fps == ds.meta.fps
    assert spec.action.stats is not None and len(spec.action.stats.min) == 2
    assert spec.features["observation.state"].names[:2] == ["pusher_x", "pusher_y"]
    arrays = load_arrays(ds, ["observation.state", "action"])
    assert arrays.num_frames == ds.meta.total_frames
    assert len(arrays.episode_starts) == 3 and arrays.episode_starts[0] == 0
    np.testing.assert_allclose(arrays.data["action"][5], ds[5]["action"].numpy(), atol=1e-6)


def test_collect_appends_and_refuses_other_features(push_ds: Path, tmp_path: Path) -> None:
    out = tmp_path / "append"
    collect(CollectConfig(env=ENV, episodes=2, out=out))
    r = collect(CollectConfig(env=ENV, episodes=1, out=out))
    assert r.total_episodes == 3 and _load(out).num_episodes == 3
    with pytest.raises(DatasetError, match="other features"):
        collect(CollectConfig(env=ENV, episodes=1, out=out, cameras=("top",), image_size=32))
    r = collect(CollectConfig(env=ENV, episodes=1, out=out, overwrite=True))
    assert _load(out).num_episodes == 1


def test_collect_commits_episodes_in_batches(tmp_path: Path) -> None:
    runs = {every: tmp_path / f"every_{every:g}" for every in (0.0, 1e9)}
    for every, out in runs.items():
        assert collect(CollectConfig(env=ENV, episodes=4, out=out, seed=3, commit_every_s=every)).total_episodes == 4
    data_files = {every: len(list((out / "data").rglob("*.parquet"))) for every, out in runs.items()}
    assert data_files == {0.0: 4, 1e9: 1}  # one commit (lerobot resume) per file
    each, batched = (load_arrays(open_dataset(out), ["observation.state", "action"]) for out in runs.values())
    np.testing.assert_array_equal(each.data["action"], batched.data["action"])
    np.testing.assert_array_equal(each.episode_starts, batched.episode_starts)


def test_collect_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a LeRobotDataset"):
        collect(CollectConfig(env=ENV, episodes=1, out=tmp_path / "x"))
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


def test_camera_dataset_stores_video_and_decodes(tmp_path: Path) -> None:
    out = tmp_path / "img"
    collect(CollectConfig(env=ENV, episodes=1, out=out, cameras=("top",), image_size=32))
    ds = open_dataset(out)
    assert ds.meta.features["observation.images.top"]["dtype"] == "video"
    arrays = load_arrays(ds, ["observation.images.top"])
    frames = arrays.data["observation.images.top"]
    assert frames.shape == (ds.meta.total_frames, 32, 32, 3) and frames.dtype == np.uint8
    assert frames.std() > 5  # a real picture, not a blank frame


def test_dataset_info_and_plot(push_ds: Path, tmp_path: Path, capsys) -> None:
    assert main(["dataset", "info", str(push_ds)]) == 0
    out = capsys.readouterr().out
    for text in ("episodes  3", "observation.state", "push the red block", "min", "pusher_x"):
        assert text in out
    png = tmp_path / "ep.png"
    assert main(["dataset", "plot", str(push_ds), "--episode", "1", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "episode"])
def test_bad_dataset_paths_give_one_line_errors(case: str, push_ds: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / case
    args = ["dataset", "info", str(path)]
    if case == "empty":
        path.mkdir()
    elif case == "corrupt":
        (path / "meta").mkdir(parents=True)
        (path / "meta" / "info.json").write_text("{not json")
    elif case == "episode":
        args = ["dataset", "plot", str(push_ds), "--episode", "7", "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robopolicy dataset: error:")
    assert "Traceback" not in err[0]


def test_unknown_env_and_bad_option_values(tmp_path: Path, capsys) -> None:
    assert main(["collect", "--env", "nope", "--episodes", "1", "--out", str(tmp_path / "d")]) == 2
    assert "unknown env 'nope'; expected one of:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["collect", "--env", ENV, "--episodes", "0", "--out", str(tmp_path / "d")])
    assert "expected a positive integer" in capsys.readouterr().err


def _episodes_on_disk(path: Path) -> int:
    info = path / "meta" / "info.json"
    return json.loads(info.read_text())["total_episodes"] if info.exists() else 0


def _start_collect(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "robopolicy.cli", "collect", "--env", ENV, "--episodes", "200", "--out", str(out),
         "--commit-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_collect_leaves_a_loadable_dataset(sig: signal.Signals, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = _start_collect(out)
    deadline = time.monotonic() + 120
    while _episodes_on_disk(out) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "collect made no progress"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if sig == signal.SIGINT:  # handled at the next episode boundary, not inside lerobot's writer
        assert proc.returncode == 130
        assert b"stopping after this episode" in proc.stderr.read()
        kept = re.search(rb"interrupted: kept (\d+) episodes", proc.stdout.read())
        assert kept and int(kept[1]) == _episodes_on_disk(out)  # the uncommitted batch was committed too
    ds = _load(out)  # lerobot itself loads what is left
    assert ds.num_episodes == _episodes_on_disk(out) >= 3
    assert len(ds) == ds.meta.total_frames
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    if sig == signal.SIGINT:
        assert leftovers == []
    # The next run cleans up whatever a kill left staged and appends after the kept episodes.
    r = collect(CollectConfig(env=ENV, episodes=1, out=out))
    assert r.total_episodes == ds.num_episodes + 1 == _load(out).num_episodes
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs (a full disk) needs root")
def test_a_full_disk_is_one_line_and_the_committed_episodes_stay_loadable(tmp_path: Path) -> None:
    """collect on a 150 kB tmpfs, in a mount namespace of its own: it fills up after a few episodes."""
    disk, out = tmp_path / "disk", tmp_path / "disk" / "push"
    disk.mkdir()
    load = (f"from lerobot.datasets.lerobot_dataset import LeRobotDataset as D; "
            f"ds = D('local/push', root={str(out)!r}, video_backend='pyav'); print(ds.num_episodes, len(ds))")
    script = (f"mount -t tmpfs -o size=150k tmpfs {disk} && "
              f"{sys.executable} -m robopolicy.cli collect --env {ENV} --episodes 40 --images --commit-every 0 "
              f"--out {out} 2> {tmp_path}/err; echo $? > {tmp_path}/rc; {sys.executable} -c \"{load}\" > {tmp_path}/n")
    subprocess.run(["unshare", "-m", "sh", "-c", script], check=True, timeout=300,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", err
    last = err.strip().splitlines()[-1]  # after the progress lines: one error line, no traceback
    assert last.startswith("robopolicy collect: error: no space left on the device of") and "Traceback" not in err, err
    kept = int(re.search(r"keeps its (\d+) committed episodes", last)[1])
    episodes, frames = map(int, (tmp_path / "n").read_text().split())
    assert 1 <= kept == episodes < 40 and frames > 0
