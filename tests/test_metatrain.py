"""`noiserater metatrain`: logging, rater checkpoints, exact resume, the inner-lr sweep, and
multi-process runs (2 gloo processes) against one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from noiserater.checkpoint import load_checkpoint, save_checkpoint
from noiserater.meta import Reducer, meta_gradient_info
from noiserater.metatrain import MetaTrainConfig, metatrain
from noiserater.models import DiTSpec, build_dit_from_spec, build_rater
from noiserater.models.loading import load_rater

SPEC = DiTSpec("DiT-N/2", 8, 1, 10, learn_sigma=False, class_dropout_prob=0.1)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A DiT-N/2 digits checkpoint with random non-zero weights (adaLN-Zero init perturbed)."""
    torch.manual_seed(0)
    model = build_dit_from_spec(SPEC)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "dit.pt"
    sd = model.state_dict()
    save_checkpoint(path, {"step": 7, "spec": SPEC.to_dict(), "model": sd, "ema": sd, "optimizer": {},
                           "config": {"data": "digits", "seed": 0, "val_fraction": 0.1, "label_dropout": 0.1},
                           "data": {"name": "digits", "num_classes": 10, "class_names": None}}, kind="diffusion")
    return str(path)


def tiny_cfg(ckpt, run_dir, **kw) -> MetaTrainConfig:
    base = dict(checkpoint=ckpt, run_dir=str(run_dir), rater="Rater-N/2", outer_steps=3, inner_steps=2, candidates=3,
                batch_size=4, val_batch_size=8, inner_lr=0.05, lr=1e-3, ckpt_every=2, progress=False, eval_every=0)
    base.update(kw)
    return MetaTrainConfig(**base)


def read_all(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def read_metrics(run_dir):
    """The per-step records (held-out evaluations are records with an "eval" key)."""
    return [r for r in read_all(run_dir) if "eval" not in r]


def read_evals(run_dir):
    return [r for r in read_all(run_dir) if "eval" in r]


def test_metatrain_logs_and_writes_a_loadable_rater(tiny_checkpoint, tmp_path):
    summary = metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "run"))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["uniform_gain"] == pytest.approx(r["val_loss_init"] - r["val_loss_uniform"], abs=1e-7)
        assert r["rater_advantage"] == pytest.approx(r["val_loss_uniform"] - r["val_loss_rater"], abs=1e-7)
        assert 0 < r["weight_entropy"] <= r["weight_entropy_uniform"] + 1e-6
        assert r["score_std"] > 0 and r["time_s"] > 0 and r["meta_grad_norm"] > 0
    rater = load_rater(summary["rater"], expect=SPEC)  # the entry point of the selection policies
    assert rater.spec.name == "Rater-N/2"
    # the rater moved away from its initialisation
    torch.manual_seed(0)
    init = build_rater("Rater-N/2", input_size=8, in_channels=1, num_classes=10)
    assert any(not torch.equal(a, b) for a, b in zip(init.state_dict().values(), rater.state_dict().values()))
    # shift-only parameters (zero meta-gradient under the group softmax) stay at their initial values
    assert torch.equal(init.head.bias, rater.head.bias) and torch.equal(init.head_norm.bias, rater.head_norm.bias)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt", kind="rater")
    assert state["step"] == 3 and "optimizer" in state and "rng" in state and state["inner_lr"] == 0.05


