"""Is the latent-cache loader ever the bottleneck? (``noiserater bench loader``) Loader images/s against the
training step's images/s, measured side by side in one process.

Per round (``repeats`` rounds, medians reported):

- ``loader_memmap``: what a training step does to fetch its batch from a large cache, i.e.
  ``data.images[idx]`` on a :class:`~noiserater.data.latents.MemmapRows` (rows read from the memory-mapped
  file, into pinned memory on CUDA) plus the copy to the device; batch indices as training draws them
  (:func:`noiserater.run.randomness.batch_indices`).
- ``loader_memory``: the same from a cache held in memory (caches up to 2 GiB are).
- ``train``: one training step as :func:`noiserater.train.train` takes it, by its own functions
  (:class:`noiserater.bench.common.TrainingStep`: the step's randomness, ``train_step`` (forward, epsilon
  loss, backward, clip), ``apply_update`` (AdamW from ``make_adamw``, fused on CPU and CUDA; EMA)) on a
  batch of the cache already on the device, with the chosen speed switches (bf16 autocast, TF32,
  torch.compile, gradient checkpointing).

The page cache is warm after the first round (the cache is read once); a cold first epoch on a network
disk can be slower, which ``loader_memmap_first_round_images_per_s`` shows. On a GPU the ``train``
figure is the DiT images/s/GPU that ``scripts/gpu_check.sh`` reports.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from ..data.latents import MemmapRows, load_latent_cache, write_synthetic_cache
from ..randomness import batch_indices
from ..train import TrainConfig
from .common import TrainingStep, default_device, machine_info, peak_rss_bytes, synchronize, time_call


def run_loader_benchmark(cache: str | None, *, model: str = "DiT-S/2", batch_size: int | None = None,
                         repeats: int = 5, loader_batches: int = 20, device: str | None = None, amp: bool = False,
                         tf32: bool = True, compile_: bool = False, grad_checkpointing: bool = False,
                         num: int = 4096, latent_size: int = 32, num_classes: int = 1000,
                         log: Callable[[str], object] = print) -> dict:
    dev = default_device(device)
    batch_size = batch_size or (64 if dev.type == "cuda" else 8)
    tmp = None
    if cache is None:
        tmp = tempfile.TemporaryDirectory(prefix="nr-bench-cache-")
        cache = str(write_synthetic_cache(Path(tmp.name) / "cache", num, (4, latent_size, latent_size), num_classes))
        log(f"synthetic cache: {num} records of 4x{latent_size}x{latent_size} random latents in {cache}")
    try:
        lazy = load_latent_cache(cache, in_memory=False)
        eager = load_latent_cache(cache, in_memory=True)
        assert isinstance(lazy.images, MemmapRows)
        n = len(lazy)
        tc = TrainConfig(model=model, batch_size=batch_size, amp=amp, tf32=tf32, compile=compile_,
                         grad_checkpointing=grad_checkpointing, learn_sigma=True)
        fetched = 0  # batches fetched so far: the loader walks the epochs as training does

        def fetch(images) -> torch.Tensor:
            nonlocal fetched
            idx = batch_indices(n, batch_size, fetched, tc.seed)
            fetched += 1
            return images[idx].to(dev, non_blocking=True)

        def time_loader(images) -> float:
            wall, _ = time_call(lambda: [fetch(images) for _ in range(loader_batches)], dev)
            return loader_batches * batch_size / wall

        first_memmap = time_loader(lazy.images)  # the page cache may be cold here
        step = TrainingStep(tc, lazy.image_size, lazy.channels, lazy.num_classes, dev)
        losses = []

        def next_batch():
            x0, labels = step.batch(lazy.images, eager.labels)
            synchronize(dev)
            return x0, labels

        for _ in range(3 if compile_ else 2):  # warm-up
            losses.append(float(step.step(*next_batch()).loss))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        memmap_rates, memory_rates, train_rates, step_s = [], [], [], []
        for r in range(repeats):
            memmap_rates.append(time_loader(lazy.images))
            memory_rates.append(time_loader(eager.images))
            x0, labels = next_batch()
            results = []
            dt, _ = time_call(lambda: results.append(step.step(x0, labels)), dev)
            losses.append(float(results[0].loss))
            step_s.append(dt)
            train_rates.append(batch_size / dt)
            log(f"round {r + 1}/{repeats}: loader(memmap) {memmap_rates[-1]:.0f} img/s, "
                f"loader(memory) {memory_rates[-1]:.0f} img/s, train step {train_rates[-1]:.1f} img/s")
        med = statistics.median
        rec = {
            "bench": "loader", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(dev),
            "model": model, "params": sum(p.numel() for p in step.model.parameters()), "batch_size": batch_size,
            "latent_shape": [lazy.channels, lazy.image_size, lazy.image_size],
            "cache": "synthetic" if tmp is not None else str(cache), "cache_records": n,
            "amp_bf16": amp, "tf32": tf32 if dev.type == "cuda" else None, "compile": compile_,
            "grad_checkpointing": grad_checkpointing, "repeats": repeats, "loader_batches_per_round": loader_batches,
            "pinned": bool(lazy.images._pin and torch.cuda.is_available()),
            "loader_memmap_images_per_s": med(memmap_rates), "loader_memory_images_per_s": med(memory_rates),
            "loader_memmap_first_round_images_per_s": first_memmap,
            "train_images_per_s": med(train_rates), "train_step_s": med(step_s),
            "loader_over_train": med(memmap_rates) / med(train_rates),
            "loader_share_of_step": (batch_size / med(memmap_rates)) / (med(step_s) + batch_size / med(memmap_rates)),
            "losses_finite": all(v == v and abs(v) != float("inf") for v in losses),
        }
        if dev.type == "cuda":
            rec["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        else:
            rec["peak_rss_mb"] = peak_rss_bytes() / 2**20
        return rec
    finally:
        if tmp is not None:
            tmp.cleanup()
