"""`noiserater bench selection` on tiny models: the records, and the ratios on a clock whose times are known."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from noiserater.bench import selection as bs
from noiserater.cli import main
from noiserater.models import build_rater


def test_bench_selection_writes_records(tmp_path):
    out = tmp_path / "sel.json"
    res = CliRunner().invoke(main, ["bench", "selection", "--json", str(out), "--model", "DiT-N/2",
                                    "--image-size", "8", "--channels", "1", "--classes", "10", "--batch-size", "2",
                                    "--rater-archs", "Rater-N/2,FastRater-N/2", "--candidates-list", "1,2", "--soft-rater-archs",
                                    "FastRater-N/2", "--soft-candidates-list", "4", "--repeats", "2"])
    assert res.exit_code == 0, res.output
    recs = json.loads(out.read_text())
    keys = {"policy", "rater", "k", "step_time_s", "ratio_vs_vanilla", "peak_mem_bytes"}
    assert all(keys <= set(r) for r in recs)
    got = {(r["policy"], r["rater"], r["k"]) for r in recs}
    want = {("vanilla", None, 1)} | {(p, None, k) for p in ("max_norm", "min_norm", "knn", "batch_ot", "class_ot")
                                     for k in (1, 2)}
    want |= {("rater", r, k) for r in ("Rater-N/2", "FastRater-N/2") for k in (1, 2)} | {("rater_soft", "FastRater-N/2", 4)}
    assert got == want
    van = next(r for r in recs if r["policy"] == "vanilla")
    assert van["ratio_vs_vanilla"] == 1.0 and len(van["step_times_s"]) == 10  # 5 per round
    for r in recs:
        if r["policy"] == "vanilla":
            continue
        assert len(r["step_times_s"]) == 2 and all(x > 0 for x in r["step_times_s"])
        assert r["ratio_vs_vanilla"] > 0 and r["ratio_vs_vanilla_wall"] > 0
        assert min(r["step_times_s"]) <= r["step_time_s"] <= max(r["step_times_s"])
    rater = next(r for r in recs if r["rater"] == "Rater-N/2" and r["k"] == 2)
    assert rater["rater_params"] == sum(p.numel() for p in build_rater(
        "Rater-N/2", input_size=8, in_channels=1, num_classes=10).parameters())
    # Memory: the rater's weights and 4 candidates' activations are on top of vanilla's step.
    soft = next(r for r in recs if r["policy"] == "rater_soft")
    assert van["peak_mem_bytes"] > 0 and soft["peak_mem_bytes"] > van["peak_mem_bytes"] + 4 * rater["rater_params"]
    assert "| vanilla |" in res.output


def test_bench_selection_rejects_unknown_rater(tmp_path):
    res = CliRunner().invoke(main, ["bench", "selection", "--json", str(tmp_path / "x.json"), "--rater-archs", "Rater-Z/2"])
    assert res.exit_code == 2 and "unknown rater 'Rater-Z/2'" in res.output


# Known per-step times (CPU, wall) on a machine that slows down 1x, 2x, 4x over three rounds; in rounds 1
# and 2 the first vanilla step of the round is a 10x outlier. Per round, vanilla is timed 5 times.
BASE_CPU = {"vanilla": 1.0, "max_norm": 1.25, "min_norm": 1.5, "knn": 2.0, "batch_ot": 2.5, "class_ot": 2.25,
            "rater": 4.0}
WALL_FACTOR = {"vanilla": 2.0, "max_norm": 2.0, "min_norm": 2.0, "knn": 2.0, "batch_ot": 2.0, "class_ot": 2.0,
               "rater": 3.0}
DRIFT = [1.0, 2.0, 4.0]


def _known_clock(monkeypatch):
    calls: dict[str, int] = {}

    def timed_step(self, cfg):
        n = calls.get(cfg.key, 0)
        calls[cfg.key] = n + 1
        if cfg.policy == "vanilla":
            rnd, j = divmod(n, 5)
            outlier = 10.0 if rnd < 2 and j == 0 else 1.0
        else:
            rnd, outlier = n, 1.0
        cpu = BASE_CPU[cfg.policy] * DRIFT[rnd] * outlier
        return cpu * WALL_FACTOR[cfg.policy], cpu

    monkeypatch.setattr(bs._Stepper, "timed_step", timed_step)
    return calls


@pytest.mark.parametrize("clock", ["cpu", "wall"])
def test_ratios_and_times_on_a_known_clock(monkeypatch, clock):
    """Each ratio is the config's time over the median vanilla time of the same round, medianed over rounds:
    on this clock exactly BASE (CPU) or BASE * WALL_FACTOR / 2 (wall), whatever the drift; normalising by the
    mean of the round's vanilla steps (BASE / 2.8) or by its first one (BASE / 10), or the other clock, would
    give other numbers."""
    calls = _known_clock(monkeypatch)
    configs = bs.build_configs(["Rater-N/2"], [2], [], [])
    setup = bs.Setup("DiT-N/2", 8, 1, 10, 2, "cpu")
    recs = bs.run_benchmark(setup, configs, repeats=3, memory=False, threads=1, clock=clock, log=lambda *a: None)
    assert calls == {c.key: (15 if c.policy == "vanilla" else 3) for c in configs}
    by_policy = {r["policy"]: r for r in recs}
    assert set(by_policy) == set(BASE_CPU)
    for policy, base in BASE_CPU.items():
        r = by_policy[policy]
        cpu_ratio, wall_ratio = base, base * WALL_FACTOR[policy] / WALL_FACTOR["vanilla"]
        assert r["ratio_vs_vanilla"] == pytest.approx(cpu_ratio if clock == "cpu" else wall_ratio, rel=1e-12)
        assert r["ratio_vs_vanilla_wall"] == pytest.approx(wall_ratio, rel=1e-12)
        factor = 1.0 if clock == "cpu" else WALL_FACTOR[policy]
        if policy == "vanilla":  # the median of its 15 steps {10,1,1,1,1; 20,2,2,2,2; 4,4,4,4,4}: 2
            assert len(r["step_times_s"]) == 15
            assert r["step_time_s"] == pytest.approx(2.0 * factor)
        else:  # the median over the rounds of base * drift
            assert r["step_times_s"] == pytest.approx([base * d * factor for d in DRIFT])
            assert r["step_time_s"] == pytest.approx(base * 2.0 * factor)
        assert r["wall_step_time_s"] == pytest.approx(r["step_time_s"] * WALL_FACTOR[policy] / factor)
    line = next(x for x in bs.format_table(recs).splitlines() if x.startswith("| rater | Rater-N/2 |"))
    assert f"| 2 | {4.0 if clock == 'cpu' else 6.0:.2f} |" in line
