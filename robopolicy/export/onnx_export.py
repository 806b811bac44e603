"""Export a trained policy to one ONNX graph plus a manifest, checked for parity and timed.

``policy.onnx`` maps raw observation features to the raw action chunk in one graph:
normalization, observation encoder, the whole few-step sampler (DDIM or Euler, unrolled,
with everything that depends only on the fixed timesteps constant-folded), clipping and
unnormalization. Inputs are named by feature (``observation.state``, ...,
``observation.images.<cam>`` uint8) plus ``noise`` ``[1, Tp, Da]``; the output is ``action``
``[1, Ta, Da]``. Shapes are static with batch 1 (what a robot runs). A language-conditioned
policy (VLA) also takes ``observation.language`` ``[1, E]``, the instruction's embedding: the
text encoder stays out of the graph, and the manifest's ``"language"`` section holds the
embedding of every training instruction, which :func:`~robopolicy.export.load_policy` looks
up from the task string.

Steps: trace ``predict_chunk`` (TorchScript exporter by default: 5 s against 58 s for the
dynamo exporter on the default policy, the same graph after simplification, the same
~1e-6 parity), simplify with ONNX Runtime's portable basic passes, then either the CPU
rewrites of :mod:`robopolicy.export.graph` (default) or nothing (``portable``, implied by
``fp16`` -- then converted to float16 -- and ``tensorrt``). The folder is staged beside ``out`` and swapped in atomically;
before that, the staged folder is opened with :func:`robopolicy.export.load_policy` (the
path users take) and compared with torch on identical inputs and noise.
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch

from robopolicy import __version__
from robopolicy.data.atomic import remove_quietly, replace_dir, write_bytes_atomic, write_json_atomic
from robopolicy.export import graph as graph_ops
from robopolicy.export import latency
from robopolicy.export import tensorrt as trt
from robopolicy.export.errors import ExportError
from robopolicy.export.runtime import (
    CHECKPOINT_DIR, MANIFEST_FILE, MANIFEST_FORMAT, MODEL_FILE, NOISE, TENSORRT_DIR,
    graph_inputs, graph_outputs, load_policy, sample_observation, session_options, sha256_file,
)
from robopolicy.policies.base import Policy
from robopolicy.spec import ACTION, FeatureSpec
from robopolicy.train.checkpoint import POLICY_META, POLICY_WEIGHTS, resolve_checkpoint
from robopolicy.train.checkpoint import load_policy as load_checkpoint

#: Default opset per exporter (the dynamo exporter emits opset 18 natively).
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
#: Largest ``|exported - torch|`` accepted at export, in raw action units, for fp32 on ONNX
#: Runtime; fp16 and TensorRT (which may pick TF32 / fp16 kernels) get a looser tolerance,
#: relative to the widest action range in the dataset statistics.
PARITY_TOLERANCE = 1e-4
PARITY_TOLERANCE_RELAXED = 2e-2
PARITY_SAMPLES = 3

Exporter = Literal["torchscript", "dynamo"]


@dataclass
class ExportReport:
    """Where the export went and what its manifest says (parity, latency, graph size)."""

    out: Path
    manifest: dict[str, Any]

    def summary(self) -> str:
        """A few lines for the CLI."""
        m = self.manifest
        model, perf, parity = m["model"], m["performance"], m["parity"]
        ort_lat, torch_lat = perf["onnxruntime"], perf["torch_eager"]
        lines = [
            f"exported {m['policy']['type']} policy ({m['policy']['num_inference_steps']} sampler steps) to {self.out / MODEL_FILE}",
            f"graph: {model['op_count']} ops ({model['op_count_ort_optimized']} after ONNX Runtime's optimizer), "
            f"{model['bytes'] / 1e6:.1f} MB, opset {model['opset']}, {model['precision']}, graph form: {model['target']}",
            f"parity vs torch: max |diff| {parity['max_abs_diff']:.2e} (tolerance {parity['tolerance']:.0e}, {parity['samples']} samples)",
            f"{'backend':<22}{'p50 ms':>9}{'p99 ms':>9}",
            f"{'onnxruntime (' + str(ort_lat['threads']) + ' thr)':<22}{ort_lat['p50_ms']:>9.2f}{ort_lat['p99_ms']:>9.2f}",
            f"{'torch eager (' + str(torch_lat['threads']) + ' thr)':<22}{torch_lat['p50_ms']:>9.2f}{torch_lat['p99_ms']:>9.2f}",
            f"onnxruntime / torch eager = {perf['ratio_onnxruntime_to_torch']:.2f}; "
            f"lower bounds: arithmetic {perf['lower_bound_ms']['arithmetic']:.2f} ms "
            f"({perf['gflop_per_chunk']:.3f} GFLOP at {perf['cpu_peak_gflops']:.0f} GFLOP/s), weight streaming "
            f"{perf['lower_bound_ms']['weight_streaming']:.2f} ms ({perf['weight_mb_per_chunk']:.0f} MB at "
            f"{perf['weight_stream_gbps']:.0f} GB/s)",
        ]
        if m.get("tensorrt"):
            trt_parity = m["tensorrt"]["parity"]["max_abs_diff"]
            lines.append(f"TensorRT engine cached in {self.out / m['tensorrt']['cache_dir']} (parity {trt_parity:.2e})")
        return "\n".join(lines)


class _ChunkGraph(torch.nn.Module):
    """``predict_chunk`` with positional inputs: observations in spec order, then the noise."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.policy = policy
        self.keys = [sig.name for sig in graph_inputs(policy.spec)[:-1]]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.policy.predict_chunk(dict(zip(self.keys, inputs[:-1])), inputs[-1])


