"""The coupling policies knn / batch_ot / class_ot against independent references (brute force over all
assignments, torchcfm's exact OT plan, POT's network simplex), and the policy registry."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import ot
import pytest
import torch
import yaml
from click.testing import CliRunner

from noiserater.cli import main
from noiserater.config import ConfigError
from noiserater.data import load_dataset
from noiserater.models import DiTSpec, build_dit, build_rater
from noiserater.objectives import get_objective
from noiserater.randomness import batch_indices
from noiserater.selection import (
    NoiseNormStats,
    SelectionPolicy,
    get_policy,
    policy_class,
    policy_names,
    register_policy,
    unregister_policy,
)
from noiserater.train import TrainConfig, draw_step_randomness, train


def _batch(B, k, C=1, S=3, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, C, S, S, generator=g, dtype=torch.float64)
    cand = torch.randn(B, k, C, S, S, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (B,), generator=g)
    return x0, torch.zeros(B, dtype=torch.long), y, cand


def _np_cost(x0: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Squared distances [B, N], the direct way (every difference)."""
    x, p = x0.reshape(len(x0), -1), pool.reshape(len(pool), -1)
    return ((x[:, None, :] - p[None, :, :]) ** 2).sum(-1)


def _brute_force(cost: np.ndarray) -> float:
    """Minimum total cost over every injective assignment of the B rows to the N >= B columns."""
    B, N = cost.shape
    rows = np.arange(B)
    return min(cost[rows, list(cols)].sum() for cols in itertools.permutations(range(N), B))


def _pot_assignment(cost: np.ndarray) -> tuple[float, np.ndarray]:
    """(min total cost, column per row) from POT's exact network simplex: B rows of mass 1 against N columns
    of mass 1, the N - B missing rows filled by zero-cost dummies (a balanced N x N transport problem)."""
    B, N = cost.shape
    M = np.vstack([cost, np.zeros((N - B, N))])
    plan = ot.emd(np.ones(N), np.ones(N), M)
    return float((plan[:B] * cost).sum()), plan[:B].argmax(1)


def _total(x0, cand, index) -> float:
    pool = cand.reshape(-1, *cand.shape[2:]).numpy()
    return float(_np_cost(x0.numpy(), pool)[np.arange(len(x0)), index.numpy()].sum())


# ---- batch_ot -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("B", [2, 3, 4, 5])
@pytest.mark.parametrize("k", [1, 2])
def test_batch_ot_equals_brute_force_over_all_assignments(B, k):
    x0, t, y, cand = _batch(B, k, seed=10 * B + k)
    noise, index = get_policy("batch_ot", k).select(x0, t, y, cand)
    pool = cand.reshape(B * k, *cand.shape[2:])
    assert len(set(index.tolist())) == B  # each image a distinct noise of the pool
    assert all(torch.equal(noise[b], pool[index[b]]) for b in range(B))  # the very noise, unchanged
    want = _brute_force(_np_cost(x0.numpy(), pool.numpy()))
    assert _total(x0, cand, index) == pytest.approx(want, rel=1e-12)
    if k == 1:  # a permutation of the batch's noises
        assert sorted(index.tolist()) == list(range(B))


def test_batch_ot_beats_every_other_assignment_it_could_have_made():
    """The brute-force reference itself must be able to tell: a wrong assignment costs more."""
    x0, t, y, cand = _batch(5, 2, seed=3)
    index = get_policy("batch_ot", 2).select(x0, t, y, cand)[1]
    cost = _np_cost(x0.numpy(), cand.reshape(10, -1).numpy())
    identity = cost[np.arange(5), np.arange(5) * 2].sum()  # each image its own first candidate
    assert _total(x0, cand, index) < identity


def test_batch_ot_at_k1_is_torchcfm_exact_ot_plan():
    torchcfm_ot = pytest.importorskip("torchcfm.optimal_transport")
    B = 24
    x0, t, y, cand = _batch(B, 1, C=2, S=4, seed=7)
    index = get_policy("batch_ot", 1).select(x0, t, y, cand)[1]
    noises = cand[:, 0]
    plan = torchcfm_ot.OTPlanSampler(method="exact").get_map(x0, noises)  # [B,B], mass 1/B per pair
    assert plan.shape == (B, B) and np.allclose(plan.sum(1), 1.0 / B)
    cost = _np_cost(x0.numpy(), noises.numpy())
    assert _total(x0, cand, index) == pytest.approx(B * float((plan * cost).sum()), rel=1e-10)
    np.testing.assert_array_equal(index.numpy(), plan.argmax(1))  # the optimum is unique for continuous data


