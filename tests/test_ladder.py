"""The dimension ladder: the weighted fit against numpy, the rung effects against a hand computation from the
published records, the pooled random null, and the command."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from noiserater.cli import main
from noiserater.data.datasets import load_source, source_dimension
from noiserater.study.ladder import fit_inverse_sqrt, ladder, merge_rungs, rung

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "docs" / "results" / "evidence-digits"


def test_fit_matches_numpy_weighted_polyfit():
    d = [64, 256, 1024, 2048]
    y = [3.0, 1.2, 0.1, 0.4]
    se = [1.0, 0.5, 0.2, 0.3]
    f = fit_inverse_sqrt(d, y, se)
    x = 1 / np.sqrt(d)
    (b, a), cov = np.polyfit(x, y, 1, w=1 / np.asarray(se), cov="unscaled")
    assert f["a"] == pytest.approx(a, rel=1e-9) and f["b"] == pytest.approx(b, rel=1e-9)
    assert f["a_se"] == pytest.approx(math.sqrt(cov[1, 1]), rel=1e-9)
    x0 = np.array([1 / 64, 1.0])
    assert f["pred"] == pytest.approx(a + b / 64, rel=1e-9)
    assert f["pred_se"] == pytest.approx(math.sqrt(x0 @ cov @ x0), rel=1e-9)
    resid = (np.asarray(y) - (a + b * x)) / np.asarray(se)
    assert f["chi2"] == pytest.approx(float(resid @ resid), rel=1e-9) and f["dof"] == 2
    # scattered rungs widen the interval by the PDG scale factor sqrt(chi2/dof); consistent ones do not
    assert f["chi2"] / 2 > 1 and f["scale"] == pytest.approx(math.sqrt(f["chi2"] / 2))
    assert f["half"] == pytest.approx(1.959963984540054 * f["pred_se"] * f["scale"])
    exact = fit_inverse_sqrt(d, [1 + 16 / math.sqrt(v) for v in d], se)
    assert exact["scale"] == 1.0 and exact["chi2"] == pytest.approx(0.0, abs=1e-12)


def test_two_rungs_are_the_line_through_them_with_propagated_error():
    # effect = 1 + 16/sqrt(d): exact at d = 64 and 1024, so the fit at 4096 is 1 + 16/64 = 1.25
    f = fit_inverse_sqrt([64, 1024], [3.0, 1.5], [0.4, 0.1])
    assert f["pred"] == pytest.approx(1.25) and f["chi2"] == pytest.approx(0.0, abs=1e-12)
    # the prediction is c1*y1 + c2*y2 with Lagrange weights in x = 1/sqrt(d); its SD follows by hand
    x1, x2, x0 = 1 / 8, 1 / 32, 1 / 64
    c1, c2 = (x0 - x2) / (x1 - x2), (x0 - x1) / (x2 - x1)
    assert f["pred_se"] == pytest.approx(math.hypot(c1 * 0.4, c2 * 0.1), rel=1e-9)
    assert f["half"] == pytest.approx(1.959963984540054 * f["pred_se"])
    with pytest.raises(ValueError, match="two rungs"):
        fit_inverse_sqrt([64, 64], [1.0, 2.0], [0.1, 0.1])


def test_rung_effects_are_the_paired_relative_changes_of_the_records():
    rows = [json.loads(line) for line in (DIGITS / "results.jsonl").read_text().splitlines()]
    r = rung(DIGITS)
    assert r["d"] == 64 and r["stage"] == 1500
    van = {x["seed"]: x["fid"] for x in rows if x["arm"] == "vanilla" and x["stage"] == 1500}
    mx = {x["seed"]: x["fid"] for x in rows if x["arm"] == "max_norm" and x["stage"] == 1500}
    diffs = np.array([100 * (mx[s] - van[s]) / van[s] for s in sorted(mx)])
    got = r["arms"]["max_norm"]["fid"]
    assert got["mean"] == pytest.approx(diffs.mean()) and got["n"] == len(diffs)
    assert got["se"] == pytest.approx(diffs.std(ddof=1) / math.sqrt(len(diffs)))
    # the random null: its inits averaged per seed first, then the seeds are the units
    loss = {x["seed"]: x["test_loss"] for x in rows if x["arm"] == "vanilla" and x["stage"] == 1500}
    per_seed = {}
    for x in rows:
        if x["arm"].startswith("rater_random/init") and x["stage"] == 1500:
            per_seed.setdefault(x["seed"], []).append(100 * (x["test_loss"] - loss[x["seed"]]) / loss[x["seed"]])
    pooled = np.array([np.mean(v) for _, v in sorted(per_seed.items())])
    got = r["arms"]["rater_random"]["test_loss"]
    assert got["n"] == len(pooled) == 4 and got["mean"] == pytest.approx(pooled.mean())


def test_ladder_fits_only_arms_with_two_dimensions():
    a = {"d": 64, "data": "x", "arms": {"max_norm": {"fid": {"mean": 2.0, "se": 1.0, "half": 2.0}},
                                        "rater": {"fid": {"mean": 1.0, "se": 1.0, "half": 2.0}}}}
    b = {"d": 1024, "data": "y", "arms": {"max_norm": {"fid": {"mean": 0.5, "se": 1.0, "half": 2.0}}}}
    out = ladder([b, a])
    assert [r["d"] for r in out["rungs"]] == [64, 1024]
    assert set(out["fits"]) == {"max_norm"} and out["fits"]["max_norm"]["fid"]["pred"] == pytest.approx(0.25)


def test_studies_of_one_recipe_share_a_rung_and_the_first_keeps_its_arms():
    ci = lambda m: {"fid": {"mean": m, "se": 1.0, "half": 2.0}}  # noqa: E731
    first = {"study": "a", "commit": "1" * 40, "d": 64, "data": "digits", "model": "DiT-T/2", "stage": 1500,
             "arms": {"max_norm": ci(1.0), "knn": ci(5.0)}}
    later = {"study": "b", "commit": "2" * 40, "d": 64, "data": "digits", "model": "DiT-T/2", "stage": 1500,
             "arms": {"knn": ci(9.0), "batch_ot": ci(3.0)}}
    other_stage = {**later, "study": "c", "stage": 300}
    merged = merge_rungs([first, later, other_stage])
    assert len(merged) == 2 and merged[0]["study"] == "a + b" and merged[1]["study"] == "c"
    assert {a: v["fid"]["mean"] for a, v in merged[0]["arms"].items()} == {"max_norm": 1.0, "knn": 5.0, "batch_ot": 3.0}
    assert first["arms"] == {"max_norm": ci(1.0), "knn": ci(5.0)}  # the inputs are not changed
    far = {**later, "study": "d", "d": 256, "data": "digits@16", "arms": {"batch_ot": ci(1.0)}}
    fit = ladder([first, later, far])["fits"]["batch_ot"]["fid"]  # batch_ot: 3.0 at 64 (from b), 1.0 at 256
    assert fit["dof"] == 0 and fit["a"] + fit["b"] / 8 == pytest.approx(3.0) and fit["a"] + fit["b"] / 16 == pytest.approx(1.0)


def test_source_dimension_matches_the_loaded_images():
    assert source_dimension("digits") == load_source("digits").images[0].numel() == 64
    assert source_dimension("digits@4") == load_source("digits@4").images[0].numel() == 16
    assert source_dimension("fashion-mnist@16") == 256 and source_dimension("fashion-mnist") == 1024


def test_ladder_command_writes_and_regenerates(tmp_path):
    study = tmp_path / "evidence-digits"
    shutil.copytree(DIGITS, study)
    other = tmp_path / "evidence-digits-again"  # a second rung at another d: the same records relabelled
    shutil.copytree(DIGITS, other)
    s = json.loads((other / "study.json").read_text())
    s["settings"]["data"] = "digits@4"
    (other / "study.json").write_text(json.dumps(s))
    out = tmp_path / "ladder"
    res = CliRunner().invoke(main, ["ladder", str(study), str(other), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| max_norm |" in res.output and (out / "ladder.png").exists()
    first = (out / "report.md").read_text()
    res = CliRunner().invoke(main, ["ladder", "--out", str(out)])  # again from ladder.json
    assert res.exit_code == 0, res.output
    assert (out / "report.md").read_text() == first
    res = CliRunner().invoke(main, ["ladder", "--out", str(tmp_path / "none")])
    assert res.exit_code != 0 and "ladder.json does not exist" in res.output
