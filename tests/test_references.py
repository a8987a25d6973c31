"""Reference tests for what the headline numbers stand on.

- the training step of :func:`noiserater.train.train` against a hand-written loop: the epsilon loss built
  from an independently computed schedule, the global gradient norm computed here and clipping applied by
  hand, ``torch.optim.AdamW`` (non-fused, same lr / weight decay / betas), and the EMA in closed form;
- the label-dropout rate within a binomial interval (scipy.stats.binomtest);
- a model whose held-out loss demonstrably falls (and a negative control that does not);
- the clipped DDIM path (``clip=True``, used for every pixel-space FID) against diffusers' DDIMScheduler
  with ``clip_sample=True, use_clipped_model_output=True``;
- InceptionV3 pool3 features and precision/recall against torch-fidelity with shared random weights
  (skipped when torch-fidelity is not installed: ``pip install --no-deps torch-fidelity``; it imports
  torchvision, which is stubbed here because its CPU wheel does not load against this torch).
"""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from noiserater.checkpoint import load_checkpoint
from noiserater.diffusion import GaussianDiffusion, ddim_sample, ddim_step, ddim_timesteps
from noiserater.models import DiTSpec, build_dit, build_dit_from_spec
from noiserater.models.loading import load_diffusion
from noiserater.objectives import get_objective
from noiserater.randomness import batch_indices, drop_labels
from noiserater.study.reproduce import fixed_triple_losses
from noiserater.train import TrainConfig, draw_step_randomness, load_splits, train

TINY = dict(data="digits", model="DiT-N/2", batch_size=16, lr=1e-3, ema_decay=0.9, log_every=1, sample_every=1000,
            ckpt_every=1000, sample_steps=2, tensorboard=False, progress=False)


def _abar() -> torch.Tensor:
    """alpha-bar of the linear schedule 1e-4..0.02 over 1000 steps, computed here in numpy float64."""
    return torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))


# ---- the training step against a hand-written loop ------------------------------------------------------


def _reference_run(cfg: TrainConfig, steps: int):
    """The same steps as ``train(cfg)``, written out by hand. Returns (model, ema, optimiser, pre-clip
    gradient norms, losses)."""
    data = load_splits(cfg, "train")
    C, H = data.channels, data.image_size
    spec = DiTSpec(cfg.model, H, C, data.num_classes, False, 0.0)
    torch.manual_seed(cfg.seed)
    model = build_dit_from_spec(spec).train()
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                            eps=1e-8, foreach=False, fused=False)
    abar = _abar()
    norms, losses = [], []
    for step in range(steps):
        idx = batch_indices(len(data), cfg.batch_size, step, cfg.seed)
        t, y, cand = draw_step_randomness(cfg, step, data.labels[idx], data.num_classes, (C, H, H), get_objective("ddpm"))
        x0, noise = data.images[idx], cand[:, 0]
        a = abar[t].view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).float()
        loss = (model(x_t, t, y)[:, :C] - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))  # the global 2-norm, by hand
        if cfg.grad_clip > 0:
            scale = min(1.0, cfg.grad_clip / (norm + 1e-6))  # clip_grad_norm_'s definition
            for g in grads:
                g.mul_(scale)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay
        with torch.no_grad():
            for n, p in model.named_parameters():
                ema[n] = decay * ema[n] + (1 - decay) * p.detach()
        norms.append(norm)
        losses.append(float(loss.detach()))
    return model, ema, opt, norms, losses


