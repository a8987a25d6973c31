"""Statistics of the reproduction report against independent references (scipy / closed forms)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from noiserater.checkpoint import RunDirError
from noiserater.study.reproduce import run_stage
from noiserater.study.reproduce_report import (
    mean_ci,
    paired_power,
    paired_test,
    seeds_for_spread,
    seeds_needed,
    summarize,
)


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
    # one p-value definition (noiserater.stats.paired_interval): the t-test of the relative differences shown,
    # so p < 0.05 exactly when the 95% interval excludes 0
    assert out["p"] == pytest.approx(stats.ttest_1samp(rel, 0).pvalue)
    assert (out["p"] < 0.05) == (abs(out["rel_diff_pct"]) > out["ci_pct"])
    # only shared seeds are paired
    assert paired_test(rat.iloc[:1], van)["n"] == 1


def _mc_power(n: int, sd: float, effect: float, reps: int, rng) -> float:
    """Brute force: the fraction of simulated paired experiments (n differences ~ N(effect, sd)) that a
    two-sided one-sample t-test (scipy) rejects at 5%."""
    d = rng.normal(effect, sd, size=(reps, n))
    return float((stats.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05).mean())


def test_paired_power_matches_a_monte_carlo_t_test():
    rng = np.random.default_rng(0)
    reps = 20000
    for n, sd, effect in [(2, 0.12, 1.0), (3, 0.5, 1.0), (5, 1.0, 1.0), (9, 0.9, 1.0), (20, 2.0, 1.0), (40, 3.3, 1.0)]:
        exact = paired_power(n, sd, effect)
        mc = _mc_power(n, sd, effect, reps, rng)
        assert abs(mc - exact) < 4 * math.sqrt(exact * (1 - exact) / reps) + 1e-3, (n, sd, exact, mc)


def test_seeds_for_spread_is_the_exact_minimum():
    # the cases: a normal approximation says 1 and 86
    assert seeds_for_spread(0.12, 1.0) == 3
    assert seeds_for_spread(3.3, 1.0) == 88
    # textbook sample sizes (one-sample / paired t-test, two-sided 5%, power 0.8; e.g. G*Power, Cohen 1988)
    # for standardised effects d = 0.2, 0.5, 0.8, 1.0: 199, 34, 15, 10
    for d, n in [(0.2, 199), (0.5, 34), (0.8, 15), (1.0, 10)]:
        assert seeds_for_spread(1.0 / d, 1.0) == n and seeds_for_spread(2.0 / d, 2.0) == n, d
    # minimality against the power computed here straight from scipy's noncentral t
    def power(n, sd):
        crit = stats.t.ppf(0.975, n - 1)
        nc = math.sqrt(n) / sd
        return stats.nct.sf(crit, n - 1, nc) + stats.nct.sf(crit, n - 1, -nc)

    for sd in (0.3, 0.7, 1.3, 2.9, 6.0):
        n = int(seeds_for_spread(sd))
        assert power(n, sd) >= 0.8 and (n == 2 or power(n - 1, sd) < 0.8), sd
    # brute force at the answer and one seed below, where the gap is wide enough to see (sd 0.9: 9 seeds)
    rng = np.random.default_rng(1)
    assert seeds_for_spread(0.9) == 9
    assert _mc_power(9, 0.9, 1.0, 20000, rng) > 0.8 > _mc_power(8, 0.9, 1.0, 20000, rng)
    # at least 2 seeds (a t-test needs a spread), NaN for an unknown spread, more seeds for more spread
    assert seeds_for_spread(0.0) == 2 and seeds_for_spread(1e-6) == 2
    assert math.isnan(seeds_for_spread(float("nan")))
    d = np.random.default_rng(0).normal(0, 2.0, size=50)
    assert seeds_needed(d) == seeds_for_spread(float(d.std(ddof=1)))
    assert seeds_needed(3 * d) > seeds_needed(d) and math.isnan(seeds_needed(d[:1]))


def test_paired_test_ci_pct_is_the_t_interval_of_the_relative_differences():
    van = pd.Series([10.0, 12.0, 11.0, 9.0, 10.5], index=range(5))
    rat = pd.Series([9.5, 11.7, 10.9, 8.6, 10.6], index=range(5))
    out = paired_test(rat, van)
    rel = (100 * (rat - van) / van).to_numpy()
    lo, hi = stats.t.interval(0.95, len(rel) - 1, loc=rel.mean(), scale=stats.sem(rel))
    assert out["rel_diff_pct"] - out["ci_pct"] == pytest.approx(lo)
    assert out["rel_diff_pct"] + out["ci_pct"] == pytest.approx(hi)
    assert out["rel_sd_pct"] == pytest.approx(rel.std(ddof=1))
    # coverage: with relative differences drawn around a known mean, the interval holds it ~95% of the time
    rng = np.random.default_rng(0)
    reps, hits = 1000, 0
    for _ in range(reps):
        d = rng.normal(-2.0, 1.5, size=6)
        o = paired_test(pd.Series(10.0 * (1 + d / 100)), pd.Series(np.full(6, 10.0)))
        hits += abs(o["rel_diff_pct"] - (-2.0)) <= o["ci_pct"]
    assert abs(hits / reps - 0.95) < 4 * math.sqrt(0.95 * 0.05 / reps), hits


def test_summarize_cost_ratio_and_vs_vanilla():
    rows = []
    for seed, (v, r) in enumerate([(1.0, 0.9), (1.2, 1.1), (0.8, 0.7)]):
        rows.append(dict(table="main", policy="vanilla", k=1, seed=seed, heldout_loss=v, train_wall_s=99.0 if seed == 0 else 10.0,
                         images_per_s=300.0, label="vanilla"))
        rows.append(dict(table="main", policy="rater", k=4, seed=seed, heldout_loss=r, train_wall_s=15.0,
                         images_per_s=200.0, label="rater k=4"))
    s = summarize(pd.DataFrame(rows), "main").set_index("label")
    # cost = throughput ratio: the warm-up inside vanilla seed 0's wall-clock (99 s) is not charged to anyone
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


def test_load_results_reads_throughput_from_each_runs_metrics(tmp_path):
    from noiserater.study.reproduce_report import load_results

    speeds = {"vanilla": [5.0, 100.0, 104.0, 98.0], "rater k=4": [1.0, 50.0, 49.0, 52.0, 51.0]}
    for i, (label, sp) in enumerate(speeds.items()):
        run = tmp_path / "runs" / "main" / label.replace(" ", "_") / "seed0"
        (run / "run" / "checkpoints").mkdir(parents=True)
        lines = [json.dumps({"step": 10 * (j + 1), "loss": 0.1, "images_per_s": v}) for j, v in enumerate(sp)]
        lines.insert(2, json.dumps({"step": 15, "event": "nonfinite_skipped", "loss": None}))
        lines.append('{"step": 99, "lo')  # a line cut by a crash
        (run / "run" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        result = {"table": "main", "label": label, "policy": label.split()[0], "k": 4 if i else 1, "seed": 0,
                  "heldout_loss": 0.1, "train_wall_s": 1.0, "checkpoint": str(run / "run" / "checkpoints" / "latest.pt")}
        (run / "stage.json").write_text(json.dumps({"config": {}, "result": result}))
    df = load_results(tmp_path).set_index("label")
    # the first (warm-up) line is dropped, events and torn lines are ignored
    assert df.loc["vanilla", "images_per_s"] == pytest.approx(np.median([100.0, 104.0, 98.0]))
    assert df.loc["rater k=4", "images_per_s"] == pytest.approx(np.median([50.0, 49.0, 52.0, 51.0]))
    s = summarize(df.reset_index(), "main").set_index("label")
    assert s.loc["rater k=4", "cost_ratio"] == pytest.approx(100.0 / 50.5)


def test_table_titles_use_the_papers_numbers_for_the_study_folders():
    """Headings follow the paper (1 policies, 2 ablations, 3 k, 4 transfer, 5 stages) from one mapping; the
    study folders (runs/main, ablation, stage-<s>, transfer) carry no number, so older studies read the same."""
    from noiserater.study.presets import PAPER_TABLES
    from noiserater.study.reproduce_report import table_title

    assert PAPER_TABLES == {"policies": 1, "ablations": 2, "k": 3, "transfer": 4, "stages": 5}
    assert table_title("main").startswith("Table 1 (policies) and Table 3 (effect of k)")
    assert table_title("ablation").startswith("Table 2: rater ablations")
    assert table_title("transfer").startswith("Table 4: the frozen rater transferred")
    assert table_title("stage-300").startswith("Table 5: rater meta-trained at pretraining step 300")
    assert table_title("something-else") == "something-else"


def test_run_metrics_keeps_step_records_with_a_loss(tmp_path):
    """The report reads a run's metrics.jsonl through run.folder.read_metrics: events, evaluations without a
    loss and a line cut by a crash are left out; a missing log gives no records."""
    from noiserater.study.reproduce_report import median_throughput, run_metrics

    ckpt = tmp_path / "run" / "checkpoints" / "latest.pt"
    ckpt.parent.mkdir(parents=True)
    lines = [{"step": 10, "loss": 0.5, "images_per_s": 100.0}, {"step": 10, "event": "resume", "loss": 0.1},
             {"step": 20, "eval": {"x": 1}}, {"step": 20, "loss": 0.4, "images_per_s": 300.0},
             {"step": 30, "loss": 0.3, "images_per_s": 200.0}]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4')
    assert [r["step"] for r in run_metrics(ckpt)] == [10, 20, 30]
    assert median_throughput(ckpt) == 250.0  # first window dropped
    assert run_metrics(tmp_path / "nowhere" / "checkpoints" / "latest.pt") == []
