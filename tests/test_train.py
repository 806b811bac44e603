"""Trainer, checkpoints and the sim evaluator on a real (small) push dataset."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from robopolicy.cli import main
from robopolicy.data.collect import CollectConfig, collect
from robopolicy.data.reader import EpisodeArrays
from robopolicy.errors import CheckpointError, RobopolicyError, SpecMismatchError
from robopolicy.spec import ENV_STATE
from robopolicy.train.checkpoint import POLICY_WEIGHTS, load_policy, resolve_checkpoint
from robopolicy.stats import wilson_interval
from robopolicy.train.evaluate import EvalConfig, evaluate_policy
from robopolicy.train.trainer import TrainConfig, Trainer, train
from robopolicy.train.windows import build_windows

TINY = {"down_dims": [16, 32], "time_embed_dim": 8, "state_mlp_dims": [32], "num_inference_steps": 3}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "push"
    collect(CollectConfig(env="push", episodes=3, out=out, seed=3))
    return out


def _cfg(dataset: Path, out: Path, policy: str = "diffusion", steps: int = 12, **kw) -> TrainConfig:
    kw = {"save_every": 6, "log_every": 2, **kw}
    return TrainConfig(policy=policy, dataset=dataset, out=out, steps=steps, batch_size=8, warmup_steps=2,
                       policy_overrides=dict(TINY), **kw)


def test_windows_pad_at_episode_edges() -> None:
    arrays = EpisodeArrays(data={}, episode_starts=np.array([0, 5]), episode_ends=np.array([5, 8]),
                           task_index=np.zeros(8, dtype=np.int64), tasks=["t"])
    w = build_windows(arrays, n_obs_steps=2, horizon=4)
    assert w.obs.shape == (8, 2) and w.action.shape == (8, 4)
    np.testing.assert_array_equal(w.obs[0], [0, 0])  # first frame repeated before the start
    np.testing.assert_array_equal(w.obs[5], [5, 5])  # never reaches into the previous episode
    np.testing.assert_array_equal(w.action[3], [2, 3, 4, 4])  # last action repeated...
    np.testing.assert_array_equal(w.action_is_pad[3], [False, False, False, True])  # ...and flagged


@pytest.mark.parametrize("policy", ["diffusion", "flow"])
def test_train_writes_checkpoints_curves_and_loads(policy: str, dataset: Path, tmp_path: Path) -> None:
    summary = train(_cfg(dataset, tmp_path / "run", policy))
    assert summary["steps"] == 12 and np.isfinite(summary["final_loss"])
    run = tmp_path / "run"
    assert resolve_checkpoint(run).name == "step_0000012"
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    loaded = load_policy(run)
    assert loaded.type == policy and not loaded.training
    meta = loaded.checkpoint_meta
    assert meta["env"] == "push" and meta["dataset"]["episodes"] == 3
    assert meta["spec"]["features"]["action"]["stats"]["min"]  # normalization travels with the policy


def test_a_killed_run_resumes_exactly(dataset: Path, tmp_path: Path) -> None:
    steps = 40
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "robopolicy.cli", "train", "--policy", "diffusion", "--dataset", str(dataset),
           "--out", str(killed), "--steps", str(steps), "--batch-size", "8", "--save-every", "6"]
    cmd += [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()] + ["--warmup-steps", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = killed / "checkpoints" / "last"
    deadline = time.monotonic() + 120
    while not last.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    stopped_at = int(last.read_text().split("_")[1])
    assert stopped_at < steps, "the run finished before it could be killed"
    train(_cfg(dataset, killed, steps=steps, resume=True, log_every=1))
    train(_cfg(dataset, tmp_path / "straight", steps=steps, log_every=1))
    a, b = load_policy(tmp_path / "straight").state_dict(), load_policy(killed).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_train_refuses_to_overwrite_a_run(dataset: Path, tmp_path: Path) -> None:
    train(_cfg(dataset, tmp_path / "run", steps=6))
    with pytest.raises(RobopolicyError, match="already holds a training run"):
        Trainer(_cfg(dataset, tmp_path / "run", steps=6))


def test_resume_refuses_another_policy_type(dataset: Path, tmp_path: Path) -> None:
    train(_cfg(dataset, tmp_path / "run", steps=6))
    with pytest.raises(CheckpointError, match="holds a 'diffusion' run but --policy is 'flow'"):
        Trainer(_cfg(dataset, tmp_path / "run", policy="flow", steps=12, resume=True))
    with pytest.raises(CheckpointError, match="holds a 'diffusion' policy but a 'flow' policy was asked for"):
        load_policy(tmp_path / "run", expect_type="flow")


def test_damaged_checkpoints_fail_clearly_and_the_last_good_one_survives(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_cfg(dataset, run, steps=12))
    good = resolve_checkpoint(run)
    # A save killed half-way leaves only a hidden staging folder: the last good checkpoint still loads.
    stage = run / "checkpoints" / ".step_0000018.staging"
    shutil.copytree(good, stage)
    (stage / POLICY_WEIGHTS).write_bytes(b"garbage")
    assert resolve_checkpoint(run) == good and load_policy(run) is not None
    # A truncated weights file is named in the error.
    weights = good / POLICY_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_policy(run)
    # A pointer to a missing checkpoint, and a folder that is no checkpoint at all.
    (run / "checkpoints" / "last").write_text("step_0999999")
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        load_policy(run)
    with pytest.raises(CheckpointError, match="neither a run folder"):
        load_policy(tmp_path)


def test_weights_of_another_architecture_are_named(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_cfg(dataset, run, steps=6))
    ckpt = resolve_checkpoint(run)
    meta = json.loads((ckpt / "policy.json").read_text())
    meta["config"]["down_dims"] = [16, 32, 64]
    (ckpt / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_policy(run)


def test_eval_runs_closed_loop_and_checks_the_env(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_cfg(dataset, run, steps=6))
    policy = load_policy(run)
    result = evaluate_policy(policy, EvalConfig(env="push", episodes=2, progress=False, max_episode_steps=20),
                             out_json=tmp_path / "eval.json")
    assert result.episodes == 2 and 0.0 <= result.success_rate <= 1.0
    assert result.latency_ms_p50 > 0 and all(r.length <= 20 for r in result.episode_results)
    assert json.loads((tmp_path / "eval.json").read_text())["episodes"] == 2
    with pytest.raises(SpecMismatchError, match="the policy.*env 'multitask'"):
        evaluate_policy(policy, EvalConfig(env="multitask", episodes=1, progress=False))
    # same shapes, other meaning: a policy trained when object positions were table coordinates
    env_state = policy.spec.features[ENV_STATE]
    old_names = [n.replace(".dx", ".x").replace(".dy", ".y") for n in env_state.names]
    policy.spec = dataclasses.replace(policy.spec, features={
        **policy.spec.features, ENV_STATE: dataclasses.replace(env_state, names=old_names)})
    with pytest.raises(SpecMismatchError, match="dimension 0 is 'red_block.x' in the policy but 'red_block.dx'"):
        evaluate_policy(policy, EvalConfig(env="push", episodes=1, progress=False))


def test_eval_cli_with_ensembling_and_video(dataset: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    train(_cfg(dataset, run, steps=6))
    video = tmp_path / "roll.mp4"
    assert main(["eval", "--checkpoint", str(run), "--episodes", "1", "--ensemble", "--video", str(video)]) == 0
    out = capsys.readouterr().out
    assert "env push: success" in out and "chunk inference p50" in out
    assert video.stat().st_size > 1000 and (run / "eval_push.json").exists()


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(45, 50)
    assert lo == pytest.approx(0.7864, abs=1e-3) and hi == pytest.approx(0.9565, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
