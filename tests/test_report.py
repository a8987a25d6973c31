"""Statistics of the reproduction report against independent references (scipy / closed forms)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from noiserater.checkpoint import RunDirError
from noiserater.experiments import run_stage
from noiserater.report import mean_ci, paired_test, seeds_needed, summarize


def test_mean_ci_matches_scipy_t_interval():
    x = np.array([1.0, 2.5, 0.5, 3.0, 2.0])
    m, s, hw = mean_ci(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert m == pytest.approx(x.mean())
    assert s == pytest.approx(x.std(ddof=1))
    assert m - hw == pytest.approx(lo) and m + hw == pytest.approx(hi)


def test_paired_test_relative_difference_and_pvalue():
    van = pd.Series([10.0, 12.0, 11.0, 9.0], index=[0, 1, 2, 3])
    rat = pd.Series([9.5, 11.7, 10.9, 8.6], index=[0, 1, 2, 3])
    out = paired_test(rat, van)
    rel = 100 * (rat - van) / van
    assert out["n"] == 4
    assert out["rel_diff_pct"] == pytest.approx(rel.mean())
    assert out["p"] == pytest.approx(stats.ttest_rel(rat, van).pvalue)
    # only shared seeds are paired
    assert paired_test(rat.iloc[:1], van)["n"] == 1


def test_seeds_needed_normal_approximation():
    rng = np.random.default_rng(0)
    d = rng.normal(0, 2.0, size=50)
    n = seeds_needed(d, effect_pct=1.0)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert n == math.ceil((z * d.std(ddof=1)) ** 2)
    # a larger spread needs more seeds
    assert seeds_needed(3 * d) > n


def test_summarize_cost_ratio_and_vs_vanilla():
    rows = []
    for seed, (v, r) in enumerate([(1.0, 0.9), (1.2, 1.1), (0.8, 0.7)]):
        rows.append(dict(table="main", policy="vanilla", k=1, seed=seed, heldout_loss=v, train_wall_s=10.0, label="vanilla"))
        rows.append(dict(table="main", policy="rater", k=4, seed=seed, heldout_loss=r, train_wall_s=15.0, label="rater k=4"))
    s = summarize(pd.DataFrame(rows), "main").set_index("label")
    assert s.loc["rater k=4", "cost_ratio"] == pytest.approx(1.5)
    assert s.loc["rater k=4", "heldout_loss_vs_vanilla_pct"] < 0
    assert s.loc["vanilla", "cost_ratio"] == pytest.approx(1.0)


def test_run_stage_skips_done_and_refuses_changed_config(tmp_path):
    calls = []

    def fn(folder):
        calls.append(folder)
        return {"value": 3}

    assert run_stage(tmp_path / "s", {"a": 1}, fn, log=lambda m: None)["value"] == 3
    assert run_stage(tmp_path / "s", {"a": 1}, fn, log=lambda m: None)["value"] == 3
    assert len(calls) == 1
    with pytest.raises(RunDirError, match="different config"):
        run_stage(tmp_path / "s", {"a": 2}, fn, log=lambda m: None)
    assert json.loads((tmp_path / "s" / "stage.json").read_text())["config"] == {"a": 1}
