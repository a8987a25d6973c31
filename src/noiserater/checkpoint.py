"""Checkpoints and run folders: atomic writes, safe loading, format versions, a writer lock.

A checkpoint is a ``torch.save`` of plain containers of tensors, numbers and strings, loaded with
``weights_only=True`` so a shared file can never run code. It always carries ``format`` (the string
``"noiserater"``), ``format_version`` and ``kind`` (``"diffusion"`` or ``"rater"``).

Since format version 2 it also carries ``sha256``: :func:`content_sha256` of everything else in the file
(a canonical walk of keys, plain values and every tensor's dtype, shape and raw bytes). Loading recomputes
it, so a damaged file (a flipped bit in a weight, a key, a number) is refused instead of loading changed
values. Version-1 files (no hash) still load, with a one-line warning.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

FORMAT = "noiserater"
FORMAT_VERSION = 2  # 2: with a content hash; 1: without (still read, with a warning)
READABLE_VERSIONS = (1, 2)
HASH_KEY = "sha256"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, foreign, of another version or for another model."""


class RunDirError(RuntimeError):
    """A run folder cannot be used (another run is in it, or another process writes to it)."""


class DiskFullError(RunDirError):
    """No space (or quota) left while writing a file; the previous version of the file is intact."""


class UnverifiedFileWarning(UserWarning):
    """A file from an older noiserater has no content hash: damage to it cannot be detected."""


# ---- content hashes --------------------------------------------------------------------------------------


def content_sha256(obj: Any) -> str:
    """Hex sha256 of a canonical walk of ``obj``: dict keys in order, plain values with their types, and
    every tensor's class, dtype, shape, requires_grad and raw bytes. Two objects with the same hash load
    as the same values; any changed bit of a weight, key, number or string changes it."""
    h = hashlib.sha256()
    _hash_into(h, obj)
    return h.hexdigest()


def _hash_into(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{type(obj).__name__}|{t.dtype}|{tuple(t.shape)}|{int(obj.requires_grad)}|{t.layout};".encode())
        flat = t.cpu().reshape(-1).contiguous()
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype.str}|{a.shape};".encode())
        h.update(a.reshape(-1).view(np.uint8) if a.size and a.dtype.kind != "O" else repr(a.tolist()).encode())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _hash_into(h, k)
            _hash_into(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for v in obj:
            _hash_into(h, v)
    elif isinstance(obj, (str, bytes, bytearray)):
        b = obj.encode("utf-8", "surrogatepass") if isinstance(obj, str) else bytes(obj)
        h.update(f"{'S' if isinstance(obj, str) else 'B'}{len(b)}:".encode())
        h.update(b)
    elif obj is None or isinstance(obj, (bool, int)):
        h.update(f"{type(obj).__name__[0]}{obj!r};".encode())
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()};".encode())
    else:  # torch.dtype, torch.device, numpy scalars, complex, ...: their type and repr
        h.update(f"O{type(obj).__module__}.{type(obj).__qualname__}:{obj!r};".encode())


WEIGHT_KEYS = ("model", "ema", "rater")


