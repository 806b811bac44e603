"""Running the stages in order, reusing finished ones, then writing the report.

A finished stage leaves ``<out>/<stage>/done.json``: its result, a fresh ``run_id``, the
settings it ran with and the ``run_id`` of every stage it read. It is reused when its
settings are unchanged and the stages it read are the very runs it saw; otherwise (a
stage it needs was re-run, ``--quick`` toggled, ``--fresh``) it runs again. A stage that
fails or is interrupted leaves no ``done.json``, so the next run redoes only it.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robopolicy.atomic_io import write_json_atomic
from robopolicy.demo.config import DemoConfig
from robopolicy.demo.report import write_report
from robopolicy.demo.stages import STAGES, Stage
from robopolicy.errors import RobopolicyError

MARKER = "done.json"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """A stage folder's ``done.json``, or ``None`` if the stage has not finished (or wrote an older format)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) and {"run_id", "result", "settings", "inputs"} <= marker.keys() else None


def why_stale(stage: Stage, cfg: DemoConfig, marker: dict[str, Any] | None,
              markers: dict[str, dict[str, Any]]) -> str | None:
    """Why ``stage`` must run (``None``: its finished run can be reused)."""
    if marker is None:
        return "not run yet"
    if marker["settings"] != stage.settings(cfg):
        return "its settings changed"
    for need in stage.needs:
        if need not in markers or marker["inputs"].get(need) != markers[need]["run_id"]:
            return f"{need} was re-run since"
    return None


def _needed(stages: Sequence[Stage], target: str) -> set[str]:
    """``target`` and every stage it reads, directly or not."""
    by_name = {s.name: s for s in stages}
    todo, seen = [target], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(by_name[name].needs)
    return seen


def run_stage(stage: Stage, cfg: DemoConfig, markers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run ``stage`` in an emptied folder; its marker is written last (atomically)."""
    folder = cfg.folder(stage.name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    try:
        result = stage.run(cfg, folder)
    except BaseException:
        print(f"[demo] {stage.name} failed after {time.perf_counter() - start:.0f} s; finished stages are kept, "
              f"the next `robopolicy demo` continues from here")
        raise
    marker = {"stage": stage.name, "run_id": uuid.uuid4().hex[:12], "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "seconds": round(time.perf_counter() - start, 1), "settings": stage.settings(cfg),
              "inputs": {need: markers[need]["run_id"] for need in stage.needs}, "result": result}
    write_json_atomic(folder / MARKER, marker)
    print(f"[demo] {stage.name}: done in {marker['seconds']:.0f} s")
    return marker


def run_demo(cfg: DemoConfig, stages: Sequence[Stage] = STAGES) -> int:
    """Bring every stage up to date (or only ``cfg.stage``), then write and print the report."""
    names = [s.name for s in stages]
    if cfg.stage is not None and cfg.stage not in names:
        raise RobopolicyError(f"unknown stage {cfg.stage!r}; expected one of: {', '.join(names)}")
    wanted = _needed(stages, cfg.stage) if cfg.stage else set(names)
    start = time.perf_counter()
    markers: dict[str, dict[str, Any]] = {}
    stale: list[str] = []
    for i, stage in enumerate(stages, 1):
        marker = read_marker(cfg.folder(stage.name))
        reason = why_stale(stage, cfg, marker, markers)
        if stage.name not in wanted:
            if reason is None:
                markers[stage.name] = marker
            else:
                stale.append(stage.name)
            continue
        if stage.name == cfg.stage:
            reason = "--stage"
        elif cfg.fresh:
            reason = "--fresh"
        head = f"[demo] {i}/{len(stages) + 1} {stage.name}"
        if reason is None:
            print(f"{head}: reusing {cfg.folder(stage.name)} (finished {marker['finished']}, {marker['seconds']:.0f} s; "
                  f"--stage {stage.name} or --fresh redoes it)")
            markers[stage.name] = marker
            continue
        print(f"{head}: {stage.what} ({reason})", flush=True)
        markers[stage.name] = run_stage(stage, cfg, markers)
    if stale:
        print(f"[demo] not up to date: {', '.join(stale)}; run `robopolicy demo` (without --stage) to redo them "
              "and write the report")
        return 0
    print(f"[demo] {len(stages) + 1}/{len(stages) + 1} report", flush=True)
    report = write_report(cfg, {name: markers[name] for name in names}, time.perf_counter() - start)
    print(report.table)
    for missing in report.summary["missing"]:
        print(f"[demo] warning: no {missing}")
    print(f"report: {report.folder}")
    return 0