@pytest.mark.parametrize("eval_every", [0, 5])
def test_first_step_uniform_loss_matches_an_independent_inner_loop(tiny_checkpoint, tmp_path, eval_every):
    """L_val after uniform SGD steps, recomputed with torch.optim.SGD on the same batches. With the held-out
    check on, the outer loss uses the meta half of the validation split only."""
    from noiserater.data import load_dataset
    from noiserater.meta.batches import MetaBatches
    from noiserater.meta.losses import candidate_losses, val_loss
    from noiserater.models.loading import load_diffusion

    cfg = tiny_cfg(tiny_checkpoint, tmp_path / "run", outer_steps=1, eval_every=eval_every)
    metatrain(cfg)
    row = read_metrics(tmp_path / "run")[0]
    model, _, _ = load_diffusion(tiny_checkpoint, use_ema=False)
    model.eval()
    val = load_dataset("digits", "val")
    if eval_every:  # an independent re-derivation of the half split: permutation by the data seed (0)
        perm = torch.randperm(len(val), generator=torch.Generator().manual_seed(0 * 7919 + 17))
        n_ho = round(len(val) * 0.5)
        val = val.subset(perm[n_ho:].sort().values, "meta")
        assert len(val) == 90
    sampler = MetaBatches(load_dataset("digits", "train"), val, 10, cfg.seed, cfg.inner_steps,
                       cfg.candidates, cfg.batch_size, cfg.val_batch_size, 0.1, False, 1000)
    batches, val = sampler.outer(0, 0, 1, "cpu")
    with torch.no_grad():
        assert val_loss(model, val).item() == pytest.approx(row["val_loss_init"], rel=1e-6)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.inner_lr)
    for b in batches:
        opt.zero_grad()
        candidate_losses(model, b).mean(dim=1).mean().backward()
        opt.step()
    with torch.no_grad():
        assert val_loss(model, val).item() == pytest.approx(row["val_loss_uniform"], rel=1e-5)


@pytest.mark.parametrize("carry", [False, True])
def test_resume_is_exact(tiny_checkpoint, tmp_path, carry):
    metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "straight", outer_steps=4, carry_inner=carry))
    metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "resumed", outer_steps=2, carry_inner=carry))
    metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "resumed", outer_steps=4, carry_inner=carry), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")
    assert all(torch.equal(a["rater"][k], b["rater"][k]) for k in a["rater"])
    if carry:
        assert all(torch.equal(a["inner_params"][k], b["inner_params"][k]) for k in a["inner_params"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "time_s")} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "straight")) == strip(read_metrics(tmp_path / "resumed"))


def test_carry_inner_changes_the_starting_point(tiny_checkpoint, tmp_path):
    metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "a", outer_steps=2, carry_inner=False))
    metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "b", outer_steps=2, carry_inner=True))
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert ra[0]["val_loss_init"] == rb[0]["val_loss_init"]
    assert ra[1]["val_loss_init"] != rb[1]["val_loss_init"]  # step 2 starts from theta_S of step 1


def _uniform_gains_by_hand(ckpt: str, cfg: MetaTrainConfig, grid) -> dict:
    """The sweep's criterion computed here: for each lr, the mean over the sweep's draws of
    L_val(theta_0) - L_val(theta_S), theta_S after S plain SGD steps on the mean over images and over the K
    candidates of the per-candidate epsilon loss (uniform weights), each candidate's x_t and loss written
    out in a loop; None where the result is not finite."""
    import math

    from noiserater.diffusion import GaussianDiffusion, per_sample_loss
    from noiserater.meta.batches import MetaBatches, checkpoint_splits
    from noiserater.models.loading import load_diffusion

    model, spec, state = load_diffusion(ckpt, use_ema=cfg.use_ema)
    model.eval()
    tr, val, _ = checkpoint_splits(state["config"], "digits")
    d = GaussianDiffusion()
    sampler = MetaBatches(tr, val, spec.num_classes, cfg.seed, cfg.inner_steps, cfg.candidates, cfg.batch_size,
                       cfg.val_batch_size, 0.1, False, d.num_timesteps)
    draws = [sampler.outer(n, 0, 1, "cpu", seed_offset=100_003) for n in range(cfg.sweep_steps)]
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def loss_at(params, x0, y, t, eps):
        f = lambda x, tt, yy: torch.func.functional_call(model, params, (x, tt, yy))  # noqa: E731
        return per_sample_loss(f, d, x0, t, y, eps).mean()

    out = {}
    for lr in grid:
        gains = []
        for batches, (vx, vy, vt, veps) in draws:
            theta = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
            with torch.no_grad():
                l0 = float(loss_at(theta, vx, vy, vt, veps))
            for x0, y, t, eps in batches:
                leaves = {n: v.clone().requires_grad_(True) for n, v in theta.items()}
                k = eps.shape[1]
                loss = sum(loss_at(leaves, x0, y, t, eps[:, j]) for j in range(k)) / k
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                theta = {n: (v - lr * g if g is not None else v).detach()
                         for (n, v), g in zip(leaves.items(), grads)}
            with torch.no_grad():
                gains.append(l0 - float(loss_at(theta, vx, vy, vt, veps)))
        mean = sum(gains) / len(gains)
        out[lr] = mean if math.isfinite(mean) else None
    return out


