"""The demo's stages, in order, each through the project's Python API.

A stage function takes the :class:`DemoConfig` and its own empty folder, writes its
outputs there and returns a JSON-able result. Files the report shows are listed under
``"artifacts"`` (report file name -> path relative to the stage folder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robopolicy.demo.config import DemoConfig
from robopolicy.errors import RobopolicyError
from robopolicy.export.latency import torch_threads
from robopolicy.seeds import EVAL_SEED

StageFn = Callable[[DemoConfig, Path], dict[str, Any]]

DATASET, RUN, MODEL = "dataset", "run", "model"


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: what it needs, which settings it depends on, how it runs."""

    name: str
    what: str  # one line for the progress output
    needs: tuple[str, ...]  # stages whose outputs it reads
    settings: Callable[[DemoConfig], dict[str, Any]]  # a change of these makes a finished run stale
    run: StageFn


def collect_demos(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    from robopolicy.data.collect import CollectConfig, collect
    from robopolicy.data.summary import dataset_info

    r = collect(CollectConfig(env=cfg.env, episodes=cfg.budget.demos, out=folder / DATASET, overwrite=True))
    print(dataset_info(folder / DATASET))
    return {"episodes": r.kept, "frames": r.frames, "expert_success": r.success_rate, "seconds": r.seconds}


def train_bc(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    from robopolicy.train.trainer import TrainConfig, train

    s = train(TrainConfig(policy="diffusion", dataset=cfg.folder("collect") / DATASET, out=folder / RUN,
                          steps=cfg.budget.train_steps))
    return {"steps": s["steps"], "seconds": s["seconds"], "final_loss": s["final_loss"],
            "samples_per_s": s["samples_per_s"], "parameters": s["parameters"],
            "artifacts": {"loss_curve.png": f"{RUN}/loss_curve.png"}}


def _evaluate(predictor: Any, cfg: DemoConfig, folder: Path, video: bool = False) -> dict[str, Any]:
    """Closed-loop evaluation on the demo's fixed seeds; results in ``eval.json``."""
    from robopolicy.train.evaluate import EvalConfig, evaluate

    b = cfg.budget
    # Batch-1 inference gains nothing from a second thread here, and stalls when another
    # process holds a core.
    with torch_threads(1):
        r = evaluate(predictor, EvalConfig(env=cfg.env, episodes=b.eval_episodes, seed=EVAL_SEED,
                                           video=folder / "rollouts.mp4" if video else None,
                                           video_episodes=b.video_episodes),
                     out_json=folder / "eval.json")
    print(r.table())
    result = {"success_rate": r.success_rate, "successes": sum(e.success for e in r.episode_results),
              "episodes": r.episodes, "ci95": list(r.ci95), "mean_length": r.mean_length,
              "latency_ms_p50": r.latency_ms_p50, "latency_ms_p99": r.latency_ms_p99}
    if video:
        result["artifacts"] = {"rollout.mp4": "rollouts.mp4"}
    return result


def eval_bc(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    from robopolicy.train.checkpoint import load_policy
    from robopolicy.inference import TorchChunkPredictor

    return _evaluate(TorchChunkPredictor(load_policy(cfg.folder("train") / RUN), seed=EVAL_SEED), cfg, folder)


def finetune_rl(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    from robopolicy.rl import ResidualArgs, finetune

    b = cfg.budget
    s = finetune(ResidualArgs(
        checkpoint=cfg.folder("train") / RUN, env=cfg.env, out=folder / RUN, steps=b.rl_steps, num_envs=b.rl_envs,
        learning_starts=b.rl_learning_starts, actor_starts=b.rl_actor_starts, eval_every=b.rl_eval_every,
        eval_episodes=b.rl_eval_episodes, eval_seed=EVAL_SEED, save_every=b.rl_steps,
        log_every=max(b.rl_steps // 30, 100)))
    return {"env_steps": s["env_steps"], "updates": s["updates"], "episodes": s["episodes"],
            "initial_eval_success": s["initial_eval_success"], "final_eval_success": s["final_eval_success"],
            "env_steps_per_s": s["throughput"]["env_steps_per_s"],
            "artifacts": {"rl_curve.png": f"{RUN}/learning_curve.png"}}


def eval_rl(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    from robopolicy.rl import load_residual_policy
    from robopolicy.inference import TorchChunkPredictor

    policy = load_residual_policy(cfg.folder("finetune") / RUN)
    return _evaluate(TorchChunkPredictor(policy, seed=EVAL_SEED), cfg, folder)


def export_onnx(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    from robopolicy.export import export_policy

    report = export_policy(checkpoint=cfg.folder("finetune") / RUN, out=folder / MODEL)
    print(report.summary())
    m = report.manifest
    parity, perf = m["parity"], m["performance"]

    def latency(timings: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {b: {"p50": timings[b]["p50_ms"], "p99": timings[b]["p99_ms"]} for b in ("torch_eager", "onnxruntime")}

    return {"parity_max_abs_diff": parity["max_abs_diff"], "parity_max_rel_diff": parity["max_rel_diff"],
            "parity_rel_tolerance": parity["rel_tolerance"],
            "correction_parity_max_abs_diff": parity["correction"]["max_abs_diff"],
            "model_bytes": m["model"]["bytes"], "latency_ms": latency(perf),
            "correction_latency_ms": latency(perf["correction"])}


def eval_export(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    from robopolicy.export import load_policy

    return _evaluate(load_policy(cfg.folder("export") / MODEL, seed=EVAL_SEED), cfg, folder, video=True)


def deploy_ros(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    from robopolicy.paths import deploy_params
    from robopolicy.real.deploy import deploy
    from robopolicy.stats import wilson_interval

    params = deploy_params(cfg.env)
    if params is None:
        raise RobopolicyError(f"no ROS 2 parameter file for env {cfg.env!r} in real/config")
    rep = deploy(cfg.folder("export") / MODEL, params, sim=cfg.env, episodes=cfg.budget.deploy_episodes,
                 out=folder / RUN)
    wins, n, t = sum(e["success"] for e in rep.episodes), len(rep.episodes), rep.timing
    return {"success_rate": rep.success_rate, "successes": wins, "episodes": n, "ci95": list(wilson_interval(wins, n)),
            "domain_id": rep.domain_id, "control_rate_hz": t.control_rate_hz, "cycles": t.cycles,
            "period_jitter_ms": t.period_jitter_ms, "missed_control_deadlines": t.missed_control_deadlines,
            "obs_to_command_ms": {"p50": t.obs_to_command_ms.p50, "p99": t.obs_to_command_ms.p99},
            "inference_ms": {"p50": t.inference_ms.p50, "p99": t.inference_ms.p99},
            "interventions": rep.interventions,
            "artifacts": {"latency_histogram.png": f"{RUN}/latency.png"}}


def _budget(*fields: str) -> Callable[[DemoConfig], dict[str, Any]]:
    return lambda cfg: {"env": cfg.env, **{f: getattr(cfg.budget, f) for f in fields}}


STAGES: tuple[Stage, ...] = (
    Stage("collect", "scripted-expert demonstrations", (), _budget("demos"), collect_demos),
    Stage("train", "diffusion policy by behaviour cloning", ("collect",), _budget("train_steps"), train_bc),
    Stage("eval_bc", "closed-loop evaluation of the BC policy", ("train",), _budget("eval_episodes"), eval_bc),
    Stage("finetune", "residual RL on top of the frozen BC policy", ("collect", "train"),
          _budget("rl_steps", "rl_envs", "rl_learning_starts", "rl_actor_starts", "rl_eval_every", "rl_eval_episodes"),
          finetune_rl),
    Stage("eval_rl", "closed-loop evaluation after RL", ("finetune",), _budget("eval_episodes"), eval_rl),
    Stage("export", "ONNX export of the fine-tuned policy, parity and latency", ("finetune",), _budget(), export_onnx),
    Stage("eval_export", "closed-loop evaluation of the exported model (ONNX Runtime)", ("export",),
          _budget("eval_episodes", "video_episodes"), eval_export),
    Stage("deploy", "ROS 2 policy node against the sim bridge", ("export",), _budget("deploy_episodes"), deploy_ros),
)
