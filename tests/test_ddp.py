"""Data-parallel reliability with 2 gloo processes under torchrun: the state-dependent policies equal the
1-process run on the same global batch; `train` and `metatrain` SIGKILLed (the whole process group) at random
moments resume bit-exactly to the uninterrupted 2-process run; one killed rank brings the other down."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from noiserater.checkpoint import load_checkpoint
from noiserater.train import TrainConfig, train

TINY = dict(data="digits", model="DiT-N/2", batch_size=16, lr=1e-3, ema_decay=0.9, log_every=1, sample_every=1000,
            ckpt_every=1000, sample_steps=2, tensorboard=False, progress=False)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _flags(opts: dict) -> list[str]:
    out = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        out += ([flag] if v else [f"--no-{k.replace('_', '-')}"]) if isinstance(v, bool) else [flag, str(v)]
    return out


def torchrun(args: list[str], **popen) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 -m noiserater ARGS` in its own session (its process group can be killed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "noiserater",
           *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def tensors(obj, prefix="") -> dict:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in tensors(val, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in tensors(val, f"{prefix}/{i}").items()}
    return {}


def records(run: Path) -> list[dict]:
    """Step records without their wall-clock fields (events and held-out records included)."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if k not in ("time", "time_s", "images_per_s")})
    return out


# ---- state-dependent policies: 2 processes = 1 process on the same global batch ----------------------------


@pytest.mark.slow
@pytest.mark.parametrize("policy, extra", [
    ("oracle_alignment", dict(oracle_val_batch=16)),
    ("rater_online", dict(oracle_val_batch=16, online_every=2, online_steps=1, online_batch=4,
                          online_rater="FastRater-N/2")),
])
def test_state_dependent_policies_under_ddp_equal_one_process(tmp_path, policy, extra):
    opts = {**TINY, "steps": 4, "policy": policy, "candidates": 2, **extra}
    train(TrainConfig(run_dir=str(tmp_path / "one"), **opts))
    finish(torchrun(["train", *_flags({**opts, "run_dir": str(tmp_path / "two")})]))
    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "latest.pt", kind="diffusion")
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "latest.pt", kind="diffusion")
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        for name, t in a[key].items():
            torch.testing.assert_close(b[key][name], t, rtol=1e-5, atol=1e-5, msg=f"{policy}: {key}.{name}")
    # (each process logs the loss of its own half of the batch: the records are not compared)
    assert [r["step"] for r in records(tmp_path / "one")] == [r["step"] for r in records(tmp_path / "two")]
    assert a["model"]["final_layer.linear.weight"].abs().sum() > 0


# ---- SIGKILL at random moments, then --resume: bit-exact to the uninterrupted 2-process run ---------------------


def _steps_done(run: Path) -> int:
    path = run / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if '"event"' not in line) if path.exists() else 0


def _kill_resume(args: list[str], run: Path, steps: int, kills: int, rng: random.Random) -> int:
    """Run under torchrun, SIGKILL the whole process group after a random number of new log records, resume,
    ``kills`` times; then let it finish. Returns how many kills landed before the run ended."""
    landed = 0
    for i in range(kills):
        before = _steps_done(run)
        target = min(steps - 1, before + rng.randint(1, 3))
        proc = torchrun(args + (["--resume"] if i or run.exists() else []))
        deadline = time.monotonic() + 240
        while proc.poll() is None and _steps_done(run) < target and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            landed += 1
        proc.communicate(timeout=60)
    finish(torchrun(args + ["--resume"]))
    return landed


def _kill_and_compare(tmp_path: Path, command: str, opts: dict, steps: int, kind: str, keys: tuple[str, ...],
                      seed: int) -> Path:
    """An uninterrupted 2-process run, then the same run SIGKILLed 3 times and resumed: their checkpoints
    (``keys`` of a ``kind`` checkpoint) and metrics records must be identical."""
    finish(torchrun([command, *_flags({**opts, "run_dir": str(tmp_path / "ref")})]))
    run = tmp_path / "run"
    landed = _kill_resume([command, *_flags({**opts, "run_dir": str(run)})], run, steps, kills=3,
                          rng=random.Random(seed))
    assert landed >= 2
    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "latest.pt", kind=kind)
    b = load_checkpoint(run / "checkpoints" / "latest.pt", kind=kind)
    assert a["step"] == b["step"] == steps
    for key in keys:
        ta, tb = tensors(a[key]), tensors(b[key])
        assert ta.keys() == tb.keys() and ta
        assert not [k for k in ta if not torch.equal(ta[k], tb[k])], f"{key} differs after DDP kills"
    assert records(run) == records(tmp_path / "ref")
    return run


@pytest.mark.slow
def test_train_under_ddp_sigkilled_resumes_bit_exactly(tmp_path):
    run = _kill_and_compare(tmp_path, "train", {**TINY, "steps": 10, "ckpt_every": 1}, 10, "diffusion",
                            ("model", "ema", "optimizer"), seed=4)
    assert not list(run.rglob("*.tmp"))


@pytest.mark.slow
def test_metatrain_under_ddp_sigkilled_resumes_bit_exactly(tmp_path):
    train(TrainConfig(run_dir=str(tmp_path / "pre"), **{**TINY, "steps": 2}))
    opts = dict(checkpoint=str(tmp_path / "pre" / "checkpoints" / "latest.pt"), outer_steps=8, inner_steps=1,
                candidates=2, batch_size=2, val_batch_size=4, inner_lr=0.1, log_every=1, ckpt_every=1,
                progress=False, seed=5, eval_every=4, eval_batches=2)
    _kill_and_compare(tmp_path, "metatrain", opts, 8, "rater", ("rater", "optimizer"), seed=5)


# ---- one rank dies: the other does not hang ---------------------------------------------------------------


def _workers(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (children of its agent, read from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(entry.name)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_one_killed_rank_brings_the_other_down(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(["train", *_flags({**TINY, "steps": 100_000, "run_dir": str(run)})])
    try:
        deadline = time.monotonic() + 240
        while _steps_done(run) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        workers = _workers(proc.pid)
        assert set(workers) == {0, 1}, (workers, proc.poll())
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)  # a hang would time out here
        assert proc.returncode != 0
        assert time.monotonic() - t0 < 120
        assert "Signal 9" in err or "SIGKILL" in err or "failed" in err.lower(), err[-2000:]
        assert not Path(f"/proc/{workers[0]}").exists() or "zombie" in (Path(f"/proc/{workers[0]}") / "status").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
