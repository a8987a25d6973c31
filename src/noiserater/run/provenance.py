"""What produced a result: the noiserater version, the git commit of its source tree and the torch version.

``version_info()`` is the one record for run folders, study stages and reports, so that a number can be traced
to the code that made it. Cheap (torch's version comes from the loaded module or the installed package's
metadata, never from importing torch; git runs once per process) and never fails: a field that cannot be
determined is ``None``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .. import __version__

__all__ = ["git_commit", "version_info", "version_line"]


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit (40 hex digits) checked out in the git work tree holding ``path`` (default: this package's
    source), with ``+dirty`` appended when tracked files differ from it; ``None`` when it is not a git checkout
    (an installed wheel, also one inside another repository's work tree) or git is not available."""
    where = Path(path) if path is not None else _package_dir()
    try:
        if path is None:  # an installed copy inside some other work tree (a venv in a repo) is not that repo's code
            tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=where,
                                     capture_output=True, text=True, timeout=10)
            if tracked.returncode != 0:
                return None
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        commit = sha.stdout.strip()
        if len(commit) != 40:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_info() -> dict[str, Any]:
    """``{"noiserater": "0.1.0", "git_commit": "<sha>[+dirty]" or None, "torch": "2.13.0" or None}``: a
    JSON-serialisable record of the code that produced a result."""
    torch_mod = sys.modules.get("torch")
    torch_version = getattr(torch_mod, "__version__", None) if torch_mod is not None else _dist_version("torch")
    return {"noiserater": __version__, "git_commit": git_commit(), "torch": None if torch_version is None else str(torch_version)}


def version_line(info: dict[str, Any] | None = None) -> str:
    """One human-readable line, e.g. ``noiserater 0.1.0 (git 1a2b3c4d5e6f), torch 2.13.0``."""
    info = version_info() if info is None else info
    commit = info.get("git_commit")
    git = f" (git {commit[:12]}{'+dirty' if commit.endswith('+dirty') else ''})" if commit else ""
    return f"noiserater {info.get('noiserater')}{git}, torch {info.get('torch') or 'unknown'}"
