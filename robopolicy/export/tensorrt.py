"""TensorRT through ONNX Runtime's TensorRT execution provider, with an on-disk engine cache.

The engine is built at export time (``robopolicy export --tensorrt``) by running the graph
once through the provider, which serializes the engine (and a timing cache) into the export
folder's ``tensorrt/``; ``load_policy(..., backend="tensorrt")`` opens a session with the
same options and loads the cached engine instead of rebuilding it. An engine is specific to
the GPU model and the TensorRT version it was built with: build it on the target machine.
Needs ``onnxruntime-gpu`` with the TensorRT libraries on the library path and a CUDA GPU
(see export/README.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from robopolicy.export.errors import TensorRTUnavailableError

PROVIDER = "TensorrtExecutionProvider"


def unavailable_reason() -> str | None:
    """Why TensorRT cannot be used here, or None if a CUDA GPU and ONNX Runtime's TensorRT provider exist."""
    import onnxruntime as ort
    import torch

    problems = []
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU")
    providers = ort.get_available_providers()
    if PROVIDER not in providers:
        problems.append(f"onnxruntime {ort.__version__} has no {PROVIDER} (it has: {', '.join(providers)})")
    return "; ".join(problems) or None


def require(what: str, instead: str) -> None:
    """Raise :class:`TensorRTUnavailableError` (one line) unless TensorRT can run here.

    ``what`` needs TensorRT; ``instead`` is what the user can do on this machine.
    """
    reason = unavailable_reason()
    if reason:
        raise TensorRTUnavailableError(
            f"{what} needs TensorRT, which is not available on this machine ({reason}); {instead}, or run it "
            "on a CUDA machine with onnxruntime-gpu and TensorRT (export/README.md)"
        )


def providers(cache_dir: Path, fp16: bool) -> list[Any]:
    """ONNX Runtime providers: TensorRT with its engine cache in ``cache_dir``, then CUDA, then CPU."""
    options = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_fp16_enable": str(bool(fp16)),
        "trt_builder_optimization_level": "3",
    }
    return [(PROVIDER, options), "CUDAExecutionProvider", "CPUExecutionProvider"]


def build_engine(model: Path, cache_dir: Path, fp16: bool, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Build and cache the engine for ``model`` by running it once (after :func:`require`); returns what
    the manifest records."""
    import onnxruntime as ort

    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    session = ort.InferenceSession(str(model), providers=providers(cache_dir, fp16))
    if session.get_providers()[0] != PROVIDER:
        raise TensorRTUnavailableError(f"ONNX Runtime did not place the graph on TensorRT (providers: {session.get_providers()})")
    session.run(None, feeds)
    engines = sorted(p.name for p in cache_dir.iterdir() if p.suffix == ".engine")
    if not engines:
        raise TensorRTUnavailableError(f"TensorRT ran but wrote no engine into {cache_dir}")
    return {"cache_dir": cache_dir.name, "engines": engines, "fp16": fp16, "build_s": round(time.perf_counter() - start, 1)}
