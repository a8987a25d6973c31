"""Training: exact resume, DDP equivalence, run folders, and every bad-input case of `noiserater train`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from noiserater.checkpoint import load_checkpoint, save_checkpoint
from noiserater.cli import main
from noiserater.randomness import batch_indices
from noiserater.train import TrainConfig, train

TINY = dict(data="digits", model="DiT-N/2", batch_size=16, lr=1e-3, ema_decay=0.9, log_every=1, sample_every=1000,
            ckpt_every=1000, sample_steps=2, tensorboard=False, progress=False)


def tiny_cfg(run_dir, **kw) -> TrainConfig:
    return TrainConfig(run_dir=str(run_dir), **{**TINY, **kw})


def cli_args(run_dir, **kw) -> list[str]:
    opts = {**TINY, "run_dir": str(run_dir), **kw}
    args = ["train"]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else f"--no-{k.replace('_', '-')}")
        else:
            args += [flag, str(v)]
    return args


def run_cli(args):
    return CliRunner().invoke(main, args)


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for f in fragments:
        assert f in err, err


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*.tmp")]


def state(run_dir) -> dict:
    return load_checkpoint(Path(run_dir) / "checkpoints" / "latest.pt", kind="diffusion")


def flat_tensors(obj, prefix=""):
    """Every tensor in a nested dict/list (optimizer state included), keyed by its path."""
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}/{i}"))
    return out


# ---- exact resume and data-parallel equivalence --------------------------------------------------------


def test_resume_is_bitwise_identical_to_a_straight_run(tmp_path):
    straight = tiny_cfg(tmp_path / "a", steps=6)
    train(straight)
    first = tiny_cfg(tmp_path / "b", steps=3)
    assert train(first)["step"] == 3
    resumed = tiny_cfg(tmp_path / "b", steps=6)
    summary = train(resumed, resume=True)
    assert summary["start_step"] == 3 and summary["step"] == 6
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "optimizer"):
        ta, tb = flat_tensors(a[key]), flat_tensors(b[key])
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{key}{k} differs after resume"
    assert not torch.equal(a["model"]["final_layer.linear.weight"], a["ema"]["final_layer.linear.weight"])
    # the log of the resumed run has each step once, with the straight run's losses
    recs = lambda d: [json.loads(s) for s in (d / "metrics.jsonl").read_text().splitlines()]
    la, lb = recs(tmp_path / "a"), recs(tmp_path / "b")
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_global_batch_order_is_a_permutation_per_epoch():
    n, b = 10, 4
    seen = torch.cat([batch_indices(n, b, s, seed=0) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(n, b, 3, seed=0), seen[12:16])


def test_two_process_ddp_matches_one_process(tmp_path):
    """torchrun with 2 gloo processes and the same global batch gives the 1-process weights."""
    one = tiny_cfg(tmp_path / "one", steps=4)
    train(one)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "noiserater", *cli_args(tmp_path / "two", steps=4)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = state(tmp_path / "one"), state(tmp_path / "two")
    assert b["step"] == 4
    for key in ("model", "ema"):
        for name, t in a[key].items():
            torch.testing.assert_close(b[key][name], t, rtol=1e-5, atol=1e-5, msg=f"{key}.{name}")
    moved = (a["model"]["final_layer.linear.weight"]).abs().sum()
    assert moved > 0  # the runs did train


def test_batch_not_divisible_by_processes_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        train(tiny_cfg(tmp_path / "r", steps=1))


# ---- run folder contents ---------------------------------------------------------------------------------


def test_run_folder_layout_and_logs(tmp_path):
    run = tmp_path / "run"
    result = run_cli(cli_args(run, steps=4, log_every=2, ckpt_every=2, sample_every=2, tensorboard=True))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 4
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"] == "DiT-N/2" and cfg["steps"] == 4
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4] and all(r["images_per_s"] > 0 for r in lines)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    with Image.open(run / "samples" / "step_0000004.png") as im:  # 2 rows x 10 classes of 8x8, upscaled
        assert im.size == (6 * (10 * 9 + 1), 6 * (2 * 9 + 1))
    assert list((run / "tb").iterdir())
    st = state(run)
    assert st["step"] == 4 and st["config"]["model"] == "DiT-N/2" and set(st["rng"]) >= {"torch", "numpy", "python"}
    assert st["spec"]["input_size"] == 8 and st["data"]["num_classes"] == 10
    # every file gets the permissions the umask asks for (0o666 & ~umask), not mkstemp's private 0o600
    umask = os.umask(0)
    os.umask(umask)
    for f in ("config.yaml", "metrics.jsonl", "run_info.json", "checkpoints/latest.pt", "samples/step_0000004.png"):
        assert stat.S_IMODE((run / f).stat().st_mode) == 0o666 & ~umask, (f, oct((run / f).stat().st_mode), oct(umask))
    assert no_temp_files(run)


@pytest.mark.parametrize("umask", [0o077, 0o002], ids=["umask077", "umask002"])
def test_run_files_follow_the_umask(tmp_path, umask):
    """In a process started under a restrictive (or a group-writable) umask, the run folder's files get
    0o666 & ~umask: private run folders stay private, shared ones stay shared."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "noiserater", *cli_args(run, steps=1)], env=env, capture_output=True,
                          text=True, timeout=240, preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in run.rglob("*") if p.is_file() and p.name != ".lock"]
    assert {"config.yaml", "metrics.jsonl", "latest.pt"} <= {p.name for p in files}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, (str(f), oct(f.stat().st_mode))


