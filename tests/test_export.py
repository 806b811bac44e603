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
