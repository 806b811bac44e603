"""ONNX export of trained policies, and running exported policies (ONNX Runtime, TensorRT, torch).

* :func:`export_policy` (``robopolicy export``): checkpoint -> ``policy.onnx`` + ``manifest.json``
  (+ ``checkpoint/`` copy, + ``tensorrt/`` engine cache), parity-checked and timed.
* :func:`load_policy` (``robopolicy eval --model``, the ROS node): an export folder ->
  :class:`ExportedPolicy` with ``spec``, ``manifest``, ``source_env`` and ``predict_chunk``;
  for a residual-RL fine-tuning an :class:`ExportedResidualPolicy`, which adds the per-step
  ``correct_action``.

``export_policy`` is imported on first use: loading and running an export needs neither
torch nor onnxscript (unless ``backend="torch"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from robopolicy.export.errors import (
    ExportError, ModelFileError, NonFiniteActionError, ObservationError, TensorRTUnavailableError,
)
from robopolicy.export.exported_policy import ExportedPolicy, ExportedResidualPolicy, load_policy
from robopolicy.inference import BACKENDS

if TYPE_CHECKING:
    from robopolicy.export.onnx_export import ExportReport, export_policy

__all__ = [
    "BACKENDS", "ExportError", "ExportReport", "ExportedPolicy", "ExportedResidualPolicy", "ModelFileError",
    "NonFiniteActionError", "ObservationError",
    "TensorRTUnavailableError", "export_policy", "load_policy",
]


def __getattr__(name: str) -> Any:
    if name in ("export_policy", "ExportReport"):
        from robopolicy.export import onnx_export

        return getattr(onnx_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
