"""Planted problems meta-training must solve: each one has a known answer, and a wrong
meta-gradient, a wrong oracle or a rater that ignores an input fails it.

1. Harmful candidates: candidate 0 of every group is PLANT x a standard normal (``planted_scale``). On a
   trained tiny DiT at inner lr 0.03 training on the planted candidate raises the validation loss (checked
   here first). Bilevel meta-training must push the planted candidate's weight well below 1/K. The bilevel
   test plants 4x: at 2.5x a small weight on the plant is close to harmless (a somewhat longer noise even
   helps at this size), so the learned weight levels off near 0.13 and where it ends below or above a bound
   depends on the machine's rounding; at 4x it settles near 0.03 for every seed measured (0, 1, 2). The
   distillation objective learns what its oracle says: the cosine oracle (direction only) rejects the
   plant; the plain alignment oracle (Theorem 4.2, first order: a 2.5x larger gradient makes a larger
   |alignment|) prefers it, and a rater distilled onto it follows.
2. A signal that needs the image: the distillation targets are planted (the oracle is replaced) as
   a_bk = mean(eps_bk) * (mean(x0_b) - c), c the median image mean. With unconditional labels the noise
   alone carries no information about the preferred direction (E[a | eps] ~ 0), so a ``no_image`` rater
   cannot rank the candidates on held-out groups while the full rater learns to.
"""

from __future__ import annotations

import json

import pytest
import torch

import noiserater.meta.outer as outer
import noiserater.metatrain as mt
from noiserater.checkpoint import save_checkpoint
from noiserater.data import load_dataset
from noiserater.meta.batches import MetaBatches, checkpoint_splits
from noiserater.meta.gradient import Reducer, inner_steps
from noiserater.meta.losses import val_loss
from noiserater.models import DiTSpec, build_dit_from_spec, build_rater
from noiserater.models.loading import load_rater

SPEC = DiTSpec("DiT-N/2", 8, 1, 10, learn_sigma=False, class_dropout_prob=0.1)
K = 4
BILEVEL_PLANT = 4.0  # the bilevel test's plant (module docstring, 1.)


def _save(path, model, unconditional: bool, steps: int) -> str:
    sd = model.state_dict()
    save_checkpoint(path, {"step": steps, "spec": SPEC.to_dict(), "model": sd, "ema": sd, "optimizer": {},
                           "config": {"data": "digits", "seed": 0, "val_fraction": 0.1, "label_dropout": 0.1,
                                      "unconditional": unconditional},
                           "data": {"name": "digits", "num_classes": 10, "class_names": None}}, kind="diffusion")
    return str(path)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """DiT-N/2 trained 300 AdamW steps on the digits train split (validation loss ~0.95 -> ~0.13)."""
    torch.manual_seed(0)
    model = build_dit_from_spec(SPEC)
    data = load_dataset("digits", "train")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(data), (64,), generator=g)
        batch = (data.images[idx], data.labels[idx], torch.randint(0, 1000, (64,), generator=g),
                 torch.randn(64, 1, 8, 8, generator=g))
        loss = val_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _save(tmp_path_factory.mktemp("planted") / "dit300.pt", model, False, 300)


@pytest.fixture(scope="module")
def unconditional_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return _save(tmp_path_factory.mktemp("planted_u") / "dit.pt", build_dit_from_spec(SPEC), True, 0)


def _cfg(ckpt, run_dir, **kw) -> mt.MetaTrainConfig:
    base = dict(checkpoint=ckpt, run_dir=str(run_dir), rater="Rater-N/2", candidates=K, ckpt_every=1000,
                progress=False, eval_every=0)
    base.update(kw)
    return mt.MetaTrainConfig(**base)


def _probe(ckpt, scale):
    """256 fixed groups (their own seed) with the same plant: where the rater's weights are read."""
    from noiserater.models.loading import load_diffusion

    _, _, state = load_diffusion(ckpt)
    train, val, _ = checkpoint_splits(state["config"], "digits")
    sampler = MetaBatches(train, val, 10, 999, 1, K, 256, 8, 0.1, False, 1000, scale)
    return sampler, sampler.train_batch(0, 0, 0, 1, "cpu")


def _planted_weight(rater, batch) -> float:
    x0, y, t, eps = batch
    with torch.no_grad():
        return float(torch.softmax(rater.score_candidates(eps, t, x0, y), dim=1)[:, 0].mean())


def _initial_rater():
    torch.manual_seed(0)  # metatrain's initialisation with seed 0
    return build_rater("Rater-N/2", input_size=8, in_channels=1, num_classes=10)


