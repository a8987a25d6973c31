"""Where evaluation keeps what it computes once: the cache folder and the file names of data sources in it.

The cache folder (:func:`cache_dir`) is ``$NOISERATER_CACHE`` or ``~/.cache/noiserater`` unless given; it
holds the dataset classifiers (``classifiers/``) and the reference statistics (``ref/``), whose file names
start with :func:`source_slug` of the data source.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..data.datasets import NAMED_SOURCES, parse_source


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``path``, else ``$NOISERATER_CACHE``, else ``~/.cache/noiserater``."""
    return Path(path or os.environ.get("NOISERATER_CACHE") or Path.home() / ".cache" / "noiserater")


def source_slug(source: str) -> str:
    """A data source as a file name: a named dataset as it is, a folder as its name and a hash of its path."""
    if parse_source(source)[0] in NAMED_SOURCES:
        return source  # a named dataset (NAME@RES too: '@' is safe in file names)
    p = Path(source).resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", p.name)[:40] or "data"
    return f"{name}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"
