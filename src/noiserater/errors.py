"""The exception types that mean "the user's input is wrong": the CLI prints them as one line ``error: ...``
on stderr and exits with code 2 (as click does for a bad option). Every other exception is a bug: it keeps
its traceback and the exit code is 1. Library code signals bad input with these classes (a ConfigError
names the key / flag, a DatasetError or CheckpointError the file), never with a bare ValueError."""

from __future__ import annotations

from .checkpoint import CheckpointError, RunDirError
from .config import ConfigError
from .data.datasets import DatasetError


class NumericsError(RuntimeError):
    """Too many non-finite losses/gradients in a row, or weights that became non-finite; the message names
    the step and what to change."""


# DiskFullError is a RunDirError, LatentCacheError a DatasetError
USER_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, RunDirError, ConfigError, DatasetError, NumericsError)


def one_line(message: object) -> str:
    """``message`` on one line (newlines and runs of spaces collapsed)."""
    return " ".join(str(message).split())
