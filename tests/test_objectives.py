"""The training objectives (noiserater.objectives) against independent references.

- flow: x_t and the velocity target against their definitions and against diffusers'
  FlowMatchEulerDiscreteScheduler (its forward process ``scale_noise`` and its Euler ``step``, the model
  fed the scheduler's timestep = 1000 sigma);
- the Euler and Heun samplers transport N(0, I) to N(m, s^2 I) with the closed-form velocity of the linear
  interpolant (first / second order in the step);
- logit-normal and uniform time sampling against scipy's distributions (KS tests, fixed seeds);
- ddpm: the objective is the pre-objective GaussianDiffusion code (q_sample, per_sample_loss, randint draws,
  ddim_sample) on random inputs;
- the meta-gradient of the flow loss (unrolled, reverse) against float64 finite differences of an outer loss
  written here from the definitions (the shape of tests/test_meta.py's DDPM checks).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from scipy import stats

from noiserater.config import ConfigError
from noiserater.diffusion import GaussianDiffusion, ddim_sample, per_sample_loss
from noiserater.meta import meta_gradient
from noiserater.models import build_dit, build_rater
from noiserater.objectives import OBJECTIVES, DDPMObjective, FlowObjective, get_objective, objective_from_config

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_registry_and_checkpoint_config():
    assert set(OBJECTIVES) == {"ddpm", "flow"}
    assert isinstance(get_objective("ddpm"), DDPMObjective) and isinstance(get_objective("flow"), FlowObjective)
    assert objective_from_config({}).name == "ddpm"  # runs written before objectives existed
    f = objective_from_config({"objective": "flow", "time_sampling": "logit-normal", "logit_mean": 0.5, "logit_std": 2})
    assert (f.name, f.time_sampling, f.logit_mean, f.logit_std) == ("flow", "logit-normal", 0.5, 2.0)
    with pytest.raises(ConfigError, match="unknown objective 'edm'"):
        get_objective("edm")
    with pytest.raises(ConfigError, match="--sampler.*pass --sampler euler"):
        get_objective("flow").check_sampler("ddim")
    with pytest.raises(ConfigError, match="pass --sampler ddim"):
        get_objective("ddpm").check_sampler("heun")


# ---- flow: definitions and diffusers ---------------------------------------------------------------------


def test_flow_x_t_and_target_against_definitions_and_diffusers():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 2, 4, 4, generator=g, dtype=DT), torch.randn(6, 2, 4, 4, generator=g, dtype=DT)
    t = torch.rand(6, generator=g, dtype=DT)
    f = get_objective("flow")
    for b in range(6):  # the definition, one sample at a time
        torch.testing.assert_close(f.x_t(x0, eps, t)[b], (1 - t[b].item()) * x0[b] + t[b].item() * eps[b], rtol=0, atol=1e-15)
    torch.testing.assert_close(f.target(x0, eps, t), eps - x0, rtol=0, atol=0)
    assert f.x_t(x0, eps, torch.zeros(6)).equal(x0) and f.x_t(x0, eps, torch.ones(6)).equal(eps)
    # diffusers' forward process at its own sigmas: x_sigma = sigma * noise + (1 - sigma) * sample
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    sch.set_timesteps(6)
    ref = sch.scale_noise(x0.float(), sch.timesteps, eps.float())
    torch.testing.assert_close(f.x_t(x0.float(), eps.float(), sch.sigmas[:6]), ref, rtol=1e-6, atol=1e-6)
    # what the DiT receives is the scheduler's timestep (1000 sigma)
    torch.testing.assert_close(f.model_time(sch.sigmas[:6]), sch.timesteps, rtol=1e-6, atol=1e-3)


class _VelocityNet(torch.nn.Module):
    """A fixed non-linear 'model' of (x, timestep, y) returning C channels; records the timesteps it sees."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, y):
        self.seen.append(t.detach().clone())
        tt = (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)
        return torch.sin(x) * (1 + tt) - 0.3 * x * tt + 0.1 * (y.to(x.dtype).view(-1, 1, 1, 1) - 1)


def test_flow_euler_step_and_trajectory_match_diffusers():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, 4, generator=g)
    y = torch.tensor([0, 1, 2])
    f = get_objective("flow")
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    sch.set_timesteps(8)
    net = _VelocityNet()
    # one step: ours from sigma_0 to sigma_1 against scheduler.step with the model's output at timestep_0
    ref = sch.step(net(x, sch.timesteps[:1].expand(3), y), sch.timesteps[0], x).prev_sample
    ours = f.step(net, x, float(sch.sigmas[0]), float(sch.sigmas[1]), y, sampler="euler")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # a whole trajectory on the scheduler's sigma grid (ours sees 1000 sigma as the timestep)
    sch.set_timesteps(8)
    ref = x.clone()
    for ts in sch.timesteps:
        ref = sch.step(net(ref, ts.expand(3), y), ts, ref).prev_sample
    net.seen.clear()
    ours = f.sample(net, x.clone(), y, sampler="euler", steps=8, times=sch.sigmas.tolist())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack([s[0] for s in net.seen]), sch.timesteps, rtol=1e-6, atol=1e-3)