def test_inner_lr_auto_picks_the_best_uniform_gain(tiny_checkpoint, tmp_path):
    """The sweep's gains equal ones computed independently (hand-written SGD on the uniform inner loss), and
    the chosen lr is the argmax of those: the middle of three lrs, so neither end of the grid would pass."""
    grid = (0.001, 0.05, 1000.0)
    cfg = tiny_cfg(tiny_checkpoint, tmp_path / "run", outer_steps=1, inner_lr="auto",
                   sweep_lrs=",".join(map(str, grid)), sweep_steps=2)
    summary = metatrain(cfg)
    sweep = json.load(open(tmp_path / "run" / "inner_lr_sweep.json"))
    recorded = {r["inner_lr"]: r["uniform_gain"] for r in sweep["grid"]}
    expected = _uniform_gains_by_hand(tiny_checkpoint, cfg, grid)
    assert set(recorded) == set(expected) == set(grid)
    for lr in grid:
        if expected[lr] is None:
            assert recorded[lr] is None, lr
        else:
            assert recorded[lr] == pytest.approx(expected[lr], rel=1e-4, abs=1e-7), lr
    finite = {k: v for k, v in expected.items() if v is not None}
    best = max(finite, key=finite.get)
    assert best == 0.05 and finite[best] > 0  # the middle lr wins by its own, independently computed gain
    assert sweep["chosen"] == best == summary["inner_lr"]
    assert expected[1000.0] is None or expected[1000.0] < 0  # a diverging lr loses


def test_warns_when_uniform_steps_do_not_help(tiny_checkpoint, tmp_path, capsys):
    # inner lrs so large that one uniform step diverges: no lr of the sweep can lower L_val
    metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "run", outer_steps=1, inner_lr="auto", sweep_lrs="1e5,1e6",
                       sweep_steps=1, max_bad_steps=2))
    assert "lowers the validation loss with uniform weights" in capsys.readouterr().err


def test_no_warning_when_a_swept_lr_helps(tiny_checkpoint, tmp_path, capsys):
    # 0.05 is the lr whose uniform gain is positive on this checkpoint (test_inner_lr_auto_picks_the_best_uniform_gain)
    metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "run", outer_steps=1, inner_lr="auto", sweep_lrs="0.05",
                       sweep_steps=1))
    assert "lowers the validation loss with uniform weights" not in capsys.readouterr().err


def test_cli_errors_are_one_line(tiny_checkpoint, tmp_path):
    from noiserater.cli import main

    r = CliRunner().invoke(main, ["metatrain", "--run-dir", str(tmp_path / "x")])
    assert r.exit_code == 2 and "checkpoint" in r.output
    r = CliRunner().invoke(main, ["metatrain", "--checkpoint", tiny_checkpoint, "--inner-lr", "fast"])
    assert r.exit_code == 2 and "inner_lr" in r.output
    r = CliRunner().invoke(main, ["metatrain", "--checkpoint", str(tmp_path / "missing.pt"), "--run-dir", str(tmp_path / "y")])
    assert r.exit_code == 2 and "not found" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["metatrain", "--checkpoint", tiny_checkpoint, "--method", "magic"])
    assert r.exit_code == 2 and "method" in r.output


