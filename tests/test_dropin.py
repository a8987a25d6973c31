"""NoiseSelector as the one-line drop-in of a diffusers training loop (docs/selection.md): the selected noise
goes through diffusers' own schedulers, DDPMScheduler (epsilon) and FlowMatchEulerDiscreteScheduler (flow)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from noiserater.selection import NoiseSelector


class _TinyDenoiser(torch.nn.Module):
    """A small conditional conv net (x_t, t) -> [B,C,H,W]: enough to see a loss fall in a few steps."""

    def __init__(self, channels: int = 1):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(channels + 1, 32, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(32, channels, 3, padding=1))

    def forward(self, x, t):
        tt = (t.float() / 1000)[:, None, None, None].expand(-1, 1, *x.shape[2:])
        return self.net(torch.cat([x, tt], 1))


def _latents(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(torch.randn(n, 1, 8, 8, generator=g) * 2)


def _train(step_fn, steps=60):
    torch.manual_seed(0)
    model = _TinyDenoiser()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for i in range(steps):
        loss = step_fn(model, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def test_diffusers_ddpm_loop_with_a_selector():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    selector = NoiseSelector("max_norm", k=4)
    data = _latents()
    seen = []

    def step(model, i):
        g = torch.Generator().manual_seed(i)
        latents = data[torch.randint(0, len(data), (16,), generator=g)]
        timesteps = torch.randint(0, 1000, (16,), generator=g)
        noise = selector(latents, timesteps, generator=g)  # was: noise = torch.randn_like(latents)
        seen.append(noise)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        return torch.nn.functional.mse_loss(model(noisy, timesteps), noise)

    losses = _train(step)
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])  # the loop trains
    # and it trained on max_norm's choice: the selected noises are longer than Gaussian ones (d=64, k=4: 1.19)
    sq = torch.cat(seen).flatten(1).pow(2).mean(1)
    assert abs(float(sq.mean()) - 1.19) < 0.03


def test_diffusers_flow_matching_loop_with_a_selector():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    selector = NoiseSelector("knn", k=4, objective="flow")
    data = _latents(seed=1)
    picked_closer = []

    def step(model, i):
        g = torch.Generator().manual_seed(100 + i)
        latents = data[torch.randint(0, len(data), (16,), generator=g)]
        idx = torch.randint(0, 1000, (16,), generator=g)
        timesteps, sigmas = scheduler.timesteps[idx], scheduler.sigmas[idx]
        cand = torch.randn(16, 4, 1, 8, 8, generator=g)
        noise, _ = selector.select(latents, sigmas, None, cand)  # the nearest of 4 candidates to each image
        picked_closer.append(float((noise - latents).flatten(1).norm(dim=1).mean()
                                   - (cand[:, 0] - latents).flatten(1).norm(dim=1).mean()))
        noisy = scheduler.scale_noise(latents, timesteps, noise)  # (1 - sigma) x0 + sigma noise
        target = noise - latents  # the velocity of the linear path
        torch.testing.assert_close(noisy, (1 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise)
        return torch.nn.functional.mse_loss(model(noisy, timesteps), target)

    losses = _train(step, steps=200)
    assert sum(losses[-20:]) < 0.9 * sum(losses[:20])  # a velocity loss falls slowly: its floor is high
    assert all(d < 0 for d in picked_closer)  # knn's noise is nearer the images than a plain draw