@pytest.mark.parametrize("warmup,clip", [(False, 10.0), (True, 0.05)], ids=["plain-ema", "warmup-ema-clipping"])
def test_training_steps_equal_a_hand_written_adamw_loop(tmp_path, warmup, clip):
    steps = 2
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), steps=steps, ema_warmup=warmup, grad_clip=clip,
                      weight_decay=0.05, **TINY)
    train(cfg)
    st = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt", kind="diffusion")
    model, ema, opt, norms, losses = _reference_run(cfg, steps)

    # the logged losses and pre-clip gradient norms are the ones computed here
    recs = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    np.testing.assert_allclose([r["loss"] for r in recs], losses, rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in recs], norms, rtol=1e-4)
    if clip < 1.0:  # the clipping case really clips (every step's norm is far above the threshold)
        assert min(norms) > 5 * clip
    else:
        assert max(norms) < clip  # and the other does not

    torch.manual_seed(cfg.seed)
    init = build_dit_from_spec(DiTSpec(cfg.model, 8, 1, 10, False, 0.0)).state_dict()
    for n, p in model.named_parameters():
        moved = (p.detach() - init[n]).abs().max()
        torch.testing.assert_close(st["model"][n], p.detach(), rtol=1e-5, atol=1e-7, msg=f"model.{n}")
        torch.testing.assert_close(st["ema"][n], ema[n], rtol=1e-5, atol=1e-7, msg=f"ema.{n}")
        if n == "final_layer.linear.weight":
            assert moved > 1e-4  # the comparison is not between two unchanged copies
    # the EMA in closed form over the two steps, from the weights train() itself wrote after step 1 and 2:
    # e2 = d1 (d0 w0 + (1 - d0) w1) + (1 - d1) w2, with d_n = min(0.9, (1 + n) / (10 + n)) under warmup
    d0, d1 = (1 / 10, 2 / 11) if warmup else (0.9, 0.9)
    one = TrainConfig(**{**vars(cfg), "run_dir": str(tmp_path / "one"), "steps": 1})
    train(one)
    w1 = load_checkpoint(tmp_path / "one" / "checkpoints" / "latest.pt", kind="diffusion")["model"]
    for n, w0 in init.items():
        if n in ema:
            torch.testing.assert_close(st["ema"][n], d1 * (d0 * w0 + (1 - d0) * w1[n]) + (1 - d1) * st["model"][n],
                                       rtol=1e-5, atol=1e-7, msg=f"ema closed form {n}")
    # AdamW's moments and step count
    ref_state = opt.state_dict()["state"]
    got_state = st["optimizer"]["state"]
    assert len(got_state) == len(ref_state) == sum(p.grad is not None for p in model.parameters())
    for i in ref_state:
        assert float(got_state[i]["step"]) == steps
        torch.testing.assert_close(got_state[i]["exp_avg"], ref_state[i]["exp_avg"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(got_state[i]["exp_avg_sq"], ref_state[i]["exp_avg_sq"], rtol=1e-4, atol=1e-12)
    pg = st["optimizer"]["param_groups"][0]
    assert (pg["lr"], pg["weight_decay"], tuple(pg["betas"]), pg["eps"]) == (cfg.lr, 0.05, (0.9, 0.999), 1e-8)


def test_adam_update_closed_form_on_the_first_step(tmp_path):
    """Step 1 of AdamW from zero moments moves each weight by -lr * (g/(|g| + eps')) - lr * wd * w, with
    g the clipped gradient: checked on the output layer without any optimiser library."""
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), steps=1, ema_warmup=False, grad_clip=0.05, weight_decay=0.05,
                      **TINY)
    train(cfg)
    st = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt", kind="diffusion")
    data = load_splits(cfg, "train")
    torch.manual_seed(cfg.seed)
    model = build_dit_from_spec(DiTSpec(cfg.model, 8, 1, 10, False, 0.0)).train()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = batch_indices(len(data), cfg.batch_size, 0, cfg.seed)
    t, y, cand = draw_step_randomness(cfg, 0, data.labels[idx], 10, (1, 8, 8), get_objective("ddpm"))
    a = _abar()[t].view(-1, 1, 1, 1)
    noise = cand[:, 0]
    x_t = (a.sqrt() * data.images[idx].double() + (1 - a).sqrt() * noise.double()).float()
    (model(x_t, t, y)[:, :1] - noise).pow(2).mean().backward()
    norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
    n = "final_layer.linear.weight"
    g = dict(model.named_parameters())[n].grad.double() * min(1.0, 0.05 / (float(norm) + 1e-6))
    # m = 0.1 g, v = 0.001 g^2; bias-corrected: m^ = g, v^ = g^2; AdamW: w <- w (1 - lr wd) - lr m^/(sqrt(v^) + eps)
    expected = init[n].double() * (1 - cfg.lr * 0.05) - cfg.lr * g / (g.abs() + 1e-8)
    torch.testing.assert_close(st["model"][n].double(), expected, rtol=1e-5, atol=1e-8)


# ---- label dropout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prob", [0.1, 0.3])
def test_label_dropout_rate_within_a_binomial_interval(prob):
    n_per, draws, null = 1000, 100, 10
    y = torch.arange(n_per) % 10
    dropped = kept_changed = 0
    for i in range(draws):
        out = drop_labels(y, null, prob, torch.Generator().manual_seed(i))
        is_null = out == null
        dropped += int(is_null.sum())
        kept_changed += int((out[~is_null] != y[~is_null]).sum())
    total = n_per * draws
    assert kept_changed == 0  # a label that is not dropped is unchanged
    res = binomtest(dropped, total, prob)
    ci = res.proportion_ci(confidence_level=0.999)
    assert ci.low <= prob <= ci.high and res.pvalue > 1e-3, (dropped / total, ci)
    # the interval is tight enough to tell prob from a nearby wrong rate
    assert ci.high - ci.low < 0.01


