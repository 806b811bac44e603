"""ONNX export: parity with torch, manifest, the CPU graph rewrites, load-time and call-time checks."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from robopolicy.export import (
    ExportError, ModelFileError, NonFiniteActionError, ObservationError, TensorRTUnavailableError, export_policy,
    load_policy,
)
from robopolicy.export import graph as graph_ops
from robopolicy.export.onnx_export import PARITY_REL_TOLERANCE
from robopolicy.export.exported_policy import BOUND_FIELDS_KEY, sample_observation
from robopolicy.policies.factory import make_policy
from robopolicy.spec import Feature, FeatureSpec, Stats
from robopolicy.train.checkpoint import save_policy

TINY = {
    "n_obs_steps": 2, "horizon": 8, "n_action_steps": 4, "num_inference_steps": 3,
    "down_dims": [16, 32], "n_groups": 4, "kernel_size": 3, "time_embed_dim": 16, "state_mlp_dims": [32],
    "image_channels": [8, 16], "image_keypoints": 4, "image_feature_dim": 8,
}
CAMERA = "observation.images.front"
STATE_NAMES = ["x", "y", "z"]


def low_dim(name: str, lo: list[float], hi: list[float], names: list[str] | None = None) -> Feature:
    mean = [(a + b) / 2 for a, b in zip(lo, hi)]
    return Feature(name, (len(lo),), names=names, stats=Stats(min=lo, max=hi, mean=mean, std=[1.0] * len(lo)))


def make_spec(image: bool) -> FeatureSpec:
    feats = {
        "observation.state": low_dim("observation.state", [-1.0, 0.0, 2.0], [1.0, 5.0, 4.0], STATE_NAMES),
        "observation.environment_state": low_dim("observation.environment_state", [0.0] * 4, [1.0] * 4),
        "action": low_dim("action", [-0.5, -1.0], [0.5, 1.0], ["vx", "vy"]),
    }
    if image:
        feats[CAMERA] = Feature(CAMERA, (20, 20, 3), dtype="uint8")
    return FeatureSpec(features=feats, fps=10.0)


def make_checkpoint(
    folder: Path, family: str, image: bool, spec: FeatureSpec | None = None,
    edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    """A tiny untrained policy (for ``spec``, default :func:`make_spec`) saved as a checkpoint folder (what
    training writes); ``edit`` changes its weights in place first."""
    torch.manual_seed(0)
    policy = make_policy(family, spec or make_spec(image), TINY).eval()
    weights = {k: v.clone() for k, v in policy.state_dict().items()}
    if edit is not None:
        edit(weights)
    save_policy(folder, policy, weights, {"env": "push", "dataset": {"path": "synthetic"}, "step": 7})
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: a second OpenMP thread only adds spin-waits (and on a busy machine, a lot)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, one_torch_thread) -> dict[str, tuple[Path, Path]]:
    """``family -> (checkpoint, export folder)``: diffusion state-only, flow with a camera."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for family, image in (("diffusion", False), ("flow", True)):
        ckpt = make_checkpoint(root / f"{family}_ckpt", family, image)
        report = export_policy(ckpt, root / f"{family}_export", latency_runs=5)
        out[family] = (ckpt, report.out)
    return out


def observation(spec: FeatureSpec, seed: int = 1) -> dict[str, np.ndarray]:
    return sample_observation(spec, np.random.default_rng(seed))


