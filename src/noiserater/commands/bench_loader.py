"""`noiserater bench loader`: is the latent-cache loader ever the bottleneck? Loader images/s against the
training step's images/s, measured side by side in one process.

Per round (``--repeats`` rounds, medians reported):

- ``loader_memmap``: what a training step does to fetch its batch from a large cache, i.e.
  ``data.images[idx]`` on a :class:`~noiserater.data.latents.MemmapRows` (rows read from the memory-mapped
  file, into pinned memory on CUDA) plus the copy to the device; random batch indices, as training draws.
- ``loader_memory``: the same from a cache held in memory (caches up to 2 GiB are).
- ``train``: one training step as :func:`noiserater.train.train` takes it (forward, epsilon loss,
  backward, clip, AdamW (fused on CUDA), EMA update) on a batch of the cache, with the chosen speed
  switches (bf16 autocast, TF32, torch.compile, gradient checkpointing).

The page cache is warm after the first round (the cache is read once); a cold first epoch on a network
disk can be slower, which ``loader_memmap_first_round_images_per_s`` shows. On a GPU the ``train``
figure is the DiT images/s/GPU that ``scripts/gpu_check.sh`` reports.
"""

from __future__ import annotations

import copy
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from ..speed import machine_info
from ._options import deprecated_alias


class _TrainStep:
    """The model, optimiser and EMA of a training run, and its step on a given batch."""

    def __init__(self, model_name: str, data, device: torch.device, amp: bool, compile_: bool, grad_ckpt: bool):
        from ..diffusion import GaussianDiffusion
        from ..models import build_dit
        from ..speed import autocast

        torch.manual_seed(0)
        self.device, self.amp = device, amp
        self.model = build_dit(model_name, input_size=data.image_size, in_channels=data.channels,
                               num_classes=data.num_classes, learn_sigma=True).to(device).train()
        self.model.grad_checkpointing = grad_ckpt
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.fwd = torch.compile(self.model) if compile_ else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
        self.diffusion = GaussianDiffusion()
        self.autocast = lambda: autocast(device, amp)
        self.params = sum(p.numel() for p in self.model.parameters())

    def __call__(self, x0: torch.Tensor, y: torch.Tensor) -> float:
        from ..diffusion import per_sample_loss

        B = x0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), device=self.device)
        noise = torch.randn_like(x0)
        with self.autocast():
            loss = per_sample_loss(self.fwd, self.diffusion, x0, t, y, noise).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1e-4)
        return float(loss.detach())