def test_flow_guidance_combines_all_channels():
    """CFG: v_u + s (v_c - v_u) on every channel, the null class = num_classes."""
    f = get_objective("flow")
    net = _VelocityNet()
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 2])
    got = f.velocity(net, x, 0.4, y, 2.5, 3)
    tt = torch.full((2,), 400.0)
    v_c, v_u = net(x, tt, y), net(x, tt, torch.full_like(y, 3))
    torch.testing.assert_close(got, v_u + 2.5 * (v_c - v_u))


# ---- the samplers on a Gaussian with a known flow ---------------------------------------------------------


M, S = 0.7, 0.4  # data N(M, S^2 I); noise N(0, I); x_t = (1 - t) x0 + t eps


def _closed_form_velocity(x, model_time, y):
    """E[eps - x0 | x_t = x] for x0 ~ N(M, S^2), eps ~ N(0, 1): (t - a S^2)(x - a M) / (a^2 S^2 + t^2) - M, a = 1 - t."""
    t = (model_time.to(x.dtype) / 1000).view(-1, 1, 1, 1)
    a = 1 - t
    return (t - a * S**2) * (x - a * M) / (a**2 * S**2 + t**2) - M


def test_euler_and_heun_transport_noise_to_the_known_gaussian():
    """The exact flow map of this velocity field is z -> M + S z: each sampler's endpoint converges to it,
    Euler at first order and Heun at second order, and the endpoint's distribution is N(M, S^2 I)."""
    f = get_objective("flow")
    z = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    y = torch.zeros(4000, dtype=torch.long)
    exact = M + S * z
    err = {}
    for sampler in ("euler", "heun"):
        for n in (10, 20, 40):
            x = f.sample(_closed_form_velocity, z, y, sampler=sampler, steps=n)
            err[sampler, n] = (x - exact).abs().max().item()
    # convergence orders: halving the step halves Euler's error and quarters Heun's
    assert 1.7 < err["euler", 20] / err["euler", 40] < 2.3, err
    assert 3.4 < err["heun", 20] / err["heun", 40] < 4.6, err
    assert err["heun", 10] < err["euler", 10] / 20, err
    assert err["heun", 40] < 1e-3, err
    x = f.sample(_closed_form_velocity, z, y, sampler="heun", steps=160)
    assert (x - exact).abs().max().item() < 1e-4  # |z| up to ~4: the map itself to 1e-4
    x = f.sample(_closed_form_velocity, z, y, sampler="heun", steps=40).flatten()
    assert abs(x.mean().item() - M) < 4 * S / math.sqrt(x.numel()) + 1e-3
    assert stats.kstest(((x - M) / S).numpy(), "norm").pvalue > 1e-3


# ---- time sampling -------------------------------------------------------------------------------------


def test_logit_normal_and_uniform_time_sampling_against_scipy():
    g = torch.Generator().manual_seed(7)
    f = FlowObjective("logit-normal", logit_mean=0.3, logit_std=1.4)
    t = f.sample_t(20000, g).double().numpy()
    assert t.min() > 0 and t.max() < 1 and f.sample_t(5, g).dtype == torch.float32

    def logit_normal_cdf(m, s):
        return lambda x: stats.norm(m, s).cdf(stats.logistic.ppf(x))  # logit = logistic quantile

    assert stats.kstest(t, logit_normal_cdf(0.3, 1.4)).pvalue > 1e-3
    assert stats.kstest(t, logit_normal_cdf(0.0, 1.4)).pvalue < 1e-6  # the test tells a wrong mean apart
    assert stats.kstest(t, logit_normal_cdf(0.3, 1.0)).pvalue < 1e-6  # and a wrong std
    u = FlowObjective("uniform").sample_t(20000, torch.Generator().manual_seed(8)).double().numpy()
    assert stats.kstest(u, stats.uniform.cdf).pvalue > 1e-3
    assert stats.kstest(t, stats.uniform.cdf).pvalue < 1e-6


# ---- ddpm: the objective is the old code -------------------------------------------------------------


