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

A residual-RL fine-tuning (``robopolicy finetune``) exports as two graphs in the same folder:
``policy.onnx`` is its frozen base's chunk graph (above), ``residual.onnx`` the per-step
correction ``(each low-dim feature [1, D], base_action [1, Da]) -> action [1, Da]`` that
runs every control step on the newest observation and the planned action; the manifest's
``"residual"`` section describes it (inputs / outputs, action scale and bounds), and the
parity check and latency report cover both. Why two graphs and not one: ONNX Runtime runs
every node of a graph whatever outputs are requested (measured: docs/ARCHITECTURE.md), so a
combined graph would run the whole sampler for each per-step correction.

Steps: trace ``predict_chunk`` (TorchScript exporter by default: 5 s against 58 s for the
dynamo exporter on the default policy, the same graph after simplification, the same
~1e-6 parity), simplify with ONNX Runtime's portable basic passes, then either the CPU
rewrites of :mod:`robopolicy.export.graph` (default) or nothing (``portable``, implied by
``fp16`` -- then converted to float16 -- and ``tensorrt``). Each graph is written carrying
the manifest fields that describe it (ONNX metadata, covered by its SHA-256), so that the
load refuses an edited manifest. The folder is staged beside ``out`` and swapped in
atomically; before that, the staged folder is opened with
:func:`robopolicy.export.load_policy` (the path users take) and compared with torch on
identical inputs and noise, within a tolerance relative to each action dimension's range.
A checkpoint with a NaN / inf weight, or a non-finite output on either side, fails the export.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch

from robopolicy import __version__
from robopolicy.atomic_io import remove_quietly, replace_dir, write_bytes_atomic, write_json_atomic
from robopolicy.export import graph as graph_ops
from robopolicy.export import latency
from robopolicy.export import tensorrt as trt
from robopolicy.export.errors import ExportError, NonFiniteActionError
from robopolicy.export.exported_policy import (
    BOUND_FIELDS_KEY, CHECKPOINT_DIR, MANIFEST_FILE, MANIFEST_FORMAT, MODEL_FILE, NOISE, RESIDUAL, RESIDUAL_FILE,
    TENSORRT_DIR, bound_fields, correction_inputs, correction_outputs, dimension_name, first_non_finite, graph_inputs,
    graph_outputs, load_policy, sample_correction_feeds, sample_observation, session_options, sha256_file,
    torch_correction_args,
)
from robopolicy.policies.base import Policy
from robopolicy.rl.policy import ResidualPolicy, load_trained_policy
from robopolicy.spec import ACTION, Feature, FeatureSpec
from robopolicy.train.checkpoint import POLICY_META, POLICY_WEIGHTS, resolve_checkpoint

