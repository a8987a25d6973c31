"""The scaffold both training loops (``train``, ``metatrain``) run inside.

:func:`open_run` starts the process group, checks that the global batches split over the processes, locks
the run folder (main process), and on the way out releases the lock, removes a folder that bad input left
holding only its lock, and destroys a process group it started. Inside, a loop uses:

- :class:`StopFlag`: SIGINT/SIGTERM set a flag; the loop saves at the end of the step and returns;
- :meth:`Run.agree`: one all-reduce per step so every rank takes the same decision to apply the step and
  to stop (a signal may reach one rank only; a non-finite gradient may appear on one rank only);
- :class:`BadStepGuard`: counts non-finite steps in a row and stops the run with :class:`NumericsError`;
- :func:`check_finite_weights`: never overwrite a good checkpoint with NaN weights;
- :meth:`Run.should_save`: the save cadence.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError, RunLock, load_checkpoint, load_state_dict_checked, set_rng_state
from ..errors import NumericsError
from .distributed import close_distributed, init_distributed, require_divisible
from .folder import log_metrics, remove_if_only_lock


class StopFlag:
    """SIGINT/SIGTERM set ``stop`` (and ``signum``) instead of killing the process, while in the ``with``."""

    def __init__(self):
        self.stop = False
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopFlag":
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.stop = True
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class Run:
    """One process's view of a run: its folder, rank, number of processes and device."""

    run_dir: Path
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, rec: dict) -> None:
        """Append ``rec`` to metrics.jsonl (main process only)."""
        log_metrics(self.run_dir, self.is_main, rec)

    def agree(self, apply: bool | torch.Tensor, stop: bool) -> tuple[bool, bool]:
        """(all ranks apply this step, any rank stops): one MIN all-reduce over [apply, not stop]."""
        if self.world == 1:
            return bool(apply), bool(stop)
        f = torch.tensor([float(bool(apply)), 0.0 if stop else 1.0], device=self.device)
        dist.all_reduce(f, op=dist.ReduceOp.MIN)
        return bool(f[0] > 0), bool(f[1] == 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @staticmethod
    def should_save(step: int, total: int, every: int, stop: bool) -> bool:
        """Save after step ``step`` (steps done): on the cadence, at the end, or when stopping."""
        return step % every == 0 or step >= total or stop


@contextmanager
def open_run(run_dir: str | Path, device: str, batch_sizes: dict[str, int]) -> Iterator[Run]:
    """Start (and finally clean up) a run; ``batch_sizes`` (config key -> global size) must divide by the
    number of processes. See the module docstring."""
    rank, world, dev = init_distributed(device)
    try:
        require_divisible(batch_sizes, world)
        run = Run(Path(run_dir), rank, world, dev)
        created = not run.run_dir.exists()
        lock = RunLock(run.run_dir).acquire() if run.is_main else None
        try:
            yield run
        except BaseException:
            if lock is not None and created:  # bad input found before anything was written: leave no folder
                remove_if_only_lock(run.run_dir)
            raise
        finally:
            if lock is not None:
                lock.release()
    finally:
        close_distributed()


def resume_from(ckpt_path: Path, kind: str, spec: dict, module: torch.nn.Module, key: str,
                opt: torch.optim.Optimizer, what: str) -> dict:
    """Load a run's last checkpoint (``kind`` "diffusion" or "rater") into ``module`` (from ``state[key]``),
    ``opt`` and the RNGs, after checking it was written for the same ``spec``; returns the whole state for
    the loop's own keys (step, EMA, selection state, ...)."""
    state = load_checkpoint(ckpt_path, kind=kind)
    if state.get("spec") != spec:
        raise CheckpointError(f"{ckpt_path} was trained with {what} {state.get('spec')}, this config builds {spec}; "
                              "use another --run-dir")
    load_state_dict_checked(module, state[key], str(ckpt_path))
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state


class BadStepGuard:
    """Non-finite steps in a row: ``bad()`` counts one (and raises :class:`NumericsError` at ``limit``),
    ``good()`` resets. ``what`` names what was non-finite, ``fix`` what to change; the count is saved in
    checkpoints that resume mid-streak."""

    def __init__(self, limit: int, what: str, fix: str, unit: str = "steps", in_row: int = 0):
        self.limit, self.what, self.fix, self.unit, self.in_row = limit, what, fix, unit, in_row

    def good(self) -> None:
        self.in_row = 0

    def bad(self, step: int, ckpt_path: Path, detail: str = "") -> None:
        self.in_row += 1
        if self.in_row >= self.limit:
            saved = f"the last good checkpoint is {ckpt_path}; " if ckpt_path.exists() else "no checkpoint was written; "
            raise NumericsError(f"non-finite {self.what} for {self.in_row} {self.unit} in a row, last at step {step}"
                                f"{detail}; {saved}{self.fix}")


def check_finite_weights(step: int, ckpt_path: Path, fix: str, *modules: torch.nn.Module) -> None:
    """Raise NumericsError (call it before saving) if any weight of ``modules`` is NaN/inf: the update
    overflowed although the loss and gradient were finite."""
    for m in modules:
        for name, p in m.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise NumericsError(f"weight {name} became non-finite by step {step}; not saving, the last good "
                                    f"checkpoint {ckpt_path} is untouched; {fix}")
