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


Stage = Callable[[DemoConfig, Path], dict[str, Any]]


def stage_collect(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    from robopolicy.data.collect import CollectConfig, collect
    from robopolicy.data.summary import dataset_info

    r = collect(CollectConfig(env=cfg.env, episodes=cfg.demo_episodes, out=folder / "dataset", overwrite=True))
    print(dataset_info(folder / "dataset"))
    return {"episodes": r.kept, "frames": r.frames, "expert_success": r.success_rate, "seconds": r.seconds}


STAGES: list[tuple[str, Stage]] = [("collect", stage_collect)]


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