# ---- bad input: one-line error, exit 2, nothing half-written ----------------------------------------------


def test_wrong_dataset_path(tmp_path):
    run = tmp_path / "run"
    result = run_cli(cli_args(run, data=str(tmp_path / "no" / "such"), steps=1))
    assert_one_line_error(result, "does not exist")
    assert not run.exists()


def _folder(root: Path, sizes) -> Path:
    for i, s in enumerate(sizes):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((s, s), np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def test_image_folder_with_mixed_sizes_or_no_images(tmp_path):
    mixed = _folder(tmp_path / "mixed", [8, 8, 16])
    result = run_cli(cli_args(tmp_path / "run1", data=str(mixed), steps=1))
    assert_one_line_error(result, "mixed sizes")
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    result = run_cli(cli_args(tmp_path / "run2", data=str(empty), steps=1))
    assert_one_line_error(result, "has no images")
    assert not (tmp_path / "run1").exists() and not (tmp_path / "run2").exists()


def test_image_folder_trains(tmp_path):
    data = _folder(tmp_path / "imgs", [8] * 12)
    result = run_cli(cli_args(tmp_path / "run", data=str(data), steps=2, batch_size=4))
    assert result.exit_code == 0, result.output
    assert state(tmp_path / "run")["data"]["class_names"] == ["c0", "c1"]


def test_run_folder_holding_a_different_run(tmp_path):
    run = tmp_path / "run"
    assert run_cli(cli_args(run, steps=2)).exit_code == 0
    before = (run / "checkpoints" / "latest.pt").read_bytes()
    result = run_cli(cli_args(run, steps=2, lr=0.01, ) + ["--resume"])
    assert_one_line_error(result, "already holds a different run", "lr")
    result = run_cli(cli_args(run, steps=3))  # same config, but no --resume
    assert_one_line_error(result, "already holds checkpoints", "--resume")
    assert (run / "checkpoints" / "latest.pt").read_bytes() == before


def test_checkpoint_of_a_different_model_config(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(cli_args(a, steps=1)).exit_code == 0
    assert run_cli(cli_args(b, steps=1, model="DiT-N/4")).exit_code == 0
    # resume a run whose latest checkpoint was replaced by one of another model
    (b / "checkpoints" / "latest.pt").write_bytes((a / "checkpoints" / "latest.pt").read_bytes())
    result = run_cli(cli_args(b, steps=2, model="DiT-N/4") + ["--resume"])
    assert_one_line_error(result, "trained with model")
    # start from a pretrained checkpoint of another model
    result = run_cli(cli_args(tmp_path / "c", steps=1, model="DiT-N/4",
                              init_checkpoint=str(a / "checkpoints" / "latest.pt")))
    assert_one_line_error(result, "DiT-N/2", "DiT-N/4")
    assert not (tmp_path / "c").exists()
    # a checkpoint whose recorded spec does not match its weights, given to `sample`
    st = state(a)
    st["spec"]["name"] = "DiT-N/4"
    save_checkpoint(tmp_path / "odd.pt", {k: v for k, v in st.items() if k not in ("format", "format_version", "kind")},
                    kind="diffusion")
    result = run_cli(["sample", "--checkpoint", str(tmp_path / "odd.pt"), "--out", str(tmp_path / "s"), "--num-samples", "2"])
    assert_one_line_error(result, "does not match the model config")
    assert not (tmp_path / "s").exists()


def test_truncated_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert run_cli(cli_args(run, steps=1)).exit_code == 0
    ckpt = run / "checkpoints" / "latest.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    result = run_cli(cli_args(run, steps=2) + ["--resume"])
    assert_one_line_error(result, "truncated or corrupt")
    result = run_cli(["sample", "--checkpoint", str(ckpt), "--out", str(tmp_path / "s")])
    assert_one_line_error(result, "truncated or corrupt")
    result = run_cli(["sample", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "s")])
    assert_one_line_error(result, "not found")
    assert not (tmp_path / "s").exists()


def _nan_after(monkeypatch, good_steps: int):
    import noiserater.objectives as tr  # the DDPM objective's loss is diffusion.per_sample_loss, looked up here

    real, calls = tr.per_sample_loss, {"n": 0}

    def loss(*args, **kw):
        calls["n"] += 1
        out = real(*args, **kw)
        return out * float("nan") if calls["n"] > good_steps else out

    monkeypatch.setattr(tr, "per_sample_loss", loss)


def test_nan_loss_stops_with_one_line_error_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    _nan_after(monkeypatch, good_steps=2)
    run = tmp_path / "run"
    result = run_cli(cli_args(run, steps=20, ckpt_every=2, max_bad_steps=3))
    assert_one_line_error(result, "non-finite", "step 4", "latest.pt")
    st = state(run)  # skipped steps still count; the checkpoint holds the good weights of step 2
    assert st["step"] == 4
    assert all(torch.isfinite(v).all() for v in flat_tensors(st["model"]).values())
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    assert [r.get("event") for r in lines].count("nonfinite_skipped") == 3
    assert no_temp_files(run)


def test_nan_loss_from_the_start_writes_no_checkpoint(tmp_path, monkeypatch):
    _nan_after(monkeypatch, good_steps=0)
    run = tmp_path / "run"
    result = run_cli(cli_args(run, steps=20, max_bad_steps=2))
    assert_one_line_error(result, "non-finite", "no checkpoint was written")
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
    assert no_temp_files(run)
    # the folder held no checkpoint, so a retry with a lower learning rate may reuse it
    monkeypatch.undo()
    result = run_cli(cli_args(run, steps=1, lr=1e-4))
    assert result.exit_code == 0, result.output
    assert [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_bad_option_values_name_the_option(tmp_path):
    result = run_cli(cli_args(tmp_path / "r", steps=1, model="DiT-Z/2"))
    assert result.exit_code == 2 and "model" in result.output
    result = run_cli(cli_args(tmp_path / "r", steps=1, ema_decay=1.5))
    assert result.exit_code == 2 and "ema_decay" in result.output
    assert not (tmp_path / "r").exists()


def test_ema_warmup_follows_its_closed_form(tmp_path):
    """E_n = d_n E_{n-1} + (1 - d_n) theta_n with d_n = min(decay, (1+n)/(10+n)), E_0 = the initial weights."""
    from noiserater.models import build_dit
    from noiserater.train import ema_decay_at

    assert ema_decay_at(0.999, 0, True) == pytest.approx(0.1) and ema_decay_at(0.999, 20_000, True) == 0.999 and ema_decay_at(0.999, 5000, True) == pytest.approx(5001 / 5010)
    assert ema_decay_at(0.999, 0, False) == 0.999
    kw = dict(ema_decay=0.999, ema_warmup=True, ckpt_every=1)
    train(tiny_cfg(tmp_path / "r", steps=1, **kw))
    a = load_checkpoint(tmp_path / "r" / "checkpoints" / "latest.pt", kind="diffusion")
    train(tiny_cfg(tmp_path / "r", steps=2, **kw), resume=True)
    b = load_checkpoint(tmp_path / "r" / "checkpoints" / "latest.pt", kind="diffusion")
    torch.manual_seed(TrainConfig().seed)
    init = build_dit("DiT-N/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False,
                     class_dropout_prob=0.0).state_dict()
    for name, p0 in init.items():
        if not p0.is_floating_point() or name == "pos_embed":
            continue
        e1 = 0.1 * p0 + 0.9 * a["model"][name]
        torch.testing.assert_close(a["ema"][name], e1, rtol=1e-5, atol=1e-6)
        d1 = 2 / 11
        torch.testing.assert_close(b["ema"][name], d1 * a["ema"][name] + (1 - d1) * b["model"][name], rtol=1e-5, atol=1e-6)
    # a run folder written before the key existed (no ema_warmup in its config) resumes only as "no warmup"
    import yaml

    old = tmp_path / "old"
    train(tiny_cfg(old, steps=1, ema_warmup=False))
    cfg_yaml = yaml.safe_load((old / "config.yaml").read_text())
    cfg_yaml.pop("ema_warmup")
    (old / "config.yaml").write_text(yaml.safe_dump(cfg_yaml))
    train(tiny_cfg(old, steps=2, ema_warmup=False), resume=True)
    with pytest.raises(Exception, match="ema_warmup"):
        train(tiny_cfg(old, steps=3, ema_warmup=True), resume=True)
