"""`noiserater sample`: samples from a checkpoint (DDIM, or Euler/Heun for flow) as a PNG grid and an .npz."""

from __future__ import annotations

import io
from pathlib import Path

import click
import numpy as np

from ..checkpoint import atomic_write_bytes
from ..run.distributed import resolve_device
from ..sampling import sample_from_checkpoint, save_grid
from ._options import SEED, FiniteFloat, deprecated_alias


@click.command("sample")
@deprecated_alias("--num", "--num-samples")
@deprecated_alias("--steps", "--sample-steps")
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(dir_okay=False),
              help="Diffusion checkpoint (a run's checkpoints/latest.pt).")
@click.option("--out", "out", default="samples", show_default=True, type=click.Path(file_okay=False),
              help="Output folder for samples.png and samples.npz.")
@click.option("--num-samples", "num", default=64, show_default=True, type=click.IntRange(min=1),
              help="Number of generated samples.")
@click.option("--labels", "labels", default="random", show_default=True,
              help="'random', 'cycle' (0,1,2,...), 'null' (unconditional), or comma-separated class ids.")
@click.option("--cfg-scale", default=1.25, show_default=True, type=FiniteFloat(min=0),
              help="Classifier-free guidance scale on all channels (1 = no guidance; 1.25, as train's sample "
                   "grids: mild guidance for a grid to look at; evaluate uses 1.0 for comparable FIDs).")
@click.option("--sample-steps", "steps", default=50, show_default=True, type=click.IntRange(1, 1000),
              help="Sampling steps: DDIM steps (eta=0) for a DDPM checkpoint, ODE steps for a flow checkpoint.")
@click.option("--sampler", "sampler", default=None, type=click.Choice(["ddim", "euler", "heun"]),
              help="Sampler: ddim (DDPM checkpoints), euler or heun (flow checkpoints; heun costs 2 model "
                   "evaluations per step); default: the checkpoint objective's (ddim / euler).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed for noise and random labels.")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Use the EMA weights.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1), help="Samples per forward.")
@click.option("--vae", "vae", default=None, type=click.Path(),
              help="Latent checkpoints: the VAE folder to decode with (default: the one recorded by cache-latents; "
                   "a VAE with another scaling factor is refused).")
@click.option("--device", "device", default="auto", show_default=True,
              help="Device: auto (CUDA when available), cpu, cuda or cuda:N.")
def command(checkpoint, out, num, labels, cfg_scale, steps, sampler, seed, ema, batch_size, vae, device) -> None:
    """Draw samples with the checkpoint objective's sampler (DDIM for DDPM, Euler/Heun ODE for flow) and
    classifier-free guidance on all channels (latents are decoded with the VAE)."""
    samples, y = sample_from_checkpoint(checkpoint, num, labels, cfg_scale, steps, seed, ema, batch_size,
                                        device=resolve_device(device), vae=vae, sampler=sampler)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(samples, out / "samples.png")
    buf = io.BytesIO()
    np.savez(buf, samples=samples.numpy(), labels=y.numpy())
    atomic_write_bytes(out / "samples.npz", buf.getvalue())
    click.echo(f"wrote {num} samples to {out}/samples.png and {out}/samples.npz")