def run_loader_benchmark(cache: str | None, *, model: str = "DiT-S/2", batch_size: int | None = None,
                         repeats: int = 5, loader_batches: int = 20, device: str | None = None, amp: bool = False,
                         tf32: bool = True, compile_: bool = False, grad_checkpointing: bool = False,
                         num: int = 4096, latent_size: int = 32, num_classes: int = 1000, log=print) -> dict:
    from ..data.latents import MemmapRows, load_latent_cache, write_synthetic_cache
    from ..speed import set_tf32

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        set_tf32(tf32)
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
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        g = torch.Generator().manual_seed(0)

        def fetch(images, idx):
            return images[idx].to(dev, non_blocking=True)

        def time_loader(images) -> float:
            sync()
            t0 = time.perf_counter()
            for _ in range(loader_batches):
                idx = torch.randint(0, n, (batch_size,), generator=g)
                fetch(images, idx)
            sync()
            return loader_batches * batch_size / (time.perf_counter() - t0)

        first_memmap = time_loader(lazy.images)  # the page cache may be cold here
        step = _TrainStep(model, lazy, dev, amp, compile_, grad_checkpointing)
        warm = 3 if compile_ else 2
        losses = []
        for _ in range(warm):
            idx = torch.randint(0, n, (batch_size,), generator=g)
            losses.append(step(fetch(lazy.images, idx), eager.labels[idx].to(dev)))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        memmap_rates, memory_rates, train_rates, step_s = [], [], [], []
        for r in range(repeats):
            memmap_rates.append(time_loader(lazy.images))
            memory_rates.append(time_loader(eager.images))
            idx = torch.randint(0, n, (batch_size,), generator=g)
            x0, y = fetch(lazy.images, idx), eager.labels[idx].to(dev)
            sync()
            t0 = time.perf_counter()
            losses.append(step(x0, y))
            sync()
            dt = time.perf_counter() - t0
            step_s.append(dt)
            train_rates.append(batch_size / dt)
            log(f"round {r + 1}/{repeats}: loader(memmap) {memmap_rates[-1]:.0f} img/s, "
                f"loader(memory) {memory_rates[-1]:.0f} img/s, train step {train_rates[-1]:.1f} img/s")
        med = statistics.median
        rec = {
            "bench": "loader", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(dev),
            "model": model, "params": step.params, "batch_size": batch_size, "latent_shape": [lazy.channels,
                                                                                               lazy.image_size,
                                                                                               lazy.image_size],
            "cache": "synthetic" if tmp is not None else str(cache), "cache_records": n,
            "amp_bf16": amp, "tf32": tf32 if dev.type == "cuda" else None, "compile": compile_,
            "grad_checkpointing": grad_checkpointing, "repeats": repeats, "loader_batches_per_round": loader_batches,
            "pinned": bool(lazy.images._pin and torch.cuda.is_available()),
            "loader_memmap_images_per_s": med(memmap_rates), "loader_memory_images_per_s": med(memory_rates),
            "loader_memmap_first_round_images_per_s": first_memmap,
            "train_images_per_s": med(train_rates), "train_step_s": med(step_s),
            "loader_over_train": med(memmap_rates) / med(train_rates),
            "loader_share_of_step": (batch_size / med(memmap_rates)) / (med(step_s) + batch_size / med(memmap_rates)),
            "losses_finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
        }
        if dev.type == "cuda":
            rec["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        else:
            rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return rec
    finally:
        if tmp is not None:
            tmp.cleanup()


@click.command("loader")
@deprecated_alias("--cache", "--data")
@deprecated_alias("--num", "--num-records")
@deprecated_alias("--out", "--json")
@click.option("--data", "cache", default=None, type=click.Path(file_okay=False),
              help="Latent cache to read (a cache-latents folder, as train's --data; default: a synthetic cache of random 4x32x32 latents in a temp folder).")
@click.option("--num-records", "num", default=4096, show_default=True, type=click.IntRange(min=64),
              help="Records of the synthetic cache.")
@click.option("--latent-size", default=32, show_default=True, type=click.IntRange(min=2),
              help="Latent side of the synthetic cache (32 = 256px images through sd-vae).")
@click.option("--model", default="DiT-S/2", show_default=True, help="DiT config of the training step.")
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="Per-process batch (default: 8 on CPU, 64 on CUDA = the paper's 256 over 4 GPUs).")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Times each measurement is repeated (interleaved rounds).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--amp/--no-amp", default=False, show_default=True, help="bf16 autocast in the training step.")
@click.option("--tf32/--no-tf32", default=True, show_default=True, help="TF32 on CUDA.")
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True, help="torch.compile the DiT.")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=False, show_default=True,
              help="Recompute DiT blocks in backward.")
@click.option("--json", "out", default=None, type=click.Path(dir_okay=False),
              help="Write the record as JSON (a list with one record) to this file. Without it nothing is written.")
def command(cache, num, latent_size, model, batch_size, repeats, device, amp, tf32, compile_, grad_checkpointing, out):
    """Latent-cache loader images/s against the training step's images/s (one process, interleaved)."""
    rec = run_loader_benchmark(cache, model=model, batch_size=batch_size, repeats=repeats, device=device, amp=amp,
                               tf32=tf32, compile_=compile_, grad_checkpointing=grad_checkpointing, num=num,
                               latent_size=latent_size, log=click.echo)
    if out:
        from ..checkpoint import atomic_write_text

        atomic_write_text(out, json.dumps([rec], indent=2) + "\n")
    click.echo(f"loader (memmap) {rec['loader_memmap_images_per_s']:.0f} img/s, (memory) "
               f"{rec['loader_memory_images_per_s']:.0f} img/s; train step {rec['train_images_per_s']:.1f} img/s "
               f"({model}, batch {rec['batch_size']}); loader/train = {rec['loader_over_train']:.0f}x"
               + (f" -> {out}" if out else ""))
