"""One way to open a model path for the robot: an export folder or a training run.

* an export folder (``manifest.json`` present) -> ``robopolicy.export.load_policy`` with
  the chosen backend (ONNX Runtime, TensorRT or torch);
* a training or fine-tuning run, or a checkpoint folder -> :class:`TorchChunkPredictor`
  around the torch policy.

Either way the result is a :class:`~robopolicy.inference.ChunkPredictor`
(``spec``, ``predict_chunk``, and ``correct_action`` for a residual-RL policy).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from robopolicy.errors import RobopolicyError

if TYPE_CHECKING:
    from robopolicy.inference import ChunkPredictor

MANIFEST = "manifest.json"


def load_predictor(path: str | Path, backend: str = "onnxruntime", threads: int = 1) -> "ChunkPredictor":
    """Open ``path`` (export folder or training run / checkpoint) as a chunk predictor."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise RobopolicyError(f"model path {folder} does not exist")
    if (folder / MANIFEST).is_file() or folder.name == MANIFEST:
        from robopolicy.export import load_policy

        return load_policy(folder, backend=backend, threads=threads)
    import torch

    from robopolicy.rl.policy import load_trained_policy
    from robopolicy.inference import TorchChunkPredictor

    torch.set_num_threads(threads)
    return TorchChunkPredictor(load_trained_policy(folder))
