"""`noiserater cache-latents`: encode an image folder once with a VAE into a resumable latent cache."""

from __future__ import annotations

import click

from ..data.latents import cache_latents
from ._options import SEED


@click.command("cache-latents")
@click.option("--data", "data", required=True, type=click.Path(file_okay=False),
              help="Image folder: DATA/<class>/<image> (classes sorted by name), or a flat folder (one class).")
@click.option("--vae", "vae", required=True, type=click.Path(),
              help="Local AutoencoderKL folder (config.json + weights, e.g. a copy of stabilityai/sd-vae-ft-mse); "
                   "a pipeline folder with a vae/ subfolder also works. Nothing is downloaded.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Cache folder (header.json, data.npy, files.txt). Rerun the same command to continue it.")
@click.option("--resolution", default=256, show_default=True, type=click.IntRange(min=8),
              help="Center-crop to a square and resize to this many pixels (the latents are RESOLUTION/8 for sd-vae).")
@click.option("--flip/--no-flip", default=False, show_default=True,
              help="Also store the horizontal mirror of every image (doubles the records; DiT trains with flips).")
@click.option("--latent", type=click.Choice(["sample", "mean"]), default="sample", show_default=True,
              help="Store one posterior sample per image (as DiT trains) or the posterior mean.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage type of the latents (float16 halves the file; they are read back as float32).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per VAE forward.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Image-decoding worker processes (0: in the main process).")
@click.option("--device", default=None, help="Device for the VAE (default: cuda when available, else cpu).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the posterior samples (per record).")
@click.option("--max-images", default=None, type=click.IntRange(min=0),
              help="Encode at most this many images in this call (the cache stays resumable).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar with images/s.")
def command(data, vae, out, resolution, flip, latent, dtype, batch_size, workers, device, seed, max_images, progress):
    """Encode every image once with a VAE into one memory-mapped latent cache (resumable, interrupt-safe).

    Train on it with `noiserater train --data OUT --model DiT-S/2`; `noiserater sample` decodes with the
    same VAE (recorded in the checkpoint; refused if a VAE with another scaling factor is passed).
    """
    res = cache_latents(data, vae, out, resolution=resolution, flip=flip, batch_size=batch_size, workers=workers,
                        device=device, latent=latent, seed=seed, dtype=dtype, max_images=max_images,
                        progress=progress, log=click.echo)
    state = "complete" if res.complete else "incomplete: rerun the same command to continue"
    rate = f", {res.images_per_s:.1f} images/s" if res.encoded_now else ""
    click.echo(f"{res.out}: {res.done_images}/{res.num_images} images ({res.num_rows} records) {state}; "
               f"encoded {res.encoded_now} now in {res.seconds:.1f}s{rate}")
