"""Chunk inference latency, batch 1, one process: exported ONNX Runtime vs torch eager vs lerobot.

    python bench/inference_latency.py [--checkpoint RUN_OR_CHECKPOINT] [--runs 120] [--lerobot-runs 6]

Rows (all produce one full action chunk from one observation):

* ``onnxruntime``: ``robopolicy.export.load_policy`` on the exported graph (normalization,
  encoder, the unrolled 10-step DDIM sampler and unnormalization in one graph), 1 and 2
  intra-op threads, and the portable export (without the CPU rewrites) for comparison;
* ``torch eager``: the same policy's ``predict_chunk`` (default and 1 torch thread);
* ``lerobot``: lerobot 0.6's ``DiffusionPolicy`` built offline at a matched size (state-only
  with ``observation.state`` + ``observation.environment_state``, ``down_dims`` (64, 128, 256)
  -> ~4.5 M parameters against ours ~4.6 M), timed as its processors + ``reset()`` +
  ``select_action`` (a reset queue makes every call denoise a full chunk): its default
  100-step DDPM as it ships, and 10-step DDIM for a like-for-like step count.

Rows are interleaved in rounds so that drift from other processes on the machine hits
them alike; still, on a shared 2-core VM expect noise: compare ratios within one run.
Without ``--checkpoint`` the default diffusion config is built on a push-like synthetic
spec (timing does not depend on the weights). The printed lower bounds are FLOPs / measured
peak and weight bytes read per chunk / measured weight-streaming bandwidth.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from robopolicy.process_defaults import apply_defaults

apply_defaults()  # before torch is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

from robopolicy.export import export_policy, load_policy  # noqa: E402
from robopolicy.export.exported_policy import sample_observation  # noqa: E402
from robopolicy.policies.base import Policy  # noqa: E402
from robopolicy.policies.factory import make_policy  # noqa: E402
from robopolicy.spec import ACTION, ENV_STATE, STATE, Feature, FeatureSpec, Stats  # noqa: E402
from robopolicy.train.checkpoint import load_policy as load_checkpoint  # noqa: E402
from robopolicy.train.checkpoint import save_policy  # noqa: E402

ROUNDS = 4


@dataclass
class Case:
    name: str
    sampler: str
    params: int
    fn: Callable[[], object]
    runs: int
    torch_threads: int | None = None
    times_ms: list[float] = field(default_factory=list)


def synthetic_spec() -> FeatureSpec:
    """Push-task shapes: state 4, environment state 6, action 2, with plausible statistics."""

    def feature(name: str, lo: list[float], hi: list[float]) -> Feature:
        mid = [(a + b) / 2 for a, b in zip(lo, hi)]
        return Feature(name, (len(lo),), stats=Stats(min=lo, max=hi, mean=mid, std=[(b - a) / 4 for a, b in zip(lo, hi)]))

    return FeatureSpec(
        features={
            STATE: feature(STATE, [-0.3, -0.3, -1.0, -1.0], [0.3, 0.3, 1.0, 1.0]),
            ENV_STATE: feature(ENV_STATE, [-0.3, -0.3, -1.0, -1.0, -0.3, -0.3], [0.3, 0.3, 1.0, 1.0, 0.3, 0.3]),
            ACTION: feature(ACTION, [-1.0, -1.0], [1.0, 1.0]),
        },
        fps=10.0, n_obs_steps=2, horizon=16, n_action_steps=8,
    )


def lerobot_cases(spec: FeatureSpec, obs: dict[str, np.ndarray], runs: int) -> list[Case]:
    """lerobot's DiffusionPolicy at our size and timing, normalized with our dataset statistics."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.diffusion.processor_diffusion import make_diffusion_pre_post_processors

    stats = {
        name: {k: torch.tensor(getattr(spec.features[name].stats, k), dtype=torch.float32) for k in ("min", "max", "mean", "std")}
        for name in (STATE, ENV_STATE, ACTION)
    }
    frame = {k: torch.from_numpy(obs[k][0, -1]) for k in (STATE, ENV_STATE)}  # lerobot queues To frames itself
    cases = []
    for sampler, scheduler, steps in (("DDPM 100", "DDPM", None), ("DDIM 10", "DDIM", 10)):
        config = DiffusionConfig(
            input_features={STATE: PolicyFeature(FeatureType.STATE, (spec.features[STATE].dim,)),
                            ENV_STATE: PolicyFeature(FeatureType.ENV, (spec.features[ENV_STATE].dim,))},
            output_features={ACTION: PolicyFeature(FeatureType.ACTION, (spec.action.dim,))},
            n_obs_steps=spec.n_obs_steps, horizon=spec.horizon, n_action_steps=spec.n_action_steps,
            down_dims=(64, 128, 256), noise_scheduler_type=scheduler, num_inference_steps=steps,
            device="cpu", pretrained_backbone_weights=None,
        )
        policy = DiffusionPolicy(config).eval()
        pre, post = make_diffusion_pre_post_processors(config, dataset_stats=stats)

        def select(policy=policy, pre=pre, post=post) -> torch.Tensor:
            with torch.inference_mode():
                policy.reset()
                return post(policy.select_action(pre(dict(frame))))

        name = f"lerobot select_action ({torch.get_num_threads()} thr)"
        cases.append(Case(name, sampler, sum(p.numel() for p in policy.parameters()), select,
                          runs if scheduler == "DDPM" else 4 * runs))
    return cases