def weights_fingerprint(path: str | os.PathLike) -> str:
    """:func:`content_sha256` of a checkpoint's weights only (``model``, ``ema``, ``rater``: whichever it
    has), so a checkpoint rebuilt elsewhere (another folder, another wall time) matches the original exactly
    when, and only when, its weights are bit for bit the same."""
    state = load_checkpoint(path)
    return content_sha256({key: state[key] for key in WEIGHT_KEYS if key in state})


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks): provenance of checkpoints and weights files."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + fsync + rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"no space left on the device while writing {path} ({len(data)} bytes); the previous {path.name} "
                "(if any) is intact and no temp file was left; free some space and run again (--resume continues a run)"
            ) from None
        raise


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files that :func:`atomic_write_bytes` left in ``folder`` when its process was killed
    mid-write (SIGKILL, power loss). Only call this while holding the folder's :class:`RunLock`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for f in folder.iterdir():
        if f.is_file() and re.fullmatch(r"\..+\.[A-Za-z0-9_]{8}\.tmp", f.name):
            try:
                f.unlink()
                removed.append(f)
            except FileNotFoundError:
                pass
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], kind: str) -> None:
    """Atomically save ``state`` (plain containers of tensors/numbers/strings) with format metadata and
    the content hash that :func:`load_checkpoint` verifies."""
    reserved = ("format", "format_version", "kind", HASH_KEY)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
               **{k: v for k, v in state.items() if k not in reserved}}
    payload[HASH_KEY] = content_sha256(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def _torch_error_reason(e: Exception) -> str:
    """The informative line of a torch.load error (its first lines are generic advice)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    return lines[0][:200] if lines else type(e).__name__


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint", allowed_globals: tuple = ()) -> Any:
    """``torch.load(weights_only=True)`` on CPU with one-line errors. A file whose unpickling would import
    and call a Python object (code execution) is refused naming that object; nothing in it is run."""
    try:
        if allowed_globals:
            with torch.serialization.safe_globals(list(allowed_globals)):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except Exception as e:  # pickle errors, truncated or foreign files, code-carrying pickles
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError:
            magic = b""
        if magic and not magic.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or a legacy pickle
            raise CheckpointError(f"could not read {what} {path} (truncated or corrupt?): it is not a torch.save file "
                                  f"(zip or pickle); it starts with {magic!r}") from None
        glob = re.search(r"GLOBAL ([\w.]+)", str(e))
        if glob:
            raise CheckpointError(
                f"refusing to load {path}: it contains objects that would run code when unpickled "
                f"(it asks for {glob.group(1)}); a {what} holds only tensors, numbers and strings"
            ) from None
        raise CheckpointError(f"could not read {what} {path} (truncated or corrupt?): {_torch_error_reason(e)}") from None


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint without executing code; check format, version, content hash and (optionally) kind.
    The hash is removed from the returned dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = safe_torch_load(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a noiserater checkpoint (no 'format' marker); "
            "for a facebookresearch/DiT file use noiserater.models.load_reference_dit"
        )
    version = state.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}, this noiserater reads versions "
            f"{READABLE_VERSIONS[0]}-{READABLE_VERSIONS[-1]}; use the noiserater release that wrote it"
        )
    verify_content_hash(state, path, "checkpoint", legacy=version < 2)
    if kind is not None and state.get("kind") != kind:
        raise CheckpointError(f"{path} is a {state.get('kind')!r} checkpoint, expected a {kind!r} checkpoint")
    return state


def verify_content_hash(state: dict, path: str | os.PathLike, what: str, legacy: bool) -> None:
    """Pop ``state[HASH_KEY]`` and check it against :func:`content_sha256` of the rest: a one-line
    :class:`CheckpointError` naming ``path`` when they differ. Without a hash a ``legacy`` file loads with
    a one-line warning; a current one is refused (its hash or the key itself was damaged)."""
    stored = state.pop(HASH_KEY, None)
    if stored is None:
        if not legacy:
            raise CheckpointError(f"{what} {path} is damaged: it has no content hash ('{HASH_KEY}'), which every "
                                  "file of its format version carries; use an intact copy")
        warnings.warn(f"{what} {path} has no content hash (written by an older noiserater): damage to it cannot be "
                      "detected; save it again to add one", UnverifiedFileWarning, stacklevel=3)
        return
    if not isinstance(stored, str) or content_sha256(state) != stored:
        raise CheckpointError(f"{what} {path} is corrupt: its content does not match the sha256 recorded in it "
                              "(a damaged copy or disk); use an intact copy")


def load_state_dict_checked(module: torch.nn.Module, state_dict: dict, what: str) -> None:
    """``load_state_dict`` with a one-line error naming the first mismatching key and shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        detail = []
        if shapes:
            k = shapes[0]
            detail.append(f"{k} has shape {tuple(state_dict[k].shape)} in the file, {tuple(own[k].shape)} in the model")
        if missing:
            detail.append(f"missing {missing[:3]}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:3]}")
        raise CheckpointError(f"{what} does not match the model config: {'; '.join(detail)}")
    module.load_state_dict(state_dict)


# ---- RNG state: every generator a run uses, as plain data (weights_only-safe) -------------------------


def get_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": _py_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate(_plain_to_py_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_plain(s):
    return [s[0], list(s[1]), s[2]]


def _plain_to_py_state(s):
    return (s[0], tuple(s[1]), s[2])


# ---- run folders ------------------------------------------------------------------------------------


class RunLock:
    """Exclusive advisory lock on ``<run>/.lock`` (fcntl); a second writer gets :class:`RunDirError`."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunDirError(
                f"run folder {self.path.parent} is locked by another process; wait for it to finish or use another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        for sub in ("", "checkpoints", "samples"):  # no other writer now: clear what a killed one left
            remove_stale_temp_files(self.path.parent / sub)
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# Config keys that may change between a run and its resumption (how long / how often, not what).
RESUMABLE_KEYS = ("resume", "steps", "outer_steps", "run_dir", "log_every", "sample_every", "ckpt_every", "progress",
                  "tensorboard", "device")


def check_run_config(run_dir: str | os.PathLike, config: dict, resume: bool, legacy: dict | None = None,
                     renamed: dict[str, dict] | None = None) -> None:
    """Refuse to mix runs: a folder whose checkpoints come from a different config, or any folder with
    checkpoints without --resume. A folder without checkpoints (a run that failed early) may be reused.
    ``legacy`` gives, for config keys added in later releases, the value that reproduces what a run
    written before the key existed did: such a run resumes when the new config asks for exactly that.
    ``renamed`` maps a key to {old value: new value} for values renamed since (``{"policy": {"nearest":
    "knn"}}``): the folder's old value compares as its new name."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not (ckpt_dir.is_dir() and any(ckpt_dir.iterdir())):
        return  # no run yet, or one that stopped before its first checkpoint: nothing to protect
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise RunDirError(f"run folder {run_dir} holds checkpoints but no config.yaml; use another --run-dir")
    try:
        old = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise RunDirError(f"{path} is not valid YAML; this folder holds a damaged run, use another --run-dir") from None
    if not isinstance(old, dict):
        raise RunDirError(f"{path} is damaged; use another --run-dir")
    ignore = set(RESUMABLE_KEYS)
    legacy = legacy or {}
    old = {**{k: v for k, v in legacy.items() if k not in old}, **old}
    for key, names in (renamed or {}).items():
        if isinstance(old.get(key), str) and old[key] in names:
            old[key] = names[old[key]]
    diff = sorted(k for k in set(old) | set(config) if k not in ignore and old.get(k) != config.get(k))
    if diff:
        k = diff[0]
        raise RunDirError(
            f"run folder {run_dir} already holds a different run ({k}: {old.get(k)!r} there, {config.get(k)!r} now); "
            "use another --run-dir"
        )
    if not resume:
        raise RunDirError(f"run folder {run_dir} already holds checkpoints; pass --resume to continue it or use another --run-dir")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
