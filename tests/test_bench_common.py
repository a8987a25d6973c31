"""noiserater.bench.common: the benchmarks time the step train() takes, and measure memory one way each."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noiserater.bench import common
from noiserater.bench.common import (
    FreshProcessError,
    PeakRssGrowth,
    TrainingStep,
    in_fresh_process,
    live_memory_probe,
    ratio_stats,
)
from noiserater.checkpoint import load_checkpoint
from noiserater.train import TrainConfig, load_splits, train


def test_training_step_is_the_step_train_takes(tmp_path):
    """Three steps of TrainingStep on the run's own data leave exactly the weights, EMA and losses that
    three steps of train() leave (same init, batches, randomness, clipping, fused AdamW and EMA warmup)."""
    tc = TrainConfig(data="digits", model="DiT-N/2", run_dir=str(tmp_path / "run"), steps=3, batch_size=16,
                     lr=1e-3, log_every=1, sample_every=1000, ckpt_every=1000, sample_steps=2, tensorboard=False,
                     progress=False, device="cpu")
    train(tc)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt", kind="diffusion")
    logged = [json.loads(s)["loss"] for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(s)]

    data = load_splits(tc, "train")
    runner = TrainingStep(tc, data.image_size, data.channels, data.num_classes, torch.device("cpu"))
    assert runner.opt.defaults["fused"] is True  # make_adamw's fused kernel, on CPU too
    losses = [float(runner(data.images, data.labels).loss) for _ in range(3)]
    assert losses == pytest.approx(logged, rel=0, abs=0)
    for name, got in (("model", runner.model.state_dict()), ("ema", runner.ema.state_dict())):
        assert got.keys() == state[name].keys()
        for k, v in got.items():
            assert torch.equal(v, state[name][k]), (name, k)
    # and the steps moved the weights (the comparison above is not between two untouched models)
    torch.manual_seed(tc.seed)
    fresh = TrainingStep(tc, data.image_size, data.channels, data.num_classes, torch.device("cpu"))
    assert any(not torch.equal(a, b) for a, b in zip(fresh.model.parameters(), runner.model.parameters()))


def test_ratio_stats():
    assert ratio_stats([2.0, 3.0, 8.0], [1.0, 1.0, 2.0]) == (3.0, 2.0, 4.0)
    with pytest.raises(ValueError):
        ratio_stats([1.0], [1.0, 2.0])


def test_live_heap_probe_sees_a_known_allocation():
    probe = live_memory_probe("cpu")
    if not probe.available:
        pytest.skip("glibc mallinfo2 is not available here")
    n = 16 * 2**20  # 64 MiB of float32, freed before the block ends: only a peak can show it
    with probe:
        x = torch.ones(n)
        del x
    assert 64 * 2**20 <= probe.growth < 80 * 2**20
    assert probe.peak >= probe.before + 64 * 2**20


def _touch_fresh_pages(n_bytes: int) -> None:
    """Make ``n_bytes`` of never-used pages resident, then unmap them. An anonymous mmap, not a tensor: malloc
    may serve a tensor from heap pages an earlier test left resident, which raise no peak (CI saw growth 0)."""
    with mmap.mmap(-1, n_bytes) as m:
        for i in range(0, n_bytes, mmap.PAGESIZE):
            m[i] = 1


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmRSS/VmHWM are Linux's")
def test_peak_rss_growth_sees_touched_pages_and_resets_an_earlier_peak():
    _touch_fresh_pages(128 * 2**20)  # an earlier, higher peak, then released
    with PeakRssGrowth() as small:
        _touch_fresh_pages(32 * 2**20)
    assert small.reset
    assert 30 * 2**20 <= small.growth < 100 * 2**20  # the earlier 128 MiB peak does not hide it


def test_in_fresh_process_returns_and_fails_clearly():
    rss = in_fresh_process("noiserater.bench.common.rss_bytes", {}, timeout=120)
    if Path("/proc/self/status").exists():
        assert isinstance(rss, int) and rss > 10 * 2**20
    with pytest.raises(FreshProcessError, match="AttributeError"):
        in_fresh_process("noiserater.bench.common.no_such_function", {}, timeout=120)


def test_the_library_does_not_import_the_cli():
    code = ("import sys, noiserater.bench.common, noiserater.bench.train, noiserater.bench.selection, "
            "noiserater.bench.metagrad, noiserater.bench.loader; "
            "print([m for m in sys.modules if m.startswith('noiserater.commands')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_timing_is_one_clock(monkeypatch):
    """time_call reads the module's clock once before and once after the call."""
    class Clock:
        def __init__(self):
            self.wall, self.cpu = iter([10.0, 12.5]), iter([1.0, 1.75])

        def perf_counter(self):
            return next(self.wall)

        def process_time(self):
            return next(self.cpu)

    calls = []
    monkeypatch.setattr(common, "time", Clock())
    assert common.time_call(lambda: calls.append(1), "cpu") == (2.5, 0.75)
    assert calls == [1]
