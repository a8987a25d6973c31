"""The evidence study: statistics against scipy, and the pipeline end to end at a tiny size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from scipy import stats

from noiserater.checkpoint import load_checkpoint, weights_fingerprint
from noiserater.cli import main
from noiserater.config import from_dict
from noiserater.data import load_dataset
from noiserater.stats import paired_interval
from noiserater.study.arms import ARMS, NORM_CHANGING, SCALE_CONTROL_OF
from noiserater.study.evidence import EVIDENCE_PRESETS, get_evidence_preset, publish_study
from noiserater.study.evidence_report import (
    compare,
    seeds_for_half_width,
    training_curve_lines,
    training_curve_plot,
    write_evidence_report,
)
from noiserater.train import TrainConfig, load_splits, train


def test_paired_interval_matches_scipy():
    d = [1.3, -0.2, 2.5, 0.7, 1.1]
    ci = paired_interval(d)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
    assert ci["mean"] == pytest.approx(np.mean(d)) and ci["half"] == pytest.approx((hi - lo) / 2)
    assert ci["p"] == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    rows = [{"arm": "a", "seed": s, "m": v} for s, v in enumerate([11.0, 9.0, 10.5])] + \
           [{"arm": "c", "seed": s, "m": v} for s, v in enumerate([10.0, 10.0, 10.0])] + [{"arm": "c", "seed": 9, "m": 1.0}]
    rel = compare(rows, "a", "c", "m")  # only the common seeds 0-2, relative to the control
    assert rel["n"] == 3 and rel["mean"] == pytest.approx(np.mean([10.0, -10.0, 5.0]))


def test_seeds_for_half_width_is_the_smallest_n_by_the_t_quantile():
    for sd in (0.9, 2.0, 3.3):
        n = seeds_for_half_width(sd, 2.0)
        half = lambda m: stats.t.ppf(0.975, m - 1) * sd / math.sqrt(m)
        assert half(n) <= 2.0 < half(n - 1) if n > 2 else half(n) <= 2.0
    assert seeds_for_half_width(3.3) == 13 and seeds_for_half_width(2.0) == 7


def test_evidence_study_end_to_end_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("NOISERATER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ev"
    args = ["evidence", "--out", str(out), "--set", "model=DiT-N/2", "--set", "rater=FastRater-N/2",
            "--set", "online_rater=FastRater-N/2", "--set", "batch_size=8", "--set", "pretrain_steps=6",
            "--set", "stages=[6]", "--set", "seeds=[0, 1]", "--set", "continue_steps=2",
            "--set", "arms=[vanilla, uniform_soft, rater_soft, rater_sample, oracle_amortised, vanilla_batch_xk]",
            "--set", "bilevel_outer_steps=2", "--set", "bilevel_inner_steps=1", "--set", "bilevel_candidates=2",
            "--set", "meta_eval_every=1", "--set", "eval_samples=20", "--set", "eval_ddim_steps=2",
            "--set", "test_draws=1", "--set", "oracle_val_batch=8"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 2 and {r["seed"] for r in rows} == {0, 1}
    n_test = len(load_dataset("digits", "test", seed=0, val_fraction=0.1, test_fraction=0.25))
    assert n_test == 449
    assert all(r["test_triples"] == n_test for r in rows)  # the digits test split, never trained on
    # FID against the held-out test split, not all digits; every run logged the norm of its noise
    assert all(r["fid_reference_images"] == n_test for r in rows)
    assert all(abs(r["noise_sq_norm_per_dim"] - 1.0) < 0.2 and r["noise_scale"] == 1.0 for r in rows)
    summary = {r["arm"]: r for r in json.loads((out / "summary.json").read_text())}
    assert summary["rater_soft"]["control"] == "uniform_soft" and summary["rater_sample"]["control"] == "vanilla"
    assert summary["uniform_soft"]["dit_passes"] == 4 and summary["rater_sample"]["dit_passes"] == 1
    report = (out / "report.md").read_text()
    assert "| rater_soft | 4 | uniform_soft | 2, 2 |" in report and "(forest-stage6.png)" in report
    assert "FID reference: the `test` split, 449 images" in report
    # uniform_soft's other equal-cost control: vanilla with k times the images per step, k passes per image slot
    big = yaml.safe_load((out / "stage-6" / "runs" / "vanilla_batch_xk" / "seed0" / "run" / "config.yaml").read_text())
    assert big["batch_size"] == 4 * 8 and big["candidates"] == 1 and summary["vanilla_batch_xk"]["dit_passes"] == 4
    by = {(r["arm"], r["seed"]): r for r in rows}
    want = np.mean([100 * (by["uniform_soft", s]["test_loss"] - by["vanilla_batch_xk", s]["test_loss"])
                    / by["vanilla_batch_xk", s]["test_loss"] for s in (0, 1)])
    line = next(x for x in report.splitlines() if x.startswith("| uniform_soft | 4, 4 |"))
    assert line.split(" | ")[3].startswith(f"{want:+.2f}%")
    # the pretraining never saw the test split: the images of the split its config names are disjoint from
    # the test images every arm is evaluated on
    cfg = yaml.safe_load((out / "pretrain" / "run" / "config.yaml").read_text())
    train_imgs = load_splits(from_dict(TrainConfig, cfg), "train").images.flatten(1)
    test_imgs = load_dataset("digits", "test", seed=0, val_fraction=0.1, test_fraction=0.25).images.flatten(1)
    assert not (torch.cdist(train_imgs, test_imgs) == 0).any()
    again = CliRunner().invoke(main, args)  # a rerun skips everything
    assert again.exit_code == 0 and "[run ]" not in again.output


def test_random_rater_null_and_noise_scale_control_by_hand():
    from noiserater.study.evidence_report import norm_control_lines, random_null

    rows = []
    for seed in range(4):
        rows.append({"stage": 1, "arm": "vanilla", "seed": seed, "fid": 10.0, "test_loss": 1.0})
        rows.append({"stage": 1, "arm": "rater", "seed": seed, "fid": 9.0 if seed < 2 else 11.0, "test_loss": 1.0})
        rows.append({"stage": 1, "arm": "max_norm", "seed": seed, "fid": 9.0, "test_loss": 0.99})
        rows.append({"stage": 1, "arm": "noise_scale", "seed": seed, "fid": 9.0 + 0.1 * seed, "test_loss": 0.99})
    for init, fid in enumerate((10.5, 11.0, 12.0)):  # the null ran seeds 0 and 1 only
        rows += [{"stage": 1, "arm": f"rater_random/init{init}", "seed": s, "fid": fid, "test_loss": 1.0} for s in (0, 1)]
    nr = random_null(rows, 1, "rater", "fid")
    effects = [5.0, 10.0, 20.0]
    assert nr["inits"] == 3 and nr["null_mean"] == pytest.approx(np.mean(effects))
    assert nr["null_sd"] == pytest.approx(np.std(effects, ddof=1))
    assert (nr["null_min"], nr["null_max"]) == (5.0, 20.0)
    assert nr["effect"] == pytest.approx(-10.0)  # on the null's seeds 0-1, not -10/+10 over all four
    assert nr["beats_null"]
    rows = [r for r in rows if r["arm"] != "rater" or r["seed"] >= 2] + \
        [{"stage": 1, "arm": "rater", "seed": s, "fid": 10.8, "test_loss": 1.0} for s in (0, 1)]
    assert not random_null(rows, 1, "rater", "fid")["beats_null"]  # +8% is inside the null's spread
    lines = norm_control_lines(rows, 1)
    want = np.mean([100 * (9.0 - (9.0 + 0.1 * s)) / (9.0 + 0.1 * s) for s in range(4)])
    assert len(lines) == 3 and lines[2].startswith("| max_norm vs noise_scale | ") and f"{want:+.2f}%" in lines[2]


def test_norm_changing_arms_are_paired_with_the_control_of_their_own_noise_length():
    """knn trains on shorter noise: the up-scaled max_norm control is not its control; the measured
    noise_scale_knn is. An arm no control matches says so instead of borrowing another's."""
    from noiserater.study.evidence_report import matched_scale_control, norm_control_lines

    norms = {"vanilla": 1.0, "max_norm": 1.187, "noise_scale": 1.192, "knn": 0.943, "noise_scale_knn": 0.945,
             "batch_ot": 1.0}
    rows = [{"stage": 1, "arm": a, "seed": s, "k": 1 if a in ("vanilla", "batch_ot") or "scale" in a else 4,
             "fid": 10.0 + s + (0.5 if a == "knn" else 0.0), "test_loss": 1.0, "noise_sq_norm_per_dim": n}
            for a, n in norms.items() for s in range(3)]
    assert matched_scale_control(rows, "max_norm") == "noise_scale"
    assert matched_scale_control(rows, "knn") == "noise_scale_knn"
    lines = norm_control_lines(rows, 1)
    knn = next(line for line in lines if line.startswith("| knn vs noise_scale_knn | 0.943, 0.945 |"))
    want = np.mean([100 * 0.5 / (10.0 + s) for s in range(3)])
    assert f"{want:+.2f}%" in knn and not any(line.startswith("| batch_ot") for line in lines)
    without = [r for r in rows if r["arm"] != "noise_scale_knn"]
    assert matched_scale_control(without, "knn") is None
    assert "| knn vs — (no control of its noise length ran) | 0.943, — | — | — |" in norm_control_lines(without, 1)
    # with FID at fewer sampler steps: one more column per step count, each the paired change vs the control
    for r in rows:
        r["fid_steps4"] = 20.0 + r["seed"] - (1.0 if r["arm"] == "knn" else 0.0)
    lines = norm_control_lines(rows, 1, [4, 8])  # no run measured 8 steps: no column for it
    assert lines[0] == "| arm vs its k=1 noise-scale control | E‖ε‖²/d: arm, control | FID | FID, 4 steps | test loss |"
    knn = next(line for line in lines if line.startswith("| knn vs noise_scale_knn"))
    four = np.mean([-100 * 1.0 / (20.0 + s) for s in range(3)])
    assert knn.split(" | ")[3].startswith(f"{four:+.2f}% ± ")
    assert "| knn vs — (no control of its noise length ran) | 0.943, — | — | — | — |" in norm_control_lines(
        [r for r in rows if r["arm"] != "noise_scale_knn"], 1, [4])


