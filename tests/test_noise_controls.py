"""The controls of norm-changing policies: true noise pairing across arms, the noise-scale and DDPM-IP
input-perturbation options, and the chi-distribution statistics of the noise a run trains on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch
from click.testing import CliRunner

from noiserater.cli import main
from noiserater.diffusion import GaussianDiffusion
from noiserater.objectives import get_objective
from noiserater.selection import (
    NoiseNormStats,
    chi_cdf,
    get_policy,
    ks_distance_from_chi,
    max_norm_scale,
)
from noiserater.train import TrainConfig, draw_input_perturbation, draw_step_randomness, train, train_step

DDPM = get_objective("ddpm")

# ---- pairing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 8])
def test_vanilla_trains_on_candidate_zero_of_every_k_arm_for_every_image(k):
    y = torch.arange(16) % 10
    one = TrainConfig(candidates=1, seed=3)
    many = TrainConfig(policy="max_norm", candidates=k, seed=3)
    for step in (0, 7):
        t1, y1, c1 = draw_step_randomness(one, step, y, 10, (1, 8, 8), DDPM)
        tk, yk, ck = draw_step_randomness(many, step, y, 10, (1, 8, 8), DDPM)
        assert torch.equal(t1, tk) and torch.equal(y1, yk)
        assert ck.shape == (16, k, 1, 8, 8)
        assert torch.equal(c1[:, 0], ck[:, 0])  # every image b, not only b = 0
        # the first j candidates of a k-arm are those of a j-arm (k=8 extends k=4)
        if k > 2:
            _, _, c2 = draw_step_randomness(TrainConfig(policy="max_norm", candidates=2, seed=3), step, y, 10,
                                            (1, 8, 8), DDPM)
            assert torch.equal(c2, ck[:, :2])
        # and the candidates are independent standard normals (not one draw repeated)
        assert not torch.equal(ck[:, 0], ck[:, 1])


def test_input_perturbation_leaves_the_candidates_paired():
    y = torch.arange(8)
    plain = draw_step_randomness(TrainConfig(seed=1), 2, y, 10, (1, 4, 4), DDPM)
    ip_cfg = TrainConfig(seed=1, input_perturbation=0.1)
    ip = draw_step_randomness(ip_cfg, 2, y, 10, (1, 4, 4), DDPM)
    assert all(torch.equal(a, b) for a, b in zip(plain, ip))
    xi = draw_input_perturbation(ip_cfg, 2, (1, 4, 4), 8)
    assert xi.shape == (8, 1, 4, 4) and not torch.equal(xi / 0.1, ip[2][:, 0])
    assert draw_input_perturbation(TrainConfig(seed=1), 2, (1, 4, 4), 8) is None
    big = draw_input_perturbation(ip_cfg, 0, (1, 32, 32), 256)
    assert abs(float(big.std()) - 0.1) < 0.003  # gamma * N(0, 1)


# ---- the chi statistics against scipy --------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 4, 64, 1024])
def test_chi_cdf_matches_scipy(d):
    x = torch.linspace(0.01, d**0.5 + 6, 50, dtype=torch.float64)
    np.testing.assert_allclose(chi_cdf(x, d).numpy(), scipy.stats.chi.cdf(x.numpy(), d), rtol=1e-7, atol=1e-12)


def test_ks_distance_matches_scipy_kstest():
    g = torch.Generator().manual_seed(0)
    for d, scale in ((64, 1.0), (64, 1.1), (16, 0.9)):
        norms = torch.randn(500, d, generator=g, dtype=torch.float64).norm(dim=1) * scale
        want = scipy.stats.kstest(norms.numpy(), scipy.stats.chi(d).cdf).statistic
        assert ks_distance_from_chi(norms, d) == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("d,k", [(64, 4), (1024, 4), (16, 2), (64, 8)])
def test_max_norm_scale_matches_order_statistics(d, k):
    # independent references: scipy's chi mean, and a Monte Carlo of the largest of k Gaussian norms
    g = torch.Generator().manual_seed(d * 10 + k)
    norms = torch.randn(40_000, k, d, generator=g, dtype=torch.float64).norm(dim=-1)
    mc = float(norms.max(dim=1).values.mean()) / scipy.stats.chi(d).mean()
    c = max_norm_scale(d, k)
    assert c == pytest.approx(mc, abs=4e-3 / d**0.5 + 1e-3)
    assert max_norm_scale(d, 1) == pytest.approx(1.0, abs=1e-9)
    if (d, k) == (64, 4):
        assert c == pytest.approx(1.0917, abs=5e-4)  # the constant of the published control


def test_noise_norm_stats_of_plain_and_max_norm_noise():
    g = torch.Generator().manual_seed(0)
    plain, chosen = NoiseNormStats(), NoiseNormStats()
    pol = get_policy("max_norm", k=4)
    for _ in range(20):
        cand = torch.randn(64, 4, 1, 8, 8, generator=g)
        plain.update(cand[:, 0])
        chosen.update(pol.select(torch.zeros(64, 1, 8, 8), torch.zeros(64, dtype=torch.long),
                                 torch.zeros(64, dtype=torch.long), cand)[0])
    p, m = plain.summary(), chosen.summary()
    assert p["noise_sq_norm_per_dim"] == pytest.approx(1.0, abs=0.02)
    assert p["noise_norm_ks"] < 1.63 / (1280**0.5)  # inside the 99% band of a sample from chi_64
    assert m["noise_sq_norm_per_dim"] == pytest.approx(1.19, abs=0.02)  # E||eps||^2/d of the max of 4, d=64
    assert m["noise_norm_ks"] > 0.3
    state = chosen.state_dict()
    again = NoiseNormStats()
    again.load_state_dict(state)
    assert again.summary() == m
    chosen.reset()
    assert chosen.summary() == {}


# ---- the loss the options train on, against the DDPM formula written out ----------------------------


class _Linear(torch.nn.Module):
    """A tiny conditional 'model' (x_t, t, y) -> epsilon prediction with parameters to differentiate."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))
        self.b = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, x, t, y):
        return self.w * x + self.b * (t.float() / 1000)[:, None, None, None]