# -- export: parity and manifest ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["diffusion", "flow"])
def test_export_parity_and_manifest(exports, family: str) -> None:
    ckpt, folder = exports[family]
    m = json.loads((folder / "manifest.json").read_text())
    parity = m["parity"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["max_rel_diff"] <= parity["rel_tolerance"] == PARITY_REL_TOLERANCE
    # relative to each action dimension's range: vx in [-0.5, 0.5], vy in [-1, 1]
    assert parity["tolerance_per_dim"] == pytest.approx([PARITY_REL_TOLERANCE, 2 * PARITY_REL_TOLERANCE])
    assert parity["tolerance"] == pytest.approx(2 * PARITY_REL_TOLERANCE) and parity["worst_dimension"] in ("vx", "vy")
    names = ["observation.environment_state", "observation.state"] + ([CAMERA] if family == "flow" else []) + ["noise"]
    assert [i["name"] for i in m["inputs"]] == names
    assert m["inputs"][1] == {"name": "observation.state", "shape": [1, 2, 3], "dtype": "float32"}
    assert m["inputs"][-1] == {"name": "noise", "shape": [1, 8, 2], "dtype": "float32"}
    if family == "flow":
        assert m["inputs"][2] == {"name": CAMERA, "shape": [1, 2, 20, 20, 3], "dtype": "uint8"}
    assert m["outputs"] == [{"name": "action", "shape": [1, 4, 2], "dtype": "float32"}]
    model = onnx.load(str(folder / "policy.onnx"))
    assert m["model"]["op_count"] == len(model.graph.node) and m["model"]["opset"] == 17
    carried = json.loads({p.key: p.value for p in model.metadata_props}[BOUND_FIELDS_KEY])
    assert carried["spec"] == m["spec"] and carried["timing"] == m["timing"] and carried["model.opset"] == 17
    assert "model.sha256" not in carried and "parity" not in carried and carried["checkpoint"] == m["checkpoint"]
    assert m["model"]["batch_size"] == 1 and m["model"]["static_shapes"] and m["model"]["target"] == "cpu"
    assert m["policy"]["type"] == family and m["policy"]["num_inference_steps"] == 3
    assert m["timing"] == {"fps": 10.0, "n_obs_steps": 2, "horizon": 8, "n_action_steps": 4}
    assert m["spec"]["features"]["observation.state"]["names"] == STATE_NAMES
    assert m["action_limits"]["dataset_min"] == [-0.5, -1.0] and m["action_limits"]["env_high"] == [1.0, 1.0]
    assert m["source"]["env"] == "push" and m["source"]["step"] == 7
    assert Path(m["source"]["checkpoint"]) == ckpt.resolve()
    perf = m["performance"]
    assert perf["onnxruntime"]["p50_ms"] > 0 and perf["torch_eager"]["p99_ms"] > 0
    assert perf["gflop_per_chunk"] > 0 and perf["lower_bound_ms"]["weight_streaming"] > 0
    assert m["model"]["op_count_ort_optimized"] > 0
    assert not list(folder.parent.glob(".*export-*")), "staging folder left behind"


def test_backends_agree_and_noise_is_deterministic(exports) -> None:
    _, folder = exports["flow"]
    onnx_policy = load_policy(folder, seed=3)
    torch_policy = load_policy(folder, backend="torch", seed=3)
    obs = {**observation(onnx_policy.spec), "task": ["push the red block to the goal"]}
    chunk = onnx_policy.predict_chunk(obs)
    assert chunk.shape == (1, 4, 2) and chunk.dtype == np.float32
    np.testing.assert_allclose(chunk, torch_policy.predict_chunk(obs), atol=1e-4)  # same seed -> same noise
    noise = np.random.default_rng(9).standard_normal((1, 8, 2), dtype=np.float32)
    np.testing.assert_array_equal(onnx_policy.predict_chunk(obs, noise), onnx_policy.predict_chunk(obs, noise))
    assert not np.array_equal(onnx_policy.predict_chunk(obs), chunk)  # the generator moves on
    assert onnx_policy.source_env == "push" and onnx_policy.manifest["policy"]["type"] == "flow"
    assert not hasattr(onnx_policy, "correct_action")  # no residual: the executor runs the chunks as they are


# -- observation checks ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda o: o.pop("observation.state"), r"'observation.state' is missing"),
        (lambda o: o.update({"observation.state": np.zeros((1, 2, 4), np.float32)}),
         r"'observation.state' has shape \(1, 2, 4\); the policy expects \(1, 2, 3\)"),
        (lambda o: o.update({"observation.state": np.zeros((2, 3), np.float32)}), r"has shape \(2, 3\)"),
        (lambda o: o.update({"observation.state": np.zeros((1, 2, 3))}), r"'observation.state' has dtype float64; the policy expects float32"),
        (lambda o: o["observation.state"].__setitem__((0, 1, 2), np.nan), r"'observation.state' contains NaN or inf .*'z'"),
        (lambda o: o["observation.environment_state"].__setitem__((0, 0, 0), np.inf), r"'observation.environment_state' contains NaN"),
    ],
)
def test_bad_observations_are_named(exports, change, match: str) -> None:
    policy = load_policy(exports["diffusion"][1])
    obs = observation(policy.spec)
    change(obs)
    with pytest.raises(ObservationError, match=match):
        policy.predict_chunk(obs)


