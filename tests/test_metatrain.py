"""`noiserater metatrain` (issue 5): logging, rater checkpoints, exact resume, the inner-lr sweep, and
multi-process runs (2 gloo processes) against one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from noiserater.checkpoint import load_checkpoint, load_rater, save_checkpoint
from noiserater.meta import Reducer, meta_gradient_info
from noiserater.meta.train import MetaTrainConfig, metatrain
from noiserater.models import DiTSpec, build_dit_from_spec, build_rater

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
    rater = load_rater(summary["rater"], expect=SPEC)  # the selection engineer's entry point
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
    from noiserater.meta.losses import candidate_losses, val_loss
    from noiserater.meta.train import _Sampler
    from noiserater.data import load_dataset
    from noiserater.train import load_diffusion

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
    sampler = _Sampler(load_dataset("digits", "train"), val, 10, cfg.seed, cfg.inner_steps,
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


def test_inner_lr_auto_picks_the_best_uniform_gain(tiny_checkpoint, tmp_path):
    summary = metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "run", outer_steps=1, inner_lr="auto",
                                 sweep_lrs="0.001,0.05,1000", sweep_steps=2))
    sweep = json.load(open(tmp_path / "run" / "inner_lr_sweep.json"))
    gains = {r["inner_lr"]: r["uniform_gain"] for r in sweep["grid"]}
    finite = {k: v for k, v in gains.items() if v is not None}
    assert sweep["chosen"] == max(finite, key=finite.get) == summary["inner_lr"]
    assert gains[1000.0] is None or gains[1000.0] < finite[sweep["chosen"]]


def test_warns_when_uniform_steps_do_not_help(tiny_checkpoint, tmp_path, capsys):
    metatrain(tiny_cfg(tiny_checkpoint, tmp_path / "run", outer_steps=1, inner_lr="auto", sweep_lrs="30,100",
                       sweep_steps=1, max_bad_steps=2))
    err = capsys.readouterr().err
    assert "lowers the validation loss" in err or "do not lower the validation loss" in err


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
    for method in ("unrolled", "reverse", "alignment"):
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
