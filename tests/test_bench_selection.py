"""`noiserater bench selection` on tiny models: the records, and ratios recomputed from the raw times."""

from __future__ import annotations

import json
import statistics

from click.testing import CliRunner

from noiserater.cli import main
from noiserater.models import build_rater


def test_bench_selection_writes_records_with_consistent_ratios(tmp_path):
    out = tmp_path / "sel.json"
    res = CliRunner().invoke(main, ["bench", "selection", "--json", str(out), "--model", "DiT-N/2",
                                    "--input-size", "8", "--channels", "1", "--classes", "10", "--batch", "2",
                                    "--raters", "Rater-N/2,FastRater-N/2", "--k", "1,2", "--soft-raters",
                                    "FastRater-N/2", "--soft-k", "4", "--repeats", "2"])
    assert res.exit_code == 0, res.output
    recs = json.loads(out.read_text())
    keys = {"policy", "rater", "k", "step_time_s", "ratio_vs_vanilla", "peak_mem_bytes"}
    assert all(keys <= set(r) for r in recs)
    got = {(r["policy"], r["rater"], r["k"]) for r in recs}
    want = {("vanilla", None, 1)} | {(p, None, k) for p in ("max_norm", "min_norm", "nearest") for k in (1, 2)}
    want |= {("rater", r, k) for r in ("Rater-N/2", "FastRater-N/2") for k in (1, 2)} | {("rater_soft", "FastRater-N/2", 4)}
    assert got == want
    van = next(r for r in recs if r["policy"] == "vanilla")
    assert van["ratio_vs_vanilla"] == 1.0 and len(van["step_times_s"]) == 10  # 5 per round
    per_round = [statistics.median(van["step_times_s"][5 * i:5 * i + 5]) for i in range(2)]
    for r in recs:
        if r["policy"] == "vanilla":
            continue
        assert len(r["step_times_s"]) == 2
        ratio = statistics.median(t / v for t, v in zip(r["step_times_s"], per_round))
        assert abs(ratio - r["ratio_vs_vanilla"]) < 1e-12
        assert r["step_time_s"] == statistics.median(r["step_times_s"])
    rater = next(r for r in recs if r["rater"] == "Rater-N/2" and r["k"] == 2)
    assert rater["rater_params"] == sum(p.numel() for p in build_rater(
        "Rater-N/2", input_size=8, in_channels=1, num_classes=10).parameters())
    # Memory: the rater's weights and 4 candidates' activations are on top of vanilla's step.
    soft = next(r for r in recs if r["policy"] == "rater_soft")
    assert van["peak_mem_bytes"] > 0 and soft["peak_mem_bytes"] > van["peak_mem_bytes"] + 4 * rater["rater_params"]
    assert "| vanilla |" in res.output


def test_bench_selection_rejects_unknown_rater(tmp_path):
    res = CliRunner().invoke(main, ["bench", "selection", "--json", str(tmp_path / "x.json"), "--raters", "Rater-Z/2"])
    assert res.exit_code == 2 and "unknown rater 'Rater-Z/2'" in res.output