def test_bad_noise_and_images(exports) -> None:
    policy = load_policy(exports["flow"][1])
    obs = observation(policy.spec)
    with pytest.raises(ObservationError, match=r"'noise' has shape \(1, 8, 3\)"):
        policy.predict_chunk(obs, np.zeros((1, 8, 3), np.float32))
    obs[CAMERA] = obs[CAMERA].astype(np.float32)
    with pytest.raises(ObservationError, match=rf"'{CAMERA}' has dtype float32; the policy expects uint8"):
        policy.predict_chunk(obs)


# -- load-time checks --------------------------------------------------------------------------
def test_truncated_model_file(exports, tmp_path) -> None:
    folder = shutil.copytree(exports["diffusion"][1], tmp_path / "copy")
    data = (folder / "policy.onnx").read_bytes()
    (folder / "policy.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated, corrupt or was modified"):
        load_policy(folder)
    (folder / "policy.onnx").unlink()
    with pytest.raises(ModelFileError, match="policy.onnx is missing"):
        load_policy(folder)
    with pytest.raises(ModelFileError, match="has no manifest.json"):
        load_policy(tmp_path)


def test_manifest_that_does_not_match_the_graph(exports, tmp_path) -> None:
    folder = shutil.copytree(exports["diffusion"][1], tmp_path / "copy")
    manifest = json.loads((folder / "manifest.json").read_text())
    # A consistent manifest (spec and inputs agree) for a policy with a 5-dim state: not this graph.
    state = manifest["spec"]["features"]["observation.state"]
    state["shape"], state["names"] = [5], None
    state["stats"] = {k: v + [0.0, 1.0] for k, v in state["stats"].items()}
    manifest["inputs"][1]["shape"] = [1, 2, 5]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match=r"graph inputs are .*observation.state \[1, 2, 3\].* but the manifest says .*\[1, 2, 5\]"):
        load_policy(folder)
    manifest["inputs"][1]["shape"] = [1, 2, 3]  # now the manifest contradicts its own spec
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="do not match its feature spec"):
        load_policy(folder)
    del manifest["source"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="incomplete: it lacks source"):
        load_policy(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="manifest.json is corrupt"):
        load_policy(folder)