@pytest.mark.parametrize("scale,gamma", [(1.0, 0.0), (1.0917, 0.0), (1.0, 0.1), (0.9, 0.2)])
def test_train_step_loss_is_the_ddpm_formula_with_scale_and_perturbation(scale, gamma):
    g = torch.Generator().manual_seed(5)
    B = 6
    x0, cand = torch.randn(B, 1, 4, 4, generator=g), torch.randn(B, 1, 1, 4, 4, generator=g)
    xi = torch.randn(B, 1, 4, 4, generator=g)
    t, y = torch.randint(0, 1000, (B,), generator=g), torch.zeros(B, dtype=torch.long)
    model, objective = _Linear(), get_objective("ddpm")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = NoiseNormStats()
    res = train_step(model, model, objective, get_policy("vanilla"), opt, x0, t, y, cand, g, 0.0, False,
                     noise_scale=scale, perturbation=gamma * xi if gamma else None, noise_stats=stats)
    abar = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), dtype=torch.float32)[t][:, None, None, None]
    eps = scale * cand[:, 0]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * (eps + gamma * xi)
    want = ((model.w * x_t + model.b * (t.float() / 1000)[:, None, None, None]) - eps).pow(2).mean()
    assert float(res.loss) == pytest.approx(float(want.detach()), rel=1e-5)
    assert stats.summary()["noise_sq_norm_per_dim"] == pytest.approx(float(eps.pow(2).mean()), rel=1e-6)


