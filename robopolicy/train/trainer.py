"""``robopolicy train``: behaviour cloning of a policy family on a LeRobotDataset.

AdamW, linear warm-up + cosine decay, EMA weights, gradient clipping, seeded; atomic
safetensors checkpoints with exact ``--resume``; a progress bar (loss, samples/s, ETA),
TensorBoard scalars and a loss-curve PNG; optional periodic evaluation in sim.

Multi-GPU: launch the same command under ``torchrun --nproc_per_node=N`` (or
``accelerate launch``); each rank samples its own batches of ``--batch-size`` (the
effective batch is N times larger), gradients are averaged by DistributedDataParallel,
logged losses are averaged over the ranks, and rank 0 alone writes checkpoints and logs.
Every rank starts from the same weights; each has its own data and noise stream, saved
per rank so ``--resume`` continues each exactly. No code change needed
(tests/test_ddp.py runs two gloo ranks on the CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robopolicy import progress
from robopolicy.atomic_io import write_json_atomic
from robopolicy.data.reader import dataset_spec, load_arrays, open_dataset, read_robopolicy_meta
from robopolicy.errors import CheckpointError, RobopolicyError
from robopolicy.seeds import EVAL_SEED
from robopolicy.train.checkpoint import (
    POLICY_WEIGHTS,
    dataset_fingerprint,
    load_tensors,
    load_train_state,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from robopolicy.train.optim import adamw, polyak_update
from robopolicy.train.plots import plot_curves
from robopolicy.train.windows import WindowSampler


@dataclass
class TrainConfig:
    policy: str
    dataset: Path
    out: Path
    steps: int | None = None  # None: the policy family's default (its config's ``train_steps``)
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    seed: int = 0
    save_every: int = 1000
    log_every: int = 25
    eval_every: int = 0
    eval_episodes: int = 10
    eval_env: str | None = None
    device: str = "auto"
    resume: bool = False
    policy_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        if self.steps is None:
            from robopolicy.policies.factory import policy_class

            self.steps = policy_class(self.policy).config_class.train_steps
        for name in ("steps", "batch_size", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise RobopolicyError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise RobopolicyError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise RobopolicyError(f"--lr must be > 0, got {self.lr}")
        return self


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # before any collective: NCCL object collectives use the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend)
    return Dist(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def _device(name: str, dist: Dist) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_lambda(warmup: int, total: int):
    """Linear warm-up then cosine decay to 0, as a LambdaLR factor."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """Polyak-average ``model`` into ``ema``; the decay warms up over the first steps."""
    polyak_update(ema, model, 1.0 - min(decay, (1 + step) / (10 + step)))


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    """Owns the model, optimizer, EMA, data sampler and logging for one run."""

    def __init__(self, cfg: TrainConfig) -> None:
        from robopolicy.policies.factory import make_policy

        self.cfg = cfg.validate()
        self.dist = _init_distributed()
        self.device = _device(cfg.device, self.dist)
        torch.manual_seed(cfg.seed)  # the same initial weights (and EMA copy) on every rank
        self.run_dir = Path(cfg.out)
        self.dataset_path = Path(cfg.dataset)

        ds = open_dataset(self.dataset_path)
        spec = dataset_spec(ds)
        self.source_meta = read_robopolicy_meta(self.dataset_path)
        self.policy = make_policy(cfg.policy, spec, cfg.policy_overrides).to(self.device)
        keys = self.policy.spec.observation_keys
        self.sampler = WindowSampler(
            load_arrays(ds, keys + ["action"]), keys,
            self.policy.config.n_obs_steps, self.policy.config.horizon, cfg.seed, self.dist.rank,
        )
        self.ema = copy.deepcopy(self.policy).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        if self.dist.world > 1:  # then a noise stream of each rank's own
            torch.manual_seed(_rank_seed(cfg.seed, self.dist.rank))
        self.optimizer = adamw(self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.warmup_steps, cfg.steps))
        self.model: torch.nn.Module = self.policy
        if self.dist.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.policy, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.step = 0
        self.history: dict[str, list[list[float]]] = {"loss": [], "lr": [], "success": []}
        self.extra = {
            "dataset": {"path": str(self.dataset_path.resolve()), "fingerprint": dataset_fingerprint(self.dataset_path),
                        "episodes": int(ds.meta.total_episodes), "frames": int(ds.meta.total_frames)},
            "env": self.source_meta.get("env"),
            "source": self.source_meta,
        }
        if cfg.resume:
            self._resume()
        elif (self.run_dir / "checkpoints" / "last").exists():
            raise RobopolicyError(
                f"{self.run_dir} already holds a training run; pass --resume to continue it or choose another --out"
            )

    # ---- persistence -------------------------------------------------------------------
    def _resume(self) -> None:
        ckpt = resolve_checkpoint(self.run_dir)
        weights, optim_state, meta = load_train_state(ckpt)
        if meta.get("policy_type") != self.cfg.policy:
            raise CheckpointError(
                f"cannot resume: {ckpt} holds a {meta.get('policy_type')!r} run but --policy is {self.cfg.policy!r}"
            )
        if meta.get("dataset_fingerprint") != self.extra["dataset"]["fingerprint"]:
            raise CheckpointError(f"cannot resume: {ckpt} was trained on another dataset than {self.dataset_path}")
        load_weights(self.policy, weights, str(ckpt))
        if self.ema is not None:
            load_weights(self.ema, load_tensors(ckpt / POLICY_WEIGHTS), str(ckpt / POLICY_WEIGHTS))
        self.optimizer.load_state_dict(optim_state)
        self.scheduler.last_epoch = meta["step"]
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.sampler.set_state(meta["sampler_rng"])
        self.history = meta["history"]
        self.step = meta["step"]
        if self.dist.rank > 0:
            self._resume_rank_rng(meta)
        if self.dist.main:
            print(f"resumed {self.run_dir} at step {self.step}")

    def _resume_rank_rng(self, meta: dict[str, Any]) -> None:
        """A rank > 0 continues its own data and noise streams (saved by rank 0 from all ranks);
        resumed with another world size, it starts fresh ones derived from (seed, rank, step)."""
        saved = meta.get("rank_rng") or []
        if len(saved) == self.dist.world - 1:
            state = saved[self.dist.rank - 1]
            self.sampler.set_state(state["sampler_rng"])
            torch.set_rng_state(torch.tensor(list(bytes.fromhex(state["torch_rng"])), dtype=torch.uint8))
        else:
            self.sampler.rng = np.random.default_rng([self.cfg.seed, self.dist.rank, self.step])
            torch.manual_seed(_rank_seed(self.cfg.seed, self.dist.rank, self.step))

    def _gather_rank_rng(self) -> list[dict[str, Any]]:
        """Every rank's sampler and torch RNG state (a collective: all ranks call it)."""
        mine = {"sampler_rng": self.sampler.state(), "torch_rng": bytes(torch.get_rng_state().tolist()).hex()}
        if self.dist.world == 1:
            return [mine]
        states: list[Any] = [None] * self.dist.world
        torch.distributed.all_gather_object(states, mine)
        return states

    def _mean_over_ranks(self, values: list[float]) -> list[float]:
        """``values`` averaged over the ranks (a collective: all ranks call it)."""
        if self.dist.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return (t / self.dist.world).tolist()

    def save(self) -> Path | None:
        """Write a checkpoint from rank 0; every rank calls it (their RNG states are gathered)."""
        rank_rng = self._gather_rank_rng()
        if not self.dist.main:
            return None
        inference = (self.ema or self.policy).state_dict()
        meta = {
            "policy_type": self.cfg.policy,
            "dataset_fingerprint": self.extra["dataset"]["fingerprint"],
            "sampler_rng": self.sampler.state(),
            "rank_rng": rank_rng[1:],
            "history": self.history,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self.cfg).items()},
        }
        path = save_checkpoint(self.run_dir, self.step, self.policy, inference, self.policy.state_dict(),
                               self.optimizer, meta, self.extra)
        plot_curves(self.history, self.run_dir / "loss_curve.png", title=f"{self.cfg.policy} on {self.dataset_path.name}")
        return path

    # ---- the loop ----------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.dist.main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / "train_config.json",
                              {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()})
        writer = self._tensorboard() if main else None
        n_params = sum(p.numel() for p in self.policy.parameters())
        bar = progress.progress(total=cfg.steps, initial=self.step, disable=not main, unit="step",
                                desc=f"train {cfg.policy} ({n_params / 1e6:.1f}M params, {self.device})")
        self.policy.train()
        start, start_step, running = time.perf_counter(), self.step, None
        while self.step < cfg.steps:
            batch = _to_device(self.sampler.batch(cfg.batch_size), self.device)
            loss, metrics = self.model(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                ema_update(self.ema, self.policy, cfg.ema_decay, self.step)
            self.step += 1
            logging = self.step % cfg.log_every == 0 or self.step == cfg.steps
            # each rank's loss is over its own batch: log their mean (the loss of the whole batch)
            reduced = self._mean_over_ranks([float(loss.detach()), *(metrics.values() if logging else ())])
            value = reduced[0]
            if logging:
                metrics = dict(zip(metrics, reduced[1:]))
            running = value if running is None else 0.95 * running + 0.05 * value
            if main and logging:
                lr = self.scheduler.get_last_lr()[0]
                rate = (self.step - start_step) * cfg.batch_size * self.dist.world / (time.perf_counter() - start)
                self.history["loss"].append([self.step, running])
                self.history["lr"].append([self.step, lr])
                writer.add_scalar("train/loss", value, self.step)
                writer.add_scalar("train/lr", lr, self.step)
                writer.add_scalar("train/grad_norm", float(grad_norm), self.step)
                writer.add_scalar("train/samples_per_s", rate, self.step)
                for k, v in metrics.items():
                    writer.add_scalar(f"train/{k}", v, self.step)
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.1e}", samples_s=f"{rate:.0f}")
            bar.update(1)
            if main and cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self._evaluate(writer)
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        seconds = time.perf_counter() - start
        summary = {
            "steps": self.step, "seconds": round(seconds, 1), "final_loss": running,
            "samples_per_s": (self.step - start_step) * cfg.batch_size * self.dist.world / max(seconds, 1e-9),
            "parameters": n_params, "run_dir": str(self.run_dir),
        }
        if main:
            writer.close()
            write_json_atomic(self.run_dir / "train_summary.json", summary)
        if self.dist.world > 1:
            torch.distributed.destroy_process_group()
        return summary

    def _evaluate(self, writer) -> None:
        from robopolicy.train.evaluate import EvalConfig, evaluate_policy

        env = self.cfg.eval_env or self.extra["env"]
        if env is None:
            raise RobopolicyError("--eval-every needs --eval-env: the dataset does not record its env")
        policy = (self.ema or self.policy).eval()
        result = evaluate_policy(policy, EvalConfig(env=env, episodes=self.cfg.eval_episodes, seed=EVAL_SEED, progress=False))
        self.policy.train()
        self.history["success"].append([self.step, result.success_rate])
        writer.add_scalar("eval/success_rate", result.success_rate, self.step)
        progress.write(f"step {self.step}: eval success {result.success_rate:.0%} over {result.episodes} episodes")

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tensorboard"))


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A torch seed of rank ``rank``'s own noise stream (independent of the init seed)."""
    return int(np.random.SeedSequence([seed, rank, step, 0x5EED]).generate_state(1)[0])


def train(cfg: TrainConfig) -> dict[str, Any]:
    return Trainer(cfg).train()


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["down_dims=[128,256]", "num_inference_steps=8"]`` -> dict (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RobopolicyError(f"policy override {item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out

