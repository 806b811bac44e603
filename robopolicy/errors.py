"""User-facing errors: the CLI prints these as one or two lines, without a traceback."""


class RobopolicyError(Exception):
    """Base class for errors caused by bad input (paths, names, options, data)."""


class SpecMismatchError(RobopolicyError):
    """Two stages disagree about the feature spec; the message names both sides."""


class InstructionError(SpecMismatchError):
    """A language instruction is empty or not one the policy was trained on."""


class DatasetError(RobopolicyError):
    """A dataset path is missing, empty, corrupt or has unexpected features."""


class CheckpointError(RobopolicyError):
    """A checkpoint is missing, truncated, corrupt or of another policy type."""


class UnknownNameError(RobopolicyError):
    """An env / policy / backend name is not registered."""

    def __init__(self, kind: str, name: str, known: list[str]):
        super().__init__(f"unknown {kind} {name!r}; expected one of: {', '.join(sorted(known))}")