def edited_copy(source: Path, tmp_path: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    """A copy of the export folder ``source`` whose ``manifest.json`` ``change`` edited."""
    folder = shutil.copytree(source, tmp_path / "edited")
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def _reverse_state_names(m: dict[str, Any]) -> None:
    m["spec"]["features"]["observation.state"]["names"].reverse()


def _longer_chunks(m: dict[str, Any]) -> None:
    """Ta = 8 in the spec and the outputs alike (a consistent manifest, for another graph)."""
    m["spec"]["n_action_steps"] = 8
    m["outputs"][0]["shape"] = [1, 8, 2]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m["spec"].update(fps=25),
         r"manifest.json says spec.fps = 25 but policy.onnx was exported with 10.0; the export folder was edited after "
         r"export: export again$"),
        (lambda m: m["timing"].update(n_action_steps=8), r"says timing.n_action_steps = 8 but policy.onnx was exported with 4;"),
        (lambda m: m["spec"]["features"]["action"]["stats"]["max"].__setitem__(1, 57.3),
         r"says spec.features.action.stats.max\[1\] = 57.3 but policy.onnx was exported with 1.0;"),
        (_reverse_state_names, r'says spec.features\["observation.state"\].names\[0\] = "z" but policy.onnx was exported with "x"'),
        (lambda m: m["model"].update(precision="fp16"), r'says model.precision = "fp16" but policy.onnx was exported with "fp32"'),
        (lambda m: m.pop("action_limits"), r"manifest.json has no action_limits but policy.onnx was exported with \{"),
        (_longer_chunks, r"graph outputs are \[action \[1, 4, 2\] float32\] but the manifest says \[action \[1, 8, 2\] float32\]"),
    ],
    ids=["fps", "timing.n_action_steps", "action_stats", "state_names", "precision", "section_removed", "consistent_Ta"],
)
def test_edited_manifest_is_refused_at_load(exports, tmp_path, backend: str, change, match: str) -> None:
    """Each graph carries the manifest fields it was exported with (covered by its SHA-256): an edited
    fps would replay chunks at the wrong rate, an edited Ta would execute steps the policy never planned."""
    with pytest.raises(ModelFileError, match=match):
        load_policy(edited_copy(exports["diffusion"][1], tmp_path, change), backend=backend)


def test_measurements_in_the_manifest_are_not_bound(exports, tmp_path) -> None:
    """Parity and latency describe the folder as measured; editing them changes nothing the runtime does."""
    def change(m: dict[str, Any]) -> None:
        m["parity"]["max_abs_diff"], m["performance"]["onnxruntime"]["p50_ms"] = 0.0, 0.001

    policy = load_policy(edited_copy(exports["diffusion"][1], tmp_path, change))
    assert policy.predict_chunk(observation(policy.spec)).shape == (1, 4, 2)


def test_torch_backend_checks_the_checkpoint_copy(exports, tmp_path) -> None:
    folder = shutil.copytree(exports["diffusion"][1], tmp_path / "copy")
    meta = json.loads((folder / "checkpoint" / "policy.json").read_text())
    meta["spec"]["fps"] = 25.0
    (folder / "checkpoint" / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"checkpoint/policy.json does not match its manifest .*modified after export"):
        load_policy(folder, backend="torch")
    assert load_policy(folder).predict_chunk(observation(load_policy(folder).spec)).shape == (1, 4, 2)  # not read


def test_exports_whose_graph_carries_no_manifest_fields_are_refused(exports, tmp_path) -> None:
    folder = shutil.copytree(exports["diffusion"][1], tmp_path / "copy")
    model = onnx.load(str(folder / "policy.onnx"))
    del model.metadata_props[:]
    data = model.SerializeToString()
    (folder / "policy.onnx").write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["model"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match=r"policy.onnx carries no readable manifest fields .*export again"):
        load_policy(folder)
    manifest["format"] = "robopolicy.export/1"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match=r"format 'robopolicy.export/1', expected 'robopolicy.export/2'; export again"):
        load_policy(folder)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_non_finite_actions_are_never_returned(exports, residual_export, backend: str) -> None:
    """A finite observation far outside the training range (a sensor glitch at float32's limit) makes
    the graph overflow: the caller gets an error naming the graph and the first bad index, not NaN."""
    policy = load_policy(exports["diffusion"][1], backend=backend)
    obs = observation(policy.spec)
    obs["observation.state"][0, :, :2] = [3e38, -3e38]
    source = "checkpoint" if backend == "torch" else "policy.onnx"
    with pytest.raises(NonFiniteActionError, match=rf"{source} \({backend}\) produced a non-finite action \((nan|inf) at "
                                                   r"action\[0, 0, 0\], dimension 'vx'\) from a finite observation"):
        policy.predict_chunk(obs)
    residual = load_policy(residual_export[0], backend=backend)
    source = "checkpoint" if backend == "torch" else "residual.onnx"
    with pytest.raises(NonFiniteActionError, match=rf"{source} \({backend}\) produced a non-finite action \((nan|inf) at "
                                                   r"action\[0, 0\], dimension 'vx'\)"):
        residual.correct_action(step_observation(residual.spec), np.float32([3e38, -3e38]))