#: Default opset per exporter (the dynamo exporter emits opset 18 natively).
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
#: Largest ``|exported - torch|`` accepted at export in each action dimension, as a fraction of
#: that dimension's range (:func:`action_ranges`): the graphs compute in normalized units, so
#: their rounding scales with the range (a diffusion policy on joint angles differs by ~1.5e-4
#: in degrees, ~3e-6 in radians: both ~5e-7 of the range). fp32 on ONNX Runtime (5e-5: the
#: former 1e-4 for the usual [-1, 1] action); fp16 and TensorRT (which may pick TF32 / fp16 kernels).
PARITY_REL_TOLERANCE = 5e-5
PARITY_REL_TOLERANCE_RELAXED = 2e-2
#: The smallest action range a tolerance is relative to (a constant action dimension has none).
MIN_ACTION_RANGE = 1e-6
PARITY_SAMPLES = 3
#: The per-step correction is cheap: check it on more samples.
CORRECTION_PARITY_SAMPLES = 32

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
        residual = m.get(RESIDUAL)
        what = f"{m['policy']['type']} policy ({m['policy']['num_inference_steps']} sampler steps"
        lines = [
            f"exported {what}{' + per-step residual correction' if residual else ''}) to {self.out / MODEL_FILE}"
            + (f" + {self.out / RESIDUAL_FILE}" if residual else ""),
            f"graph: {model['op_count']} ops ({model['op_count_ort_optimized']} after ONNX Runtime's optimizer), "
            f"{model['bytes'] / 1e6:.1f} MB, opset {model['opset']}, {model['precision']}, graph form: {model['target']}",
            f"parity vs torch: max |diff| {parity['max_abs_diff']:.2e}, {parity['max_rel_diff']:.1e} of the action range "
            f"(tolerance {parity['rel_tolerance']:.0e} of each dimension's range, {parity['samples']} samples)",
        ]
        if residual:
            low, high, correction = residual["action_low"], residual["action_high"], parity["correction"]
            box = f"[{low[0]:g}, {high[0]:g}]" if len(set(low)) == len(set(high)) == 1 else "per-dimension bounds"
            lines += [
                f"correction graph: {residual['op_count']} ops, {residual['bytes'] / 1e3:.0f} kB, action scale "
                f"{residual['action_scale']:g}, clipped to {box}",
                f"correction parity vs torch: max |diff| {correction['max_abs_diff']:.2e}, "
                f"{correction['max_rel_diff']:.1e} of the action range ({correction['samples']} samples)",
            ]
        lines += [
            f"{'backend':<22}{'p50 ms':>9}{'p99 ms':>9}",
            f"{'onnxruntime (' + str(ort_lat['threads']) + ' thr)':<22}{ort_lat['p50_ms']:>9.2f}{ort_lat['p99_ms']:>9.2f}",
            f"{'torch eager (' + str(torch_lat['threads']) + ' thr)':<22}{torch_lat['p50_ms']:>9.2f}{torch_lat['p99_ms']:>9.2f}",
            f"onnxruntime / torch eager = {perf['ratio_onnxruntime_to_torch']:.2f}; "
            f"lower bounds: arithmetic {perf['lower_bound_ms']['arithmetic']:.2f} ms "
            f"({perf['gflop_per_chunk']:.3f} GFLOP at {perf['cpu_peak_gflops']:.0f} GFLOP/s), weight streaming "
            f"{perf['lower_bound_ms']['weight_streaming']:.2f} ms ({perf['weight_mb_per_chunk']:.0f} MB at "
            f"{perf['weight_stream_gbps']:.0f} GB/s)",
        ]
        if residual:
            lines.append("per-step correction: " + "; ".join(
                f"{name.replace('_', ' ')} p50 {lat['p50_ms'] * 1e3:.0f} us, p99 {lat['p99_ms'] * 1e3:.0f} us"
                for name, lat in perf["correction"].items()))
        if m.get("tensorrt"):
            trt_parity = m["tensorrt"]["parity"]
            correction = f", correction {trt_parity['correction']['max_abs_diff']:.2e}" if residual else ""
            lines.append(f"TensorRT engine{'s' if residual else ''} cached in {self.out / m['tensorrt']['cache_dir']} "
                         f"(parity {trt_parity['max_abs_diff']:.2e}{correction})")
        return "\n".join(lines)