def test_label_dropout_rate_of_the_training_randomness():
    """Over many steps of the training loop's own draws (label_dropout 0.1), about 10% of labels become the
    null class; with --unconditional every label is the null class."""
    cfg = TrainConfig(run_dir="unused", **TINY)
    y = torch.arange(256) % 10
    dropped = sum(int((draw_step_randomness(cfg, s, y, 10, (1, 2, 2), get_objective("ddpm"))[1] == 10).sum()) for s in range(200))
    ci = binomtest(dropped, 256 * 200, 0.1).proportion_ci(confidence_level=0.999)
    assert ci.low <= 0.1 <= ci.high, dropped / (256 * 200)
    un = TrainConfig(run_dir="unused", unconditional=True, **TINY)
    assert (draw_step_randomness(un, 0, y, 10, (1, 2, 2), get_objective("ddpm"))[1] == 10).all()


# ---- a model whose loss falls ---------------------------------------------------------------------------


def _heldout(model, val) -> float:
    with torch.no_grad():
        return float(fixed_triple_losses(model.eval(), val.images, val.labels, draws=4, seed=0)[0].mean())


def test_loss_falls_over_100_steps_on_digits(tmp_path):
    """DiT-N/2 on digits: the EMA model's loss on fixed held-out (image, timestep, noise) triples of the
    validation split falls from ~1 (adaLN-Zero starts at eps = 0) to well under half of it in 100 steps;
    the same run at a learning rate 10^4 times smaller (a stand-in for an optimiser that does not move)
    does not."""
    base = dict(TINY, batch_size=32, log_every=10, sample_every=10_000, ckpt_every=10_000)
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), steps=100, **base)
    train(cfg)
    val = load_splits(cfg, "val")
    torch.manual_seed(cfg.seed)
    initial = _heldout(build_dit_from_spec(DiTSpec(cfg.model, 8, 1, 10, False, 0.0)), val)
    trained = _heldout(load_diffusion(tmp_path / "run" / "checkpoints" / "latest.pt")[0], val)
    raw = _heldout(load_diffusion(tmp_path / "run" / "checkpoints" / "latest.pt", use_ema=False)[0], val)
    assert 0.9 < initial < 1.1
    assert trained < 0.5 * initial and raw < 0.5 * initial, (initial, trained, raw)
    recs = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < 0.5 * recs[0]["loss"]  # the training loss falls too

    frozen = TrainConfig(run_dir=str(tmp_path / "frozen"), steps=100, **{**base, "lr": 1e-7})
    train(frozen)
    stuck = _heldout(load_diffusion(tmp_path / "frozen" / "checkpoints" / "latest.pt")[0], val)
    assert stuck > 0.9 * initial, stuck


# ---- clipped DDIM against diffusers ---------------------------------------------------------------------


def _clipping_scheduler(diffusion: GaussianDiffusion, steps: int):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas.numpy(),
                      clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
                      timestep_spacing="leading", prediction_type="epsilon")
    s.set_timesteps(steps)
    return s


def test_clipped_ddim_step_matches_diffusers():
    d = GaussianDiffusion()
    sched = _clipping_scheduler(d, 20)
    ts = ddim_timesteps(1000, 20)
    assert ts == sched.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    clipped_somewhere = 0
    for i, t in enumerate(ts):
        x, eps = 1.5 * torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        ours = ddim_step(d, x, t, t_prev, eps, clip=True)
        ref = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        torch.testing.assert_close(ours, ref, rtol=2e-5, atol=2e-5)
        if not torch.allclose(ours, ddim_step(d, x, t, t_prev, eps, clip=False), atol=1e-3):
            clipped_somewhere += 1
    assert clipped_somewhere >= 10  # the clamp is active on most steps, so the check means something
    # the last step lands on the clipped x0 prediction: every value in [-1, 1]
    assert ddim_step(d, 3 * torch.randn(4, 1, 4, 4), ts[-1], -1, torch.randn(4, 1, 4, 4), clip=True).abs().max() <= 1


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_clipped_ddim_trajectory_matches_diffusers(cfg_scale):
    d = GaussianDiffusion()
    torch.manual_seed(0)
    model = build_dit("DiT-N/2", input_size=8, in_channels=3, num_classes=3, learn_sigma=True)
    with torch.no_grad():  # away from adaLN-Zero's identity start, with outputs large enough to clip
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    steps = 10
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2])
    ours = ddim_sample(model, d, noise, y, steps=steps, cfg_scale=cfg_scale, clip=True)
    sched = _clipping_scheduler(d, steps)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            tt = torch.full((3,), int(t))
            e_c = model(x, tt, y)[:, :3]
            e_u = model(x, tt, torch.full_like(y, 3))[:, :3]
            eps = e_u + cfg_scale * (e_c - e_u)
            x = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    assert ours.abs().max() <= 1 + 1e-6
    unclipped = ddim_sample(model, d, noise, y, steps=steps, cfg_scale=cfg_scale, clip=False)
    assert (unclipped - ours).abs().max() > 0.05  # clipping changed the trajectory