def _tiny_study(out, jobs: int = 1, **sets: str) -> list[dict]:
    """`noiserater evidence --out OUT --jobs JOBS` at a size of seconds (DiT-N/2, 2 seeds, 20-sample FID) with
    ``sets`` as further --set overrides; returns its results.jsonl records."""
    base = {"model": "DiT-N/2", "rater": "FastRater-N/2", "batch_size": "8", "seeds": "[0, 1]", "random_raters": "2",
            "fid_large_arms": "[]", "eval_samples": "20", "eval_ddim_steps": "2", "test_draws": "1"}
    args = ["evidence", "--out", str(out), "--jobs", str(jobs)] + [
        x for k, v in {**base, **sets}.items() for x in ("--set", f"{k}={v}")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_evidence_study_with_the_flow_objective_and_the_couplings(tmp_path, monkeypatch):
    monkeypatch.setenv("NOISERATER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ev"
    rows = _tiny_study(out, objective="flow", pretrain_steps=6, stages="[6]", continue_steps=2,
                       arms="[vanilla, knn, batch_ot, class_ot, noise_scale, rater_random]", eval_extra_steps="[1]")
    assert {r["arm"].split("/init")[0] for r in rows} == {"vanilla", "knn", "batch_ot", "class_ot", "noise_scale", "rater_random"}
    # FID at 1 Euler step too: other samples than at 2 steps, so another FID
    assert all(math.isfinite(r["fid_steps1"]) and r["fid_steps1"] != r["fid"] for r in rows)
    assert len(rows) == 2 * (5 + 2)  # the random rater once per initialisation
    ckpt = out / rows[0]["checkpoint"]
    assert load_checkpoint(ckpt, kind="diffusion")["config"]["objective"] == "flow"
    assert all(r["fid"] is not None and r["test_loss"] > 0 for r in rows)
    knn = [r["noise_sq_norm_per_dim"] for r in rows if r["arm"] == "knn"]
    assert all(v < 1.0 for v in knn)  # the nearest noise to an image is shorter (||x0 - eps||^2 favours small eps)
    report = (out / "report.md").read_text()
    # knn trains on shorter noise than noise_scale's: not its control; batch_ot at k=1 keeps the lengths
    assert "objective `flow`" in report and "| knn vs — (no control of its noise length ran) |" in report
    assert "| batch_ot vs" not in report
    assert "`knn`, `batch_ot`, `class_ot` train on noise coupled to the image" in report  # why their loss is not FID
    assert "FID vs vanilla, 1 steps" in report
    assert "enters as 1000·t, so t<100 means t < 0.1" in report  # the loss bands' units, stated for flow


def test_from_scratch_study_trains_each_arm_from_initialisation(tmp_path, monkeypatch):
    """scratch_steps: every arm trains a fresh DiT, evaluated at each step; the run at the later step is the same
    training run continued (segments are bit-exact), and a straight run to that step gives the same weights."""
    monkeypatch.setenv("NOISERATER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ev"
    rows = _tiny_study(out, pretrain_steps=4, stages="[4]", scratch_steps="[3, 5]",
                       arms="[vanilla, max_norm, rater_random]")
    assert len(rows) == 2 * 2 * (2 + 2) and {r["stage"] for r in rows} == {3, 5}
    for r in rows:
        state = load_checkpoint(out / r["checkpoint"], kind="diffusion")
        assert state["step"] == r["stage"] and not state["config"]["init_checkpoint"]  # from initialisation
        assert state["config"]["seed"] == r["seed"] and state["config"]["lr"] == 1e-3
    van5 = next(r for r in rows if r["arm"] == "vanilla" and r["seed"] == 1 and r["stage"] == 5)
    straight = TrainConfig(**{**load_checkpoint(out / van5["checkpoint"], kind="diffusion")["config"],
                              "run_dir": str(tmp_path / "straight"), "ckpt_every": 1000})
    train(straight)
    a = load_checkpoint(out / van5["checkpoint"], kind="diffusion")
    b = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt", kind="diffusion")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    report = (out / "report.md").read_text()
    assert "## Step 5 from scratch" in report and "## Step 3 from scratch" in report
    assert "every arm trained from initialisation" in report
    assert "## Along training" in report and "| max_norm | " in report.split("## Along training")[1]
    # the published layout regenerates the same report
    pub = tmp_path / "pub"
    publish_study(out, pub)
    assert (pub / "training-curve.png").exists()
    (pub / "report.md").unlink()
    write_evidence_report(pub)
    assert (pub / "report.md").read_text() == report


@pytest.mark.parametrize("name", sorted(EVIDENCE_PRESETS))
def test_shipped_presets_are_valid_studies_with_their_controls(name):
    p = get_evidence_preset(name)
    p.validate()
    # every study with a rater arm carries its random-rater null, every norm-changing arm its noise-scale control
    if any(ARMS[a][3] == "bilevel" for a in p.arms):
        assert "rater_random" in p.arms and p.random_raters >= 5
    # every norm-changing arm runs beside the k=1 control of its own noise length; three ladder rungs and
    # digits-flow-scratch, published before knn's control (noise_scale_knn) existed, pair knn with whichever
    # recorded length matches, if any
    before_knn_control = {"fashion-mnist", "fashion-mnist-16", "digits-1024", "digits-flow-scratch"}
    for arm in set(p.arms) & set(NORM_CHANGING):
        if (arm == "knn" and name in before_knn_control) or not ARMS[arm][1]:
            continue  # at k = 1 a batch coupling permutes i.i.d. noises: their lengths are plain chi_d
        assert {SCALE_CONTROL_OF[arm], "vanilla"} <= set(p.arms), arm
    assert set(p.fid_large_arms) <= set(p.arms)
    assert p.eval_reference_split in ("test", "all") and p.test_fraction > 0 and len(p.seeds) >= 4

def test_training_curve_tables_give_each_steps_paired_change_vs_vanilla(tmp_path):
    """From scratch: one row per arm, one column per step; each cell the paired relative change of that step."""
    rows = []
    for s in range(3):
        for step, van, knn in ((100, 10.0, 9.0), (200, 8.0, 8.8)):
            rows.append({"stage": step, "arm": "vanilla", "seed": s, "fid": van + 0.1 * s, "test_loss": 1.0})
            rows.append({"stage": step, "arm": "knn", "seed": s, "fid": knn + 0.1 * s, "test_loss": 1.0})
        rows.append({"stage": 100, "arm": "rater_random/init0", "seed": s, "fid": 5.0, "test_loss": 1.0})
    settings = {"eval_ddim_steps": 25, "scratch_steps": [100, 200]}
    lines = training_curve_lines(rows, settings)
    knn = [line for line in lines if line.startswith("| knn |")]
    assert len(knn) == 2 and not any("/init" in line for line in lines)  # FID and test loss; no random inits
    want = [np.mean([100 * ((k + 0.1 * s) - (v + 0.1 * s)) / (v + 0.1 * s) for s in range(3)])
            for v, k in ((10.0, 9.0), (8.0, 8.8))]
    cells = knn[0].split(" | ")[1:]
    assert cells[0].startswith(f"{want[0]:+.2f}%") and cells[1].startswith(f"{want[1]:+.2f}%")
    assert "| *vanilla (absolute)* | 10.1 | 8.1 |" in lines
    assert training_curve_plot(rows, settings, tmp_path / "c.png").exists()


def test_knn_noise_scale_control_is_measured_on_the_study_training_split():
    from noiserater.selection import policy_norm_scale
    from noiserater.study.evidence import resolve_overrides

    p = get_evidence_preset("digits-scratch")
    c = resolve_overrides(p, {"noise_scale": "knn"})["noise_scale"]
    train_images = load_dataset("digits", "train", seed=p.split_seed, val_fraction=p.val_fraction,
                                test_fraction=p.test_fraction).images
    assert c == policy_norm_scale("knn", train_images, p.k, p.batch_size, seed=p.split_seed) and 0.8 < c < 1.0
    assert "noise_scale_knn" in p.arms


def test_noise_scale_dose_response_finds_the_vertex_of_a_planted_parabola(tmp_path):
    """Scale arms whose paired FID change is exactly 50 (C - 1.1)^2 - 50 (0.1)^2 (0 at C = 1, minimum at
    C = 1.1): the sweep table lists them by C around vanilla, the fit finds 1.1 (closed form), and arms that
    change anything besides the scale (k = 4, input perturbation) are not in the sweep."""
    from noiserater.study.evidence_report import dose_response, parabola_minimum, scale_arms

    assert parabola_minimum([(0.0, 1.0), (1.0, 0.0), (2.0, 1.0)]) == pytest.approx(1.0)
    assert parabola_minimum([(0.0, -1.0), (1.0, 0.0), (2.0, -1.0)]) is None  # opens downward
    assert parabola_minimum([(1.0, 0.0), (2.0, 1.0)]) is None

    def change(c):
        return 50 * (c - 1.1) ** 2 - 50 * 0.1 ** 2

    scales = {"noise_scale_down": 0.9158, "noise_scale_x0.95": 0.95, "noise_scale": 1.0919, "noise_scale_x1.25": 1.25}
    rows = []
    for s in range(3):
        base = {"stage": 1, "seed": s, "policy": "vanilla", "k": 1, "input_perturbation": 0.0}
        rows.append({**base, "arm": "vanilla", "noise_scale": 1.0, "fid": 10.0 + s, "test_loss": 1.0})
        rows.append({**base, "arm": "max_norm", "policy": "max_norm", "k": 4, "noise_scale": 1.0, "fid": 1.0,
                     "test_loss": 1.0})
        rows.append({**base, "arm": "input_perturbation", "input_perturbation": 0.1, "noise_scale": 1.0, "fid": 1.0,
                     "test_loss": 1.0})
        for arm, c in scales.items():
            rows.append({**base, "arm": arm, "noise_scale": c, "fid": (10.0 + s) * (1 + change(c) / 100),
                         "test_loss": 1.0 + (c - 1.0) ** 2})
    assert [a for _, a in scale_arms(rows, 1)] == ["noise_scale_down", "noise_scale_x0.95", "noise_scale",
                                                   "noise_scale_x1.25"]
    lines, fit = dose_response(rows, 1)
    assert [line.split(" | ")[1] for line in lines[2:7]] == ["noise_scale_down", "noise_scale_x0.95",
                                                             "vanilla (the control)", "noise_scale", "noise_scale_x1.25"]
    assert fit["best"]["fid"] == pytest.approx(1.1, abs=1e-6)
    assert fit["best"]["test_loss"] == pytest.approx(1.0, abs=1e-6)
    assert f"| {change(1.25):+.3f}% ± 0.000 |" in lines[6]  # exact: every seed has the same change
    assert "classifier-FID: C = 1.100" in lines[-1]
    assert dose_response([r for r in rows if r["arm"] in ("vanilla", "noise_scale", "noise_scale_x1.25")], 1) is None


def test_a_published_study_is_extended_with_more_seeds_and_its_rebuilt_stages_are_checked(tmp_path, monkeypatch):
    """A published copy keeps the records but no DiT checkpoint and no random rater: extending it with a
    seed rebuilds the pretraining and the random raters from their configs, checks their weights against the
    recorded fingerprints, skips every finished run, and gives the new seed the same numbers as a study that
    ran it from the start. A record whose fingerprint the rebuild does not match is refused."""
    monkeypatch.setenv("NOISERATER_CACHE", str(tmp_path / "cache"))
    sets = dict(pretrain_steps="6", stages="[6]", continue_steps="2", arms="[vanilla, rater_random]")
    whole = _tiny_study(tmp_path / "whole", **sets, seeds="[0, 1, 2]")
    _tiny_study(tmp_path / "first", **sets)
    publish_study(tmp_path / "first", tmp_path / "pub")
    assert not list((tmp_path / "pub").rglob("*.pt"))
    pub = (tmp_path / "pub" / "pretrain" / "stage.json").read_text()
    args = ["evidence", "--out", str(tmp_path / "pub")] + [
        x for k, v in {"model": "DiT-N/2", "rater": "FastRater-N/2", "batch_size": "8", "random_raters": "2",
                       "fid_large_arms": "[]", "eval_samples": "20", "eval_ddim_steps": "2", "test_draws": "1",
                       **sets, "seeds": "[0, 1, 2]"}.items() for x in ("--set", f"{k}={v}")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "[redo] " in res.output and "pretrain" in res.output and "rater-random" in res.output
    assert "runs/vanilla/seed0 (done)" in res.output  # finished runs are not rerun
    rows = {(r["arm"], r.get("rater_init"), r["seed"]): r for r in
            (json.loads(x) for x in (tmp_path / "pub" / "results.jsonl").read_text().splitlines())}
    for r in whole:
        assert rows[(r["arm"], r.get("rater_init"), r["seed"])]["fid"] == r["fid"]
        assert rows[(r["arm"], r.get("rater_init"), r["seed"])]["test_loss"] == r["test_loss"]
    # a record made by other weights: the rebuilt pretraining does not match it and the study stops
    rec = json.loads(pub)
    rec["result"]["fingerprints"]["6"] = "0" * 64
    publish_study(tmp_path / "first", tmp_path / "pub2")
    (tmp_path / "pub2" / "pretrain" / "stage.json").write_text(json.dumps(rec))
    bad = CliRunner().invoke(main, [a if a != str(tmp_path / "pub") else str(tmp_path / "pub2") for a in args])
    assert bad.exit_code != 0 and "rebuilt differently from its record" in bad.output


def test_study_progress_estimates_the_time_left_from_the_runs_it_trained(monkeypatch):
    """Three jobs: a skipped one (costs nothing), then two that train 1 and 3 minutes. After the first
    trained run 1 job is left at 1 min a run; the last line says done."""
    import noiserater.study.evidence as ev

    clock = iter([0.0, 10.0, 70.0, 100.0, 280.0])  # the skipped job reads the clock once
    monkeypatch.setattr(ev.time, "perf_counter", lambda: next(clock))
    lines = []
    prog = ev.StudyProgress(3, "stage 300", lines.append)
    with prog.run():
        prog.log("[skip] a (done)")
    with prog.run():
        prog.log("[run ] b")
    with prog.run():
        prog.log("[redo] c")
    assert lines == ["[skip] a (done)", "[run ] b", "[2/3] stage 300: 1 min on 1 run(s) so far, about 1 min left",
                     "[redo] c", "[3/3] stage 300: 4 min on 2 run(s) so far, done"]
    assert [ev.duration(x) for x in (40, 720, 7500)] == ["40 s", "12 min", "2 h 05 min"]


def test_parallel_jobs_give_the_same_records_as_one_process(tmp_path, monkeypatch):
    """`evidence --jobs 2` from a 2-thread process (two spawned workers and the shared stages on one torch
    thread each) writes the same records, to the bit, as the same study run in one process with one thread,
    and leaves the caller's thread count as it was."""
    monkeypatch.setenv("NOISERATER_CACHE", str(tmp_path / "cache"))
    sets = dict(pretrain_steps="6", stages="[6]", continue_steps="2", arms="[vanilla, max_norm, rater_random]")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _tiny_study(tmp_path / "one", **sets)
        torch.set_num_threads(2)
        two = _tiny_study(tmp_path / "two", **sets, jobs=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    key = lambda r: (r["arm"], r.get("rater_init") or -1, r["seed"])  # noqa: E731
    assert len(one) == len(two) == 2 + 2 + 2 * 2
    ckpt = "pretrain/step_0000006.pt"
    assert weights_fingerprint(tmp_path / "one" / ckpt) == weights_fingerprint(tmp_path / "two" / ckpt)
    for a, b in zip(sorted(one, key=key), sorted(two, key=key)):
        assert (a["fid"], a["test_loss"], a["noise_sq_norm_per_dim"]) == (b["fid"], b["test_loss"], b["noise_sq_norm_per_dim"])
    inv = json.loads((tmp_path / "two" / "study.json").read_text())["invocations"][-1]
    assert (inv["jobs"], inv["torch_threads"]) == (2, 1)
    bad = CliRunner().invoke(main, ["evidence", "--out", str(tmp_path / "x"), "--jobs", "0"])
    assert bad.exit_code == 2 and "--jobs" in bad.output
