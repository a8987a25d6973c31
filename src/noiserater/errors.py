"""The exception types that mean "the user's input is wrong" (printed as one line by the CLI)."""

from __future__ import annotations

from .checkpoint import CheckpointError, RunDirError
from .config import ConfigError
from .data.datasets import DatasetError


def _user_errors() -> tuple[type[BaseException], ...]:
    from .train import NumericsError

    return (CheckpointError, RunDirError, ConfigError, DatasetError, NumericsError, ValueError, FileNotFoundError)


USER_ERRORS = _user_errors()
