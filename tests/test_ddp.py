"""Two DistributedDataParallel ranks (gloo, CPU) under ``torchrun`` train exactly like one process.

The real trainer runs in tests/ddp_worker.py: two ranks of batch B under
``torchrun --standalone --nproc_per_node=2``, and one plain process of batch 2B on the
same planned samples and noise. Averaged gradients make them the same run within float
rounding; rank 0 alone writes the run folder; logged losses are the mean over the ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robopolicy.data.collect import CollectConfig, collect
from robopolicy.train.checkpoint import resolve_checkpoint

WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS, B = 4, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "push"
    collect(CollectConfig(env="push", episodes=2, out=out, seed=3))
    return out


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "ROBOPOLICY_PROGRESS": "log"}
    env.pop("WORLD_SIZE", None), env.pop("RANK", None), env.pop("LOCAL_RANK", None)
    return env


def _maxdiff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_two_gloo_ranks_average_gradients_and_only_rank0_writes(dataset: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found beside the interpreter"
    common = ["--dataset", str(dataset), "--combined", str(2 * B), "--steps", str(STEPS)]
    ref = subprocess.Popen(
        [sys.executable, str(WORKER), "--out", str(tmp_path / "ref"), "--probe", str(tmp_path / "probe_ref"),
         "--batch", str(2 * B), *common], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ddp = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(WORKER), "--out", str(tmp_path / "ddp"),
         "--probe", str(tmp_path / "probe_ddp"), "--batch", str(B), *common],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
    ref_out = ref.communicate(timeout=240)[0]
    assert ddp.returncode == 0, ddp.stdout.decode()[-4000:]
    assert ref.returncode == 0, ref_out.decode()[-4000:]

    ref = torch.load(tmp_path / "probe_ref" / "rank0.pt")
    r0 = torch.load(tmp_path / "probe_ddp" / "rank0.pt")
    r1 = torch.load(tmp_path / "probe_ddp" / "rank1.pt")

    # Every rank starts from the same weights: the ones a single process starts from.
    assert _maxdiff(r0["initial"], ref["initial"]) == 0 and _maxdiff(r1["initial"], ref["initial"]) == 0
    # The ranks saw different halves (their own losses differ); the whole batch's loss is their mean.
    assert all(abs(a - b) > 1e-4 for a, b in zip(r0["losses"], r1["losses"]))
    for whole, a, b in zip(ref["losses"], r0["losses"], r1["losses"]):
        assert whole == pytest.approx((a + b) / 2, rel=1e-5)
    # Gradients after the all-reduce: the same on both ranks, and equal to the combined batch's.
    scale = max(float(g.abs().max()) for g in ref["grads"].values())
    assert _maxdiff(r0["grads"], r1["grads"]) <= 1e-7 * scale
    assert _maxdiff(r0["grads"], ref["grads"]) <= 1e-5 * scale
    # After STEPS steps: the same weights and EMA as one process on the combined batch.
    moved = _maxdiff(ref["weights"], ref["initial"])
    assert moved > 1e-4
    for key in ("weights", "ema"):
        assert _maxdiff(r0[key], r1[key]) <= 1e-6
        assert _maxdiff(r0[key], ref[key]) <= 1e-5, key
    # Logged losses are averaged over the ranks: the summary matches the single process's.
    assert r0["summary"]["final_loss"] == pytest.approx(ref["summary"]["final_loss"], rel=1e-5)

    # Rank 0 alone writes the run folder: checkpoints, config, summary, one TensorBoard log.
    run = tmp_path / "ddp"
    assert r1["writes"] == [], r1["writes"][:5]
    assert any(p.endswith("train_state.json") for _, p in r0["writes"])  # (the hook sees Python's writes)
    assert (run / "checkpoints" / "last").exists() and (run / "train_summary.json").exists()
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert json.loads((run / "train_summary.json").read_text())["final_loss"] == pytest.approx(
        ref["summary"]["final_loss"], rel=1e-5)
    # The checkpoint carries rank 1's own data and noise streams, so --resume continues both.
    meta = json.loads((resolve_checkpoint(run) / "train_state.json").read_text())
    assert len(meta["rank_rng"]) == 1 and meta["rank_rng"][0]["sampler_rng"] != meta["sampler_rng"]
    # Progress in a log: lines, not carriage-return bar updates.
    assert b"\r" not in ddp.stdout


@pytest.mark.slow
def test_a_ddp_run_resumes_each_rank_exactly(dataset: Path, tmp_path: Path) -> None:
    """``robopolicy train`` under torchrun, resumed half-way, ends where the straight run ends:
    each rank continues its own sampler and noise stream (rank 1's are saved by rank 0).
    Slow (two more torchrun launches): ``scripts/test.sh tests/test_ddp.py -m slow``."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")

    def run(out: Path, *extra: str) -> None:
        cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "robopolicy.cli", "train", "--policy",
               "diffusion", "--dataset", str(dataset), "--out", str(out), "--steps", "6", "--batch-size", "4",
               "--save-every", "3", "--warmup-steps", "2", *extra]
        cmd += [f"--set={k}={json.dumps(v)}" for k, v in
                {"down_dims": [16, 32], "time_embed_dim": 8, "state_mlp_dims": [32], "num_inference_steps": 3}.items()]
        proc = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
        assert proc.returncode == 0, proc.stdout.decode()[-4000:]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    # The resumed run starts from the straight run's step-3 checkpoint, as if killed after it.
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_0000003", resumed / "checkpoints" / "step_0000003")
    (resumed / "checkpoints" / "last").write_text("step_0000003")
    run(resumed, "--resume")
    from robopolicy.train.checkpoint import load_policy

    a, b = load_policy(straight).state_dict(), load_policy(resumed).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
