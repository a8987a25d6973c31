"""Sampling from a trained checkpoint (its objective's sampler: DDIM for DDPM, Euler/Heun for flow; classifier-free
guidance on all channels) and image grids.

The library side of `noiserater sample`; evaluation and the demo call :func:`sample_from_checkpoint` too.
"""

from __future__ import annotations

import io
import math
import os

import torch
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import atomic_write_bytes
from .config import ConfigError
from .data.latents import LatentDecoder
from .models.loading import load_diffusion
from .objectives import objective_from_config


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> None:
    """Save images [N,C,H,W] in [-1,1] as one PNG grid (atomic). 1-channel images are grey."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    if c not in (1, 3):
        x = x[:, :1] if c < 3 else x[:, :3]
        c = x.shape[1]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    pad = 1
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    scale = max(1, -(-512 // max(img.size)))  # upscale small grids to at least 512 px so they are viewable
    if scale > 1:
        img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def sample_grid_labels(num_classes: int, n: int, unconditional: bool) -> torch.Tensor:
    if unconditional:
        return torch.full((n,), num_classes, dtype=torch.long)
    return torch.arange(n) % num_classes


def parse_labels(spec: str, num: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Class labels [num] from a spec: 'random', 'cycle' (0,1,2,...), 'null' (the null class) or ids '3,7'."""
    if spec == "random":
        return torch.randint(0, num_classes, (num,), generator=generator)
    if spec == "cycle":
        return torch.arange(num) % num_classes
    if spec == "null":
        return torch.full((num,), num_classes, dtype=torch.long)
    try:
        ids = [int(s) for s in spec.split(",")]
    except ValueError:
        raise ConfigError(f"invalid labels {spec!r} (flag --labels): use random, cycle, null or comma-separated integers") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise ConfigError(f"invalid labels (flag --labels): class ids {bad} outside [0, {num_classes - 1}]")
    return torch.tensor(ids, dtype=torch.long).repeat(num // len(ids) + 1)[:num]


def sample_from_checkpoint(checkpoint, num, labels="random", cfg_scale=1.25, steps=50, seed=0, ema=True,
                           batch_size=256, device=None, progress=False, vae=None, decode=True, shard=None,
                           sampler=None):
    """(samples [N,C,H,W] in data units, labels [N]) from a diffusion checkpoint; repeatable by seed.

    The checkpoint's objective decides the sampler: ``sampler`` None is its default (ddim for DDPM, euler
    for flow); one that does not fit it (``ddim`` on a flow checkpoint) is a one-line ConfigError.

    A checkpoint trained on a latent cache returns images decoded with its VAE (``vae``: another folder
    holding the same VAE; ``decode=False``: the latents). ``shard=(rank, world)`` returns only that rank's
    contiguous share of the same N samples (noise and labels are drawn for all N first), for multi-GPU
    sampling: concatenating the shards of ranks 0..world-1 gives the 1-process result.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, spec, state = load_diffusion(checkpoint, use_ema=ema, device=device)
    objective = objective_from_config(state.get("config"))
    sampler = sampler or objective.default_sampler
    objective.check_sampler(sampler)
    objective.check_steps(steps)
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
    outs = []
    starts = range(0, num, batch_size)
    if progress:
        starts = tqdm(starts, desc="sampling", unit="batch", dynamic_ncols=True, leave=False)
    for i in starts:
        yy = y[i:i + batch_size].to(device)
        if uncond:
            yy = torch.full_like(yy, spec.num_classes)
        outs.append(objective.sample(model, noise[i:i + batch_size].to(device), yy, sampler=sampler, steps=steps,
                                     cfg_scale=1.0 if uncond else cfg_scale, clip=spec.in_channels in (1, 3)).cpu())
    samples = torch.cat(outs) if outs else noise[:0]
    if latent and decode:
        samples = LatentDecoder.from_recorded(latent["vae"], vae, device).decode(samples, min(batch_size, 32))
    return samples, y


def save_sample_grid(model, objective, data, path, *, seed: int, unconditional: bool, cfg_scale: float,
                     sampler: str | None, steps: int, device) -> None:
    """A grid of samples from ``model`` (2 per class, or 16 unconditional) at a fixed noise (``seed``) to
    ``path``: what training writes every ``sample_every`` steps. ``data`` gives the shape and classes."""
    n = 2 * data.num_classes if not unconditional else 16
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, data.channels, data.image_size, data.image_size), generator=g).to(device)
    y = sample_grid_labels(data.num_classes, n, unconditional).to(device)
    x = objective.sample(model, noise, y, sampler=sampler, steps=steps, cfg_scale=1.0 if unconditional else cfg_scale,
                         clip=True)
    save_grid(x, path, nrow=data.num_classes if not unconditional else None)