def export_policy(
    checkpoint: Path,
    out: Path,
    fp16: bool = False,
    tensorrt: bool = False,
    portable: bool = False,
    opset: int | None = None,
    exporter: Exporter = "torchscript",
    threads: int = 1,
    latency_runs: int = 200,
    seed: int = 0,
) -> ExportReport:
    """Export the policy of a run / checkpoint folder into the folder ``out`` (replaced atomically).

    ``fp16`` halves weights and activations (inputs and output stay float32) for GPUs; on a
    CPU it is slower. ``tensorrt`` also builds a TensorRT engine (needs a CUDA GPU; fails
    first thing otherwise). Both imply ``portable``: the graph as exported and simplified,
    without the rewrites that tune it for ONNX Runtime on CPU (the default). ``latency_runs`` ONNX Runtime chunks (and a tenth as many
    torch eager ones) are timed with ``threads`` intra-op threads. ``opset`` defaults to
    :data:`DEFAULT_OPSET` of the ``exporter``.
    """
    if tensorrt:
        trt.require("--tensorrt", "export without --tensorrt")
    if exporter not in DEFAULT_OPSET:
        raise ExportError(f"unknown exporter {exporter!r}; expected one of: {', '.join(DEFAULT_OPSET)}")
    opset = opset or DEFAULT_OPSET[exporter]
    ckpt = resolve_checkpoint(Path(checkpoint))
    policy = load_checkpoint(ckpt)
    out = Path(out)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.export-{os.getpid()}"
    remove_quietly(stage)
    stage.mkdir()
    try:
        rng = np.random.default_rng(seed)
        example = {**sample_observation(policy.spec, rng), NOISE: rng.standard_normal(policy.noise_shape(1), dtype=np.float32)}
        target = "portable" if (portable or fp16 or tensorrt) else "cpu"
        simplified = _export_graph(policy, example, stage, opset, exporter)
        model = simplified if target == "portable" else graph_ops.optimize_for_cpu(simplified)
        if fp16:
            model = _to_fp16(model)
        write_bytes_atomic(stage / MODEL_FILE, model.SerializeToString())
        (stage / CHECKPOINT_DIR).mkdir()
        for name in (POLICY_META, POLICY_WEIGHTS):
            shutil.copy2(ckpt / name, stage / CHECKPOINT_DIR / name)
        manifest = _manifest(policy, ckpt, stage, model, exporter, fp16, target)
        write_json_atomic(stage / MANIFEST_FILE, manifest)
        manifest["parity"] = _parity(policy, stage, "onnxruntime", _tolerance(policy, relaxed=fp16), rng)
        manifest["performance"], manifest["model"]["op_count_ort_optimized"] = _performance(
            policy, stage, simplified, example, threads, latency_runs
        )
        if tensorrt:
            manifest["tensorrt"] = trt.build_engine(stage / MODEL_FILE, stage / TENSORRT_DIR, fp16, example)
            write_json_atomic(stage / MANIFEST_FILE, manifest)
            manifest["tensorrt"]["parity"] = _parity(policy, stage, "tensorrt", _tolerance(policy, relaxed=True), rng)
        write_json_atomic(stage / MANIFEST_FILE, manifest)
        replace_dir(stage, out)
    finally:
        remove_quietly(stage)
    return ExportReport(out, manifest)


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        raise ExportError(f"refusing to replace {out}: it exists and is not a robopolicy export folder (no {MANIFEST_FILE})")


