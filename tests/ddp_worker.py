"""One rank of tests/test_ddp.py (under torchrun), or the single-process reference run.

Runs the project's real :class:`Trainer` (DDP wrapping, all-reduce, clipping, AdamW, EMA,
checkpoints, logs) with two things planned by the test instead of drawn at random, so that
two ranks of batch B and one process of batch 2B see exactly the same samples and noise:

* the batch rows of step k: ``rows[k]`` (2B windows without action padding, so every
  sample weighs the same in each rank's loss); rank r takes ``rows[k][r*B:(r+1)*B]``;
* the diffusion noise and timesteps of step k, sliced the same way.

Writes ``probe/rank<r>.pt``: the gradients after the first all-reduce, each step's local
loss, the final weights (model and EMA), the summary, and every write this process made
under the run folder (an audit hook), so the test can tell that rank 1 wrote nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.symlink", "os.link",
               "os.truncate", "os.chmod", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}


def watch_writes(root: Path) -> list[tuple[str, str]]:
    """Record every file write / directory change under ``root`` made by this process."""
    root_s = str(root)
    seen: list[tuple[str, str]] = []

    def under(p: object) -> str | None:
        if isinstance(p, (str, bytes, os.PathLike)):
            s = os.path.abspath(os.fsdecode(p))
            return s if s == root_s or s.startswith(root_s + os.sep) else None
        return None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (list(args) + [None, None, 0])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if writing and (hit := under(path)):
                seen.append((event, hit))
        elif event in PATH_EVENTS:
            for a in args[:2]:
                if hit := under(a):
                    seen.append((event, hit))

    sys.addaudithook(hook)
    return seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--probe", type=Path, required=True)
    ap.add_argument("--batch", type=int, required=True, help="batch of this process (B per rank, 2B alone)")
    ap.add_argument("--combined", type=int, required=True, help="the combined batch 2B")
    ap.add_argument("--steps", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    run_dir = args.out.resolve()
    writes = watch_writes(run_dir)

    from robopolicy.train.trainer import TrainConfig, Trainer

    tiny = {"down_dims": [16, 32], "time_embed_dim": 8, "state_mlp_dims": [32], "num_inference_steps": 3}
    cfg = TrainConfig(policy="diffusion", dataset=args.dataset, out=run_dir, steps=args.steps,
                      batch_size=args.batch, warmup_steps=2, save_every=2, log_every=1, ema_decay=0.9,
                      policy_overrides=tiny)
    trainer = Trainer(cfg)
    policy, sampler = trainer.policy, trainer.sampler
    lo, hi = rank * args.batch, (rank + 1) * args.batch
    assert hi <= args.combined

    # ---- the plan: the same for every process ------------------------------------------
    full = np.flatnonzero(~sampler.index.action_is_pad.any(axis=1))
    plan = np.random.default_rng(1234)
    rows = [plan.choice(full, size=args.combined) for _ in range(args.steps)]
    gen = torch.Generator().manual_seed(99)
    shape = (args.combined, policy.spec.action.dim, policy.config.horizon)  # noise is drawn as [B, Da, Tp]
    noise = [torch.randn(shape, generator=gen) for _ in range(args.steps)]
    times = [torch.randint(0, policy.config.num_train_timesteps, (args.combined,), generator=gen)
             for _ in range(args.steps)]

    state = {"k": -1, "in_loss": False}

    def batch(batch_size: int):
        assert batch_size == args.batch, batch_size
        state["k"] += 1
        return sampler.gather(rows[state["k"]][lo:hi])

    sampler.batch = batch
    randn_like, randint = torch.randn_like, torch.randint

    def planned_randn_like(x, *a, **kw):
        if state["in_loss"] and tuple(x.shape) == (args.batch, *shape[1:]):
            return noise[state["k"]][lo:hi].to(x.dtype).clone()
        return randn_like(x, *a, **kw)

    def planned_randint(*a, **kw):
        size = kw.get("size", a[-1] if a else None)
        if state["in_loss"] and isinstance(size, tuple) and size == (args.batch,):
            return times[state["k"]][lo:hi].clone()
        return randint(*a, **kw)

    torch.randn_like, torch.randint = planned_randn_like, planned_randint

    losses: list[float] = []
    compute_loss = policy.compute_loss

    def recorded_loss(b):
        state["in_loss"] = True
        try:
            loss, metrics = compute_loss(b)
        finally:
            state["in_loss"] = False
        losses.append(float(loss.detach()))
        return loss, metrics

    policy.compute_loss = recorded_loss

    first_grads: dict[str, torch.Tensor] = {}

    def record_grads(optimizer, *_):  # the first step's gradients, after DDP's all-reduce (and clipping)
        if not first_grads:
            first_grads.update({n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(record_grads)
    initial = {k: v.detach().clone() for k, v in policy.state_dict().items()}

    summary = trainer.train()
    assert state["k"] == args.steps - 1, state
    args.probe.mkdir(parents=True, exist_ok=True)
    torch.save({
        "rank": rank, "grads": first_grads, "losses": losses, "summary": summary, "writes": list(writes),
        "initial": initial, "weights": {k: v.detach().clone() for k, v in policy.state_dict().items()},
        "ema": {k: v.detach().clone() for k, v in trainer.ema.state_dict().items()},
    }, args.probe / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
