"""ONNX export: parity with torch, manifest, the CPU graph rewrites, load-time and call-time checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from robopolicy.export import (
    ExportError, ModelFileError, ObservationError, TensorRTUnavailableError, export_policy, load_policy,
)
from robopolicy.export import graph as graph_ops
from robopolicy.export.runtime import sample_observation
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


def make_checkpoint(folder: Path, family: str, image: bool) -> Path:
    """A tiny untrained policy saved as a checkpoint folder (what training writes)."""
    torch.manual_seed(0)
    policy = make_policy(family, make_spec(image), TINY).eval()
    save_policy(folder, policy, policy.state_dict(), {"env": "push", "dataset": {"path": "synthetic"}, "step": 7})
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
    assert m["parity"]["max_abs_diff"] <= 1e-4
    names = ["observation.environment_state", "observation.state"] + ([CAMERA] if family == "flow" else []) + ["noise"]
    assert [i["name"] for i in m["inputs"]] == names
    assert m["inputs"][1] == {"name": "observation.state", "shape": [1, 2, 3], "dtype": "float32"}
    assert m["inputs"][-1] == {"name": "noise", "shape": [1, 8, 2], "dtype": "float32"}
    if family == "flow":
        assert m["inputs"][2] == {"name": CAMERA, "shape": [1, 2, 20, 20, 3], "dtype": "uint8"}
    assert m["outputs"] == [{"name": "action", "shape": [1, 4, 2], "dtype": "float32"}]
    model = onnx.load(str(folder / "policy.onnx"))
    assert m["model"]["op_count"] == len(model.graph.node) and m["model"]["opset"] == 17
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
