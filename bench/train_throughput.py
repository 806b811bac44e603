"""Training throughput: robopolicy's trainer vs lerobot's DiffusionPolicy, same run.

Same dataset, same batch size, matched parameter count (lerobot's ``down_dims`` chosen
to land closest to ours), same torch threads. lerobot runs its standard path:
LeRobotDataset with delta_timestamps + DataLoader + preprocessor + ``policy.forward``;
we report its best of 0 and 2 DataLoader workers. Ours runs ``Trainer.train`` end to end
(including its checkpoint write). Prints samples/s, the share of time waiting for data,
and the ratio.

    python bench/train_throughput.py [--dataset datasets/lift] [--steps 150] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from robopolicy.process_defaults import apply_defaults

apply_defaults()  # before torch / lerobot are imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lerobot_baseline import make_lerobot_diffusion, n_params  # noqa: E402

from robopolicy.data.collect import CollectConfig, collect  # noqa: E402
from robopolicy.train.trainer import TrainConfig, Trainer  # noqa: E402

CANDIDATE_DOWN_DIMS = [(64, 128, 256), (96, 192, 384), (128, 256, 512), (160, 320, 640), (192, 384, 768)]


def ensure_dataset(path: Path | None, work: Path) -> Path:
    if path is not None:
        return path
    out = work / "lift"
    print(f"no --dataset given: collecting 10 lift episodes into {out}")
    collect(CollectConfig(env="lift", episodes=10, out=out))
    return out


def ours(dataset: Path, out: Path, steps: int, batch: int) -> dict:
    trainer = Trainer(TrainConfig(policy="diffusion", dataset=dataset, out=out, steps=steps, batch_size=batch,
                                  save_every=10**9, log_every=10**9))
    data_time = 0.0
    batch_fn = trainer.sampler.batch

    def timed_batch(n: int):
        nonlocal data_time
        t = time.perf_counter()
        b = batch_fn(n)
        data_time += time.perf_counter() - t
        return b

    trainer.sampler.batch = timed_batch
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"name": "robopolicy diffusion", "params": n_params(trainer.policy), "samples_s": steps * batch / seconds,
            "data_share": data_time / seconds, "detail": "in-memory windows"}


def lerobot(dataset: Path, steps: int, batch: int, target_params: int, workers: int) -> dict:
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    best = min(CANDIDATE_DOWN_DIMS,
               key=lambda d: abs(n_params(make_lerobot_diffusion(dataset, d)[0]) - target_params))
    policy, pre, _, meta = make_lerobot_diffusion(dataset, best)
    ds = LeRobotDataset(f"local/{dataset.name}", root=dataset, video_backend="pyav",
                        delta_timestamps=resolve_delta_timestamps(policy.config, meta))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=1e-6)
    policy.train()
    it, done, data_time = iter(loader), 0, 0.0
    warmup = 5
    while done < steps + warmup:
        if done == warmup:
            start, data_time = time.perf_counter(), 0.0
        t = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        data_time += time.perf_counter() - t
        loss, _ = policy.forward(pre(b))
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
    seconds = time.perf_counter() - start
    return {"name": f"lerobot DiffusionPolicy ({workers} workers)", "params": n_params(policy),
            "samples_s": steps * batch / seconds, "data_share": data_time / seconds, "detail": f"down_dims={best}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = ensure_dataset(args.dataset, Path(tmp))
        rows = [ours(dataset, Path(tmp) / "run", args.steps, args.batch_size)]
        baselines = [lerobot(dataset, args.steps, args.batch_size, rows[0]["params"], w) for w in (0, 2)]
        rows += baselines
    base = max(baselines, key=lambda r: r["samples_s"])
    print(f"\ntraining throughput, batch {args.batch_size}, {args.steps} steps, torch threads {torch.get_num_threads()},"
          f" dataset {dataset.name}")
    print(f"{'trainer':<36} {'params':>8} {'samples/s':>10} {'data wait':>10} {'vs lerobot':>11}  detail")
    for r in rows:
        print(f"{r['name']:<36} {r['params'] / 1e6:>7.2f}M {r['samples_s']:>10.1f} {r['data_share']:>9.0%}"
              f" {r['samples_s'] / base['samples_s']:>10.2f}x  {r['detail']}")


if __name__ == "__main__":
    main()