def test_ddpm_objective_is_the_gaussian_diffusion_code():
    d, o = GaussianDiffusion(), get_objective("ddpm")
    g = torch.Generator().manual_seed(11)
    x0, eps = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=DT), 0)[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(o.x_t(x0, eps, t).double(), abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double(),
                               rtol=1e-6, atol=1e-6)
    assert o.x_t(x0, eps, t).equal(d.q_sample(x0, t, eps)) and o.target(x0, eps, t).equal(eps)
    assert o.model_time(t).equal(t)
    torch.manual_seed(0)
    model = build_dit("DiT-N/2", input_size=4, in_channels=1, num_classes=3, learn_sigma=False).eval()
    assert o.loss(model, x0, y, t, eps).equal(per_sample_loss(model, d, x0, t, y, eps))  # bit for bit
    ref = ((model(d.q_sample(x0, t, eps), t, y) - eps) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(o.loss(model, x0, y, t, eps), ref)
    assert o.sample_t(16, torch.Generator().manual_seed(4)).equal(
        torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(4)))
    assert o.sample(model, eps, y, steps=5, cfg_scale=1.5).equal(ddim_sample(model, d, eps, y, steps=5, cfg_scale=1.5))
    with pytest.raises(ConfigError, match="DDIM steps must be in"):
        o.sample(model, eps, y, steps=1001)


# ---- the meta-gradient of the flow loss against finite differences --------------------------------------

SIZE, CLASSES, B, K = 4, 3, 2, 3


def _models():
    torch.manual_seed(0)
    model = build_dit("DiT-N/2", input_size=SIZE, in_channels=1, num_classes=CLASSES, learn_sigma=False).to(DT)
    with torch.no_grad():  # leave the adaLN-Zero init: non-zero gates and output layer
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    rater = build_rater("Rater-N/2", input_size=SIZE, in_channels=1, num_classes=CLASSES).to(DT)
    return model, rater


def _batches(S: int):
    g = torch.Generator().manual_seed(1)

    def common():
        return (torch.randn(B, 1, SIZE, SIZE, generator=g, dtype=DT), torch.randint(0, CLASSES + 1, (B,), generator=g),
                torch.rand(B, generator=g, dtype=DT))

    train = [(*common(), torch.randn(B, K, 1, SIZE, SIZE, generator=g, dtype=DT)) for _ in range(S)]
    return train, (*common(), torch.randn(B, 1, SIZE, SIZE, generator=g, dtype=DT))


def _ref_losses(model, batch):
    """[B,K] flow losses from the definitions: model((1-t) x0 + t eps, 1000 t, y) against eps - x0."""
    x0, y, t, eps = batch
    tt = t.view(-1, 1, 1, 1)
    return torch.stack([((model((1 - tt) * x0 + tt * eps[:, k], 1000 * t, y) - (eps[:, k] - x0)) ** 2).mean(dim=(1, 2, 3))
                        for k in range(eps.shape[1])], dim=1)


def _ref_outer_loss(model, rater, train, val, lr):
    m = copy.deepcopy(model).eval()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for batch in train:
        x0, y, t, eps = batch
        with torch.no_grad():  # the rater sees the DiT's time units too
            w = torch.softmax(torch.stack([rater.eval()(eps[:, k], 1000 * t, x0, y) for k in range(K)], dim=1), dim=1)
        opt.zero_grad()
        (w * _ref_losses(m, batch)).sum(1).mean().backward()
        opt.step()
    with torch.no_grad():
        x0, y, t, eps = val
        return _ref_losses(m, (x0, y, t, eps[:, None])).mean().item()


@pytest.mark.parametrize("method", ["unrolled", "reverse"])
def test_flow_meta_gradient_matches_finite_differences(method):
    model, rater = _models()
    train, val = _batches(2)
    lr, h = 0.05, 1e-5
    grads = meta_gradient(model, rater, train, val, inner_lr=lr, method=method, objective=get_objective("flow"))
    norm = torch.cat([g.flatten() for g in grads]).norm()
    assert norm.item() > 1e-6
    gen = torch.Generator().manual_seed(5)
    directions = [[g / norm for g in grads]]
    d = [torch.randn(p.shape, generator=gen, dtype=DT) * p.requires_grad for p in rater.parameters()]
    dn = torch.cat([x.flatten() for x in d]).norm()
    directions.append([x / dn for x in d])
    for d in directions:
        vals = []
        for sign in (1, -1):
            r2 = copy.deepcopy(rater)
            with torch.no_grad():
                for p, di in zip(r2.parameters(), d):
                    p.add_(sign * h * di)
            vals.append(_ref_outer_loss(model, r2, train, val, lr))
        fd = (vals[0] - vals[1]) / (2 * h)
        analytic = float(sum((g * di).sum() for g, di in zip(grads, d)))
        assert abs(fd - analytic) <= 1e-4 * abs(analytic), (fd, analytic)
    # the DDPM meta-gradient of the same batches differs: the objective is really used
    ddpm_batches = [(x0, y, (t * 999).long(), eps) for x0, y, t, eps in train]
    vx0, vy, vt, veps = val
    other = meta_gradient(model, rater, ddpm_batches, (vx0, vy, (vt * 999).long(), veps), inner_lr=lr, method=method)
    assert (torch.cat([g.flatten() for g in other]) - torch.cat([g.flatten() for g in grads])).norm() > 1e-3 * norm