# ---- InceptionV3 and precision/recall against torch-fidelity --------------------------------------------


def _import_torch_fidelity():
    """torch-fidelity's package imports torchvision at import time (datasets, transforms, models) though
    the InceptionV3 extractor and the precision/recall code use none of it; stub it when it cannot load."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchvision")
        stub.__noiserater_stub__ = True
        for sub in ("datasets", "transforms", "transforms.functional", "models"):
            sys.modules[f"torchvision.{sub}"] = types.ModuleType(f"torchvision.{sub}")
        sys.modules["torchvision"] = stub
        stub.datasets, stub.transforms, stub.models = (sys.modules[f"torchvision.{s}"] for s in ("datasets", "transforms", "models"))
        stub.transforms.functional = sys.modules["torchvision.transforms.functional"]
        for n in ("CIFAR10", "STL10", "CIFAR100"):
            setattr(stub.datasets, n, object)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        from torch_fidelity.metric_prc import calculate_precision_recall_full
    except ImportError as e:
        pytest.skip(f"torch-fidelity is not installed ({e}); pip install --no-deps torch-fidelity")
    return FeatureExtractorInceptionV3, calculate_precision_recall_full


@pytest.fixture
def torch_fidelity():
    saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
    yield _import_torch_fidelity()
    for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        if getattr(sys.modules[name], "__noiserater_stub__", False) or name not in saved:
            del sys.modules[name]
    sys.modules.update(saved)


def test_inception_features_equal_torch_fidelity(torch_fidelity, tmp_path):
    """The same random weights in both networks (BatchNorm statistics set from a batch, so activations are
    O(1) rather than vanishing): at 299x299 the 2048-d pool3 features are identical. (Smaller images are
    resized differently: bilinear like pytorch-fid here, TensorFlow-1 style in torch-fidelity.)"""
    FeatureExtractorInceptionV3, _ = torch_fidelity
    from noiserater.eval.inception import InceptionV3

    torch.manual_seed(0)
    net = InceptionV3()
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 256, (2, 3, 299, 299), generator=g, dtype=torch.uint8)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0  # running statistics := this batch's
    with torch.no_grad():
        net.train()(calib.float() / 128 - 1)
    net.eval()
    path = tmp_path / "inception-random.pth"
    torch.save(net.state_dict(), path)
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    images = torch.randint(0, 256, (2, 3, 299, 299), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        ours = net(images.float() / 128 - 1)  # torch-fidelity's (x - 128) / 128
        theirs = ref(images)[0]
    assert ours.shape == theirs.shape == (2, 2048)
    assert ours.std() > 0.05 and ours.abs().mean() > 0.05
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_precision_recall_equal_torch_fidelity(torch_fidelity):
    from noiserater.eval.frechet import precision_recall

    _, calculate_precision_recall_full = torch_fidelity
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 32, generator=g, dtype=torch.float64)
    fake = 0.8 * torch.randn(300, 32, generator=g, dtype=torch.float64) + 0.3
    ours = precision_recall(real, fake, k=3)
    p, r = calculate_precision_recall_full(fake, real, neighborhood=3)  # its convention: generated first
    # the same counts (torch-fidelity averages in float32): 1 sample is 1/300 or 1/400 of a share
    assert round(ours["precision"] * 300) == round(p * 300) and round(ours["recall"] * 400) == round(r * 400)
    assert ours["precision"] == pytest.approx(p, abs=1e-6) and ours["recall"] == pytest.approx(r, abs=1e-6)
    assert 0.05 < p < 0.95 and 0.05 < r < 0.95 and abs(p - r) > 0.02  # not a degenerate case
