"""The `noiserater` command line: help texts, `sample`, `demo`, the module entry point."""

from __future__ import annotations

import subprocess
import sys

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from noiserater.cli import main
from noiserater.train import TrainConfig, train


def _invoke(args):
    return CliRunner().invoke(main, args)


def _command(*path):
    cmd = main
    for p in path:
        cmd = cmd.get_command(click.Context(cmd), p)
        assert cmd is not None, f"no command {' '.join(path)}"
    return cmd


def test_help_lists_the_foundation_commands():
    result = _invoke(["--help"])
    assert result.exit_code == 0
    for name in ("demo", "train", "sample", "bench"):
        assert name in result.output
    assert _command("bench", "train").name == "train"


@pytest.mark.parametrize("path", [("train",), ("sample",), ("demo",), ("bench", "train")])
def test_every_option_is_documented(path):
    cmd = _command(*path)
    assert cmd.help
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help and len(param.help) > 10, f"{' '.join(path)} {param.opts} has no help"
    assert _invoke([*path, "--help"]).exit_code == 0


def test_module_entry_point_and_version():
    """`python -m noiserater` works, and --version answers without importing torch (commands load lazily)."""
    code = "import sys, runpy; sys.argv = ['noiserater', '--version']\ntry:\n    runpy.run_module('noiserater', run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "noiserater, version" in proc.stdout, proc.stderr
    assert proc.stdout.strip().endswith("False")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(TrainConfig(run_dir=str(run), model="DiT-N/2", steps=2, batch_size=8, sample_every=100, ckpt_every=100,
                      sample_steps=2, tensorboard=False, progress=False))
    return run / "checkpoints" / "latest.pt"


def test_sample_writes_png_and_npz_repeatably(tiny_checkpoint, tmp_path):
    args = ["sample", "--checkpoint", str(tiny_checkpoint), "--num-samples", "6", "--sample-steps", "3", "--labels", "cycle"]
    r1 = _invoke(args + ["--out", str(tmp_path / "a")])
    assert r1.exit_code == 0, r1.output
    r2 = _invoke(args + ["--out", str(tmp_path / "b")])
    assert r2.exit_code == 0
    a, b = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert a["samples"].shape == (6, 1, 8, 8) and a["labels"].tolist() == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(a["samples"], b["samples"])
    assert np.abs(a["samples"]).max() <= 1.0  # pixel data is clipped to the data range
    with Image.open(tmp_path / "a" / "samples.png") as im:
        assert im.size[0] > 8
    r3 = _invoke(args[:-2] + ["--labels", "7,8", "--seed", "1", "--out", str(tmp_path / "c")])
    assert r3.exit_code == 0
    c = np.load(tmp_path / "c" / "samples.npz")
    assert c["labels"].tolist() == [7, 8, 7, 8, 7, 8]
    assert not np.array_equal(c["samples"], a["samples"])


def test_sample_rejects_bad_labels(tiny_checkpoint, tmp_path):
    result = _invoke(["sample", "--checkpoint", str(tiny_checkpoint), "--labels", "3,12", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "outside [0, 9]" in result.output
    result = _invoke(["sample", "--checkpoint", str(tiny_checkpoint), "--labels", "cats", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--labels" in result.output


@pytest.mark.parametrize("cmd", ["train", "metatrain", "evaluate", "sample"])
def test_device_option_is_everywhere_and_a_missing_cuda_is_one_line(tmp_path, cmd):
    import torch

    from noiserater.run.distributed import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("this check is for machines without CUDA")
    args = {"train": ["train", "--run-dir", str(tmp_path / "r"), "--steps", "1"],
            "metatrain": ["metatrain", "--checkpoint", str(tmp_path / "c.pt"), "--run-dir", str(tmp_path / "m")],
            "evaluate": ["evaluate", "--checkpoint", str(tmp_path / "c.pt")],
            "sample": ["sample", "--checkpoint", str(tmp_path / "c.pt")]}[cmd]
    res = CliRunner().invoke(main, [*args, "--device", "cuda"])
    assert res.exit_code == 2, res.output
    if cmd in ("train", "metatrain", "sample"):  # evaluate reports the missing checkpoint first
        assert "--device" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() and not (tmp_path / "m").exists()