class _ChunkGraph(torch.nn.Module):
    """``predict_chunk`` with positional inputs: observations in spec order, then the noise."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.policy = policy
        self.keys = [sig.name for sig in graph_inputs(policy.spec)[:-1]]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.policy.predict_chunk(dict(zip(self.keys, inputs[:-1])), inputs[-1])


class _CorrectionGraph(torch.nn.Module):
    """The residual actor with one input per low-dim feature ``[1, D]`` (spec order), then the base action."""

    def __init__(self, policy: ResidualPolicy) -> None:
        super().__init__()
        self.actor = policy.actor
        if self.actor.keys != [sig.name for sig in correction_inputs(policy.spec)[:-1]]:
            raise ExportError(f"the residual actor reads {self.actor.keys}, not the spec's low-dim features in order")

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.actor(torch.cat(inputs[:-1], dim=-1), inputs[-1])


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
    policy = load_trained_policy(ckpt)
    _check_finite_weights(policy, ckpt)
    residual = isinstance(policy, ResidualPolicy)
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
        names = [sig.name for sig in graph_inputs(policy.spec)]
        simplified = _export_graph(_ChunkGraph(policy), example, names, stage, opset, exporter)
        graphs = {MODEL_FILE: _finish_graph(simplified, target, fp16)}
        if residual:
            step = sample_correction_feeds(policy.spec, rng)
            names = [sig.name for sig in correction_inputs(policy.spec)]
            graphs[RESIDUAL_FILE] = _finish_graph(
                _export_graph(_CorrectionGraph(policy), step, names, stage, opset, exporter), target, fp16)
        (stage / CHECKPOINT_DIR).mkdir()
        for name in (POLICY_META, POLICY_WEIGHTS):
            shutil.copy2(ckpt / name, stage / CHECKPOINT_DIR / name)
        manifest = _manifest(policy, ckpt, stage, graphs[MODEL_FILE], exporter, fp16, target)
        if residual:
            manifest[RESIDUAL] = _residual_manifest(policy, graphs[RESIDUAL_FILE])
        _write_graphs(stage, graphs, manifest)
        write_json_atomic(stage / MANIFEST_FILE, manifest)
        rel_tolerance = PARITY_REL_TOLERANCE_RELAXED if fp16 else PARITY_REL_TOLERANCE
        manifest["parity"] = _parity(policy, stage, "onnxruntime", rel_tolerance, rng)
        manifest["performance"], manifest["model"]["op_count_ort_optimized"] = _performance(
            policy, stage, simplified, example, threads, latency_runs
        )
        if residual:
            manifest["performance"]["correction"] = _correction_latency(policy, stage, step, threads, latency_runs)
        if tensorrt:
            manifest["tensorrt"] = trt.build_engine(stage / MODEL_FILE, stage / TENSORRT_DIR, fp16, example)
            if residual:  # its own engine, in the same cache (ONNX Runtime keys engines by graph)
                manifest["tensorrt"]["correction"] = trt.build_engine(stage / RESIDUAL_FILE, stage / TENSORRT_DIR, fp16, step)
            write_json_atomic(stage / MANIFEST_FILE, manifest)
            manifest["tensorrt"]["parity"] = _parity(policy, stage, "tensorrt", PARITY_REL_TOLERANCE_RELAXED, rng)
        write_json_atomic(stage / MANIFEST_FILE, manifest)
        replace_dir(stage, out)
    finally:
        remove_quietly(stage)
    return ExportReport(out, manifest)


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        raise ExportError(f"refusing to replace {out}: it exists and is not a robopolicy export folder (no {MANIFEST_FILE})")


def _export_graph(
    module: torch.nn.Module, example: dict[str, np.ndarray], names: list[str], stage: Path, opset: int,
    exporter: Exporter,
) -> onnx.ModelProto:
    """Trace ``module`` (positional inputs ``names``, one output ``action``) into ONNX and simplify it
    (constant folding: for the chunk graph, everything that depends only on the fixed sampler
    timesteps, e.g. the step embeddings and their FiLM projections)."""
    module = module.eval()
    args = tuple(torch.from_numpy(example[name]) for name in names)
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


def _finish_graph(simplified: onnx.ModelProto, target: str, fp16: bool) -> onnx.ModelProto:
    """The simplified graph in its final form: CPU rewrites for ``target`` "cpu", then fp16 if asked."""
    model = simplified if target == "portable" else graph_ops.optimize_for_cpu(simplified)
    return _to_fp16(model) if fp16 else model


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and activations in float16; inputs and output keep float32 (casts at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_float_to_float16(model, keep_io_types=True)


def _manifest(
    policy: Policy, ckpt: Path, stage: Path, model: onnx.ModelProto, exporter: Exporter, fp16: bool, target: str,
) -> dict[str, Any]:
    """The manifest as known before the graphs are written: what ``policy.onnx`` carries (:func:`_write_graphs`)."""
    import onnxruntime as ort

    spec: FeatureSpec = policy.spec
    meta = getattr(policy, "checkpoint_meta", {})
    action = spec.action
    env = meta.get("env")
    return {
        "format": MANIFEST_FORMAT,
        "robopolicy_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {  # + "sha256" and "bytes" once written (_write_graphs)
            "file": MODEL_FILE,
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
            "num_inference_steps": getattr(_chunk_policy(policy).config, "num_inference_steps", None),
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
        **({"language": language} if (language := _chunk_policy(policy).language_info()) else {}),
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
        # The copy the torch backend runs, checked by it at load.
        "checkpoint": {
            name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for name, path in ((n, stage / CHECKPOINT_DIR / n) for n in (POLICY_META, POLICY_WEIGHTS))
        },
        "versions": {
            "robopolicy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "python": platform.python_version(),
        },
    }


def _chunk_policy(policy: Policy) -> Policy:
    """The policy whose graph ``policy.onnx`` is: a residual policy's frozen base, else the policy."""
    return policy.base if isinstance(policy, ResidualPolicy) else policy


