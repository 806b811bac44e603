"""Does ONNX Runtime run only the nodes a requested output needs? (why a residual export has two graphs)

    python bench/ort_output_pruning.py [--runs 50]

One graph, two independent paths: ``heavy`` (40 chained 1024x1024 MatMuls, standing for the
chunk sampler) and ``light`` (one 8x8 MatMul, standing for the per-step correction). Rows:
each output requested alone (all inputs fed), the light output with the heavy path's input
left unfed (an error) or given a default initializer, the light output of a copy without the
heavy path (what a separate graph costs), and an ``If`` node that picks one path by a mode
input. The profiler column counts the kernels ORT executed for the light output. Ratios are
against the heavy output alone, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

N, DEPTH = 1024, 40


def _model(heavy: bool = True, light: bool = True, defaults: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, inputs, outputs = [], [], [], []
    if heavy:
        for i in range(DEPTH):
            inits.append(numpy_helper.from_array(rng.standard_normal((N, N), dtype=np.float32) / N**0.5, f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"]))
        nodes.append(helper.make_node("Identity", [f"h{DEPTH - 1}"], ["heavy"]))
        inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N]))
        outputs.append(helper.make_tensor_value_info("heavy", TensorProto.FLOAT, [1, N]))
        if defaults:  # an input that is also an initializer may be left unfed (IR >= 4)
            inits.append(numpy_helper.from_array(np.zeros((1, N), np.float32), "x"))
    if light:
        inits.append(numpy_helper.from_array(rng.standard_normal((8, 8), dtype=np.float32), "ws"))
        nodes.append(helper.make_node("MatMul", ["s", "ws"], ["light"]))
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 8]))
        outputs.append(helper.make_tensor_value_info("light", TensorProto.FLOAT, [1, 8]))
    graph = helper.make_graph(nodes, "paths", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _if_model() -> onnx.ModelProto:
    """``mode`` True -> the light path, False -> the heavy path, as the two branches of an ``If``."""
    full = _model()
    heavy_nodes = [n for n in full.graph.node if n.output[0] != "light"]
    out = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    light = helper.make_graph([helper.make_node("MatMul", ["s", "ws"], ["light"])], "light", [], [out("light")])
    heavy = helper.make_graph(heavy_nodes, "heavy", [], [out("heavy")])
    graph = helper.make_graph(
        [helper.make_node("If", ["mode"], ["out"], then_branch=light, else_branch=heavy)], "if",
        [*full.graph.input, helper.make_tensor_value_info("mode", TensorProto.BOOL, [])], [out("out")],
        list(full.graph.initializer))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _session(model: onnx.ModelProto, profile: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if profile:
        options.enable_profiling, options.profile_file_prefix = True, profile
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    import time

    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def _kernels_run(model: onnx.ModelProto, outputs: list[str], feeds: dict[str, np.ndarray]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(model, os.path.join(tmp, "profile"))
        session.run(outputs, feeds)
        with open(session.end_profiling()) as f:
            return sum(e.get("cat") == "Node" and e["name"].endswith("_kernel_time") for e in json.load(f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    x, s = rng.standard_normal((1, N), dtype=np.float32), rng.standard_normal((1, 8), dtype=np.float32)
    both, defaults, alone, branch = _session(_model()), _session(_model(defaults=True)), \
        _session(_model(heavy=False)), _session(_if_model())
    rows: list[tuple[str, float | None, str]] = []
    heavy_ms = _median_ms(lambda: both.run(["heavy"], {"x": x, "s": s}), args.runs)
    rows.append(("heavy output only", heavy_ms, ""))
    rows.append(("light output only (all inputs fed)", _median_ms(lambda: both.run(["light"], {"x": x, "s": s}), args.runs),
                 f"{_kernels_run(_model(), ['light'], {'x': x, 's': s})} kernels ran"))
    try:
        both.run(["light"], {"s": s})
        rows.append(("light output, heavy input unfed", None, "ran"))
    except Exception as e:  # noqa: BLE001  (ORT's own error type)
        rows.append(("light output, heavy input unfed", None, f"error: {str(e).splitlines()[0][:60]}"))
    rows.append(("light output, heavy input defaulted", _median_ms(lambda: defaults.run(["light"], {"s": s}), args.runs), ""))
    rows.append(("light path as its own graph", _median_ms(lambda: alone.run(None, {"s": s}), args.runs), ""))
    rows.append(("If(mode): light branch", _median_ms(lambda: branch.run(None, {"x": x, "s": s, "mode": np.array(True)}), args.runs),
                 f"output shape {branch.get_outputs()[0].shape}"))
    print(f"ONNX Runtime {ort.__version__}, heavy path: {DEPTH} MatMuls {N}x{N}; light path: one 8x8 MatMul")
    print(f"{'run':<40}{'p50 ms':>9}{'/ heavy':>9}  note")
    for name, ms, note in rows:
        cells = f"{ms:>9.3f}{ms / heavy_ms:>9.3f}" if ms is not None else f"{'-':>9}{'-':>9}"
        print(f"{name:<40}{cells}  {note}")


if __name__ == "__main__":
    main()