def _export_graph(
    policy: Policy, example: dict[str, np.ndarray], stage: Path, opset: int, exporter: Exporter
) -> onnx.ModelProto:
    """Trace ``predict_chunk`` into ONNX and simplify it (constant folding: everything that depends
    only on the fixed sampler timesteps, e.g. the step embeddings and their FiLM projections)."""
    module = _ChunkGraph(policy).eval()
    args = tuple(torch.from_numpy(example[sig.name]) for sig in graph_inputs(policy.spec))
    names = [sig.name for sig in graph_inputs(policy.spec)]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes on Python-level shape checks; legacy-exporter notice
        if exporter == "torchscript":
            torch.onnx.export(module, args, buffer, input_names=names, output_names=[ACTION],
                              opset_version=opset, dynamo=False, do_constant_folding=True)
        else:
            program = torch.onnx.export(module, args, input_names=names, output_names=[ACTION],
                                        opset_version=opset, dynamo=True, verbose=False)
            buffer.write(program.model_proto.SerializeToString())
    simplified = stage / "simplified.onnx"
    try:
        return graph_ops.simplify(buffer.getvalue(), simplified)
    finally:
        remove_quietly(simplified)


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and activations in float16; inputs and output keep float32 (casts at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_float_to_float16(model, keep_io_types=True)


def _manifest(
    policy: Policy, ckpt: Path, stage: Path, model: onnx.ModelProto, exporter: Exporter, fp16: bool, target: str,
) -> dict[str, Any]:
    import onnxruntime as ort

    spec: FeatureSpec = policy.spec
    meta = getattr(policy, "checkpoint_meta", {})
    action = spec.action
    env = meta.get("env")
    return {
        "format": MANIFEST_FORMAT,
        "robopolicy_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {
            "file": MODEL_FILE,
            "sha256": sha256_file(stage / MODEL_FILE),
            "bytes": (stage / MODEL_FILE).stat().st_size,
            "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "exporter": exporter,
            "precision": "fp16 (float32 inputs / output)" if fp16 else "fp32",
            "target": target,
            "op_count": len(model.graph.node),
            "op_histogram": graph_ops.op_histogram(model),
            "batch_size": 1,
            "static_shapes": True,
        },
        "inputs": [sig.to_dict() for sig in graph_inputs(spec)],
        "outputs": [sig.to_dict() for sig in graph_outputs(spec)],
        "noise": "standard normal, float32; drawn by the predictor from numpy.random.default_rng(seed) when not given",
        "policy": {
            "type": policy.type,
            "num_inference_steps": getattr(policy.config, "num_inference_steps", None),
            "parameters": sum(p.numel() for p in policy.parameters()),
            "config": meta.get("config"),
        },
        "timing": {
            "fps": spec.fps,
            "n_obs_steps": spec.n_obs_steps,
            "horizon": spec.horizon,
            "n_action_steps": spec.n_action_steps,
        },
        "spec": spec.to_dict(),
        # A language-conditioned policy: the instruction -> embedding table the runtime maps task strings with.
        **({"language": language} if (language := getattr(policy, "base", policy).language_info()) else {}),
        "action_limits": {
            "names": action.names,
            "dataset_min": action.stats.min if action.stats else None,
            "dataset_max": action.stats.max if action.stats else None,
            # robopolicy envs take a float32 Box in [-1, 1] (robopolicy/sim/base.py).
            "env_low": [-1.0] * action.dim if env else None,
            "env_high": [1.0] * action.dim if env else None,
        },
        "source": {
            "checkpoint": str(ckpt.resolve()),
            "step": meta.get("step"),
            "env": env,
            "dataset": meta.get("dataset"),
            "checkpoint_copy": CHECKPOINT_DIR,
        },
        "versions": {
            "robopolicy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "python": platform.python_version(),
        },
    }


