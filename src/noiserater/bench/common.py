"""What the benchmarks share: the training step they time, clocks, peak memory, fresh processes, output.

- :class:`TrainingStep`: a training run's model, EMA, optimiser and selection policy, built and stepped by
  :func:`noiserater.train.train`'s own functions (``run.speed.make_adamw``, ``build_policy``,
  ``draw_step_randomness``, ``train_step``, ``apply_update``, ``ema_decay_at``; ``batch_indices`` and
  ``step_generator`` of :mod:`noiserater.run.randomness`), so every benchmark times the step ``train()``
  runs, fused AdamW included on CPU.
- Clocks: :func:`time_call` (wall-clock and process CPU seconds, synchronised on CUDA) and
  :func:`ratio_stats` (median, min and max of per-round ratios).
- Peak memory, one implementation of each measure:
  :func:`live_memory_probe` (the peak growth of live memory during a ``with`` block: glibc's in-use heap
  sampled after every aten op on CPU, ``torch.cuda.max_memory_allocated`` on CUDA),
  :func:`peak_rss_bytes` / :class:`PeakRssGrowth` (the resident set: ``VmHWM``, ``ru_maxrss`` off Linux).
- :func:`in_fresh_process`: call a function of the library in a fresh Python process (memory that one
  configuration freed but the allocator kept must not hide another's growth).
- :func:`machine_info` (from :mod:`noiserater.run.speed`) and :func:`write_result` (atomic JSON).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..checkpoint import write_json
from ..models import DiTSpec, build_dit_from_spec
from ..randomness import batch_indices, draw_step_randomness, step_generator
from ..run.distributed import resolve_device
from ..run.speed import machine_info, make_adamw, set_tf32
from ..run.step import StepResult, apply_update, train_step
from ..selection import SelectionPolicy
from ..train import TrainConfig, build_policy, ema_decay_at

try:
    import resource
except ImportError:  # Windows: no getrusage; peak RSS is then read from /proc only (and absent there)
    resource = None

__all__ = [
    "FreshProcessError", "PeakRssGrowth", "TrainingStep", "default_device", "heap_in_use", "in_fresh_process",
    "live_memory_probe", "machine_info", "peak_rss_bytes", "ratio_stats", "rss_bytes", "synchronize",
    "tensor_bytes", "time_call", "write_result",
]


def default_device(name: str | torch.device | None = None) -> torch.device:
    """``name``, or (None / ``"auto"``) CUDA when available, else CPU: :func:`~noiserater.run.distributed.resolve_device`
    (a CUDA device on a machine without one is a ConfigError naming --device)."""
    return resolve_device("auto" if name is None else str(name))


# ---- the training step --------------------------------------------------------------------------------


class TrainingStep:
    """The model, EMA, optimiser and selection policy of a :func:`noiserater.train.train` run with config
    ``tc`` on data of ``input_size`` x ``input_size`` x ``channels`` and ``num_classes`` classes, and its
    step: built and taken by train()'s own functions (see the module docstring).

    ``policy`` None: the run's policy from :func:`noiserater.train.build_policy` (vanilla, or a frozen
    rater file named by ``tc.rater``); a benchmark comparing policies passes each to :meth:`step`.
    """

    def __init__(self, tc: TrainConfig, input_size: int, channels: int, num_classes: int, device: torch.device,
                 policy: SelectionPolicy | None = None):
        self.tc, self.device = tc, torch.device(device)
        self.spec = DiTSpec(tc.model, input_size, channels, num_classes, tc.learn_sigma, 0.0)  # as train() builds it
        self.objective = tc.training_objective()
        torch.manual_seed(tc.seed)
        self.model = build_dit_from_spec(self.spec).to(self.device)
        self.model.grad_checkpointing = tc.grad_checkpointing
        if self.device.type == "cuda":
            set_tf32(tc.tf32)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = make_adamw(self.model.parameters(), tc.lr, tc.weight_decay, self.device)
        self.policy = policy if policy is not None else build_policy(tc, self.spec, self.device, self.model)
        self.fwd = torch.compile(self.model) if tc.compile else self.model
        self.model.train()
        self.step_index = 0
        self._configs = {tc.candidates: tc}

    def _config(self, k: int) -> TrainConfig:
        """The run's config with ``k`` candidates (what a run of that policy would draw)."""
        if k not in self._configs:
            self._configs[k] = dataclasses.replace(self.tc, candidates=k)
        return self._configs[k]

    def batch(self, images, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 on the device, labels [B] on the CPU) of this step's batch, indexed as train() indexes it."""
        idx = batch_indices(len(images), self.tc.batch_size, self.step_index, self.tc.seed)
        return images[idx].to(self.device, non_blocking=True), labels[idx]

    def step(self, x0: torch.Tensor, labels: torch.Tensor, policy: SelectionPolicy | None = None) -> StepResult:
        """One step on the batch: draw the step's randomness (timesteps, label dropout, k candidates), let
        the scorer refresh, :func:`~noiserater.train.train_step` (select, loss, backward, clip), then
        :func:`~noiserater.train.apply_update` (AdamW, EMA) when the step is finite."""
        policy = policy if policy is not None else self.policy
        tc, dev, step = self._config(policy.k), self.device, self.step_index
        t, y, cand = draw_step_randomness(tc, step, labels, self.spec.num_classes, tuple(x0.shape[1:]),
                                          self.objective)
        t, y, cand = t.to(dev), y.to(dev), cand.to(dev)
        policy.before_step(step)
        res = train_step(self.fwd, self.model, self.objective, policy, self.opt, x0, t, y, cand,
                         step_generator(tc.seed, step, stream=1), tc.grad_clip, tc.amp)
        if res.finite:
            apply_update(self.opt, self.model, self.ema, ema_decay_at(tc.ema_decay, step, tc.ema_warmup))
        self.step_index += 1
        return res

    def __call__(self, images, labels: torch.Tensor, policy: SelectionPolicy | None = None) -> StepResult:
        """:meth:`batch` then :meth:`step`: one iteration of train()'s loop, without its logging, sampling
        and checkpoints."""
        x0, y = self.batch(images, labels)
        return self.step(x0, y, policy)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- clocks -------------------------------------------------------------------------------------------


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[float, float]:
    """(wall-clock seconds, process CPU seconds) of ``fn()``, synchronising CUDA before and after. The CPU
    time is the steadier measure on a shared machine (time spent waiting for a core does not count)."""
    synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - w0, time.process_time() - c0