def _residual_manifest(policy: ResidualPolicy, model: onnx.ModelProto) -> dict[str, Any]:
    """The manifest's ``"residual"`` section: the correction graph and what it computes (+ ``"sha256"`` and
    ``"bytes"`` once written)."""
    actor = policy.actor
    return {
        "file": RESIDUAL_FILE,
        "op_count": len(model.graph.node),
        "op_histogram": graph_ops.op_histogram(model),
        "inputs": [sig.to_dict() for sig in correction_inputs(policy.spec)],
        "outputs": [sig.to_dict() for sig in correction_outputs(policy.spec)],
        "function": "action = clip(base_action + action_scale * tanh(mlp([normalized features, normalized base_action])),"
                    " action_low, action_high)",
        "applied": "every control step, to the planned (scheduled) action with the newest observation; the ROS node's "
                   "safety layer checks the result",
        "action_scale": actor.action_scale,
        "action_low": actor.action_low.tolist(),
        "action_high": actor.action_high.tolist(),
        "hidden": list(policy.config.hidden),
        "parameters": sum(p.numel() for p in actor.parameters()),
        "base_type": policy.config.base_type,
    }


def _write_graphs(stage: Path, graphs: dict[str, onnx.ModelProto], manifest: dict[str, Any]) -> None:
    """Write each graph carrying the manifest fields that describe it (ONNX metadata :data:`BOUND_FIELDS_KEY`,
    so that its SHA-256 covers them: ``policy.onnx`` all but the ``residual`` section, ``residual.onnx``
    that section), then record its size and SHA-256 in its manifest section."""
    for file, model in graphs.items():
        if file == MODEL_FILE:
            section, sections = "model", {k: v for k, v in manifest.items() if k != RESIDUAL}
        else:
            section, sections = RESIDUAL, {RESIDUAL: manifest[RESIDUAL]}
        props = [p for p in model.metadata_props if p.key != BOUND_FIELDS_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(props)
        model.metadata_props.add(key=BOUND_FIELDS_KEY, value=json.dumps(bound_fields(sections)))
        data = model.SerializeToString()
        write_bytes_atomic(stage / file, data)
        manifest[section].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def _check_finite_weights(policy: Policy, ckpt: Path) -> None:
    """Refuse a checkpoint with a NaN / inf weight or buffer (a diverged run), naming the first such tensor."""
    for name, tensor in policy.state_dict().items():
        if not tensor.is_floating_point():
            continue
        values = tensor.detach().float().cpu().numpy()
        bad = first_non_finite(values)
        if bad is not None:
            raise ExportError(
                f"{ckpt / POLICY_WEIGHTS}: tensor {name!r} {list(values.shape)} holds {values[bad]} at index {list(bad)}: "
                "the checkpoint's weights are not finite (did training diverge?); the export was not written"
            )


def action_ranges(action: Feature) -> np.ndarray:
    """Each action dimension's scale for the parity tolerance: its dataset range (max - min); where that
    is zero, ``|mean| + std``; 1.0 without statistics; never below :data:`MIN_ACTION_RANGE`."""
    if action.stats is None:
        return np.ones(action.dim)
    stats = action.stats
    span = np.asarray(stats.max, np.float64) - np.asarray(stats.min, np.float64)
    spread = np.abs(np.asarray(stats.mean, np.float64)) + np.asarray(stats.std, np.float64)
    return np.maximum(np.where(span > 0, span, np.where(spread > 0, spread, 1.0)), MIN_ACTION_RANGE)


def _parity(policy: Policy, stage: Path, backend: str, rel_tolerance: float, rng: np.random.Generator) -> dict[str, Any]:
    """``|exported - torch|`` through ``load_policy``, per action dimension and relative to its range
    (:func:`action_ranges`): chunks over a few random observations with identical noise, and (residual
    policies) corrections over random features and planned actions."""
    exported = load_policy(stage, backend=backend)
    ranges = action_ranges(policy.spec.action)
    what = f"the action chunk ({MODEL_FILE})"
    diffs = []
    for _ in range(PARITY_SAMPLES):
        obs = sample_observation(policy.spec, rng)
        noise = rng.standard_normal(policy.noise_shape(1), dtype=np.float32)
        with torch.inference_mode():
            expected = policy.predict_chunk({k: torch.from_numpy(v) for k, v in obs.items()}, torch.from_numpy(noise)).numpy()
        diffs.append(_sample_diff(expected, exported.predict_chunk, (obs, noise), what))
    report = {**_parity_report(np.max(diffs, axis=0), ranges, rel_tolerance, policy.spec.action, backend, what),
              "samples": PARITY_SAMPLES, "backend": backend}
    if isinstance(policy, ResidualPolicy):
        def correct(obs: dict[str, np.ndarray], planned: np.ndarray) -> np.ndarray:
            return exported.correct_action(obs, planned)[None]  # batch 1, as torch's

        what = f"the per-step correction ({RESIDUAL_FILE})"
        diffs = []
        for _ in range(CORRECTION_PARITY_SAMPLES):
            obs, base = torch_correction_args(sample_correction_feeds(policy.spec, rng))
            expected = policy.correct_action(obs, base).numpy()
            diffs.append(_sample_diff(expected, correct, ({k: v.numpy()[0] for k, v in obs.items()}, base.numpy()[0]), what))
        report["correction"] = {**_parity_report(np.max(diffs, axis=0), ranges, rel_tolerance, policy.spec.action,
                                                 backend, what), "samples": CORRECTION_PARITY_SAMPLES}
    return report


def _sample_diff(expected: np.ndarray, run: Callable[..., np.ndarray], args: tuple[Any, ...], what: str) -> np.ndarray:
    """Per action dimension, the largest ``|run(*args) - expected|`` (the torch output ``expected`` and the
    exported one have the same shape); a non-finite output on either side fails the export."""
    bad = first_non_finite(expected)
    if bad is not None:
        raise ExportError(
            f"parity check failed for {what}: the torch policy produced non-finite actions ({expected[bad]} at "
            f"action[{', '.join(map(str, bad))}]) from an in-range observation although its weights are finite: they "
            "overflow (did training diverge?); the export was not written"
        )
    try:
        got = run(*args)
    except NonFiniteActionError as e:
        raise ExportError(f"parity check failed for {what}: {e}; the export was not written") from e
    return np.abs(got - expected).reshape(-1, expected.shape[-1]).max(axis=0)


def _parity_report(
    diff: np.ndarray, ranges: np.ndarray, rel_tolerance: float, action: Feature, backend: str, what: str,
) -> dict[str, Any]:
    """The parity section for the per-dimension worst ``diff``, or an :class:`ExportError` where a dimension
    differs by more than ``rel_tolerance`` of its range."""
    relative = diff / ranges
    worst = int(np.argmax(relative))
    name = dimension_name(action, worst)
    if not relative[worst] <= rel_tolerance:
        raise ExportError(
            f"parity check failed for {what}: {backend} and torch differ by up to {diff[worst]:.3g} in action "
            f"dimension {name!r}, {relative[worst]:.2g} of its range {ranges[worst]:.3g} (tolerance {rel_tolerance:.0e} "
            "of the range); the export was not written"
        )
    tolerance = rel_tolerance * ranges
    return {
        "max_abs_diff": float(diff.max()),  # raw action units
        "max_rel_diff": float(relative[worst]),  # of the dimension's range
        "worst_dimension": name,
        "rel_tolerance": rel_tolerance,
        "tolerance_per_dim": tolerance.tolist(),  # raw action units
        "tolerance": float(tolerance.max()),  # the loosest of them (max_abs_diff <= tolerance holds)
    }


def _correction_latency(
    policy: ResidualPolicy, stage: Path, step: dict[str, np.ndarray], threads: int, runs: int,
) -> dict[str, Any]:
    """Per-step correction latency in ONNX Runtime and torch eager (same inputs)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(stage / RESIDUAL_FILE), session_options(threads), providers=["CPUExecutionProvider"])
    ort_latency = latency.measure(lambda: session.run(None, step), runs)
    obs, base = torch_correction_args(step)
    with latency.torch_threads(threads):
        torch_latency = latency.measure(lambda: policy.correct_action(obs, base), runs)
    return {"onnxruntime": {**ort_latency.to_dict(), "threads": threads},
            "torch_eager": {**torch_latency.to_dict(), "threads": threads}}


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
    with torch.inference_mode(), latency.torch_threads(threads):
        torch_latency = latency.measure(lambda: policy.predict_chunk(obs, noise), max(runs // 10, 5), warmup=2)
    flops = graph_ops.count_flops(simplified)
    weight_bytes = graph_ops.weight_bytes_read(simplified)
    peak, stream = latency.cpu_peak_gflops(threads), latency.weight_stream_gbps(threads)
    return {
        "onnxruntime": {**ort_latency.to_dict(), "threads": threads},
        "torch_eager": {**torch_latency.to_dict(), "threads": threads},
        "ratio_onnxruntime_to_torch": round(ort_latency.p50_ms / torch_latency.p50_ms, 4),
        "gflop_per_chunk": flops / 1e9,
        "weight_mb_per_chunk": weight_bytes / 1e6,
        "cpu_peak_gflops": peak,
        "weight_stream_gbps": stream,
        "lower_bound_ms": {"arithmetic": flops / (peak * 1e9) * 1e3, "weight_streaming": weight_bytes / (stream * 1e9) * 1e3},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other processes: "
                   "percentiles over many runs)",
    }, op_count_optimized