# ---- multi-process ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)


def _metagrad_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    _init(rank, world, port)
    dist.init_process_group("gloo")
    model, rater, train, val = _float64_problem()
    half = lambda b: tuple(x[rank * 2:(rank + 1) * 2] for x in b)  # noqa: E731
    out = {}
    for method in ("unrolled", "reverse", "alignment", "implicit_cg", "implicit_neumann"):
        for opt in ("sgd", "adam"):
            res = meta_gradient_info(model, rater, [half(b) for b in train], half(val), inner_lr=0.02, method=method,
                                     inner_optimizer=opt, reducer=Reducer())
            out[f"{method}-{opt}"] = (res.grads, res.val_loss)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _float64_problem():
    torch.manual_seed(0)
    spec = DiTSpec("DiT-N/2", 4, 1, 3, learn_sigma=False)
    model = build_dit_from_spec(spec).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    rater = build_rater("Rater-N/2", input_size=4, in_channels=1, num_classes=3).double()
    g = torch.Generator().manual_seed(1)

    def batch(k):
        x0 = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
        y, t = torch.randint(0, 4, (4,), generator=g), torch.randint(0, 1000, (4,), generator=g)
        eps = torch.randn((4, k, 1, 4, 4) if k else (4, 1, 4, 4), generator=g, dtype=torch.float64)
        return x0, y, t, eps

    return model, rater, [batch(3) for _ in range(2)], batch(0)


def test_meta_gradient_two_processes_match_one(tmp_path):
    port = _free_port()
    mp.spawn(_metagrad_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    model, rater, train, val = _float64_problem()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, (grads, lval) in got.items():
            method, opt = key.split("-")
            ref = meta_gradient_info(model, rater, train, val, inner_lr=0.02, method=method, inner_optimizer=opt)
            a = torch.cat([x.reshape(-1) for x in grads])
            b = torch.cat([x.reshape(-1) for x in ref.grads])
            # Adam's g / (|g| + 1e-8) amplifies the round-off of a different summation order up to 1e8-fold
            assert (a - b).norm() <= (1e-10 if opt == "sgd" else 1e-7) * b.norm(), key
            assert lval == pytest.approx(ref.val_loss, rel=1e-12)


def _metatrain_worker(rank, world, port, ckpt, run_dir):
    _init(rank, world, port)
    import torch.distributed as dist

    try:
        metatrain(tiny_cfg(ckpt, run_dir, outer_steps=2, batch_size=4, val_batch_size=8))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_metatrain_two_processes_match_one(tiny_checkpoint, tmp_path):
    port = _free_port()
    mp.spawn(_metatrain_worker, args=(2, port, tiny_checkpoint, str(tmp_path / "two")), nprocs=2, join=True)
    metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "one", outer_steps=2, batch_size=4, val_batch_size=8))
    a = load_checkpoint(tmp_path / "two" / "checkpoints" / "latest.pt")["rater"]
    b = load_checkpoint(tmp_path / "one" / "checkpoints" / "latest.pt")["rater"]
    torch.manual_seed(0)  # metatrain's rater initialisation
    init = build_rater("Rater-N/2", input_size=8, in_channels=1, num_classes=10).state_dict()
    flat = lambda sd: torch.cat([sd[k].reshape(-1) for k in sorted(sd)])  # noqa: E731
    # Adam maps entries whose meta-gradient is ~0 to +-lr steps, so round-off of a different summation
    # order moves a handful of entries by up to ~1e-5: compare against the size of the update itself.
    assert (flat(a) - flat(b)).norm() < 1e-3 * (flat(b) - flat(init)).norm()
    # and what they do: group weights on fixed candidates agree, and differ from the initial rater's
    two, one = load_rater(tmp_path / "two" / "rater.pt"), load_rater(tmp_path / "one" / "rater.pt")
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 4, 1, 8, 8, generator=g)
    t, y = torch.randint(0, 1000, (6,), generator=g), torch.randint(0, 11, (6,), generator=g)
    with torch.no_grad():
        wa = torch.softmax(two.score_candidates(eps, t, x0, y), 1)
        wb = torch.softmax(one.score_candidates(eps, t, x0, y), 1)
        r0 = build_rater("Rater-N/2", input_size=8, in_channels=1, num_classes=10)
        r0.load_state_dict(init)
        w0 = torch.softmax(r0.score_candidates(eps, t, x0, y), 1)
    assert (wa - wb).abs().max() < 1e-5 < (wa - w0).abs().max()
    ra, rb = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert len(ra) == len(rb) == 2
    for x, y in zip(ra, rb):
        for key in ("val_loss_init", "val_loss_rater", "val_loss_uniform", "meta_grad_norm", "score_mean", "score_std",
                    "weight_entropy"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key


# ---- the distillation objective, the held-out meta-validation, the splits ----------------------


def _ref_alignments(model, batch, val):
    """Reference oracle: grad L_val (autograd) dotted with one autograd gradient per candidate."""
    from noiserater.meta.losses import candidate_losses, val_loss

    params = [p for p in model.parameters() if p.requires_grad]
    gv = torch.autograd.grad(val_loss(model, val), params, allow_unused=True)
    gv = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gv)]).double()
    B, K = batch[3].shape[:2]
    out = torch.zeros(B, K, dtype=torch.float64)
    for b in range(B):
        one = tuple(x[b:b + 1] for x in batch)
        for k in range(K):
            lk = candidate_losses(model, one)[0, k]
            gk = torch.autograd.grad(lk, params, allow_unused=True)
            gk = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gk)])
            out[b, k] = gk.double() @ gv
    return out


