"""The demo's report folder: the summary table (Markdown + JSON) and the figures and video.

``summarize`` turns the finished stages' markers into one JSON-able summary; ``render``
formats it as two Markdown tables (success rates; time and latency), which is also what
the demo prints last. ``write_report`` stages the folder beside its target and swaps it in,
so a reader never sees a half-written report.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robopolicy.atomic_io import remove_quietly, replace_dir, write_bytes_atomic, write_json_atomic
from robopolicy.demo.config import DemoConfig

#: (stage, key in the summary, label) of each success-rate row.
SUCCESS_ROWS = (
    ("eval_bc", "bc", "BC policy (torch)"),
    ("eval_rl", "rl", "after residual RL (torch)"),
    ("eval_export", "exported", "exported (ONNX Runtime)"),
    ("deploy", "ros2", "over ROS 2 (policy node + sim bridge)"),
)
#: Figures shown in summary.md, in order, with their captions (when the stages produced them).
FIGURES = (("loss_curve.png", "BC training loss"), ("rl_curve.png", "residual RL learning curve"),
           ("latency_histogram.png", "control loop over ROS 2: latency and period"))


@dataclass
class Report:
    folder: Path
    summary: dict[str, Any]
    table: str  # the Markdown tables, as printed


def _p(d: dict[str, Any]) -> dict[str, float]:
    return {"p50": d["p50"], "p99": d["p99"]}


def summarize(cfg: DemoConfig, markers: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """One summary of the finished stages (``markers``: stage name -> its ``done.json``)."""
    r = {name: m["result"] for name, m in markers.items()}
    stage_s = {name: m["seconds"] for name, m in markers.items()}
    deploy, export = r["deploy"], r["export"]
    return {
        "env": cfg.env,
        "budget": "quick" if cfg.quick else "default",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "success": {key: {"label": label, **{k: r[stage][k] for k in ("success_rate", "successes", "episodes", "ci95")}}
                    for stage, key, label in SUCCESS_ROWS},
        "bc_training": {"steps": r["train"]["steps"], "seconds": stage_s["train"],
                        "final_loss": r["train"]["final_loss"]},
        "finetuning": {"env_steps": r["finetune"]["env_steps"], "seconds": stage_s["finetune"],
                       "env_steps_per_s": r["finetune"]["env_steps_per_s"]},
        "export": {"parity_max_abs_diff": export["parity_max_abs_diff"], "parity_max_rel_diff": export["parity_max_rel_diff"],
                   "parity_rel_tolerance": export["parity_rel_tolerance"],
                   "correction_parity_max_abs_diff": export["correction_parity_max_abs_diff"]},
        "inference_latency_ms": {"torch_eager": _p(export["latency_ms"]["torch_eager"]),
                                 "onnxruntime": _p(export["latency_ms"]["onnxruntime"]),
                                 "ros_node": _p(deploy["inference_ms"]),
                                 "correction_torch_eager": _p(export["correction_latency_ms"]["torch_eager"]),
                                 "correction_onnxruntime": _p(export["correction_latency_ms"]["onnxruntime"])},
        "control_loop": {"rate_hz": deploy["control_rate_hz"], "obs_to_command_ms": _p(deploy["obs_to_command_ms"]),
                         "period_jitter_ms": deploy["period_jitter_ms"],
                         "missed_deadlines": deploy["missed_control_deadlines"]},
        "stage_seconds": stage_s,
        "pipeline_seconds": round(sum(stage_s.values()), 1),
        "this_run_seconds": round(seconds, 1),
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _ms(d: dict[str, float], digits: int = 1) -> str:
    return " / ".join("n/a" if d[k] is None or math.isnan(d[k]) else f"{d[k]:.{digits}f}" for k in ("p50", "p99")) + " ms"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def render(summary: dict[str, Any]) -> str:
    """The summary as two Markdown tables."""
    lines = ["| policy | success | 95% CI | episodes |", "| --- | ---: | :---: | ---: |"]
    for row in summary["success"].values():
        lo, hi = row["ci95"]
        lines.append(f"| {row['label']} | {_pct(row['success_rate'])} ({row['successes']}/{row['episodes']}) "
                     f"| {lo:.0%} - {hi:.0%} | {row['episodes']} |")
    bc, ft, ex = summary["bc_training"], summary["finetuning"], summary["export"]
    lat, loop = summary["inference_latency_ms"], summary["control_loop"]
    rows = [
        ("BC training (diffusion)", f"{bc['steps']} steps in {_duration(bc['seconds'])}"),
        ("residual RL fine-tuning", f"{ft['env_steps']} env steps in {_duration(ft['seconds'])} "
                                    f"({ft['env_steps_per_s']:.0f} env steps/s while training)"),
        ("export parity, max abs diff vs torch", f"chunk {ex['parity_max_abs_diff']:.1e} "
                                                 f"({ex['parity_max_rel_diff']:.1e} of the action range), correction "
                                                 f"{ex['correction_parity_max_abs_diff']:.1e} (tolerance "
                                                 f"{ex['parity_rel_tolerance']:.0e} of each dimension's range)"),
        ("chunk inference p50 / p99, torch eager", _ms(lat["torch_eager"])),
        ("chunk inference p50 / p99, ONNX Runtime", _ms(lat["onnxruntime"])),
        ("chunk inference p50 / p99, in the ROS 2 node", _ms(lat["ros_node"])),
        ("per-step correction p50 / p99, torch eager", _ms(lat["correction_torch_eager"], 3)),
        ("per-step correction p50 / p99, ONNX Runtime", _ms(lat["correction_onnxruntime"], 3)),
        ("control loop obs-to-command p50 / p99", _ms(loop["obs_to_command_ms"])),
        (f"control period jitter (std) at {loop['rate_hz']:g} Hz",
         f"{loop['period_jitter_ms']:.2f} ms, {loop['missed_deadlines']} missed deadlines"),
        ("demo wall-clock (sum of the stages)", _duration(summary["pipeline_seconds"])),
    ]
    lines += ["", "| measure | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def write_report(cfg: DemoConfig, markers: dict[str, dict[str, Any]], seconds: float) -> Report:
    """Write ``summary.md``, ``summary.json`` and the stages' artifacts into ``cfg.report_dir``."""
    summary = summarize(cfg, markers, seconds)
    folder = cfg.report_dir
    stage = folder.with_name(f".{folder.name}.staging")
    remove_quietly(stage)
    stage.mkdir(parents=True)
    files, missing = [], []
    for name, marker in markers.items():
        for file, rel in marker["result"].get("artifacts", {}).items():
            src = cfg.folder(name) / rel
            if src.is_file():
                shutil.copy2(src, stage / file)
                files.append(file)
            else:
                missing.append(f"{file} ({src} was not written)")
    summary["files"] = ["summary.md", "summary.json", *files]
    summary["missing"] = missing
    table = render(summary)
    figures = [f"![{caption}]({file})" for file, caption in FIGURES if file in files]
    video = ["Rollouts of the final (exported) policy: [rollout.mp4](rollout.mp4)"] if "rollout.mp4" in files else []
    title = f"# robopolicy demo: {summary['env']} ({summary['budget']} budget, {summary['created']})"
    write_bytes_atomic(stage / "summary.md", "\n\n".join([title, table, *video, *figures]).encode() + b"\n")
    write_json_atomic(stage / "summary.json", summary)
    replace_dir(stage, folder)
    return Report(folder, summary, table)
