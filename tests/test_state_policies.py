"""rater_sample, uniform_soft, the oracle policies and the online rater, against references."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from scipy import stats

from noiserater.checkpoint import load_checkpoint
from noiserater.cli import main
from noiserater.data import load_dataset
from noiserater.diffusion import GaussianDiffusion
from noiserater.models import build_dit, build_rater
from noiserater.models.loading import save_rater
from noiserater.objectives import get_objective
from noiserater.selection import (
    NoiseSelector,
    dit_passes,
    equal_cost_control,
    get_policy,
    gumbel_argmax,
)
from noiserater.train import TrainConfig, train

TINY = dict(data="digits", model="DiT-N/2", batch_size=8, lr=1e-3, ema_decay=0.9, log_every=1, sample_every=1000,
            ckpt_every=1000, sample_steps=2, tensorboard=False, progress=False, split_seed=0, test_fraction=0.1,
            oracle_val_batch=32)
DIFF = GaussianDiffusion()


def test_gumbel_sampling_matches_the_softmax_distribution():
    scores = torch.tensor([[0.0, 1.0, -0.5, 2.0]]).repeat(40_000, 1)
    g = torch.Generator().manual_seed(0)
    for tau in (1.0, 0.5):
        idx = gumbel_argmax(scores, tau, g)
        counts = torch.bincount(idx, minlength=4).numpy()
        p = torch.softmax(scores[0].double() / tau, 0).numpy()
        chi2 = stats.chisquare(counts, p * counts.sum())
        assert chi2.pvalue > 1e-3, (tau, counts, p)
    # T -> 0 is argmax (the paper's policy)
    assert torch.equal(gumbel_argmax(scores[:100], 1e-6, g), torch.full((100,), 3))


def test_rater_sample_policy_draws_from_the_rater_softmax_and_is_repeatable():
    torch.manual_seed(0)
    rater = build_rater("Rater-N/2", input_size=8, in_channels=1, num_classes=10)
    pol = get_policy("rater_sample", 4, rater=rater, temperature=1.0)
    x0 = torch.randn(2000, 1, 8, 8)
    t = torch.randint(0, 1000, (2000,))
    y = torch.randint(0, 10, (2000,))
    cand = torch.randn(2000, 4, 1, 8, 8)
    noise, idx = pol.select(x0, t, y, cand, torch.Generator().manual_seed(1))
    noise2, idx2 = pol.select(x0, t, y, cand, torch.Generator().manual_seed(1))
    assert torch.equal(idx, idx2) and torch.equal(noise, cand[torch.arange(2000), idx])
    with torch.no_grad():
        p = torch.softmax(torch.stack([rater(cand[:, j], t, x0, y) for j in range(4)], 1), 1)
    # The chosen candidate's mean probability is E[sum_k p_k^2] under sampling, not max p (argmax)
    chosen = p[torch.arange(2000), idx]
    expected = (p * p).sum(1)
    assert abs(float(chosen.mean() - expected.mean())) < 4 * float(chosen.std()) / 2000 ** 0.5
    assert float(chosen.mean()) < float(p.max(1).values.mean())


def test_cost_classes_and_controls():
    assert dit_passes("uniform_soft", 4) == 4 and dit_passes("rater_sample", 4) == 1
    assert equal_cost_control("rater_soft", 4) == ("uniform_soft", 4)
    assert equal_cost_control("oracle_alignment", 4) == ("vanilla", 1)


def test_uniform_soft_train_loss_is_the_mean_of_the_k_candidate_losses(tmp_path):
    """One step of uniform_soft equals one AdamW step on the hand-written mean over the k candidates."""
    cfg = TrainConfig(run_dir=str(tmp_path / "u"), steps=1, policy="uniform_soft", candidates=3, **TINY)
    summary = train(cfg)
    from noiserater.randomness import batch_indices
    from noiserater.train import draw_step_randomness, load_splits

    data = load_splits(cfg, "train")
    idx = batch_indices(len(data), cfg.batch_size, 0, cfg.seed)
    t, y, cand = draw_step_randomness(cfg, 0, data.labels[idx], 10, (1, 8, 8), get_objective("ddpm"))
    torch.manual_seed(cfg.seed)
    model = build_dit("DiT-N/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, class_dropout_prob=0.0)
    x0 = data.images[idx]
    ref = sum(((model(DIFF.q_sample(x0, t, cand[:, j]), t, y) - cand[:, j]) ** 2).mean() for j in range(3)) / 3
    assert summary["final_loss"] == pytest.approx(float(ref), rel=1e-5)
    # ... and the update is one AdamW step (clipped as train clips) on that hand-written loss
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    ref.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    trained = load_checkpoint(summary["checkpoint"], kind="diffusion")["model"]
    for name, p in model.state_dict().items():
        torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-7, msg=name)


def test_oracle_selector_picks_the_candidate_with_the_largest_alignment():
    torch.manual_seed(0)
    model = build_dit("DiT-N/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, class_dropout_prob=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    val = load_dataset("digits", "val")
    sel = NoiseSelector.oracle(model, val.images, val.labels, k=3, val_batch=16)
    assert sel.name == "oracle_alignment"
    x0, y, t = val.images[:4], val.labels[:4], torch.randint(0, 1000, (4,))
    cand = torch.randn(4, 3, 1, 8, 8)
    _, idx = sel.select(x0, t, y, cand)
    # reference: explicit per-candidate gradients dotted with the validation gradient
    vb = sel.policy.scorer.draw_val_batch(0)
    params = [p for p in model.parameters() if p.requires_grad]
    gv = torch.autograd.grad(((model(DIFF.q_sample(vb[0], vb[2], vb[3]), vb[2], vb[1]) - vb[3]) ** 2).mean(), params)
    ref = torch.zeros(4, 3)
    for b in range(4):
        for j in range(3):
            lb = ((model(DIFF.q_sample(x0[b:b + 1], t[b:b + 1], cand[b:b + 1, j]), t[b:b + 1], y[b:b + 1]) - cand[b:b + 1, j]) ** 2).mean()
            ref[b, j] = sum((g1 * g2).sum() for g1, g2 in zip(torch.autograd.grad(lb, params), gv))
    assert torch.equal(idx, ref.argmax(1))
    anti = NoiseSelector.oracle(model, val.images, val.labels, k=3, mode="anti", val_batch=16)
    assert torch.equal(anti.select(x0, t, y, cand)[1], ref.argmin(1))


@pytest.mark.parametrize("policy,extra", [("oracle_alignment", {"oracle_every": 2}),
                                          ("rater_online", {"online_every": 2, "online_steps": 2, "online_batch": 4,
                                                            "online_rater": "FastRater-N/2"})])
def test_state_dependent_policies_resume_bit_exact(tmp_path, policy, extra):
    """3 steps + resume to 5 equals 5 straight steps: the cached validation gradient / online rater is saved."""
    kw = {**TINY, **extra, "policy": policy, "candidates": 3}
    straight = train(TrainConfig(run_dir=str(tmp_path / "a"), steps=5, **kw))
    train(TrainConfig(run_dir=str(tmp_path / "b"), steps=3, **kw))
    resumed = train(TrainConfig(run_dir=str(tmp_path / "b"), steps=5, **kw), resume=True)
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "latest.pt", kind="diffusion")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "latest.pt", kind="diffusion")
    for n in a["model"]:
        assert torch.equal(a["model"][n], b["model"][n]), n
    assert straight["final_loss"] == resumed["final_loss"]
    assert a["selection_state"]["refreshes"] >= 1


def test_online_rater_is_refreshed_and_changes(tmp_path):
    kw = {**TINY, "policy": "rater_online", "candidates": 3, "online_every": 2, "online_steps": 3, "online_batch": 4,
          "online_rater": "FastRater-N/2"}
    train(TrainConfig(run_dir=str(tmp_path / "o"), steps=4, **kw))
    st = load_checkpoint(tmp_path / "o" / "checkpoints" / "latest.pt", kind="diffusion")["selection_state"]
    assert st["refreshes"] == 2 and st["key"] == 1
    torch.manual_seed(TINY.get("seed", 0) + 1)
    init = build_rater("FastRater-N/2", input_size=8, in_channels=1, num_classes=10).state_dict()
    assert any(not torch.equal(init[n], st["rater"][n]) for n in init)  # distillation moved the weights


def test_cli_policies_and_refusals(tmp_path):
    r = CliRunner()
    base = ["train", "--data", "digits", "--model", "DiT-N/2", "--steps", "2", "--batch-size", "8", "--no-progress",
            "--no-tensorboard", "--sample-every", "1000", "--sample-steps", "2", "--test-fraction", "0.1"]
    torch.manual_seed(0)
    rater_path = tmp_path / "r.pt"
    save_rater(rater_path, build_rater("FastRater-N/2", input_size=8, in_channels=1, num_classes=10))
    for policy, extra in (("uniform_soft", []), ("rater_sample", ["--rater", str(rater_path), "--temperature", "0.5"]),
                          ("oracle_cosine", ["--oracle-val-batch-size", "16"])):
        res = r.invoke(main, base + ["--run-dir", str(tmp_path / policy), "--policy", policy, "--candidates", "2", *extra])
        assert res.exit_code == 0, res.output
    res = r.invoke(main, base + ["--run-dir", str(tmp_path / "bad"), "--policy", "max_norm"])
    assert res.exit_code == 2 and "candidates" in res.output and "2 or more" in res.output
    res = r.invoke(main, base + ["--run-dir", str(tmp_path / "bad2"), "--policy", "uniform_soft", "--candidates", "2",
                                 "--rater", str(rater_path)])
    assert res.exit_code == 2 and "does not use a rater" in res.output