def test_distill_first_step_matches_an_independent_reference(tiny_checkpoint, tmp_path):
    """Logged distillation loss, Spearman and argmax agreement of step 1 vs the oracle recomputed with one
    backward per candidate, a hand-written listwise cross-entropy and scipy's ranks."""
    from scipy.stats import spearmanr

    from noiserater.data import load_dataset
    from noiserater.meta.batches import MetaBatches
    from noiserater.models.loading import load_diffusion

    cfg = tiny_cfg(tiny_checkpoint, tmp_path / "run", objective="distill", outer_steps=1, distill_val_batch_size=40,
                   distill_temperature=0.7)
    summary = metatrain(cfg)
    assert summary["objective"] == "distill" and summary["inner_lr"] is None
    assert not (tmp_path / "run" / "inner_lr_sweep.json").exists()  # no sweep for distill
    row = read_metrics(tmp_path / "run")[0]
    model, _, _ = load_diffusion(tiny_checkpoint, use_ema=False)
    model.eval()
    sampler = MetaBatches(load_dataset("digits", "train"), load_dataset("digits", "val"), 10, cfg.seed, 1,
                       cfg.candidates, cfg.batch_size, cfg.val_batch_size, 0.1, False, 1000)
    batch = sampler.train_batch(0, 0, 0, 1, "cpu")
    val = sampler.val_batch(0, 40, 0, 1, "cpu")
    a = _ref_alignments(model, batch, val)
    torch.manual_seed(cfg.seed)
    rater = build_rater("Rater-N/2", input_size=8, in_channels=1, num_classes=10)
    x0, y, t, eps = batch
    with torch.no_grad():
        s = rater.score_candidates(eps, t, x0, y).double()
    z = (a - a.mean(1, keepdim=True)) / (a - a.mean(1, keepdim=True)).pow(2).mean(1, keepdim=True).sqrt()
    p = torch.exp(z / 0.7) / torch.exp(z / 0.7).sum(1, keepdim=True)
    ce = -(p * (s - torch.logsumexp(s, 1, keepdim=True))).sum(1).mean()
    assert row["distill_loss"] == pytest.approx(float(ce), rel=1e-4)
    rho = sum(spearmanr(s[i].numpy(), a[i].numpy())[0] for i in range(len(a))) / len(a)
    assert row["spearman"] == pytest.approx(rho, abs=1e-9)
    assert row["argmax_agreement"] == pytest.approx(float((s.argmax(1) == a.argmax(1)).double().mean()))
    with torch.no_grad():
        from noiserater.meta.losses import val_loss

        assert row["val_loss_init"] == pytest.approx(float(val_loss(model, val)), rel=1e-5)
    assert row["grad_norm"] > 0


