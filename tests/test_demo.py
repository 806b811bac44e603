"""`robopolicy demo`: stage reuse / --fresh / --stage logic and the report, on synthetic stage
results (no training); and, marked slow, the whole quick demo end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from robopolicy.demo import DemoConfig, run_demo
from robopolicy.demo.report import render, write_report
from robopolicy.demo.runner import MARKER, read_marker
from robopolicy.demo.stages import STAGES

EVAL = {"successes": 9, "episodes": 10, "success_rate": 0.9, "ci95": [0.6, 0.98], "mean_length": 40.0,
        "latency_ms_p50": 10.0, "latency_ms_p99": 20.0}
RESULTS: dict[str, dict[str, Any]] = {
    "collect": {"episodes": 10, "frames": 400, "expert_success": 1.0, "seconds": 20.0},
    "train": {"steps": 300, "seconds": 100.0, "final_loss": 0.2, "samples_per_s": 150.0, "parameters": 4_600_000,
              "artifacts": {"loss_curve.png": "run/loss_curve.png"}},
    "eval_bc": EVAL,
    "finetune": {"env_steps": 1200, "updates": 800, "episodes": 20, "initial_eval_success": 0.3,
                 "final_eval_success": 0.6, "env_steps_per_s": 38.5,
                 "artifacts": {"rl_curve.png": "run/learning_curve.png"}},
    "eval_rl": {**EVAL, "successes": 10, "success_rate": 1.0, "ci95": [0.72, 1.0]},
    "export": {"parity_max_abs_diff": 1.5e-6, "parity_max_rel_diff": 7.5e-7, "parity_rel_tolerance": 5e-5, "correction_parity_max_abs_diff": 7e-8,
               "model_bytes": 18_000_000,
               "latency_ms": {"torch_eager": {"p50": 97.0, "p99": 150.0}, "onnxruntime": {"p50": 35.2, "p99": 48.9}},
               "correction_latency_ms": {"torch_eager": {"p50": 0.1, "p99": 4.2},
                                         "onnxruntime": {"p50": 0.021, "p99": 0.046}}},
    "eval_export": {**EVAL, "artifacts": {"rollout.mp4": "rollouts.mp4"}},
    "deploy": {"success_rate": 0.5, "successes": 1, "episodes": 2, "ci95": [0.09, 0.91], "domain_id": 42,
               "control_rate_hz": 50.0, "cycles": 500, "period_jitter_ms": 0.61, "missed_control_deadlines": 0,
               "obs_to_command_ms": {"p50": 1.25, "p99": 4.5}, "inference_ms": {"p50": 40.0, "p99": 80.0},
               "interventions": {}, "artifacts": {"latency_histogram.png": "run/latency.png"}},
}


Calls = list  # the stages that ran, in order


def fake_stages(calls: Calls, fail: str | None = None) -> tuple:
    """The real stages (names, dependencies, settings) with runs that write their artifacts and return RESULTS."""

    def make(name: str):
        def run(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
            calls.append(name)
            if name == fail:
                raise RuntimeError(f"{name} broke")
            for file, rel in RESULTS[name].get("artifacts", {}).items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(f"{name}:{file}".encode())
            return json.loads(json.dumps(RESULTS[name]))

        return run

    return tuple(dataclasses.replace(s, run=make(s.name)) for s in STAGES)


def demo(tmp_path: Path, calls: Calls, fail: str | None = None, **kwargs: Any) -> int:
    return run_demo(DemoConfig(out=tmp_path / "demo", **kwargs), fake_stages(calls, fail))


ALL = [s.name for s in STAGES]


def test_first_run_runs_every_stage_and_writes_the_report(tmp_path: Path, capsys) -> None:
    calls = Calls()
    assert demo(tmp_path, calls, quick=True) == 0
    assert calls == ALL
    report = tmp_path / "demo" / "report"
    assert sorted(p.name for p in report.iterdir()) == sorted(
        ["summary.md", "summary.json", "loss_curve.png", "rl_curve.png", "latency_histogram.png", "rollout.mp4"])
    assert (report / "rl_curve.png").read_bytes() == b"finetune:rl_curve.png"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["budget"] == "quick" and summary["env"] == "lift"
    assert summary["success"]["ros2"]["episodes"] == 2 and summary["success"]["rl"]["success_rate"] == 1.0
    assert summary["inference_latency_ms"]["onnxruntime"] == {"p50": 35.2, "p99": 48.9}
    assert summary["control_loop"]["obs_to_command_ms"] == {"p50": 1.25, "p99": 4.5}
    assert summary["finetuning"]["env_steps"] == 1200 and summary["missing"] == []
    md = (report / "summary.md").read_text()
    assert "| over ROS 2 (policy node + sim bridge) | 50% (1/2) | 9% - 91% | 2 |" in md
    assert "![residual RL learning curve](rl_curve.png)" in md and "[rollout.mp4](rollout.mp4)" in md
    out = capsys.readouterr().out
    assert "| chunk inference p50 / p99, ONNX Runtime | 35.2 / 48.9 ms |" in out
    assert "| per-step correction p50 / p99, ONNX Runtime | 0.021 / 0.046 ms |" in out
    assert out.rstrip().endswith(f"report: {report}")


def test_a_second_run_reuses_every_finished_stage(tmp_path: Path, capsys) -> None:
    demo(tmp_path, Calls(), quick=True)
    capsys.readouterr()
    first = read_marker(tmp_path / "demo" / "train")
    calls = Calls()
    demo(tmp_path, calls, quick=True)
    assert calls == []
    assert read_marker(tmp_path / "demo" / "train") == first
    assert capsys.readouterr().out.count(": reusing ") == len(ALL)


def test_fresh_redoes_every_stage(tmp_path: Path) -> None:
    demo(tmp_path, Calls(), quick=True)
    calls = Calls()
    demo(tmp_path, calls, quick=True, fresh=True)
    assert calls == ALL


def test_changed_settings_redo_the_stages_that_depend_on_them(tmp_path: Path) -> None:
    demo(tmp_path, Calls(), quick=True)
    calls = Calls()
    demo(tmp_path, calls)  # default budget: every stage's settings (or an input) changed
    assert calls == ALL


def test_stage_reruns_one_stage_and_later_ones_follow_on_the_next_run(tmp_path: Path, capsys) -> None:
    demo(tmp_path, Calls(), quick=True)
    before = (tmp_path / "demo" / "report" / "summary.json").read_text()
    capsys.readouterr()
    calls = Calls()
    demo(tmp_path, calls, quick=True, stage="finetune")
    assert calls == ["finetune"]
    out = capsys.readouterr().out
    assert "not up to date: eval_rl, export, eval_export, deploy" in out and "report:" not in out
    assert (tmp_path / "demo" / "report" / "summary.json").read_text() == before  # not mixed with stale results
    calls = Calls()
    demo(tmp_path, calls, quick=True)
    assert calls == ["eval_rl", "export", "eval_export", "deploy"]


def test_stage_on_the_last_stage_rewrites_the_report(tmp_path: Path, capsys) -> None:
    demo(tmp_path, Calls(), quick=True)
    capsys.readouterr()
    calls = Calls()
    demo(tmp_path, calls, quick=True, stage="deploy")
    assert calls == ["deploy"]
    assert "report: " in capsys.readouterr().out


def test_stage_runs_the_unfinished_stages_it_needs_only(tmp_path: Path) -> None:
    calls = Calls()
    demo(tmp_path, calls, quick=True, stage="eval_bc")
    assert calls == ["collect", "train", "eval_bc"]
    assert not (tmp_path / "demo" / "report").exists()


def test_a_failed_stage_leaves_no_marker_and_is_redone_next_time(tmp_path: Path) -> None:
    calls = Calls()
    with pytest.raises(RuntimeError, match="export broke"):
        demo(tmp_path, calls, quick=True, fail="export")
    assert calls == ALL[:ALL.index("export") + 1]
    assert not (tmp_path / "demo" / "export" / MARKER).exists()
    calls = Calls()
    demo(tmp_path, calls, quick=True)
    assert calls == ["export", "eval_export", "deploy"]


def test_a_marker_in_an_older_format_is_not_reused(tmp_path: Path) -> None:
    demo(tmp_path, Calls(), quick=True)
    (tmp_path / "demo" / "collect" / MARKER).write_text(json.dumps({"episodes": 10, "stage_seconds": 1.0}))
    calls = Calls()
    demo(tmp_path, calls, quick=True)
    assert calls == ALL


def test_report_names_missing_artifacts_and_unknown_values(tmp_path: Path) -> None:
    cfg = DemoConfig(out=tmp_path)
    markers = {s.name: {"seconds": 10.0, "result": json.loads(json.dumps(RESULTS[s.name]))} for s in STAGES}
    markers["deploy"]["result"].update(success_rate=None, successes=0, episodes=0, ci95=[0.0, 1.0],
                                       inference_ms={"p50": float("nan"), "p99": float("nan")})
    report = write_report(cfg, markers, seconds=80.0)
    assert report.summary["pipeline_seconds"] == 80.0 and report.summary["budget"] == "default"
    assert len(report.summary["missing"]) == 4  # no stage folder wrote its files here
    assert sorted(p.name for p in report.folder.iterdir()) == ["summary.json", "summary.md"]
    table = render(report.summary)
    assert "| over ROS 2 (policy node + sim bridge) | n/a (0/0) | 0% - 100% | 0 |" in table
    assert "| chunk inference p50 / p99, in the ROS 2 node | n/a / n/a ms |" in table
    assert "| residual RL fine-tuning | 1200 env steps in 10 s (38 env steps/s while training) |" in table


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 5-8 min on this 2-core VM under load; the suite's default is 10 min
def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    """Every stage for real: expert data, BC, RL, ONNX export, ROS 2 deploy; then the report."""
    assert run_demo(DemoConfig(quick=True, out=tmp_path)) == 0
    report = tmp_path / "report"
    assert {"summary.md", "summary.json", "loss_curve.png", "rl_curve.png", "latency_histogram.png",
            "rollout.mp4"} <= {p.name for p in report.iterdir()}
    summary = json.loads((report / "summary.json").read_text())
    assert summary["missing"] == []
    assert [row["episodes"] for row in summary["success"].values()] == [5, 5, 5, 2]
    assert summary["export"]["parity_max_rel_diff"] <= summary["export"]["parity_rel_tolerance"]
    assert summary["control_loop"]["obs_to_command_ms"]["p50"] > 0
    assert summary["finetuning"]["env_steps"] >= 1200
