"""A run folder's log, ``metrics.jsonl``: one strict-JSON record a line, appended by the main process.

Records carry ``step`` (steps done); events (``"event": ...``) and evaluations (``"eval": {...}``) too.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

from ..checkpoint import atomic_write_text

METRICS = "metrics.jsonl"


def log_metrics(run_dir: Path, is_main: bool, rec: dict) -> None:
    """Append one record to run_dir/metrics.jsonl (main process only); NaN/inf are written as null."""
    if not is_main:
        return
    rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics.jsonl (a missing file: none); lines cut by a crash are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def eval_records(path: str | Path) -> list[dict]:
    """The held-out evaluation records (``{"step", "eval": {...}}``) of a metrics.jsonl, in order."""
    return [r for r in read_metrics(path) if isinstance(r.get("eval"), dict)]


def truncate_metrics(path: Path, step: int, events_count_done: bool = False) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again); a fresh start
    (step 0) drops them all. Records carry the number of steps done; events the index of their step
    (``train``) or, with ``events_count_done``, the number of steps done like records (``metatrain``)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        s = rec.get("step", 0) if isinstance(rec, dict) else None
        done = isinstance(s, int) and (s < step or (s == step and (events_count_done or "event" not in rec)))
        if step > 0 and done:
            keep.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def remove_if_only_lock(run_dir: Path) -> None:
    """Delete a run folder if it holds nothing but the lock file (and empty folders): what bad input found
    before anything was written leaves behind."""
    files = [p for p in Path(run_dir).rglob("*") if p.is_file() and p.name != ".lock"]
    if not files:
        shutil.rmtree(run_dir, ignore_errors=True)


def tensorboard_writer(run_dir: Path, step: int):
    """A TensorBoard writer for run_dir/tb, or None (with a warning) when the optional [tb] extra is missing."""
    try:  # lazy: tensorboard is optional; metrics.jsonl has the same numbers without it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: tensorboard is not installed (pip install 'noiserater[tb]'): no TensorBoard events, "
              "metrics.jsonl is still written", file=sys.stderr)
        return None
    return SummaryWriter(str(run_dir / "tb"), purge_step=step)