def test_bilevel_learns_to_down_weight_harmful_candidates(trained_checkpoint, tmp_path):
    from noiserater.models.loading import load_diffusion

    sampler, probe = _probe(trained_checkpoint, BILEVEL_PLANT)
    # precondition: the plant really is harmful at this inner lr (S=2 SGD steps), the others help
    model, _, _ = load_diffusion(trained_checkpoint, use_ema=False)
    model.eval()
    sampler2 = MetaBatches(sampler.train, sampler.val, 10, 0, 2, K, 16, 64, 0.1, False, 1000, BILEVEL_PLANT)
    harm, good = [], []
    for n in range(4):
        batches, val = sampler2.outer(n, 0, 1, "cpu")
        with torch.no_grad():
            l0 = float(val_loss(model, val))
        for col, out in ((0, harm), (1, good)):
            w = [torch.nn.functional.one_hot(torch.full((b[0].shape[0],), col), K).float() for b in batches]
            theta = inner_steps(model, batches, w, inner_lr=0.03, inner_optimizer="sgd", reducer=Reducer())
            with torch.no_grad():
                out.append(float(val_loss(model, val, params=theta)) - l0)
    assert sum(harm) > 0 > sum(good), (harm, good)

    init = _planted_weight(_initial_rater(), probe)
    summary = mt.metatrain(_cfg(trained_checkpoint, tmp_path / "run", objective="bilevel", outer_steps=40,
                                inner_steps=2, batch_size=16, val_batch_size=64, inner_lr=0.03, lr=1e-2,
                                planted_scale=BILEVEL_PLANT))
    final = _planted_weight(load_rater(summary["rater"]), probe)
    assert init > 0.2  # the random rater does not start out rejecting them
    assert final < 0.4 / K, (init, final)  # measured 0.026 (meta-training seeds 1, 2: 0.022, 0.029)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    first, last = [r["planted_weight"] for r in rows[:10]], [r["planted_weight"] for r in rows[-10:]]
    assert sum(last) < sum(first)


@pytest.mark.parametrize("oracle,expect", [("cosine", "down"), ("align", "up")])
def test_distill_follows_its_oracle_on_planted_candidates(trained_checkpoint, tmp_path, oracle, expect):
    from noiserater.meta.oracle import distillation_targets, oracle_scores, validation_gradient
    from noiserater.models.loading import load_diffusion

    sampler, probe = _probe(trained_checkpoint, 2.5)
    # what the oracle itself says about the plant (an independent evaluation on the probe groups)
    model, _, _ = load_diffusion(trained_checkpoint, use_ema=False)
    _, g = validation_gradient(model, sampler.val_batch(0, 256, 0, 1, "cpu"))
    target = float(distillation_targets(oracle_scores(model, probe, g, oracle), 0.5)[:, 0].mean())
    summary = mt.metatrain(_cfg(trained_checkpoint, tmp_path / "run", objective="distill", distill_oracle=oracle,
                                outer_steps=40, batch_size=16, distill_val_batch_size=256, lr=1e-2,
                                planted_scale=2.5))
    final = _planted_weight(load_rater(summary["rater"]), probe)
    if expect == "down":
        assert target < 0.1 and final < 0.5 / K, (target, final)  # measured 0.048 and 0.074
    else:
        assert target > 1.0 / K and final > 1.5 / K, (target, final)  # measured 0.42 and 0.59


def _planted_image_targets(c: float):
    def oracle(model, batch, val, reducer, mode="align", objective=None):
        x0, _, _, eps = batch
        return 0.0, eps.flatten(2).mean(dim=2) * (x0.flatten(1).mean(dim=1, keepdim=True) - c)

    return oracle


@pytest.mark.parametrize("ablation", ["full", "no_image"])
def test_distilled_signal_that_needs_the_image(unconditional_checkpoint, tmp_path, monkeypatch, ablation):
    train = load_dataset("digits", "train")
    c = float(train.images.flatten(1).mean(dim=1).median())
    monkeypatch.setattr(outer, "oracle_at", _planted_image_targets(c))  # what DistillStep calls
    summary = mt.metatrain(_cfg(unconditional_checkpoint, tmp_path / "run", objective="distill", ablation=ablation,
                                outer_steps=150, batch_size=64, lr=1e-3, distill_val_batch_size=8, eval_every=75,
                                eval_batches=4))
    evals = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r["eval"] for r in evals if "eval" in r]
    assert [e["groups"] for e in evals] == [256] * len(evals) and len(evals) == 3
    final = evals[-1]
    if ablation == "full":
        assert final["spearman"] > 0.45 and final["argmax_agreement"] > 0.5, final  # measured 0.69 / 0.79
        assert summary["best_eval"]["step"] == 150
    else:  # the noise alone says nothing about the preferred direction: near zero on held-out groups
        assert abs(final["spearman"]) < 0.25 and final["argmax_agreement"] < 0.45, final
