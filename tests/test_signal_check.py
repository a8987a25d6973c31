"""`noiserater signal check` against independent references on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from scipy.stats import spearmanr

from noiserater.analysis.candidate_signal import SignalCheckConfig, signal_check
from noiserater.checkpoint import save_checkpoint
from noiserater.data import load_dataset
from noiserater.models import DiTSpec, build_dit_from_spec

SPEC = DiTSpec("DiT-N/2", 8, 1, 10, learn_sigma=False, class_dropout_prob=0.1)


def _ckpt(path, test_fraction):
    torch.manual_seed(0)
    model = build_dit_from_spec(SPEC)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = model.state_dict()
    save_checkpoint(path, {"step": 5, "spec": SPEC.to_dict(), "model": sd, "ema": sd, "optimizer": {},
                           "config": {"data": "digits", "seed": 0, "val_fraction": 0.1, "test_fraction": test_fraction,
                                      "label_dropout": 0.1, "batch_size": 8, "lr": 1e-3},
                           "data": {"name": "digits", "num_classes": 10, "class_names": None}}, kind="diffusion")
    return str(path)


def _ref_alignments(model, batch, val):
    from noiserater.meta.losses import candidate_losses, val_loss

    params = [p for p in model.parameters() if p.requires_grad]
    flat = lambda gs: torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)  # noqa: E731
                                 for p, g in zip(params, gs)]).double()
    gv = flat(torch.autograd.grad(val_loss(model, val), params, allow_unused=True))
    B, K = batch[3].shape[:2]
    out = torch.zeros(B, K, dtype=torch.float64)
    for b in range(B):
        one = tuple(x[b:b + 1] for x in batch)
        for k in range(K):
            out[b, k] = flat(torch.autograd.grad(candidate_losses(model, one)[0, k], params, allow_unused=True)) @ gv
    return out


def test_signal_check_matches_independent_references(tmp_path):
    from noiserater.meta.batches import MetaBatches, split_heldout
    from noiserater.meta.losses import candidate_losses, val_loss
    from noiserater.models.loading import load_diffusion

    ckpt = _ckpt(tmp_path / "dit.pt", 0.0)
    cfg = SignalCheckConfig(checkpoint=ckpt, k=3, groups=12, val_images=30, steps=2, seeds=2, optimizer="sgd",
                            lr=0.05, eval_draws=2, chunk=5)
    res = signal_check(cfg)
    model, _, _ = load_diffusion(ckpt, use_ema=False)
    model.eval()
    train, val = load_dataset("digits", "train"), load_dataset("digits", "val")
    meta, heldout = split_heldout(val, 0.5, 0)
    smp = MetaBatches(train, meta, 10, 0, 1, 3, 12, 30, 0.1, False, 1000)
    groups = smp.train_batch(0, 0, 0, 1, "cpu")
    a1 = _ref_alignments(model, groups, smp.val_batch(0, 30, 0, 1, "cpu", seed_offset=0))
    a2 = _ref_alignments(model, groups, smp.val_batch(0, 30, 0, 1, "cpu", seed_offset=1))
    rho = [spearmanr(a1[i], a2[i])[0] for i in range(12)]
    assert res["stability"]["spearman"] == pytest.approx(sum(rho) / 12, abs=1e-9)
    assert res["stability"]["argmax_agreement"] == pytest.approx(float((a1.argmax(1) == a2.argmax(1)).double().mean()))
    norms = groups[3].flatten(2).norm(dim=2)
    rho_n = [spearmanr(a1[i], norms[i])[0] for i in range(12)]
    assert res["vs_noise_norm"]["spearman"] == pytest.approx(sum(rho_n) / 12, abs=1e-9)
    with torch.no_grad():
        losses = candidate_losses(model, groups)
    rho_l = [spearmanr(a1[i], losses[i])[0] for i in range(12)]
    assert res["vs_loss"]["spearman"] == pytest.approx(sum(rho_l) / 12, abs=1e-9)
    # the vanilla arm of seed 0, rebuilt with torch.optim.SGD on candidate 0, scored on the held-out half
    f = res["few_step"]
    assert f["eval_split"].startswith("val") and f["eval_triples"] == 2 * len(heldout) == 180
    g = torch.Generator().manual_seed(4242)
    draws = []
    for _ in range(2):
        t = torch.randint(0, 1000, (len(heldout),), generator=g)
        draws.append((heldout.images, heldout.labels, t, torch.randn(heldout.images.shape, generator=g)))
    stream = MetaBatches(train, meta, 10, 1, 1, 3, 8, 30, 0.1, False, 1000)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for i in range(2):
        b = stream.train_batch(i, 0, 0, 1, "cpu")
        opt.zero_grad()
        candidate_losses(model, b)[:, 0].mean().backward()
        opt.step()
    with torch.no_grad():
        ref = sum(float(val_loss(model, d)) for d in draws) / 2
    assert f["per_seed"][0]["loss_vanilla"] == pytest.approx(ref, rel=1e-5)
    assert f["per_seed"][0]["loss_oracle"] != f["per_seed"][0]["loss_vanilla"]
    d = [s["delta_pct"] for s in f["per_seed"]]
    assert f["delta_pct"] == pytest.approx(sum(d) / 2) and f["delta_pct_se"] == pytest.approx(abs(d[0] - d[1]) / 2)


def test_signal_check_uses_the_test_split_and_zero_steps_change_nothing(tmp_path):
    ckpt = _ckpt(tmp_path / "dit.pt", 0.2)
    res = signal_check(SignalCheckConfig(checkpoint=ckpt, k=2, groups=4, val_images=8, steps=0, seeds=1, eval_draws=1))
    f = res["few_step"]
    test = load_dataset("digits", "test", seed=0, test_fraction=0.2)
    assert f["eval_split"] == "test" and f["eval_triples"] == len(test)
    assert f["delta"] == 0 and f["loss_vanilla"] == f["loss_checkpoint"]
    assert res["oracle_val_images"] == len(load_dataset("digits", "val", seed=0, test_fraction=0.2))  # all of val


def test_signal_check_cli(tmp_path):
    from noiserater.cli import main

    ckpt = _ckpt(tmp_path / "dit.pt", 0.0)
    out = tmp_path / "sc.json"
    r = CliRunner().invoke(main, ["signal", "check", "--checkpoint", ckpt, "--candidates", "2", "--groups", "4",
                                  "--val-images", "8", "--steps", "1", "--seeds", "1", "--no-progress", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "oracle stability" in r.output and "chance 50%" in r.output and "few-step gain" in r.output
    assert json.loads(out.read_text())["k"] == 2
    for args, key in ((["--candidates", "1"], "--candidates"), (["--optimizer", "lion"], "optimizer"), (["--groups", "1"], "groups")):
        r = CliRunner().invoke(main, ["signal", "check", "--checkpoint", ckpt, *args])
        assert r.exit_code == 2 and key in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = CliRunner().invoke(main, ["signal", "check", "--checkpoint", str(tmp_path / "missing.pt")])
    assert r.exit_code == 2 and "not found" in r.output and len(r.output.strip().splitlines()) == 1, r.output
