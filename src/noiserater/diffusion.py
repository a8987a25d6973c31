"""DDPM forward process, the epsilon loss with explicit noise, and a DDIM sampler with CFG on all channels.

Schedule: linear betas 1e-4..0.02 over 1000 steps (as DiT / ADM). Timesteps are integers in [0, T).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import ConfigError


class GaussianDiffusion:
    """Holds the noise schedule. ``alphas_cumprod`` is float64 [T]; tensors are cast on use."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps
        self.betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def _coef(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(like.device)[t.long()].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise [B,C,H,W]; t [B] int."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {list(noise.shape)} differs from x0 shape {list(x0.shape)}")
        a = self._coef(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def epsilon_prediction(output: torch.Tensor, channels: int) -> torch.Tensor:
    """The epsilon part of a model output (first C channels when sigma is learned)."""
    return output[:, :channels]


def per_sample_loss(
    model: Callable, diffusion: GaussianDiffusion, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
    noise: torch.Tensor, input_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Epsilon loss per sample, mean over C,H,W: [B]. The SAME ``noise`` builds x_t and is the target,
    unless ``input_noise`` is given: then x_t is built from it and ``noise`` stays the target (input
    perturbation, DDPM-IP: ``input_noise = noise + gamma * xi``)."""
    x_t = diffusion.q_sample(x0, t, noise if input_noise is None else input_noise)
    err = epsilon_prediction(model(x_t, t, y), x0.shape[1]) - noise
    if err.dtype not in (torch.float32, torch.float64):  # bf16/fp16 under autocast: reduce in float32
        err = err.float()
    return err.pow(2).flatten(1).mean(dim=1)


def epsilon_loss(
    model: Callable, diffusion: GaussianDiffusion, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
    noise: torch.Tensor, weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar epsilon loss: mean over the batch, optionally weighted per sample ([B], summing to B)."""
    losses = per_sample_loss(model, diffusion, x0, t, y, noise)
    if weights is None:
        return losses.mean()
    return (losses * weights).mean()


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Decreasing timesteps with 'leading' spacing (diffusers' DDIMScheduler default)."""
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}")
    ratio = num_timesteps // steps
    return [i * ratio for i in range(steps)][::-1]


def ddim_step(
    diffusion: GaussianDiffusion, x_t: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor, clip: bool = False
) -> torch.Tensor:
    """One deterministic DDIM (eta=0) update from t to t_prev (t_prev < 0 means to x0)."""
    ac = diffusion.alphas_cumprod
    a_t = ac[t].item()
    a_prev = ac[t_prev].item() if t_prev >= 0 else 1.0
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - a_t**0.5 * x0) / (1 - a_t) ** 0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 50,
    cfg_scale: float = 1.0,
    null_class: int | None = None,
    clip: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (eta=0) from ``noise`` [B,C,H,W] with labels y [B]; returns x0 [B,C,H,W].

    With ``cfg_scale != 1`` the conditional and null-class predictions are combined on ALL channels:
    eps = eps_uncond + s * (eps_cond - eps_uncond). ``null_class`` defaults to ``model.num_classes``.
    """
    was_training = model.training
    model.eval()
    C = noise.shape[1]
    null = getattr(model, "num_classes", None) if null_class is None else null_class
    guided = cfg_scale != 1.0
    if guided and null is None:
        raise ConfigError("classifier-free guidance needs null_class (the model has no num_classes)")
    x = noise
    ts = ddim_timesteps(diffusion.num_timesteps, steps)
    iterator = ts
    if progress:
        iterator = tqdm(ts, desc="DDIM", leave=False)
    try:
        for i, t in enumerate(iterator):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            if guided:
                out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null)]))
                eps_c, eps_u = epsilon_prediction(out, C).chunk(2)
                eps = eps_u + cfg_scale * (eps_c - eps_u)
            else:
                eps = epsilon_prediction(model(x, tt, y), C)
            x = ddim_step(diffusion, x, t, t_prev, eps.to(x.dtype), clip=clip)
    finally:
        model.train(was_training)
    return x