def ratio_stats(numerators: list[float], denominators: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-round ratios ``numerators[i] / denominators[i]``."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"ratio_stats needs two equally long non-empty lists, got {len(numerators)} and "
                         f"{len(denominators)}")
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return statistics.median(ratios), min(ratios), max(ratios)


# ---- peak memory --------------------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _load_mallinfo2():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc older than 2.33
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def heap_in_use() -> int | None:
    """Bytes of live heap allocations (glibc ``mallinfo2``: uordblks + hblkhd, tensors included), or None
    where glibc's mallinfo2 is unavailable."""
    if _MALLINFO2 is None:
        return None
    m = _MALLINFO2()
    return int(m.uordblks + m.hblkhd)


class _HeapPeak:
    """The peak of :func:`heap_in_use` during a ``with`` block, sampled after every aten op."""

    method = "peak growth of glibc's in-use heap (mallinfo2, sampled after every aten op)"
    available = _MALLINFO2 is not None

    def __enter__(self):
        if not self.available:
            raise RuntimeError("glibc mallinfo2 is not available here; CPU peak memory cannot be measured")
        probe = self

        class _Sample(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                probe.peak = max(probe.peak, heap_in_use())
                return out

        self.before = self.peak = heap_in_use()
        self._mode = _Sample()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self.peak = max(self.peak, heap_in_use())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.before)


class _CudaPeak:
    """``torch.cuda.max_memory_allocated`` during a ``with`` block, and the allocation before it."""

    method = "torch.cuda.max_memory_allocated growth"
    available = True

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        self.before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.before)


def live_memory_probe(device: torch.device | str):
    """A context manager measuring the peak growth of live memory during its block: ``.before``, ``.peak``,
    ``.growth`` (bytes) and ``.method`` (in words). CUDA: allocated device memory; CPU: glibc's in-use heap
    (``.available`` is False where glibc's mallinfo2 is missing, and entering raises)."""
    device = torch.device(device)
    return _CudaPeak(device) if device.type == "cuda" else _HeapPeak()


def _status_bytes(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """The current resident set size (``VmRSS``), or None off Linux."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process. Linux: ``VmHWM``, which belongs to the current address space
    and can be reset (:class:`PeakRssGrowth`); ``ru_maxrss`` of a freshly exec'd child still holds its
    parent's peak at fork. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB on other systems)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    if resource is None:
        raise RuntimeError("peak RSS: neither /proc/self/status nor getrusage is available here")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRssGrowth:
    """``.growth``: how far the peak resident set rose during a ``with`` block above the resident set at its
    start. On Linux the peak is reset on entry, so an earlier, higher peak does not hide the block's; where
    it cannot be reset the growth is that of the process's peak (0 while below an earlier peak)."""

    def __enter__(self):
        now = rss_bytes()
        self.reset = now is not None and _reset_peak_rss()
        self.base = now if self.reset else peak_rss_bytes()
        return self

    def __exit__(self, *exc):
        self.peak = peak_rss_bytes()
        self.growth = self.peak - self.base


# ---- fresh processes and output -----------------------------------------------------------------------


class FreshProcessError(RuntimeError):
    """A measurement in a fresh process failed; the message is the last line of its stderr."""


_CHILD = ("import importlib, json, sys; mod, fn = sys.argv[1].rsplit('.', 1); "
          "out = getattr(importlib.import_module(mod), fn)(**json.loads(sys.argv[2])); "
          "print('RESULT ' + json.dumps(out))")


def in_fresh_process(target: str, kwargs: dict, timeout: float, env: dict | None = None) -> dict:
    """``module.function(**kwargs)`` (JSON in, JSON out) run in a fresh Python process. Raises
    :class:`FreshProcessError` when it fails and ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, target, json.dumps(kwargs)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise FreshProcessError((proc.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(lines[-1][len("RESULT "):])


def write_result(path, result) -> None:
    """Write a benchmark's records as JSON (atomically; indented, keys sorted)."""
    write_json(path, result)