def test_distill_resume_is_exact_with_heldout_evals(tiny_checkpoint, tmp_path):
    kw = dict(objective="distill", distill_val_batch_size=16, eval_every=2, eval_batches=2, ckpt_every=3)
    metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "straight", outer_steps=5, **kw))
    metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "resumed", outer_steps=3, **kw))
    s = metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "resumed", outer_steps=5, **kw), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")
    assert all(torch.equal(a["rater"][k], b["rater"][k]) for k in a["rater"])
    assert a["heldout"] == b["heldout"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "time_s")} for r in rows]  # noqa: E731
    assert strip(read_all(tmp_path / "straight")) == strip(read_all(tmp_path / "resumed"))
    evals = read_evals(tmp_path / "resumed")
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        e = r["eval"]
        assert e["metric"] == "spearman" and e["value"] == e["spearman"] and e["groups"] == 8 and e["chance"] == 1 / 3
        assert -1 <= e["spearman"] <= 1 and e["spearman_se"] > 0 and 0 <= e["argmax_agreement"] <= 1
    best = max((r for r in evals if r["eval"]["best"]), key=lambda r: r["step"])
    assert s["best_eval"]["step"] == best["step"] and s["best_rater"].endswith("rater_best.pt")
    assert load_checkpoint(s["best_rater"], kind="rater")["step"] == best["step"]
    from PIL import Image

    with Image.open(s["heldout_curve"]) as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_bilevel_heldout_eval_matches_an_independent_inner_loop(tiny_checkpoint, tmp_path):
    """The step-0 held-out rater advantage, recomputed with torch.optim.SGD on the held-out draws (the
    held-out half of the val split, the eval seed stream): mean and SE over the 2 fixed batches."""
    from noiserater.data import load_dataset
    from noiserater.meta.batches import EVAL_SEED_OFFSET, MetaBatches
    from noiserater.meta.losses import candidate_losses, val_loss
    from noiserater.models.loading import load_diffusion

    cfg = tiny_cfg(tiny_checkpoint, tmp_path / "run", outer_steps=0, eval_every=1, eval_batches=2)
    summary = metatrain(cfg)
    (rec,) = read_evals(tmp_path / "run")
    assert rec["step"] == 0 and rec["eval"]["best"] and summary["best_eval"]["step"] == 0
    val = load_dataset("digits", "val")
    perm = torch.randperm(len(val), generator=torch.Generator().manual_seed(17))
    heldout = val.subset(perm[:90].sort().values, "heldout")
    sampler = MetaBatches(load_dataset("digits", "train"), heldout, 10, cfg.seed, cfg.inner_steps, cfg.candidates,
                       cfg.batch_size, cfg.val_batch_size, 0.1, False, 1000)
    rater = load_rater(summary["rater"])
    adv = []
    for n in range(2):
        batches, vb = sampler.outer(n, 0, 1, "cpu", seed_offset=EVAL_SEED_OFFSET)
        losses = []
        for use_rater in (False, True):
            model, _, _ = load_diffusion(tiny_checkpoint, use_ema=False)
            model.eval()
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.inner_lr)
            for b in batches:
                with torch.no_grad():
                    w = torch.softmax(rater.score_candidates(b[3], b[2], b[0], b[1]), 1) if use_rater else 1 / 3
                opt.zero_grad()
                (candidate_losses(model, b) * w).sum(dim=1).mean().backward()
                opt.step()
            with torch.no_grad():
                losses.append(float(val_loss(model, vb)))
        adv.append(losses[0] - losses[1])
    assert rec["eval"]["rater_advantage"] == pytest.approx((adv[0] + adv[1]) / 2, rel=1e-3, abs=1e-8)
    assert rec["eval"]["rater_advantage_se"] == pytest.approx(abs(adv[0] - adv[1]) / 2, rel=1e-3, abs=1e-8)