def test_unknown_backend(exports) -> None:
    with pytest.raises(Exception, match="unknown backend 'tensorflow'"):
        load_policy(exports["diffusion"][1], backend="tensorflow")


# -- export options ------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_tensorrt_without_gpu_is_a_clear_error(exports, tmp_path) -> None:
    ckpt, folder = exports["diffusion"]
    with pytest.raises(TensorRTUnavailableError, match="--tensorrt needs TensorRT, which is not available on this machine .*no CUDA GPU"):
        export_policy(ckpt, tmp_path / "trt", tensorrt=True)
    assert not (tmp_path / "trt").exists()
    with pytest.raises(TensorRTUnavailableError, match="backend 'tensorrt' needs TensorRT.*no CUDA GPU.*use backend 'onnxruntime'"):
        load_policy(folder, backend="tensorrt")


def test_fp16_export_runs_and_reexport_replaces(exports, tmp_path) -> None:
    ckpt, _ = exports["diffusion"]
    out = tmp_path / "fp16"
    report = export_policy(ckpt, out, fp16=True, latency_runs=3)
    m = report.manifest
    assert m["model"]["precision"].startswith("fp16") and m["model"]["target"] == "portable"
    assert m["parity"]["max_abs_diff"] <= m["parity"]["tolerance"]
    assert load_policy(out).predict_chunk(observation(load_policy(out).spec)).dtype == np.float32
    export_policy(ckpt, out, latency_runs=3)  # an existing export is replaced
    assert json.loads((out / "manifest.json").read_text())["model"]["precision"] == "fp32"
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="refusing to replace"):
        export_policy(ckpt, foreign, latency_runs=3)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_torch_eager_is_timed_on_onnxruntimes_thread_count(exports, tmp_path) -> None:
    """A like-for-like ratio, and one that another busy process cannot blow up 4x (two torch
    threads on a 2-core VM with a core taken); the caller's thread count is restored."""
    torch.set_num_threads(2)
    try:
        perf = export_policy(exports["diffusion"][0], tmp_path / "threads", latency_runs=3).manifest["performance"]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert perf["torch_eager"]["threads"] == perf["onnxruntime"]["threads"] == 1


def _nan_weight(weights: dict[str, torch.Tensor]) -> None:
    weights["encoder.state_mlp.0.weight"][0, 5] = float("nan")


def _overflowing_weights(weights: dict[str, torch.Tensor]) -> None:
    weights["encoder.state_mlp.0.weight"] *= 1e30  # finite, but the features overflow downstream


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_nan_weight, r"policy.safetensors: tensor 'encoder.state_mlp.0.weight' \[32, \d+\] holds nan at index \[0, 5\]: "
                      r"the checkpoint's weights are not finite \(did training diverge\?\); the export was not written$"),
        (_overflowing_weights, r"parity check failed for the action chunk \(policy.onnx\): the torch policy produced "
                               r"non-finite actions \((nan|inf) at action\[0, 0, 0\]\) .*the export was not written$"),
    ],
    ids=["nan_weight", "overflowing_weights"],
)
def test_non_finite_checkpoints_are_not_exported(tmp_path, edit, match: str) -> None:
    """NaN must not pass parity as 0.0 (``max(0.0, nan)`` is 0.0): a non-finite weight or output fails the export."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "diffusion", False, edit=edit)
    with pytest.raises(ExportError, match=match):
        export_policy(ckpt, tmp_path / "out", latency_runs=3)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*export-*"))


def test_parity_tolerance_is_relative_to_each_action_range(tmp_path) -> None:
    """A diffusion policy on a 6-joint arm in degrees: the graphs compute in normalized units, so fp32
    rounding is ~1e-4 in degrees (over a fixed 1e-4 in raw units) and ~1e-6 of each joint's range."""
    lo, hi = [-180.0, -90.0, -170.0, -350.0, -120.0, 0.0], [180.0, 270.0, 170.0, 350.0, 120.0, 360.0]
    spec = make_spec(False)
    spec.features["action"] = low_dim("action", lo, hi, [f"joint{i}_deg" for i in range(6)])
    report = export_policy(make_checkpoint(tmp_path / "ckpt", "diffusion", False, spec), tmp_path / "deg", latency_runs=3)
    parity = report.manifest["parity"]
    assert parity["max_rel_diff"] <= PARITY_REL_TOLERANCE and parity["worst_dimension"].startswith("joint")
    assert parity["tolerance_per_dim"] == pytest.approx(PARITY_REL_TOLERANCE * np.subtract(hi, lo))
    assert parity["max_abs_diff"] <= parity["tolerance"]  # what readers of the old scalar fields check
    assert "of the action range (tolerance 5e-05 of each dimension's range" in report.summary()