def _tolerance(policy: Policy, relaxed: bool) -> float:
    if not relaxed:
        return PARITY_TOLERANCE
    stats = policy.spec.action.stats
    span = max(hi - lo for lo, hi in zip(stats.min, stats.max)) if stats else 2.0
    return PARITY_TOLERANCE_RELAXED * max(span, 1e-6)


def _parity(policy: Policy, stage: Path, backend: str, tolerance: float, rng: np.random.Generator) -> dict[str, Any]:
    """Max ``|exported - torch|`` over a few random observations with identical noise, through ``load_policy``."""
    exported = load_policy(stage, backend=backend)
    worst = 0.0
    for _ in range(PARITY_SAMPLES):
        obs = sample_observation(policy.spec, rng)
        noise = rng.standard_normal(policy.noise_shape(1), dtype=np.float32)
        with torch.inference_mode():
            expected = policy.predict_chunk({k: torch.from_numpy(v) for k, v in obs.items()}, torch.from_numpy(noise)).numpy()
        worst = max(worst, float(np.abs(exported.predict_chunk(obs, noise) - expected).max()))
    if not worst <= tolerance:
        raise ExportError(
            f"parity check failed: {backend} and torch differ by up to {worst:.3g} in raw action units "
            f"(tolerance {tolerance:.0e}); the export was not written"
        )
    return {"max_abs_diff": worst, "tolerance": tolerance, "samples": PARITY_SAMPLES, "backend": backend}


def _performance(
    policy: Policy, stage: Path, simplified: onnx.ModelProto, example: dict[str, np.ndarray], threads: int, runs: int,
) -> tuple[dict[str, Any], int]:
    """Chunk latency in ONNX Runtime and torch eager (same process, same inputs), the lower bounds,
    and the op count of the graph after ONNX Runtime's own (hardware-specific) optimizer."""
    import onnxruntime as ort

    optimized = stage / "ort_optimized.onnx"
    session = ort.InferenceSession(str(stage / MODEL_FILE), session_options(threads, optimized), providers=["CPUExecutionProvider"])
    op_count_optimized = len(onnx.load(str(optimized), load_external_data=False).graph.node)
    remove_quietly(optimized)
    ort_latency = latency.measure(lambda: session.run(None, example), runs)
    obs = {k: torch.from_numpy(v) for k, v in example.items() if k != NOISE}
    noise = torch.from_numpy(example[NOISE])
    with torch.inference_mode():
        torch_latency = latency.measure(lambda: policy.predict_chunk(obs, noise), max(runs // 10, 5), warmup=2)
    flops = graph_ops.count_flops(simplified)
    weight_bytes = graph_ops.weight_bytes_read(simplified)
    peak, stream = latency.cpu_peak_gflops(threads), latency.weight_stream_gbps(threads)
    return {
        "onnxruntime": {**ort_latency.to_dict(), "threads": threads},
        "torch_eager": {**torch_latency.to_dict(), "threads": torch.get_num_threads()},
        "ratio_onnxruntime_to_torch": round(ort_latency.p50_ms / torch_latency.p50_ms, 4),
        "gflop_per_chunk": flops / 1e9,
        "weight_mb_per_chunk": weight_bytes / 1e6,
        "cpu_peak_gflops": peak,
        "weight_stream_gbps": stream,
        "lower_bound_ms": {"arithmetic": flops / (peak * 1e9) * 1e3, "weight_streaming": weight_bytes / (stream * 1e9) * 1e3},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other processes: "
                   "percentiles over many runs)",
    }, op_count_optimized
