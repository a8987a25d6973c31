"""`noiserater demo` = `reproduce --preset digits-quick` + report, end to end at an even smaller size."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from noiserater.cli import main
from noiserater.config import ConfigError, parse_overrides
from noiserater.study.presets import ReproducePreset, get_preset

# digits-quick shrunk to seconds: every stage of the protocol still runs (pretrain with two stage
# checkpoints, main rater + a stage rater, Table 1 with vanilla/max_norm/rater over two seeds, Table 5,
# evaluation with classifier-FID, the rater analysis, the report).
TINY = ["--pretrain-steps", "12", "--continue-steps", "3", "--sample-steps", "2",
        "--set", "model=DiT-N/2", "--set", "meta_outer_steps=2", "--set", "meta_candidates=2",
        "--set", "batch_size=16", "--set", "eval_samples=40", "--set", "eval_ddim_steps=2",
        "--set", "heldout_images=16", "--set", "heldout_draws=2", "--set", "power_seeds=[2]",
        "--set", "stage_steps=[2, 12]", "--set", "analysis_images=3"]


def test_demo_runs_the_protocol_end_to_end_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("NOISERATER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    # the headline table: vanilla, max_norm and rater at k=4, each with its seeds and a cost ratio
    assert "vanilla" in result.output and "rater k=4" in result.output and "max_norm k=4" in result.output
    study = json.loads((out / "study.json").read_text())["settings"]
    assert study["pretrain_steps"] == 12 and study["stage_steps"] == [2, 12] and study["model"] == "DiT-N/2"
    report = (out / "report.md").read_text()
    assert report.startswith("> **Smoke test, not evidence.**")  # the demo says what it is in its first line
    for heading in ("Table 1", "Table 5: rater meta-trained at pretraining step 2", "Headline and power",
                    "What the rater learned", "Table 5 at stage 12: the continuations from that checkpoint are Table 1's"):
        assert heading in report
    # numbered progress lines with elapsed time; the count matches the stages the study runs
    lines = [ln for ln in result.output.splitlines() if ln.startswith("[") and "/" in ln.split("]")[0]]
    totals = {ln.split("/")[1].split("]")[0] for ln in lines}
    assert len(totals) == 1 and int(totals.pop()) == len(lines) and "elapsed" in lines[-1]
    # every continuation ran and was evaluated on the same seeds
    rows = [json.loads(p.read_text())["result"] for p in out.glob("runs/**/stage.json")]
    df = pd.DataFrame(rows)
    # Table 1 (2 seeds x 3 policies, + power seed 2 for vanilla and rater) + Table 5 at the stage that is not
    # the meta-training stage (1 stage x 2 policies x 2 seeds): the meta stage's runs are Table 1's, not repeated
    assert len(df) == 2 * 3 + 2 + 1 * 2 * 2
    assert df["fid"].notna().all() and (df["fid"] > 0).all()
    seeds = {key: sorted(g) for key, g in df.groupby(["table", "label"])["seed"]}
    assert seeds.pop(("main", "vanilla")) == [0, 1, 2] and seeds.pop(("main", "rater k=4")) == [0, 1, 2]
    assert all(v == [0, 1] for v in seeds.values())
    assert ((df["class_accuracy"] >= 0) & (df["class_accuracy"] <= 1)).all()
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["headline"]) == {"fid", "heldout_loss"} and rep["headline"]["fid"]["n"] == 3  # power seed paired too
    for png in ("main_fid.png", "main_loss_curves.png", "analysis_stages.png", "samples.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 50
    # a rerun skips every finished stage and prints the same table
    again = CliRunner().invoke(main, ["demo", "--out", str(out), *TINY])
    assert again.exit_code == 0, again.output
    assert " run " not in again.output and again.output.count("] skip ") >= len(df)
    # a moved copy of the study reports identically (stage records hold paths relative to the study root)
    import shutil

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, moved)
    for folder in (out, moved):
        res = CliRunner().invoke(main, ["report", str(folder)])
        assert res.exit_code == 0, res.output
    assert (moved / "report.md").read_text() == (out / "report.md").read_text()
    bad_k = CliRunner().invoke(main, ["report", str(moved), "--candidates", "8"])  # no k=8 runs: refused, not dropped
    assert bad_k.exit_code == 2 and "k = [4], not 8" in bad_k.output
    rerun = CliRunner().invoke(main, ["demo", "--out", str(moved), *TINY])  # resumes the moved copy, runs nothing
    assert rerun.exit_code == 0, rerun.output
    assert " run " not in rerun.output
    # a changed setting is refused, not mixed into the finished study
    changed = CliRunner().invoke(main, ["demo", "--out", str(out), *TINY[:-1], "analysis_images=4"])
    assert changed.exit_code == 2 and "different config" in changed.output


def test_set_overrides_are_parsed_and_type_checked():
    o = parse_overrides(ReproducePreset, ["meta_lr=1e-3", "ks=[2, 4]", "transfer_model=null", "rater=Rater-T/2"])
    assert o == {"meta_lr": 1e-3, "ks": [2, 4], "transfer_model": None, "rater": "Rater-T/2"}
    p = get_preset("digits", **o)
    assert p.meta_lr == 1e-3 and p.ks == [2, 4] and p.transfer_model is None
    with pytest.raises(ConfigError, match="unknown key 'meta_steps'"):
        parse_overrides(ReproducePreset, ["meta_steps=3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(ReproducePreset, ["meta_lr"])
    with pytest.raises(ConfigError, match="must be int"):
        get_preset("digits", **parse_overrides(ReproducePreset, ["continue_steps=lots"]))
    with pytest.raises(ValueError, match="selection needs k >= 2"):
        get_preset("digits", ks=[1, 4])


def test_reproduce_rejects_a_bad_setting_with_a_clear_message(tmp_path):
    result = CliRunner().invoke(main, ["reproduce", "--out", str(tmp_path / "s"), "--set", "seeds=[]"])
    assert result.exit_code == 2 and "seeds" in result.output
    assert not (tmp_path / "s" / "pretrain-DiT-T_2").exists()


def test_a_signal_during_a_stage_stops_the_study_without_recording_the_stage(tmp_path, monkeypatch):
    """train() returns interrupted=True after saving on SIGTERM: the study must stop, not evaluate and
    record a half-trained run as done; the same command then resumes it."""
    import noiserater.study.reproduce as experiments
    from noiserater.study.presets import get_preset
    from noiserater.study.reproduce import StudyInterrupted, pretrain

    real = experiments.train
    calls = {"n": 0}

    def stop_once(cfg, resume=False):
        calls["n"] += 1
        out = real(cfg, resume=resume)
        if calls["n"] == 1:
            out = {**out, "interrupted": True, "signal": 15}
        return out

    monkeypatch.setattr(experiments, "train", stop_once)  # where pretrain looks it up
    p = get_preset("digits-quick", model="DiT-N/2", batch_size=8)
    with pytest.raises(StudyInterrupted, match="signal 15"):
        pretrain(p, tmp_path, p.model, 4, [2, 4], log=lambda m: None)
    assert not (tmp_path / "pretrain-DiT-N_2" / "stage.json").exists()
    res = pretrain(p, tmp_path, p.model, 4, [2, 4], log=lambda m: None)  # the rerun resumes and finishes
    assert set(res["checkpoints"]) == {"2", "4"}


def test_meaningless_inputs_are_refused(tmp_path):
    r = CliRunner()
    res = r.invoke(main, ["train", "--steps", "0", "--run-dir", str(tmp_path / "z")])
    assert res.exit_code == 2 and "steps" in res.output and "nothing to train" in res.output
    assert not (tmp_path / "z").exists()