def test_soft_policy_scales_every_candidate():
    g = torch.Generator().manual_seed(6)
    x0, cand = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 2, 1, 4, 4, generator=g)
    t, y = torch.randint(0, 1000, (3,), generator=g), torch.zeros(3, dtype=torch.long)
    model, diffusion = _Linear(), GaussianDiffusion()
    objective = get_objective("ddpm")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    res = train_step(model, model, objective, get_policy("uniform_soft", k=2), opt, x0, t, y, cand, g, 0.0,
                     False, noise_scale=1.2)
    abar = diffusion.alphas_cumprod.float()[t][:, None, None, None]
    want = 0.0
    for j in range(2):
        eps = 1.2 * cand[:, j]
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        want += 0.5 * ((model.w * x_t + model.b * (t.float() / 1000)[:, None, None, None]) - eps).pow(2).mean()
    assert float(res.loss) == pytest.approx(float(want.detach()), rel=1e-5)


# ---- end to end: a run records the noise it trained on ----------------------------------------------


def test_a_scaled_run_logs_the_norm_of_its_noise(tmp_path):
    common = dict(model="DiT-N/2", steps=4, batch_size=16, log_every=2, sample_every=100, ckpt_every=100,
                  progress=False, tensorboard=False)
    for name, extra, want in (("plain", {}, 1.0), ("scaled", {"noise_scale": 1.25}, 1.5625),
                              ("maxnorm", {"policy": "max_norm", "candidates": 4}, 1.19)):
        train(TrainConfig(run_dir=str(tmp_path / name), **common, **extra))
        recs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "noise_sq_norm_per_dim" in r]
        assert [r["step"] for r in recs] == [2, 4]
        mean = np.mean([r["noise_sq_norm_per_dim"] for r in recs])
        assert mean == pytest.approx(want, rel=0.08), name


def test_cli_refuses_out_of_range_controls(tmp_path):
    r = CliRunner().invoke(main, ["train", "--run-dir", str(tmp_path / "a"), "--noise-scale", "0"])
    assert r.exit_code != 0 and "--noise-scale" in r.output and "[0.25, 4]" in r.output
    r = CliRunner().invoke(main, ["train", "--run-dir", str(tmp_path / "b"), "--input-perturbation", "1.5"])
    assert r.exit_code != 0 and "--input-perturbation" in r.output
    r = CliRunner().invoke(main, ["train", "--run-dir", str(tmp_path / "c"), "--noise-scale", "nan"])
    assert r.exit_code != 0 and "--noise-scale" in r.output


def test_policy_norm_scale_matches_the_closed_forms_of_max_and_min_norm():
    """Measured by Monte Carlo through the policies themselves: max_norm's against the chi quadrature of
    max_norm_scale; knn's on images of zeros (the nearest noise to 0 is the shortest) against E[min of k chi_d]
    / E[chi_d] by the same quadrature; and chi_mean against scipy."""
    from scipy import stats as sps

    from noiserater.selection import chi_cdf, chi_mean, max_norm_scale, policy_norm_scale

    d, k = 64, 4
    assert chi_mean(d) == pytest.approx(sps.chi(d).mean(), rel=1e-12)
    images = torch.randn(500, 1, 8, 8)
    assert policy_norm_scale("max_norm", images, k, 50, draws=8) == pytest.approx(max_norm_scale(d, k), abs=0.003)
    x = torch.linspace(0.0, d**0.5 + 40.0, 200_001, dtype=torch.float64)
    e_min = float(torch.trapezoid((1 - chi_cdf(x, d)).pow(k), x)) / chi_mean(d)
    zeros = torch.zeros(500, 1, 8, 8)
    assert policy_norm_scale("knn", zeros, k, 50, draws=8) == pytest.approx(e_min, abs=0.003)
    # on real-looking data knn shortens the noise (||x0 - eps||^2 favours small eps), and the scale is repeatable
    data = torch.rand(500, 1, 8, 8) * 2 - 1
    a = policy_norm_scale("knn", data, k, 50, seed=3)
    assert a < 1.0 and a == policy_norm_scale("knn", data, k, 50, seed=3)
