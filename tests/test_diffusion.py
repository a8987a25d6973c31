"""Diffusion: schedule, q_sample closed form, the explicit-noise loss, DDIM against diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from noiserater.diffusion import (
    GaussianDiffusion,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    epsilon_loss,
    per_sample_loss,
)
from noiserater.models import build_dit


def _scheduler(diffusion: GaussianDiffusion, steps: int) -> DDIMScheduler:
    s = DDIMScheduler(
        num_train_timesteps=diffusion.num_timesteps,
        trained_betas=diffusion.betas.numpy(),  # the same betas (diffusers keeps them in float32)
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    s.set_timesteps(steps)
    return s


def test_linear_schedule_matches_dit_and_diffusers():
    d = GaussianDiffusion()
    assert d.betas.shape == (1000,) and d.betas.dtype == torch.float64
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ref.alphas_cumprod.double().numpy(), rtol=1e-5)
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))  # independent float64 computation
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), abar, rtol=1e-12)


def test_q_sample_closed_form():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    got = d.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        abar = np.prod([1.0 - b for b in np.linspace(1e-4, 0.02, 1000)[: ti + 1]])
        expected = np.sqrt(abar) * x0[i].numpy() + np.sqrt(1 - abar) * noise[i].numpy()
        np.testing.assert_allclose(got[i].numpy(), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="noise shape"):
        d.q_sample(x0, t, noise[:, :1])


def test_loss_uses_the_same_noise_for_x_t_and_target():
    """An 'oracle' model that inverts q_sample recovers the noise that built x_t exactly: the loss is ~0
    only if that same noise is the regression target."""
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (8,), generator=g)
    y = torch.zeros(8, dtype=torch.long)
    abar = d.alphas_cumprod[t].view(-1, 1, 1, 1)

    def oracle(x_t, tt, yy):  # returns [B,2C]: eps in the first C channels, junk (learned sigma) after
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return torch.cat([eps, torch.full_like(eps, 123.0)], dim=1)

    losses = per_sample_loss(oracle, d, x0, t, y, noise)
    assert losses.shape == (8,)
    assert losses.max().item() < 1e-18
    # a model predicting zero has loss = mean(noise^2) per sample
    zero = per_sample_loss(lambda x_t, tt, yy: torch.zeros_like(x_t), d, x0, t, y, noise)
    torch.testing.assert_close(zero, noise.pow(2).flatten(1).mean(1))  # float64 in, float64 out
    w = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)
    torch.testing.assert_close(epsilon_loss(lambda x_t, tt, yy: torch.zeros_like(x_t), d, x0, t, y, noise, w),
                               (zero * w).mean())
    # a half-precision prediction (autocast) is reduced in float32, against the float32 noise
    n32 = noise.float()
    half = per_sample_loss(lambda x_t, tt, yy: torch.zeros_like(x_t, dtype=torch.bfloat16), d, x0.float(), t, y, n32)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, n32.pow(2).flatten(1).mean(1))


@pytest.mark.parametrize("steps", [1, 7, 50, 250])
def test_ddim_timesteps_match_diffusers_leading_spacing(steps):
    d = GaussianDiffusion()
    assert ddim_timesteps(1000, steps) == _scheduler(d, steps).timesteps.tolist()


def test_ddim_timesteps_rejects_bad_counts():
    with pytest.raises(ValueError, match="DDIM steps"):
        ddim_timesteps(1000, 0)
    with pytest.raises(ValueError, match="DDIM steps"):
        ddim_timesteps(1000, 1001)


def test_ddim_step_matches_diffusers():
    d = GaussianDiffusion()
    sched = _scheduler(d, 20)
    g = torch.Generator().manual_seed(0)
    ts = ddim_timesteps(1000, 20)
    for i, t in enumerate(ts):
        x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        ours = ddim_step(d, x, t, t_prev, eps)
        ref = sched.step(eps, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _random_dit(seed: int):
    torch.manual_seed(seed)
    m = build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=3, learn_sigma=True)
    with torch.no_grad():  # leave adaLN-Zero's identity start so outputs depend on x, t and y
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.mark.parametrize("cfg_scale", [1.0, 1.25, 4.0])
def test_ddim_trajectory_matches_diffusers_with_cfg_on_all_channels(cfg_scale):
    d = GaussianDiffusion()
    model = _random_dit(0)
    steps = 10
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2])
    ours = ddim_sample(model, d, noise, y, steps=steps, cfg_scale=cfg_scale)

    sched = _scheduler(d, steps)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            tt = torch.full((3,), int(t))
            e_c = model(x, tt, y)[:, :4]
            e_u = model(x, tt, torch.full_like(y, 3))[:, :4]
            eps = e_u + cfg_scale * (e_c - e_u)  # every one of the 4 channels is guided
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    assert (ours - noise).abs().mean() > 0.1


def test_cfg_changes_every_channel():
    """Against DiT's reference sampler, which guides only 3 of 4 channels: here all 4 move with the scale."""
    d = GaussianDiffusion()
    model = _random_dit(1)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 2])
    a = ddim_sample(model, d, noise, y, steps=4, cfg_scale=1.0)
    b = ddim_sample(model, d, noise, y, steps=4, cfg_scale=3.0)
    per_channel = (a - b).abs().flatten(2).mean(-1).min(0).values
    assert (per_channel > 1e-4).all()
    assert model.training is False


def test_ddim_sample_restores_training_mode_and_needs_null_class_for_cfg():
    d = GaussianDiffusion()
    model = _random_dit(2).train()
    ddim_sample(model, d, torch.randn(1, 4, 8, 8), torch.tensor([0]), steps=2)
    assert model.training

    class NoClasses(torch.nn.Module):
        def forward(self, x, t, y):
            return x

    with pytest.raises(ValueError, match="null_class"):
        ddim_sample(NoClasses(), d, torch.randn(1, 4, 8, 8), torch.tensor([0]), steps=2, cfg_scale=2.0)