@pytest.mark.parametrize("B,k", [(12, 2), (16, 4), (9, 3)])
def test_batch_ot_equals_pot_network_simplex_for_k_above_1(B, k):
    x0, t, y, cand = _batch(B, k, C=2, S=4, seed=B + k)
    index = get_policy("batch_ot", k).select(x0, t, y, cand)[1]
    want_cost, want_index = _pot_assignment(_np_cost(x0.numpy(), cand.reshape(B * k, -1).numpy()))
    assert _total(x0, cand, index) == pytest.approx(want_cost, rel=1e-10)
    np.testing.assert_array_equal(index.numpy(), want_index)


# ---- class_ot -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_class_ot_stays_within_classes_and_equals_per_class_brute_force(k):
    B = 9
    x0, t, _, cand = _batch(B, k, seed=20 + k)
    y = torch.tensor([0, 2, 0, 1, 2, 0, 3, 2, 0])  # 3 = the null label of a 3-class model: its own group
    noise, index = get_policy("class_ot", k).select(x0, t, y, cand)
    owner = index // k  # the image whose candidates the chosen noise was drawn for
    assert torch.equal(y[owner], y), "class_ot paired an image with another class's noise"
    assert len(set(index.tolist())) == B
    pool = cand.reshape(B * k, -1).numpy()
    want = 0.0
    for c in y.unique().tolist():
        members = np.flatnonzero(y.numpy() == c)
        rows = (members[:, None] * k + np.arange(k)).ravel()
        want += _brute_force(_np_cost(x0.numpy()[members], pool[rows]))
    assert _total(x0, cand, index) == pytest.approx(want, rel=1e-12)
    # plain batch_ot, free to cross classes, is at least as cheap (and here strictly cheaper)
    assert _total(x0, cand, get_policy("batch_ot", k).select(x0, t, y, cand)[1]) < want


def test_class_ot_of_one_class_is_batch_ot():
    x0, t, y, cand = _batch(7, 2, seed=5)
    one = torch.zeros(7, dtype=torch.long)
    assert torch.equal(get_policy("class_ot", 2).select(x0, t, one, cand)[1],
                       get_policy("batch_ot", 2).select(x0, t, one, cand)[1])


# ---- knn and the norms of what couplings choose -------------------------------------------------------


def test_knn_picks_the_numpy_argmin_of_l2_distance():
    x0, t, y, cand = _batch(16, 5, C=3, S=4, seed=2)
    index = get_policy("knn", 5).select(x0, t, y, cand)[1]
    d = np.sqrt(((cand.numpy() - x0.numpy()[:, None]) ** 2).reshape(16, 5, -1).sum(-1))
    np.testing.assert_array_equal(index.numpy(), d.argmin(1))


@pytest.mark.parametrize("policy", ["knn", "batch_ot", "class_ot"])
def test_couplings_favour_small_norm_noise(policy):
    """||x0 - eps||^2 = ||x0||^2 - 2<x0, eps> + ||eps||^2: choosing near noise lowers E||eps||^2 / d."""
    g = torch.Generator().manual_seed(0)
    stats = NoiseNormStats()
    pol = get_policy(policy, 4)
    for _ in range(10):
        x0 = torch.randn(32, 1, 8, 8, generator=g) * 0.5
        cand = torch.randn(32, 4, 1, 8, 8, generator=g)
        y = torch.randint(0, 4, (32,), generator=g)
        stats.update(pol.select(x0, torch.zeros(32, dtype=torch.long), y, cand)[0])
    s = stats.summary()
    assert s["noise_sq_norm_per_dim"] < 0.95 and s["noise_norm_ks"] > 0.1


# ---- training with a coupling: the chosen noise, its metrics, bad input --------------------------------


