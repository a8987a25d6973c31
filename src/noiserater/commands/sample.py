"""`noiserater sample`: DDIM samples from a checkpoint as a PNG grid and an .npz."""

from __future__ import annotations

import io
from pathlib import Path

import click
import numpy as np
import torch

from ..checkpoint import atomic_write_bytes
from ..diffusion import GaussianDiffusion, ddim_sample
from ..train import load_diffusion, save_grid
from ._options import SEED, FiniteFloat
from ..config import ConfigError


@click.command("sample")
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(dir_okay=False),
              help="Diffusion checkpoint (a run's checkpoints/latest.pt).")
@click.option("--out", "out", default="samples", show_default=True, type=click.Path(file_okay=False),
              help="Output folder for samples.png and samples.npz.")
@click.option("--num", "num", default=64, show_default=True, type=click.IntRange(min=1), help="Number of samples.")
@click.option("--labels", "labels", default="random", show_default=True,
              help="'random', 'cycle' (0,1,2,...), 'null' (unconditional), or comma-separated class ids.")
@click.option("--cfg-scale", default=1.25, show_default=True, type=FiniteFloat(min=0),
              help="Classifier-free guidance scale on all channels (1 = no guidance).")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1, 1000), help="DDIM steps.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed for noise and random labels.")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Use the EMA weights.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1), help="Samples per forward.")
@click.option("--vae", "vae", default=None, type=click.Path(),
              help="Latent checkpoints: the VAE folder to decode with (default: the one recorded by cache-latents; "
                   "a VAE with another scaling factor is refused).")
def command(checkpoint, out, num, labels, cfg_scale, steps, seed, ema, batch_size, vae) -> None:
    """Draw samples with DDIM (eta=0) and classifier-free guidance (latents are decoded with the VAE)."""
    samples, y = sample_from_checkpoint(checkpoint, num, labels, cfg_scale, steps, seed, ema, batch_size, vae=vae)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(samples, out / "samples.png")
    buf = io.BytesIO()
    np.savez(buf, samples=samples.numpy(), labels=y.numpy())
    atomic_write_bytes(out / "samples.npz", buf.getvalue())
    click.echo(f"wrote {num} samples to {out}/samples.png and {out}/samples.npz")


def parse_labels(spec: str, num: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    if spec == "random":
        return torch.randint(0, num_classes, (num,), generator=generator)
    if spec == "cycle":
        return torch.arange(num) % num_classes
    if spec == "null":
        return torch.full((num,), num_classes, dtype=torch.long)
    try:
        ids = [int(s) for s in spec.split(",")]
    except ValueError:
        raise click.BadParameter(f"--labels {spec!r}: use random, cycle, null or comma-separated integers") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise click.BadParameter(f"--labels: class ids {bad} outside [0, {num_classes - 1}]")
    return torch.tensor(ids, dtype=torch.long).repeat(num // len(ids) + 1)[:num]


def sample_from_checkpoint(checkpoint, num, labels="random", cfg_scale=1.25, steps=50, seed=0, ema=True,
                           batch_size=256, device=None, progress=False, vae=None, decode=True, shard=None):
    """(samples [N,C,H,W] in data units, labels [N]) from a diffusion checkpoint; repeatable by seed.

    A checkpoint trained on a latent cache returns images decoded with its VAE (``vae``: another folder
    holding the same VAE; ``decode=False``: the latents). ``shard=(rank, world)`` returns only that rank's
    contiguous share of the same N samples (noise and labels are drawn for all N first), for multi-GPU
    sampling: concatenating the shards of ranks 0..world-1 gives the 1-process result.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, spec, state = load_diffusion(checkpoint, use_ema=ema, device=device)
    latent = state.get("data", {}).get("latent")
    if vae is not None and not latent:
        raise ConfigError(f"--vae given, but {checkpoint} was trained on pixels, not on a latent cache; drop --vae")
    g = torch.Generator().manual_seed(seed)
    y = parse_labels(labels, num, spec.num_classes, g)
    noise = torch.randn((num, spec.in_channels, spec.input_size, spec.input_size), generator=g)
    if shard is not None:
        rank, world = shard
        lo, hi = rank * num // world, (rank + 1) * num // world
        y, noise, num = y[lo:hi], noise[lo:hi], hi - lo
    uncond = bool(state.get("config", {}).get("unconditional", False))
    diffusion = GaussianDiffusion()
    outs = []
    starts = range(0, num, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sampling", unit="batch", dynamic_ncols=True, leave=False)
    for i in starts:
        yy = y[i:i + batch_size].to(device)
        if uncond:
            yy = torch.full_like(yy, spec.num_classes)
        outs.append(ddim_sample(model, diffusion, noise[i:i + batch_size].to(device), yy, steps=steps,
                                cfg_scale=1.0 if uncond else cfg_scale, clip=spec.in_channels in (1, 3)).cpu())
    samples = torch.cat(outs) if outs else noise[:0]
    if latent and decode:
        from ..data.latents import LatentDecoder

        samples = LatentDecoder.from_recorded(latent["vae"], vae, device).decode(samples, min(batch_size, 32))
    return samples, y
