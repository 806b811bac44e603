"""Errors of the export stage; all are :class:`~robopolicy.errors.RobopolicyError` (one-line CLI errors)."""

from robopolicy.errors import RobopolicyError, SpecMismatchError


class ExportError(RobopolicyError):
    """The policy could not be exported (unsupported, parity check failed, output path in the way)."""


class TensorRTUnavailableError(ExportError):
    """TensorRT was asked for on a machine without a CUDA GPU or without TensorRT."""


class ModelFileError(RobopolicyError):
    """An exported model folder is missing, truncated, modified, or its manifest disagrees with its graph."""


class ObservationError(SpecMismatchError):
    """An observation given to an exported policy is missing, has a wrong shape or dtype, or is not finite."""


class NonFiniteActionError(RobopolicyError):
    """An exported policy's graph (or its checkpoint copy, on the torch backend) produced a NaN / inf action
    from a finite observation; the action is never returned."""