def test_parity_failure_names_the_dimension_and_its_range() -> None:
    from robopolicy.export.onnx_export import _parity_report, action_ranges

    action = low_dim("action", [-180.0, -1.0], [180.0, 1.0], ["shoulder_deg", "gripper"])
    ranges = action_ranges(action)
    assert ranges.tolist() == [360.0, 2.0]
    report = _parity_report(np.array([1e-2, 1e-5]), ranges, PARITY_REL_TOLERANCE, action, "onnxruntime", "the chunk")
    assert report["worst_dimension"] == "shoulder_deg" and report["max_abs_diff"] == 1e-2
    with pytest.raises(ExportError, match=r"differ by up to 0.001 in action dimension 'gripper', 0.0005 of its range 2 "
                                          r"\(tolerance 5e-05 of the range\); the export was not written"):
        _parity_report(np.array([1e-2, 1e-3]), ranges, PARITY_REL_TOLERANCE, action, "onnxruntime", "the chunk")
    constant = low_dim("action", [0.5, -1.0], [0.5, 1.0])  # a dimension that never moved: |mean| + std
    assert action_ranges(constant).tolist() == [1.5, 2.0]
    assert action_ranges(Feature("action", (3,))).tolist() == [1.0, 1.0, 1.0]  # no statistics


@pytest.mark.slow
def test_dynamo_exporter(exports, tmp_path) -> None:
    report = export_policy(exports["flow"][0], tmp_path / "dynamo", exporter="dynamo", latency_runs=3)
    assert report.manifest["model"]["opset"] == 18 and report.manifest["parity"]["max_abs_diff"] <= 1e-4


# -- the CPU graph rewrites ----------------------------------------------------------------------
def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