def run_interleaved(cases: list[Case]) -> None:
    """``ROUNDS`` rounds; in each, every case runs its share of calls (after one warm-up call)."""
    for case in cases:
        if case.torch_threads:
            torch.set_num_threads(case.torch_threads)
        case.fn()
    default_threads = torch.get_num_threads()
    for _ in range(ROUNDS):
        for case in cases:
            torch.set_num_threads(case.torch_threads or default_threads)
            for _ in range(math.ceil(case.runs / ROUNDS)):
                start = time.perf_counter()
                case.fn()
                case.times_ms.append((time.perf_counter() - start) * 1e3)
    torch.set_num_threads(default_threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="run or checkpoint folder (default: untrained default config)")
    parser.add_argument("--runs", type=int, default=120, help="ONNX Runtime chunks per row (torch eager: a tenth)")
    parser.add_argument("--lerobot-runs", type=int, default=6, help="lerobot 100-step chunks (10-step: 4x as many)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            torch.manual_seed(0)
            policy = make_policy("diffusion", synthetic_spec()).eval()
            checkpoint = Path(tmp) / "checkpoint"
            save_policy(checkpoint, policy, policy.state_dict(), {"env": None})
        report = export_policy(checkpoint, Path(tmp) / "export", latency_runs=20)
        export_policy(checkpoint, Path(tmp) / "portable", portable=True, latency_runs=5)
        policy: Policy = load_checkpoint(checkpoint)
        spec = policy.spec
        steps = f"{'DDIM' if policy.type == 'diffusion' else 'Euler'} {getattr(policy.config, 'num_inference_steps', '?')}"
        params = sum(p.numel() for p in policy.parameters())
        obs = sample_observation(spec, np.random.default_rng(0))
        noise = np.random.default_rng(1).standard_normal(policy.noise_shape(1), dtype=np.float32)
        obs_t = {k: torch.from_numpy(v) for k, v in obs.items()}
        noise_t = torch.from_numpy(noise)

        def eager() -> torch.Tensor:
            with torch.inference_mode():
                return policy.predict_chunk(obs_t, noise_t)

        cases = []
        for folder, threads, label in (("export", 1, ""), ("export", 2, ""), ("portable", 1, ", portable graph")):
            exported = load_policy(Path(tmp) / folder, threads=threads)
            cases.append(Case(f"onnxruntime ({threads} thr{label})", steps, params,
                              lambda exported=exported: exported.predict_chunk(obs, noise), args.runs))
        cases.append(Case(f"torch eager ({default_threads} thr)", steps, params, eager, max(args.runs // 10, 5)))
        if default_threads != 1:
            cases.append(Case("torch eager (1 thr)", steps, params, eager, max(args.runs // 10, 5), torch_threads=1))
        if {STATE, ENV_STATE} <= set(spec.features) and not spec.image_features:
            cases += lerobot_cases(spec, obs, args.lerobot_runs)
        run_interleaved(cases)

    base = float(np.percentile(cases[0].times_ms, 50))
    print(f"\nbatch 1, full chunk (Tp={spec.horizon}, Ta={spec.n_action_steps}, Da={spec.action.dim}); "
          f"{ROUNDS} interleaved rounds; machine may be shared: compare within this run")
    print(f"{'backend':<38}{'sampler':<10}{'params':>8}{'runs':>6}{'p50 ms':>10}{'p99 ms':>10}{'p50 / ORT':>11}")
    for c in cases:
        p50, p99 = np.percentile(c.times_ms, 50), np.percentile(c.times_ms, 99)
        print(f"{c.name:<38}{c.sampler:<10}{c.params / 1e6:>7.2f}M{len(c.times_ms):>6}{p50:>10.2f}{p99:>10.2f}{p50 / base:>11.2f}")
    m = report.manifest
    perf, model = m["performance"], m["model"]
    print(f"\nexported graph: {model['op_count']} ops ({model['op_count_ort_optimized']} after ONNX Runtime's optimizer), "
          f"parity vs torch {m['parity']['max_abs_diff']:.1e}")
    print(f"arithmetic: {perf['gflop_per_chunk']:.3f} GFLOP per chunk / {perf['cpu_peak_gflops']:.0f} GFLOP/s peak "
          f"(1-thread 1024^3 MatMul) = {perf['lower_bound_ms']['arithmetic']:.2f} ms lower bound")
    print(f"weights: {perf['weight_mb_per_chunk']:.0f} MB read per chunk / {perf['weight_stream_gbps']:.0f} GB/s "
          f"(1-thread batch-4 MatMul over 32 MB) = {perf['lower_bound_ms']['weight_streaming']:.2f} ms lower bound")
    print(f"onnxruntime (1 thr) p50 is {base / perf['lower_bound_ms']['weight_streaming']:.1f}x the weight-streaming "
          f"bound; bench took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
