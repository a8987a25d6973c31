"""The error contract: bad input anywhere is ONE line ``error: ...`` on stderr with exit code 2 (naming
the flag or the file); an unexpected exception is a bug and keeps its traceback with exit code 1; a failed run
leaves no run folder (nor ``.lock``) behind when it created the folder."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import noiserater.cli as cli
from noiserater.cli import main
from noiserater.errors import USER_ERRORS


def _one_line_error(res, *fragments: str) -> str:
    err = res.stderr.strip()
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in res.output and "Usage:" not in res.output, res.output
    for f in fragments:
        assert f in err, (f, err)
    return err


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    r = CliRunner()
    run = tmp_path / "run"
    (tmp_path / "bad.yaml").write_text("batch_size: 0\n")
    (tmp_path / "notckpt.yaml").write_text("a: 1\nb: [2]\n")
    cases = [
        (["train", "--batch-size", "0", "--run-dir", str(run)], ["--batch-size"]),  # our range check
        (["train", "--batch-size", "x", "--run-dir", str(run)], ["--batch-size"]),  # click's type check
        (["train", "--no-such-flag"], ["--no-such-flag"]),
        (["no-such-command"], ["no-such-command"]),
        (["--no-such-flag"], ["--no-such-flag"]),
        (["train", "--config", str(tmp_path / "bad.yaml"), "--run-dir", str(run)], ["batch_size", "--batch-size"]),
        (["train", "--model", "DiT-Q/2", "--run-dir", str(run)], ["--model"]),
        (["sample", "--checkpoint", str(tmp_path / "notckpt.yaml"), "--out", str(tmp_path / "s")],
         [str(tmp_path / "notckpt.yaml"), "not a torch.save file"]),
        (["sample", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "s")], ["not found"]),
        (["report", str(tmp_path)], ["no finished continuation runs"]),
    ]
    for args, fragments in cases:
        _one_line_error(r.invoke(main, args), *fragments)
    assert not run.exists()


def test_a_failed_metatrain_leaves_no_run_folder_or_lock(tmp_path):
    run = tmp_path / "mt"
    res = CliRunner().invoke(main, ["metatrain", "--checkpoint", str(tmp_path / "missing.pt"), "--run-dir", str(run)])
    _one_line_error(res, "not found", str(tmp_path / "missing.pt"))
    assert not run.exists()
    # a folder that existed before is kept, and a later run can take its lock
    run.mkdir()
    res = CliRunner().invoke(main, ["metatrain", "--checkpoint", str(tmp_path / "missing.pt"), "--run-dir", str(run)])
    assert res.exit_code == 2 and run.is_dir()
    from noiserater.checkpoint import RunLock

    RunLock(run).acquire().release()


def test_bare_python_errors_are_not_user_errors():
    for e in (ValueError("x"), FileNotFoundError("x"), KeyError("x"), IndexError("x"), RuntimeError("x"),
              TypeError("x"), OSError("x")):
        assert not isinstance(e, USER_ERRORS), e
    from noiserater.checkpoint import DiskFullError
    from noiserater.config import ConfigError, MissingFileError
    from noiserater.data.latents import LatentCacheError

    for e in (ConfigError("x"), MissingFileError("x"), LatentCacheError("x"), DiskFullError("x")):
        assert isinstance(e, USER_ERRORS), e
    assert isinstance(MissingFileError("x"), FileNotFoundError)  # library callers may still catch that


@pytest.mark.parametrize("exc", [ValueError, FileNotFoundError, IndexError, KeyError])
def test_a_bug_keeps_its_exception_and_exit_code_1(monkeypatch, exc):
    @click.command("boom")
    def boom():
        raise exc("pop from empty list")

    original = cli._Group.get_command
    monkeypatch.setattr(cli._Group, "get_command",
                        lambda self, ctx, name: boom if name == "boom" else original(self, ctx, name))
    res = CliRunner().invoke(main, ["boom"])
    assert res.exit_code == 1 and isinstance(res.exception, exc), (res.exit_code, res.output)
    assert "error:" not in res.stderr


def test_a_bug_prints_its_traceback_in_a_real_process():
    code = ("import click, sys, noiserater.cli as c\n"
            "cmd = click.Command('boom', callback=lambda: [].pop())\n"
            "orig = c._Group.get_command\n"
            "c._Group.get_command = lambda self, ctx, n: cmd if n == 'boom' else orig(self, ctx, n)\n"
            "c.main(['boom'], prog_name='noiserater')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "Traceback (most recent call last)" in p.stderr and "IndexError: pop from empty list" in p.stderr
    assert not p.stderr.startswith("error:")