class _Block(torch.nn.Module):
    """Convs of every kind the U-Net has, GroupNorm, Mish and a runtime FiLM modulation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(3, 8, 5, padding=2)
        self.down = torch.nn.Conv1d(8, 8, 3, 2, 1)
        self.up = torch.nn.ConvTranspose1d(8, 8, 4, 2, 1)
        self.skip = torch.nn.Conv1d(8, 8, 1)
        self.norm = torch.nn.GroupNorm(2, 8)

    def forward(self, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.mish(self.norm(self.conv(x)))
        h = torch.addcmul(film[:, 8:, None], film[:, :8, None], h)
        return self.skip(self.up(self.down(h))) + torch.nn.functional.softplus(h)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_cpu_rewrites_keep_the_function(tmp_path) -> None:
    x, film = torch.randn(1, 3, 8), torch.randn(1, 16)
    path = tmp_path / "block.onnx"
    torch.onnx.export(_Block().eval(), (x, film), str(path), input_names=["x", "film"], dynamo=False)
    simplified = graph_ops.simplify(path.read_bytes(), tmp_path / "simplified.onnx")
    rewritten = graph_ops.optimize_for_cpu(simplified)
    ops = graph_ops.op_histogram(rewritten)
    assert "Conv" not in ops and "ConvTranspose" not in ops  # T = 8 and 4: all rewritten as GEMMs
    assert ops["Softplus"] == 1  # the Mish one becomes Exp/Log; the one that is not under Tanh stays
    assert ops["BatchNormalization"] == 2  # the GroupNorm affine and the FiLM modulation
    feeds = {"x": x.numpy(), "film": film.numpy()}
    np.testing.assert_allclose(_run(rewritten, feeds), _run(simplified, feeds), atol=1e-5)
    assert graph_ops.count_flops(simplified) == 2 * (3 * 8 * 5 * 8 + 8 * 8 * 3 * 4 + 8 * 8 * 4 * 4 + 8 * 8 * 8)


# -- residual-RL policies: base chunk graph + per-step correction graph ----------------------------
def make_residual_checkpoint(folder: Path, scale: float = 0.3) -> tuple[Path, torch.nn.Module]:
    """A tiny diffusion base + a residual actor with a non-zero last layer, saved as a fine-tuning checkpoint."""
    from robopolicy.rl.policy import make_residual_policy

    torch.manual_seed(0)
    base = make_policy("diffusion", make_spec(False), TINY).eval()
    policy = make_residual_policy(base, scale, (16, 16), (-0.4, -1.0), (0.4, 1.0)).eval()
    torch.nn.init.normal_(policy.actor.net[-1].weight, std=0.5)
    save_policy(folder, policy, policy.state_dict(), {"env": "push", "step": 11})
    return folder, policy


@pytest.fixture(scope="module")
def residual_export(tmp_path_factory, one_torch_thread) -> tuple[Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("residual")
    ckpt, policy = make_residual_checkpoint(root / "ckpt")
    return export_policy(ckpt, root / "export", latency_runs=5).out, policy


def step_observation(spec: FeatureSpec, seed: int = 2) -> dict[str, np.ndarray]:
    """One current (unbatched) observation, as the evaluator and the ROS node pass it."""
    return {k: v[0, -1] for k, v in observation(spec, seed).items()}


def test_residual_export_has_both_graphs_checked_for_parity(residual_export) -> None:
    folder, policy = residual_export
    m = json.loads((folder / "manifest.json").read_text())
    assert (folder / "policy.onnx").is_file() and (folder / "residual.onnx").is_file()
    r = m["residual"]
    assert r["inputs"] == [{"name": "observation.environment_state", "shape": [1, 4], "dtype": "float32"},
                           {"name": "observation.state", "shape": [1, 3], "dtype": "float32"},
                           {"name": "base_action", "shape": [1, 2], "dtype": "float32"}]
    assert r["outputs"] == [{"name": "action", "shape": [1, 2], "dtype": "float32"}]
    assert r["action_scale"] == pytest.approx(0.3) and r["action_high"] == pytest.approx([0.4, 1.0])
    assert r["action_low"] == pytest.approx([-0.4, -1.0]) and r["base_type"] == "diffusion"
    assert [i["name"] for i in m["inputs"]][-1] == "noise"  # the chunk graph is the base's, unchanged
    assert m["policy"]["type"] == "residual" and m["policy"]["num_inference_steps"] == 3
    assert m["parity"]["max_abs_diff"] <= 1e-4 and m["parity"]["correction"]["max_abs_diff"] <= 1e-4
    assert m["performance"]["correction"]["onnxruntime"]["p50_ms"] > 0
    assert m["performance"]["correction"]["torch_eager"]["p50_ms"] > 0
    model = onnx.load(str(folder / "residual.onnx"))
    assert r["op_count"] == len(model.graph.node) and "Conv" not in r["op_histogram"]


def test_exported_correction_matches_torch_on_every_backend(residual_export) -> None:
    folder, policy = residual_export
    exported, eager = load_policy(folder), load_policy(folder, backend="torch")
    assert type(exported).__name__ == "ExportedResidualPolicy" and hasattr(eager, "correct_action")
    rng = np.random.default_rng(4)
    for seed in range(5):
        obs = {**step_observation(exported.spec, seed), "task": "ignored"}
        planned = rng.uniform([-0.6, -1.2], [0.6, 1.2]).astype(np.float32)  # some beyond the actor's bounds
        with torch.inference_mode():
            want = policy.correct_action({k: torch.from_numpy(v)[None] for k, v in obs.items() if k != "task"},
                                         torch.from_numpy(planned)[None]).numpy()[0]
        got = exported.correct_action(obs, planned)
        assert got.shape == (2,) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(eager.correct_action(obs, planned), want, atol=1e-6)
        low, high = np.float32([-0.4, -1.0]), np.float32([0.4, 1.0])
        assert np.all(got >= low) and np.all(got <= high)
        assert np.abs(got - np.clip(planned, low, high)).max() > 1e-3  # it does correct


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda o, a: o.pop("observation.state"), r"'observation.state' is missing"),
        (lambda o, a: o.update({"observation.state": o["observation.state"][None]}),
         r"'observation.state' has shape \(1, 3\); the policy expects \(3,\) \(one step"),
        (lambda o, a: o.update({"observation.state": o["observation.state"].astype(np.float64)}),
         r"'observation.state' has dtype float64; the policy expects float32"),
        (lambda o, a: o["observation.state"].__setitem__(2, np.nan), r"'observation.state' contains NaN .*'z'"),
        (lambda o, a: a.__setitem__(1, np.inf), r"planned action 'base_action' contains NaN or inf .*'vy'"),
    ],
)
def test_bad_correction_inputs_are_named(residual_export, change, match: str) -> None:
    policy = load_policy(residual_export[0])
    obs, planned = step_observation(policy.spec), np.zeros(2, np.float32)
    change(obs, planned)
    with pytest.raises(ObservationError, match=match):
        policy.correct_action(obs, planned)
    with pytest.raises(ObservationError, match=r"planned action 'base_action' has dtype float64"):
        policy.correct_action(step_observation(policy.spec), np.zeros(2))


def test_residual_graph_that_does_not_match_its_manifest(residual_export, tmp_path, capsys) -> None:
    from robopolicy.cli import main

    folder = shutil.copytree(residual_export[0], tmp_path / "copy")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["residual"]["inputs"][1]["shape"] = [1, 5]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match=r"inputs of residual.onnx .*observation.state \[1, 5\].* do not match its feature spec"):
        load_policy(folder)
    assert main(["eval", "--model", str(folder), "--env", "push", "--episodes", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "robopolicy eval: error:" in err[0] and "residual.onnx" in err[0]
    manifest["residual"]["inputs"][1]["shape"] = [1, 3]
    manifest["residual"]["outputs"][0]["name"] = "corrected"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match=r"outputs of residual.onnx"):
        load_policy(folder)
    manifest["residual"]["outputs"][0]["name"] = "action"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "residual.onnx").write_bytes((folder / "residual.onnx").read_bytes()[:-10])
    with pytest.raises(ModelFileError, match=r"residual.onnx does not match its manifest"):
        load_policy(folder)
    del manifest["residual"]["sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match=r"incomplete: it lacks residual.sha256"):
        load_policy(folder)


def test_fp16_residual_export_checks_both_paths(residual_export, tmp_path) -> None:
    report = export_policy(residual_export[0].parent / "ckpt", tmp_path / "fp16", fp16=True, latency_runs=3)
    m = report.manifest
    assert m["model"]["precision"].startswith("fp16") and m["model"]["target"] == "portable"
    assert m["parity"]["correction"]["max_abs_diff"] <= m["parity"]["tolerance"]
    summary = report.summary()
    assert "correction parity vs torch: max |diff|" in summary and "per-step correction: onnxruntime p50" in summary
    policy = load_policy(report.out)
    assert policy.correct_action(step_observation(policy.spec), np.zeros(2, np.float32)).dtype == np.float32


def test_edited_residual_section_is_refused_at_load(residual_export, tmp_path) -> None:
    folder = edited_copy(residual_export[0], tmp_path, lambda m: m["residual"].update(action_scale=0.5))
    for backend in ("onnxruntime", "torch"):
        with pytest.raises(ModelFileError, match=r"says residual.action_scale = 0.5 but residual.onnx was exported with 0.3"):
            load_policy(folder, backend=backend)
