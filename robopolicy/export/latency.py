"""Latency percentiles and this CPU's ceilings (peak GFLOP/s, weight-streaming GB/s), measured in-process.

The ceilings give the lower bounds printed beside a measured chunk latency:
``FLOPs / peak`` (arithmetic) and ``weight bytes read per chunk / streaming bandwidth``.
A batch-1 U-Net step reads every weight once and uses it for only ``T`` (4..16)
multiply-adds, so the second bound is the one that binds on a CPU. Ceilings are best-of-N
(what the hardware can do), measured once per process; latencies are percentiles (what a
caller sees).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from robopolicy.stats import percentiles


@dataclass
class Latency:
    """Wall-clock percentiles of repeated calls, in milliseconds."""

    p50_ms: float
    p99_ms: float
    min_ms: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (then restore the count).

    Torch eager is timed on as many threads as ONNX Runtime, for a like-for-like ratio. It
    also keeps the figure meaningful: on this 2-core VM with another process busy, the VLA's
    chunk took 50 ms on one torch thread and 210 ms on two, in the same process.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure(fn: Callable[[], object], runs: int, warmup: int = 5) -> Latency:
    """Call ``fn`` ``warmup`` times, then time ``runs`` calls."""
    for _ in range(warmup):
        fn()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    times *= 1e3
    return Latency(*percentiles(times), float(times.min()), runs)


def _matmul_chain(m: int, k: int, n: int, count: int, threads: int) -> tuple[Callable[[], object], np.ndarray]:
    """An ONNX Runtime session of ``count`` chained ``[m, k] @ [k, n]`` MatMuls with distinct weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((k, n), dtype=np.float32) / k**0.5 for _ in range(count)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"y{i - 1}", f"w{i}"], [f"y{i}"]) for i in range(count)]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info(f"y{count - 1}", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((m, k), dtype=np.float32)
    return (lambda: session.run(None, {"x": x})), np.array([w.nbytes for w in weights])


@functools.cache
def cpu_peak_gflops(threads: int = 1) -> float:
    """fp32 GFLOP/s of a 1024^3 MatMul in ONNX Runtime (MLAS) with ``threads`` threads (best of 30)."""
    run, _ = _matmul_chain(1024, 1024, 1024, 1, threads)
    return 2 * 1024**3 / (measure(run, runs=30, warmup=3).min_ms / 1e3) / 1e9


@functools.cache
def weight_stream_gbps(threads: int = 1) -> float:
    """GB/s at which batch-4 MatMuls stream 32 MB of distinct fp32 weights (beyond L2; best of 30)."""
    run, sizes = _matmul_chain(4, 1024, 1024, 8, threads)
    return float(sizes.sum()) / (measure(run, runs=30, warmup=3).min_ms / 1e3) / 1e9
