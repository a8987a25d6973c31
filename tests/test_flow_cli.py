"""The flow objective end to end through the CLI on a tiny digits run: train --objective flow, sample with
Euler/Heun (the checkpoint's objective decides the sampler), evaluate, metatrain (bilevel and distill), a
rater continuation; and the one-line errors for an objective or sampler that does not fit the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from noiserater.checkpoint import load_checkpoint
from noiserater.cli import main
from noiserater.models.loading import load_diffusion

TINY = ["--data", "digits", "--model", "DiT-N/2", "--batch-size", "16", "--log-every", "5", "--no-tensorboard",
        "--no-progress", "--device", "cpu", "--sample-steps", "2"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for f in fragments:
        assert f in err, err


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("flow") / "run"
    ok(run("train", *TINY, "--objective", "flow", "--time-sampling", "logit-normal", "--steps", "20",
           "--sample-every", "20", "--ckpt-every", "20", "--sampler", "heun", "--run-dir", d))
    return d


def test_train_records_the_flow_objective(flow_run):
    cfg = yaml.safe_load((flow_run / "config.yaml").read_text())
    assert (cfg["objective"], cfg["time_sampling"], cfg["sampler"]) == ("flow", "logit-normal", "heun")
    state = load_checkpoint(flow_run / "checkpoints" / "latest.pt", kind="diffusion")
    assert state["config"]["objective"] == "flow" and state["step"] == 20
    recs = [json.loads(s) for s in (flow_run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in recs if "loss" in r)
    assert (flow_run / "samples" / "step_0000020.png").exists()


def test_sample_uses_the_flow_sampler(flow_run, tmp_path):
    """One Euler step from t=1 to 0 is x = noise - v(noise, t=1): recomputed here from the EMA model."""
    ckpt = flow_run / "checkpoints" / "latest.pt"
    ok(run("sample", "--checkpoint", ckpt, "--out", tmp_path / "e", "--num-samples", "6", "--sample-steps", "1",
           "--sampler", "euler", "--labels", "cycle", "--cfg-scale", "1", "--device", "cpu"))
    got = torch.from_numpy(np.load(tmp_path / "e" / "samples.npz")["samples"])
    model, spec, _ = load_diffusion(ckpt)
    noise = torch.randn((6, spec.in_channels, spec.input_size, spec.input_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = model.eval()(noise, torch.full((6,), 1000.0), torch.arange(6) % 10)
    torch.testing.assert_close(got, (noise - v).clamp(-1, 1), rtol=1e-5, atol=1e-5)
    ok(run("sample", "--checkpoint", ckpt, "--out", tmp_path / "h", "--num-samples", "6", "--sample-steps", "3",
           "--sampler", "heun", "--device", "cpu"))
    heun = np.load(tmp_path / "h" / "samples.npz")["samples"]
    assert np.isfinite(heun).all() and (tmp_path / "h" / "samples.png").exists()
    one_line_error(run("sample", "--checkpoint", ckpt, "--out", tmp_path / "d", "--sampler", "ddim", "--device", "cpu"),
                   "'ddim'", "--sampler", "flow", "pass --sampler euler")


def test_evaluate_a_flow_checkpoint(flow_run, tmp_path):
    ckpt = flow_run / "checkpoints" / "latest.pt"
    base = ["evaluate", "--checkpoint", ckpt, "--num-samples", "20", "--sample-steps", "2", "--cache-dir",
            tmp_path / "cache", "--no-progress", "--no-record", "--device", "cpu", "--as-json"]
    rec = json.loads(ok(run(*base, "--sampler", "heun")).stdout)[0]
    assert (rec["objective"], rec["sampler"], rec["steps"]) == ("flow", "heun", 2) and "eta" not in rec
    assert np.isfinite(rec["fid"])
    one_line_error(run(*base, "--sampler", "ddim"), "--sampler", "flow")


def test_metatrain_bilevel_and_distill_on_a_flow_checkpoint(flow_run, tmp_path):
    ckpt = flow_run / "checkpoints" / "latest.pt"
    common = ["metatrain", "--checkpoint", ckpt, "--rater-arch", "Rater-N/2", "--outer-steps", "2", "--candidates", "3",
              "--batch-size", "4", "--eval-every", "0", "--no-progress", "--device", "cpu"]
    ok(run(*common, "--run-dir", tmp_path / "bil", "--inner-steps", "2", "--val-batch-size", "8", "--inner-lr", "0.01"))
    ok(run(*common, "--run-dir", tmp_path / "dis", "--meta-objective", "distill", "--distill-val-batch-size", "16"))
    for name, key in (("bil", "rater_advantage"), ("dis", "distill_loss")):
        rater = load_checkpoint(tmp_path / name / "rater.pt", kind="rater")
        assert rater["diffusion"]["objective"] == "flow" and rater["diffusion"]["time_sampling"] == "logit-normal"
        recs = [json.loads(s) for s in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs if key in r] == [1, 2] and all(np.isfinite(r[key]) for r in recs if key in r)
    # the rater continues the flow model (its timestep input in the DiT's units); a DDPM continuation is refused
    cont = ["train", *TINY, "--init-checkpoint", ckpt, "--policy", "rater", "--candidates", "3", "--rater",
            tmp_path / "bil" / "rater.pt", "--steps", "25", "--sample-every", "100", "--ckpt-every", "100"]
    ok(run(*cont, "--objective", "flow", "--run-dir", tmp_path / "cont"))
    assert load_checkpoint(tmp_path / "cont" / "checkpoints" / "latest.pt", kind="diffusion")["step"] == 25
    one_line_error(run(*cont, "--run-dir", tmp_path / "cont_ddpm"), "flow objective", "--objective ddpm",
                   "pass --objective flow")


def test_resume_with_another_objective_is_one_line(flow_run):
    one_line_error(run("train", *TINY, "--objective", "ddpm", "--steps", "30", "--run-dir", flow_run, "--resume"),
                   "--resume", "flow objective", "pass --objective flow")


def test_train_refuses_a_sampler_or_time_option_of_the_other_objective(tmp_path):
    r = run("train", *TINY, "--steps", "1", "--sampler", "heun", "--run-dir", tmp_path / "a")
    assert r.exit_code == 2 and "--sampler" in r.stderr and "ddim" in r.stderr, r.output
    r = run("train", *TINY, "--steps", "1", "--time-sampling", "logit-normal", "--run-dir", tmp_path / "b")
    assert r.exit_code == 2 and "--objective flow" in r.stderr, r.output


def test_signal_check_on_a_flow_checkpoint(flow_run, tmp_path):
    """The oracle's signal check runs on a flow checkpoint (its losses, oracle and t draws are the flow
    objective's: tests/test_signal_check.py checks the computation itself against references)."""
    out = tmp_path / "signal.json"
    ok(run("signal", "check", "--checkpoint", flow_run / "checkpoints" / "latest.pt", "--candidates", "2", "--groups",
           "4", "--val-images", "8", "--steps", "1", "--seeds", "1", "--no-progress", "--json", out))
    res = json.loads(out.read_text())
    assert res["k"] == 2 and np.isfinite(res["few_step"]["loss_oracle"]) and np.isfinite(res["few_step"]["loss_vanilla"])


def test_a_rater_of_the_other_objective_is_refused(flow_run, tmp_path):
    """A rater meta-trained on a flow checkpoint scores t in flow's units: a DDPM run refuses it."""
    ckpt = flow_run / "checkpoints" / "latest.pt"
    ok(run("metatrain", "--checkpoint", ckpt, "--rater-arch", "Rater-N/2", "--outer-steps", "1", "--candidates", "2",
           "--batch-size", "2", "--inner-steps", "1", "--val-batch-size", "4", "--inner-lr", "0.01", "--eval-every", "0",
           "--no-progress", "--device", "cpu", "--run-dir", tmp_path / "m"))
    one_line_error(run("train", *TINY, "--steps", "2", "--policy", "rater", "--candidates", "2", "--rater",
                       tmp_path / "m" / "rater.pt", "--run-dir", tmp_path / "ddpm"),
                   "meta-trained on a flow checkpoint", "--objective ddpm")
