"""``robopolicy demo``: the whole pipeline on the default task, stage by stage.

Each stage writes its results under ``<out>/<stage>/`` and a ``done.json`` marker last;
a re-run reuses finished stages unless ``--fresh``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from robopolicy.data.atomic import write_json_atomic

DEFAULT_ENV = "lift"


@dataclass
class DemoConfig:
    quick: bool = False
    fresh: bool = False
    out: Path = Path("outputs/demo")
    env: str = DEFAULT_ENV

    @property
    def demo_episodes(self) -> int:
        return 10 if self.quick else 50

    @property
    def train_steps(self) -> int:
        return 300 if self.quick else 4000

    @property
    def eval_episodes(self) -> int:
        return 5 if self.quick else 50

    def folder(self, stage: str) -> Path:
        return self.out / stage


Stage = Callable[[DemoConfig, Path], dict[str, Any]]


def stage_collect(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    from robopolicy.data.collect import CollectConfig, collect
    from robopolicy.data.summary import dataset_info

    r = collect(CollectConfig(env=cfg.env, episodes=cfg.demo_episodes, out=folder / "dataset", overwrite=True))
    print(dataset_info(folder / "dataset"))
    return {"episodes": r.kept, "frames": r.frames, "expert_success": r.success_rate, "seconds": r.seconds}


def stage_train(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    from robopolicy.train.trainer import TrainConfig, train

    s = train(TrainConfig(policy="diffusion", dataset=cfg.folder("collect") / "dataset", out=folder / "run",
                          steps=cfg.train_steps))
    return {"steps": s["steps"], "seconds": s["seconds"], "final_loss": s["final_loss"],
            "samples_per_s": s["samples_per_s"], "parameters": s["parameters"]}


def stage_eval_bc(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    from robopolicy.train.checkpoint import load_policy
    from robopolicy.train.evaluate import EvalConfig, evaluate_policy

    policy = load_policy(cfg.folder("train") / "run")
    r = evaluate_policy(policy, EvalConfig(env=cfg.env, episodes=cfg.eval_episodes, video=folder / "rollouts.mp4"),
                        out_json=folder / "eval.json")
    print(r.table())
    return {"success_rate": r.success_rate, "ci95": list(r.ci95), "episodes": r.episodes,
            "latency_ms_p50": r.latency_ms_p50, "latency_ms_p99": r.latency_ms_p99}


STAGES: list[tuple[str, Stage]] = [("collect", stage_collect), ("train", stage_train), ("eval_bc", stage_eval_bc)]


def run_stage(cfg: DemoConfig, name: str, fn: Stage) -> dict[str, Any]:
    folder = cfg.out / name
    marker = folder / "done.json"
    if marker.exists() and not cfg.fresh:
        print(f"[demo] {name}: reusing {folder} (pass --fresh to redo)")
        return json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"[demo] {name}: running")
    start = time.perf_counter()
    result = fn(cfg, folder)
    result["stage_seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(marker, result)
    return result


def run_demo(cfg: DemoConfig) -> int:
    results = {name: run_stage(cfg, name, fn) for name, fn in STAGES}
    print("\n[demo] summary")
    for name, r in results.items():
        print(f"  {name:<10} " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    return 0