@pytest.mark.parametrize("policy,k", [("batch_ot", 2), ("batch_ot", 1), ("class_ot", 2)])
def test_training_step_uses_the_optimal_assignment_and_logs_its_norms(policy, k, tmp_path):
    B = 8
    cfg = TrainConfig(model="DiT-N/2", run_dir=str(tmp_path / "run"), steps=1, batch_size=B, log_every=1,
                      sample_steps=2, tensorboard=False, progress=False, policy=policy, candidates=k)
    train(cfg)
    data = load_dataset("digits", "train", seed=0, val_fraction=0.1)
    idx = batch_indices(len(data), B, 0, 0)
    x0 = data.images[idx].double()
    _, y, cand = draw_step_randomness(cfg, 0, data.labels[idx], 10, (1, 8, 8), get_objective("ddpm"))
    pool = cand.reshape(B * k, -1).double().numpy()
    chosen = np.zeros((B, pool.shape[1]))
    groups = [np.arange(B)] if policy == "batch_ot" else [np.flatnonzero(y.numpy() == c) for c in y.unique().tolist()]
    for members in groups:  # the reference assignment, by POT
        rows = (members[:, None] * k + np.arange(k)).ravel()
        _, col = _pot_assignment(_np_cost(x0.numpy()[members], pool[rows]))
        chosen[members] = pool[rows[col]]
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    norms = np.linalg.norm(chosen, axis=1)
    assert rec["noise_sq_norm_per_dim"] == pytest.approx((norms**2).mean() / 64, rel=1e-6)
    ks = NoiseNormStats()
    ks.update(torch.from_numpy(chosen).reshape(B, 1, 8, 8))
    assert rec["noise_norm_ks"] == pytest.approx(ks.summary()["noise_norm_ks"], rel=1e-6)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())["selection"]
    assert info["coupling"] == {"scope": "each process's share of the batch", "images": B}


def test_coupling_admission_rules():
    TrainConfig(policy="batch_ot", candidates=1).validate()  # k=1: a permutation of the batch's noises
    TrainConfig(policy="class_ot", candidates=1).validate()
    with pytest.raises(ConfigError, match="knn chooses among k candidates"):
        TrainConfig(policy="knn", candidates=1).validate()
    with pytest.raises(ConfigError, match="does not use a rater"):
        TrainConfig(policy="batch_ot", candidates=2, rater="r.pt").validate()
    TrainConfig(policy="batch_ot", batch_size=2048, candidates=4).validate()  # 2**24 entries: the limit
    for bs, k in ((4096, 1), (2048, 5)):
        with pytest.raises(ConfigError, match=r"invalid batch_size: .*too large.*--batch-size or --candidates"):
            TrainConfig(policy="batch_ot", batch_size=bs, candidates=k).validate()
    TrainConfig(policy="knn", batch_size=4096, candidates=4).validate()  # no assignment, no limit