def test_plateau_stops_and_a_resumed_run_stays_stopped(tiny_checkpoint, tmp_path):
    cfg = tiny_cfg(tiny_checkpoint, tmp_path / "run", outer_steps=10, eval_every=2, eval_batches=2, patience=1,
                   lr=1e-12, ckpt_every=100)
    s = metatrain(cfg)  # a rater that cannot move cannot improve beyond one SE: stop at the first later eval
    assert s["step"] == 2 and "plateau" in s["stopped"] and s["best_eval"]["step"] == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["step"] == 2
    s2 = metatrain(cfg, resume=True)
    assert s2["step"] == 2 and "plateau" in s2["stopped"]
    assert [r["step"] for r in read_evals(tmp_path / "run")] == [0, 2]


def test_splits_follow_the_checkpoint_and_never_load_the_test_split(tmp_path, monkeypatch):
    import noiserater.metatrain as mt
    from noiserater.data import load_dataset
    from noiserater.meta import batches

    torch.manual_seed(0)
    sd = build_dit_from_spec(SPEC).state_dict()
    ckpt = tmp_path / "dit.pt"
    save_checkpoint(ckpt, {"step": 1, "spec": SPEC.to_dict(), "model": sd, "ema": sd, "optimizer": {},
                           "config": {"data": "digits", "seed": 0, "split_seed": 3, "test_fraction": 0.2,
                                      "val_fraction": 0.1, "label_dropout": 0.1},
                           "data": {"name": "digits", "num_classes": 10, "class_names": None}}, kind="diffusion")
    calls = []

    def spy(source, split="train", **kw):
        calls.append((split, kw))
        return load_dataset(source, split, **kw)

    monkeypatch.setattr(batches, "load_dataset", spy)  # where checkpoint_splits looks it up
    s = metatrain(tiny_cfg(str(ckpt), tmp_path / "run", outer_steps=1, eval_every=1, eval_batches=1))
    assert sorted(c[0] for c in calls) == ["train", "val"]
    assert all(kw == {"seed": 3, "val_fraction": 0.1, "test_fraction": 0.2} for _, kw in calls)
    info = load_checkpoint(s["rater"], kind="rater")["data"]
    val = load_dataset("digits", "val", seed=3, test_fraction=0.2)
    assert info["split_seed"] == 3 and info["meta_val_images"] + info["heldout_val_images"] == len(val)
    meta, heldout = mt.split_heldout(val, 0.5, 3)
    both = torch.cat([meta.images.flatten(1), heldout.images.flatten(1)])
    assert len(meta) + len(heldout) == len(val) and torch.equal(both.sort(0).values, val.images.flatten(1).sort(0).values)


@pytest.mark.parametrize("args,key", [
    (["--meta-objective", "magic"], "objective"),
    (["--heldout-fraction", "1"], "heldout_fraction"),
    (["--patience", "2", "--eval-every", "0"], "patience"),
    (["--meta-objective", "distill", "--carry-inner"], "carry_inner"),
    (["--distill-oracle", "best"], "distill_oracle"),
    (["--distill-temperature", "0"], "distill_temperature"),
    (["--eval-batches", "0"], "eval_batches"),
])
def test_cli_rejects_bad_distill_and_heldout_options_in_one_line(tiny_checkpoint, tmp_path, args, key):
    from noiserater.cli import main

    r = CliRunner().invoke(main, ["metatrain", "--checkpoint", tiny_checkpoint, "--run-dir", str(tmp_path / "x"), *args])
    assert r.exit_code == 2 and key in r.output and len(r.output.strip().splitlines()) == 1, r.output