def test_cli_names_the_flag_of_a_too_large_assignment(tmp_path):
    res = CliRunner().invoke(main, ["train", "--policy", "class_ot", "--batch-size", "4096", "--candidates", "2",
                                    "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--batch-size" in lines[0] and "class_ot" in lines[0], res.output


# ---- the registry --------------------------------------------------------------------------------------


def _options(cls, k):
    rater = build_rater("Rater-N/2", input_size=4, in_channels=1, num_classes=3) if cls.uses_rater == "required" else None
    scorer = SimpleNamespace(scores=lambda x0, t, y, c: torch.zeros(c.shape[:2])) if cls.state_dependent else None
    return {"rater": rater, "scorer": scorer}


def test_every_registered_policy_is_reachable_and_selects():
    names = policy_names()
    assert {"vanilla", "max_norm", "knn", "batch_ot", "class_ot", "rater", "rater_online"} <= set(names)
    assert "nearest" not in names
    x0, t, y, cand = _batch(4, 3, S=4)
    for name in names:
        cls = policy_class(name)
        k = 1 if cls.k_rule == "one" else 3
        pol = get_policy(name, k, **_options(cls, k))
        assert type(pol) is cls and pol.name == name and pol.k == k
        noise, index = pol.select(x0.float(), t, y, cand[:, :k].float())
        assert noise.shape == x0.shape and index.shape == (4,)
        assert cls.dit_passes(k) == (k if cls.soft else 1)
        control = cls.control(k)
        if name != "uniform_soft":  # uniform_soft is rater_soft's control; itself it is compared with vanilla
            assert policy_class(control[0]).dit_passes(control[1]) == cls.dit_passes(k)  # equal cost


def test_from_config_reads_only_the_declared_fields():
    """Each policy's from_config reads policy, candidates and its config_fields, nothing else."""
    model = build_dit("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
    data = load_dataset("digits", "train", seed=0, val_fraction=0.1)
    for name in policy_names():
        cls = policy_class(name)
        cfg = TrainConfig(policy=name, candidates=1 if cls.k_rule == "one" else 2, oracle_val_batch=4)
        read: set[str] = set()

        class Recording:
            def __getattr__(self, key):
                read.add(key)
                return getattr(cfg, key)

        rater = build_rater("Rater-N/2", input_size=8, in_channels=1, num_classes=10) if cls.uses_rater == "required" else None
        pol = cls.from_config(Recording(), rater=rater, model=model, val=data, train_data=data, spec=DiTSpec("DiT-N/2", 8, 1, 10, False, 0.0))
        assert isinstance(pol, cls)
        assert read <= {"policy", "candidates", *cls.config_fields}, (name, read - set(cls.config_fields))


def test_register_policy_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="'max_norm' is already registered"):
        @register_policy
        class Again(SelectionPolicy):
            name = "max_norm"
    with pytest.raises(ValueError, match="'nearest' is already registered"):  # a retired name stays retired
        @register_policy
        class Old(SelectionPolicy):
            name = "nearest"
    with pytest.raises(ValueError, match=r"unknown selection policy 'nearest' \('nearest' is now 'knn'\)"):
        get_policy("nearest", 2)


def test_a_new_policy_is_one_class(tmp_path):
    """The worked example of docs/architecture.md, run as written: registered, it is validated, listed in
    --help, and trains; its choice is numpy's median-norm candidate."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    blocks = re.findall(r"```python\n(@register_policy\n.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/architecture.md must keep one worked policy example"
    scope = {"register_policy": register_policy, "SelectionPolicy": SelectionPolicy}
    exec(compile(blocks[0], "docs/architecture.md", "exec"), scope)
    try:
        x0, t, y, cand = _batch(6, 5, S=4, seed=1)
        index = get_policy("median_norm", 5).select(x0, t, y, cand)[1]
        norms = np.linalg.norm(cand.numpy().reshape(6, 5, -1), axis=-1)
        np.testing.assert_array_equal(index.numpy(), np.argsort(norms, axis=1)[:, 2])
        with pytest.raises(ConfigError, match="median_norm chooses among k"):
            TrainConfig(policy="median_norm", candidates=1).validate()
        with pytest.raises(ConfigError, match="does not use a rater"):
            TrainConfig(policy="median_norm", candidates=3, rater="r.pt").validate()
        res = CliRunner().invoke(main, ["train", "--help"])
        assert "median_norm: the candidate of median L2 norm" in " ".join(res.output.split())
        summary = train(TrainConfig(model="DiT-N/2", run_dir=str(tmp_path / "run"), steps=1, batch_size=4,
                                    sample_steps=2, tensorboard=False, progress=False, policy="median_norm",
                                    candidates=3))
        assert summary["step"] == 1
    finally:
        unregister_policy("median_norm")
    with pytest.raises(ConfigError, match="invalid policy"):
        TrainConfig(policy="median_norm", candidates=3).validate()


# ---- the old name 'nearest' ------------------------------------------------------------------------------


def test_an_old_config_with_policy_nearest_loads_as_knn(tmp_path):
    common = ["--model", "DiT-N/2", "--steps", "1", "--batch-size", "4", "--sample-steps", "2", "--no-progress",
              "--no-tensorboard"]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"policy": "nearest", "candidates": 2, "run_dir": str(tmp_path / "a")}))
    res = CliRunner().invoke(main, ["train", "--config", str(old), *common])
    assert res.exit_code == 0, res.output + res.stderr
    assert res.stderr.strip() == "warning: policy 'nearest' is now called 'knn'; write that in new configs"
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["policy"] == "knn"
    # an old run folder (its config.yaml says nearest) resumes under either name
    conf = tmp_path / "a" / "config.yaml"
    for name, steps in (("nearest", "2"), ("knn", "3")):
        conf.write_text(conf.read_text().replace("policy: knn", "policy: nearest"))
        args = ["train", "--policy", name, "--candidates", "2", "--run-dir", str(tmp_path / "a"), "--resume", *common]
        args[args.index("--steps") + 1] = steps
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output + res.stderr
        assert json.loads(res.stdout)["step"] == int(steps)
    assert "nearest" not in " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
