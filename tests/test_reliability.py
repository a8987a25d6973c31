"""Reliability and safety: crash safety under SIGKILL, clean SIGINT/SIGTERM, safe checkpoint
loading, guarded numerics, run-folder locking and a full disk.

Each test checks one protection and fails without it. The kill tests start real `python -m noiserater`
processes and kill them at random moments (seeded, so a failure can be replayed). When the environment
variable NOISERATER_RELIABILITY_JSON names a file, the tests append what they measured to it (kills
survived, checkpoints read while being written, ...); ``scripts/reliability_report.py`` uses that to write
docs/reliability.json. The test suite itself never writes into the repository.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import noiserater.objectives as objectives
from noiserater.checkpoint import (
    FORMAT,
    HASH_KEY,
    CheckpointError,
    DiskFullError,
    RunDirError,
    RunLock,
    content_sha256,
    load_checkpoint,
    save_checkpoint,
)
from noiserater.cli import main
from noiserater.errors import NumericsError
from noiserater.models import build_rater
from noiserater.models.dit import load_reference_dit
from noiserater.models.loading import load_diffusion, load_rater, save_rater
from noiserater.randomness import batch_indices
from noiserater.train import TrainConfig, train

# A tiny run: DiT-N/2 on the bundled 8x8 digits, one metrics line per step, no periodic samples.
TINY = dict(data="digits", model="DiT-N/2", batch_size=8, lr=1e-3, ema_decay=0.9, log_every=1,
            sample_every=100_000, sample_steps=2, tensorboard=False, progress=False, seed=3)
KILL_STEPS = 48  # steps of the subprocess runs (a few ms each)


# ---- helpers ---------------------------------------------------------------------------------------------


def record(name: str, **values) -> None:
    """Append measurements to $NOISERATER_RELIABILITY_JSON (only when the report script asks for them)."""
    path = os.environ.get("NOISERATER_RELIABILITY_JSON")
    if not path:
        return
    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() else {}
    data.setdefault(name, []).append(values)
    p.write_text(json.dumps(data, indent=2))


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


def subprocess_env() -> dict:
    """Children import the same noiserater as this process, with one thread each."""
    import noiserater

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(noiserater.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def spawn(args: list[str], resume: bool = False, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "noiserater", *args] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def run_to_end(args: list[str], resume: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    p = spawn(args, resume)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def n_train() -> int:
    from noiserater.data import load_dataset

    return len(load_dataset(TINY["data"], "train", seed=TINY["seed"]))


# Killing many runs: starting `python -m noiserater` costs seconds of imports on a busy machine, so the kill
# tests run each attempt in a process forked from a launcher that imported everything once. A forked child is
# a real process running the real CLI (`main(argv)`, exit codes included); SIGKILL/SIGINT/SIGTERM go to it.
LAUNCHER = r"""
import json, os, signal, sys
import importlib
import torch  # noqa: F401  (the expensive imports, done once)
import torch._dynamo  # noqa: F401  (imported by the first optimizer; seconds on a busy machine)
from noiserater.cli import main
for name in ("train", "metatrain"):
    try:
        importlib.import_module("noiserater.commands." + name)
    except ImportError:
        pass
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                main.main(args=req["argv"], prog_name="noiserater")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                import traceback
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Launcher:
    """Starts `noiserater ...` runs as children forked from one pre-imported Python process."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=subprocess_env())
        self.messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.count = 0
        self.current: ForkedRun | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.messages.put(json.loads(line))
        self.messages.put(None)

    def start(self, argv: list[str]) -> "ForkedRun":
        assert self.current is None or self.current.returncode is not None, "one run at a time"
        self.count += 1
        out, err = self.workdir / f"run{self.count}.out", self.workdir / f"run{self.count}.err"
        self.proc.stdin.write(json.dumps({"argv": argv, "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        msg = self.messages.get(timeout=120)
        assert msg is not None and "pid" in msg, "the launcher died"
        self.current = ForkedRun(self, msg["pid"], out, err)
        return self.current

    def close(self) -> None:
        if self.current is not None and self.current.poll() is None:
            self.current.send_signal(signal.SIGKILL)
            self.current.wait()
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class ForkedRun:
    """The part of the Popen interface the kill tests use."""

    def __init__(self, launcher: Launcher, pid: int, out: Path, err: Path):
        self.launcher, self.pid, self.out_path, self.err_path = launcher, pid, out, err
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                msg = self.launcher.messages.get_nowait()
            except queue.Empty:
                return None
            assert msg is not None and msg["pid"] == self.pid, msg
            self.returncode = msg["returncode"]
        return self.returncode

    def wait(self, timeout: float = 300) -> int:
        if self.returncode is None:
            msg = self.launcher.messages.get(timeout=timeout)
            assert msg is not None and msg["pid"] == self.pid, msg
            self.returncode = msg["returncode"]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def communicate(self, timeout: float = 300) -> tuple[str, str]:
        self.wait(timeout)
        return self.out_path.read_text(), self.err_path.read_text()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    la = Launcher(tmp_path_factory.mktemp("launcher"))
    yield la
    la.close()


def tiny_cfg(run_dir, **kw) -> TrainConfig:
    return TrainConfig(run_dir=str(run_dir), **{**TINY, **kw})


def ckpt_path(run_dir) -> Path:
    return Path(run_dir) / "checkpoints" / "latest.pt"


def metrics(run_dir) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(s) for s in p.read_text().splitlines()] if p.exists() else []


def loss_curve(run_dir) -> list[tuple]:
    """(step, loss, grad_norm) of every step record: exact float values, so any drift shows."""
    return [(r["step"], r["loss"], r["grad_norm"]) for r in metrics(run_dir) if "event" not in r]


def last_logged_step(run_dir) -> int | None:
    p = Path(run_dir) / "metrics.jsonl"
    try:
        lines = p.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if "event" not in rec:
            return int(rec["step"])
    return None


def temp_files(run_dir) -> list[Path]:
    return [p for p in Path(run_dir).rglob("*.tmp")]


def flat_tensors(obj, prefix="") -> dict[str, torch.Tensor]:
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


def assert_same_training_state(a: dict, b: dict) -> None:
    """Model, EMA and optimizer state (moments, step counts, hyper-parameters) equal bit for bit."""
    assert a["step"] == b["step"]
    for key in ("model", "ema", "optimizer"):
        ta, tb = flat_tensors(a[key]), flat_tensors(b[key])
        assert ta.keys() == tb.keys(), key
        assert ta, key
        diff = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
        assert not diff, f"{key} differs at {diff[:5]}"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def wait_for_step(run_dir, target: int, proc: subprocess.Popen, timeout: float = 180) -> int | None:
    """Poll metrics.jsonl until step >= target is logged; None if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = last_logged_step(run_dir)
        if s is not None and s >= target:
            return s
        if proc.poll() is not None:
            return None
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"no progress to step {target} within {timeout}s")


class CheckpointWatcher(threading.Thread):
    """Loads latest.pt over and over while a run writes it: every read must be a whole checkpoint, and the
    step must never go backwards (a resumed run continues from the last checkpoint)."""

    def __init__(self, path: Path, kind: str = "diffusion"):
        super().__init__(daemon=True)
        self.path, self.kind = path, kind
        self.loads, self.errors, self.steps = 0, [], []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            if self.path.exists():  # once written, latest.pt is only ever replaced, never removed
                try:
                    st = load_checkpoint(self.path, kind=self.kind)
                    self.loads += 1
                    self.steps.append(int(st["step"]))
                except Exception as e:  # noqa: BLE001 - any failure to read is what we look for
                    self.errors.append(f"{type(e).__name__}: {e}")
            self._halt.wait(0.005)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


# ---- 1. crash safety ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of KILL_STEPS steps (subprocess, same environment as the killed runs)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    res = run_to_end(cli_args(run, steps=KILL_STEPS, ckpt_every=1000))
    assert res.returncode == 0, res.stderr
    return load_checkpoint(ckpt_path(run), kind="diffusion"), loss_curve(run)


def wait_for_temp_file(folder: Path, proc, timeout: float = 120) -> bool:
    """Poll until atomic_write_bytes has a temp file open in ``folder`` (a checkpoint being written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(e.name.endswith(".tmp") for e in os.scandir(folder)):
                return True
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    return False


def kill_resume_cycle(launcher: Launcher, run: Path, args: list[str], n_kills: int, rng: random.Random, steps: int,
                      modes: list[str] | None = None, kind: str = "diffusion") -> dict:
    """Start the run (always with --resume), SIGKILL it at a random moment, check what is on disk, repeat
    ``n_kills`` times; then let it finish. The moment is one of
    - ``loop``: after a random step of the training loop, plus a random fraction of a step;
    - ``write``: as soon as a checkpoint's temp file appears, plus 0-3 ms (inside the write + fsync);
    - ``startup``: a random time before the first step (data, model, lock, config and log rewrites, resume).
    ``modes`` fixes the sequence; by default each kill draws one (loop 1/2, write 1/4, startup 1/4)."""
    counts = {"kills": 0, "kills_during_checkpoint_write": 0, "kills_during_startup": 0, "kills_in_loop": 0}
    startup_time = None
    span = max(1, (steps - max(2, steps // 8)) // n_kills)
    for i in range(3 * n_kills):
        if counts["kills"] >= n_kills:
            break
        ck = load_checkpoint(ckpt_path(run), kind=kind)["step"] if ckpt_path(run).exists() else 0
        lo, hi = max(ck, last_logged_step(run) or 0) + 1, steps - max(2, steps // 8)  # target > any stale log line
        mode = modes[i % len(modes)] if modes else rng.choice(["loop", "loop", "write", "startup"])
        if startup_time is None or lo > hi:
            mode = "loop" if lo <= hi else "startup"
        t0 = time.monotonic()
        proc = launcher.start(args + ["--resume"])
        if mode == "startup":
            time.sleep(rng.uniform(0.0, startup_time or 1.0))
        else:
            assert wait_for_step(run, lo, proc) is not None, proc.communicate()[1]
            startup_time = time.monotonic() - t0 if startup_time is None else startup_time
            if mode == "loop":
                target = rng.randint(lo, min(hi, lo + 2 * span))
                assert wait_for_step(run, target, proc) is not None, proc.communicate()[1]
                time.sleep(rng.uniform(0.0, 0.02))
            else:
                wait_for_temp_file(run / "checkpoints", proc)
                time.sleep(rng.uniform(0.0, 0.003))
        if proc.poll() is not None:  # it ended before the kill landed (must have been a clean finish)
            _, err = proc.communicate()
            assert proc.returncode == 0, err
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        counts["kills"] += 1
        counts["kills_during_startup" if mode == "startup" else "kills_in_loop"] += 1
        # a temp file left next to latest.pt: the kill landed inside a checkpoint write
        counts["kills_during_checkpoint_write"] += any(p.parent.name == "checkpoints" for p in temp_files(run))
        if ckpt_path(run).exists():  # what a killed run leaves behind always loads
            load_checkpoint(ckpt_path(run), kind=kind)
    res = launcher.start(args + ["--resume"])
    _, err = res.communicate(timeout=300)
    assert res.returncode == 0, err
    return counts


def _crash_test(launcher, tmp_path, reference, n_kills: int, ckpt_every: int, seed: int, name: str,
                modes: list[str] | None = None) -> None:
    ref_state, ref_curve = reference
    run = tmp_path / "run"
    args = cli_args(run, steps=KILL_STEPS, ckpt_every=ckpt_every)
    watcher = CheckpointWatcher(ckpt_path(run))
    watcher.start()
    try:
        stats = kill_resume_cycle(launcher, run, args, n_kills, random.Random(seed), KILL_STEPS, modes)
    finally:
        watcher.stop()
    assert stats["kills"] == n_kills, stats
    assert not watcher.errors, watcher.errors[:3]  # never observed half-written
    assert watcher.loads > 0
    assert watcher.steps == sorted(watcher.steps), "a checkpoint went back in time"
    final = load_checkpoint(ckpt_path(run), kind="diffusion")
    assert_same_training_state(final, ref_state)
    assert loss_curve(run) == ref_curve  # every step's loss and gradient norm, not only the end
    assert not temp_files(run)  # what the killed writers left was cleared under the lock
    record(name, seed=seed, ckpt_every=ckpt_every, steps=KILL_STEPS, watcher_loads=watcher.loads, **stats)


def test_sigkill_at_random_moments_then_resume_is_bit_exact(launcher, tmp_path, reference):
    _crash_test(launcher, tmp_path, reference, n_kills=5, ckpt_every=2, seed=1, name="train_sigkill",
                modes=["loop", "write", "startup", "write", "loop"])


@pytest.mark.slow
def test_sigkill_many_times_checkpointing_every_step(launcher, tmp_path, reference):
    _crash_test(launcher, tmp_path, reference, n_kills=12, ckpt_every=1, seed=2, name="train_sigkill_slow")


def test_sigint_and_sigterm_save_a_checkpoint_and_exit(launcher, tmp_path, reference):
    """SIGINT -> exit 130, SIGTERM -> exit 143 (128 + signal, as a shell reports it), each after saving a
    checkpoint of the last completed step; resuming twice gives the uninterrupted run's weights."""
    ref_state, ref_curve = reference
    run = tmp_path / "run"
    args = cli_args(run, steps=KILL_STEPS, ckpt_every=1000)  # no periodic checkpoint: only the signal saves one
    seen = []
    for sig, code, target in ((signal.SIGINT, 130, 5), (signal.SIGTERM, 143, 20)):
        proc = launcher.start(args + ["--resume"])
        assert wait_for_step(run, target, proc) is not None
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == code, (sig, proc.returncode, err)
        st = load_checkpoint(ckpt_path(run), kind="diffusion")
        assert st["step"] == last_logged_step(run), "the checkpoint is not the last completed step"
        assert target <= st["step"] < KILL_STEPS
        assert f"interrupted by signal {int(sig)}" in err and "--resume" in err
        assert json.loads(out)["interrupted"] is True
        seen.append(st["step"])
    assert seen[0] < seen[1]
    res = launcher.start(args + ["--resume"])
    assert res.wait() == 0, res.communicate()[1]
    assert_same_training_state(load_checkpoint(ckpt_path(run), kind="diffusion"), ref_state)
    assert loss_curve(run) == ref_curve


# ---- 1b. crash safety of meta-training ---------------------------------------------------------------------

META_STEPS = 14
META = dict(outer_steps=META_STEPS, inner_steps=1, candidates=2, batch_size=2, val_batch_size=2, inner_lr=0.1,
            log_every=1, progress=False, seed=5)


def meta_args(run_dir, checkpoint, **kw) -> list[str]:
    opts = {**META, "checkpoint": str(checkpoint), "run_dir": str(run_dir), **kw}
    args = ["metatrain"]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        args += ([flag] if v else [f"--no-{k.replace('_', '-')}"]) if isinstance(v, bool) else [flag, str(v)]
    return args


def meta_curve(run_dir) -> list[tuple]:
    keys = ("step", "val_loss_init", "val_loss_rater", "val_loss_uniform", "meta_grad_norm", "score_mean", "score_std")
    # step records only: not events, nor the held-out evaluation records ({"step", "eval"})
    return [tuple(r[k] for k in keys) for r in metrics(run_dir) if "event" not in r and "eval" not in r]


def assert_same_rater_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["inner_lr"] == b["inner_lr"] and a.get("bad_in_row") == b.get("bad_in_row")
    for key in ("rater", "optimizer"):
        ta, tb = flat_tensors(a[key]), flat_tensors(b[key])
        assert ta.keys() == tb.keys() and ta, key
        diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not diff, f"{key} differs at {diff[:5]}"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


@pytest.fixture(scope="module")
def diffusion_ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pretrained") / "run"
    train(tiny_cfg(run, steps=2, ckpt_every=1000))
    return ckpt_path(run)


@pytest.fixture(scope="module")
def meta_reference(tmp_path_factory, launcher, diffusion_ckpt):
    run = tmp_path_factory.mktemp("meta_reference") / "run"
    res = launcher.start(meta_args(run, diffusion_ckpt, ckpt_every=1000))
    assert res.wait() == 0, res.communicate()[1]
    return load_checkpoint(ckpt_path(run), kind="rater"), meta_curve(run)


def _meta_crash_test(launcher, tmp_path, diffusion_ckpt, meta_reference, n_kills, ckpt_every, seed, name, modes=None):
    ref_state, ref_curve = meta_reference
    run = tmp_path / "run"
    args = meta_args(run, diffusion_ckpt, ckpt_every=ckpt_every)
    watcher = CheckpointWatcher(ckpt_path(run), kind="rater")
    watcher.start()
    try:
        stats = kill_resume_cycle(launcher, run, args, n_kills, random.Random(seed), META_STEPS, modes, kind="rater")
    finally:
        watcher.stop()
    assert stats["kills"] == n_kills, stats
    assert not watcher.errors, watcher.errors[:3]
    assert watcher.loads > 0 and watcher.steps == sorted(watcher.steps)
    assert_same_rater_state(load_checkpoint(ckpt_path(run), kind="rater"), ref_state)
    assert meta_curve(run) == ref_curve
    load_rater(run / "rater.pt")  # the exported rater is whole too
    assert not temp_files(run)
    record(name, seed=seed, ckpt_every=ckpt_every, steps=META_STEPS, watcher_loads=watcher.loads, **stats)


def test_metatrain_sigkill_at_random_moments_then_resume_is_bit_exact(launcher, tmp_path, diffusion_ckpt,
                                                                       meta_reference):
    _meta_crash_test(launcher, tmp_path, diffusion_ckpt, meta_reference, n_kills=3, ckpt_every=1, seed=7,
                     name="metatrain_sigkill", modes=["loop", "write", "startup"])


@pytest.mark.slow
def test_metatrain_sigkill_many_times(launcher, tmp_path, diffusion_ckpt, meta_reference):
    _meta_crash_test(launcher, tmp_path, diffusion_ckpt, meta_reference, n_kills=8, ckpt_every=2, seed=8,
                     name="metatrain_sigkill_slow")


def test_metatrain_sigterm_saves_and_exits_143(launcher, tmp_path, diffusion_ckpt, meta_reference):
    ref_state, ref_curve = meta_reference
    run = tmp_path / "run"
    args = meta_args(run, diffusion_ckpt, ckpt_every=1000)
    proc = launcher.start(args)
    assert wait_for_step(run, 3, proc) is not None, proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate()
    assert proc.returncode == 143, err
    st = load_checkpoint(ckpt_path(run), kind="rater")
    assert st["step"] == last_logged_step(run) and 3 <= st["step"] < META_STEPS
    assert "interrupted by signal 15" in err
    res = launcher.start(args + ["--resume"])
    assert res.wait() == 0, res.communicate()[1]
    assert_same_rater_state(load_checkpoint(ckpt_path(run), kind="rater"), ref_state)
    assert meta_curve(run) == ref_curve


# ---- 2. safe loading ------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    marker = tmp_path / "pwned"
    # a noiserater-looking checkpoint (torch zip format) with the payload inside
    a = tmp_path / "evil_ckpt.pt"
    torch.save({"format": FORMAT, "format_version": 1, "kind": "diffusion", "step": 0, "x": _Payload(marker)}, a)
    # a rater-looking one
    b = tmp_path / "evil_rater.pt"
    torch.save({"format": FORMAT, "format_version": 1, "kind": "rater", "spec": {}, "rater": _Payload(marker)}, b)
    # plain (legacy, non-zip) pickles: protocol 2 reaches the payload's GLOBAL, protocol 4 stops earlier
    c = tmp_path / "evil_legacy.pt"
    with open(c, "wb") as f:
        pickle.dump({"model": _Payload(marker)}, f, protocol=2)
    c4 = tmp_path / "evil_legacy4.pt"
    with open(c4, "wb") as f:
        pickle.dump({"model": _Payload(marker)}, f, protocol=4)
    # a facebookresearch/DiT-style bare state dict
    d = tmp_path / "evil_dit.pt"
    torch.save({"ema": {"x_embedder.proj.weight": _Payload(marker)}}, d)
    return marker, [a, b, c, d, c4]


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker, files = _evil_files(tmp_path)
    loaders = [
        lambda p: load_checkpoint(p),
        lambda p: load_checkpoint(p, kind="diffusion"),
        lambda p: load_rater(p),
        lambda p: load_diffusion(p),
        lambda p: load_reference_dit(str(p), "DiT-S/8", image_size=64, num_classes=10),
    ]
    for f in files:
        for load in loaders:
            with pytest.raises(CheckpointError) as e:
                load(f)
            assert str(f) in str(e.value)
            assert not marker.exists(), f"loading {f.name} ran code"
    for f in files[:4]:  # the refusal names what the file would have called
        assert "would run code" in _error(load_checkpoint, f) and "system" in _error(load_checkpoint, f), f
    # every user-facing entry point: sample, train --init-checkpoint, train --rater
    r = CliRunner()
    for args in (["sample", "--checkpoint", str(files[0]), "--out", str(tmp_path / "s")],
                 cli_args(tmp_path / "r1", steps=1, init_checkpoint=str(files[0])),
                 cli_args(tmp_path / "r2", steps=1, policy="rater", candidates=2, rater=str(files[1]))):
        res = r.invoke(main, args)
        assert res.exit_code == 2, (args, res.output, res.exception)
        assert "run code" in res.stderr and "\n" not in res.stderr.strip()
    assert not marker.exists()
    # control: the payload is live, so the refusal above is what kept it from running
    torch.load(files[0], weights_only=False)
    assert marker.exists()


def _error(fn, *a) -> str:
    try:
        fn(*a)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return ""


def _good_state(tmp_path: Path) -> Path:
    path = tmp_path / "good.pt"
    save_checkpoint(path, {"step": 3, "model": {"w": torch.randn(64, 64)}}, kind="diffusion")
    return path


def test_foreign_old_and_wrong_kind_checkpoints_get_clear_errors(tmp_path):
    good = _good_state(tmp_path)
    assert load_checkpoint(good, kind="diffusion")["step"] == 3
    state = torch.load(good, weights_only=True)
    cases = {}
    for version in (0, 3, None, "1", True):
        p = tmp_path / f"v{version}.pt"
        torch.save({**state, "format_version": version}, p)
        cases[p] = "format version"
    p = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, p)
    cases[p] = "not a noiserater checkpoint"
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], p)
    cases[p] = "not a noiserater checkpoint"
    p = tmp_path / "other_format.pt"
    torch.save({**state, "format": "somebody-else"}, p)
    cases[p] = "not a noiserater checkpoint"
    for p, fragment in cases.items():
        assert fragment in _error(load_checkpoint, p), p
    assert "expected a 'rater' checkpoint" in _error(load_checkpoint, good, "rater")
    assert "expected a 'rater' checkpoint" in _error(load_rater, good)
    assert "not found" in _error(load_checkpoint, tmp_path / "missing.pt")
    assert "not found" in _error(load_checkpoint, tmp_path)  # a folder


def test_truncated_and_garbage_files_get_clear_errors(tmp_path):
    good = _good_state(tmp_path)
    data = good.read_bytes()
    rng = random.Random(0)
    cuts = sorted({0, 1, 10, 100, len(data) // 2, len(data) - 100, len(data) - 1} | {rng.randrange(len(data)) for _ in range(8)})
    for n in cuts:
        p = tmp_path / f"cut{n}.pt"
        p.write_bytes(data[:n])
        for load in (load_checkpoint, load_rater, load_diffusion):
            with pytest.raises(CheckpointError):
                load(p)
        with pytest.raises(CheckpointError):
            load_reference_dit(str(p), "DiT-S/8", image_size=64, num_classes=10)
    p = tmp_path / "garbage.pt"
    p.write_bytes(bytes(rng.randrange(256) for _ in range(5000)))
    assert "truncated or corrupt" in _error(load_checkpoint, p)


def test_rater_checkpoint_round_trip_and_refusals(tmp_path):
    rater = build_rater("Rater-N/2", input_size=8, in_channels=1, num_classes=10)
    p = tmp_path / "rater.pt"
    save_rater(p, rater)
    again = load_rater(p)
    assert all(torch.equal(a, b) for a, b in zip(rater.state_dict().values(), again.state_dict().values()))
    state = torch.load(p, weights_only=True)
    bad = tmp_path / "bad_spec.pt"
    torch.save(_signed({**state, "spec": {"name": "Rater-N/2"}}), bad)
    assert "invalid rater spec" in _error(load_rater, bad)
    shape = tmp_path / "bad_shape.pt"
    sd = dict(state["rater"])
    k = next(iter(sd))
    sd[k] = torch.zeros(3, 3)
    torch.save(_signed({**state, "rater": sd}), shape)
    assert "does not match" in _error(load_rater, shape)
    torch.save({**state, "rater": sd}, shape)  # the same edit without re-hashing: refused as corrupt
    assert "is corrupt" in _error(load_rater, shape) and str(shape) in _error(load_rater, shape)


def _signed(state: dict) -> dict:
    """``state`` with its content hash recomputed (a deliberate edit, as opposed to damage)."""
    body = {k: v for k, v in state.items() if k != HASH_KEY}
    return {**body, HASH_KEY: content_sha256(body)}


# ---- 3. numerics ------------------------------------------------------------------------------------------


class _InfGrad(torch.autograd.Function):
    """Adds zero to the loss but sends an infinite gradient back: the loss stays finite."""

    @staticmethod
    def forward(ctx, x):
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("inf"))


def inject(monkeypatch, kind: str, steps: set[int]) -> None:
    """Make the loss NaN / inf, or the gradient inf, on the chosen step indices (0-based, one loss call
    per step: vanilla policy)."""
    real, calls = objectives.per_sample_loss, {"n": -1}  # the DDPM objective's loss looks it up there

    def loss(*args, **kw):
        calls["n"] += 1
        out = real(*args, **kw)
        if calls["n"] not in steps:
            return out
        if kind == "nan_loss":
            return out * float("nan")
        if kind == "inf_loss":
            return out + float("inf")
        if kind == "inf_grad":
            return out + _InfGrad.apply(out)
        raise AssertionError(kind)

    monkeypatch.setattr(objectives, "per_sample_loss", loss)


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory):
    """Checkpoints of clean in-process runs after 2 and 3 steps."""
    out = {}
    for n in (2, 3):
        run = tmp_path_factory.mktemp(f"clean{n}") / "run"
        train(tiny_cfg(run, steps=n, ckpt_every=1000))
        out[n] = load_checkpoint(ckpt_path(run), kind="diffusion")
    return out


@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "inf_grad"])
def test_a_nonfinite_step_is_skipped_and_logged(tmp_path, monkeypatch, clean_runs, kind):
    """A bad step at index 2 changes nothing (weights, EMA, optimizer moments and step count): the run of
    3 steps ends exactly where a clean run of 2 steps does, and the log names the step and the batch."""
    inject(monkeypatch, kind, {2})
    run = tmp_path / "run"
    summary = train(tiny_cfg(run, steps=3, ckpt_every=1000, max_bad_steps=2))
    assert summary["step"] == 3
    st = load_checkpoint(ckpt_path(run), kind="diffusion")
    assert_same_training_state({**st, "step": 2}, clean_runs[2])
    events = [r for r in metrics(run) if r.get("event") == "nonfinite_skipped"]
    assert len(events) == 1 and events[0]["step"] == 2
    assert events[0]["batch"] == batch_indices(n_train(), 8, 2, 3).tolist()
    if kind == "inf_grad":
        assert events[0]["loss"] is not None  # the loss was finite: the gradient was caught
    else:
        assert events[0]["loss"] is None  # NaN/inf written as null: metrics.jsonl stays strict JSON


def test_too_many_bad_steps_stop_with_the_step_and_batch(tmp_path, monkeypatch, clean_runs):
    inject(monkeypatch, "inf_grad", {3, 4, 5})
    run = tmp_path / "run"
    res = CliRunner().invoke(main, cli_args(run, steps=10, ckpt_every=3, max_bad_steps=3))
    assert res.exit_code == 2, (res.output, res.exception)
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "3 steps in a row" in err and "step 5" in err
    assert str(batch_indices(n_train(), 8, 5, 3).tolist()[:8])[1:-1] in err  # the batch that caused it
    assert "latest.pt" in err
    st = load_checkpoint(ckpt_path(run), kind="diffusion")  # the last good checkpoint, intact
    assert_same_training_state(st, clean_runs[3])
    assert not temp_files(run)


def test_nonfinite_rater_scores_are_caught(tmp_path, monkeypatch):
    """NaN/inf rater scores would make argmax pick a NaN candidate silently; they are a skipped step."""
    from noiserater.models.rater import NoiseRater
    from noiserater.selection import NonFiniteError, get_policy

    rater = build_rater("Rater-N/2", input_size=8, in_channels=1, num_classes=10)
    rpath = tmp_path / "rater.pt"
    save_rater(rpath, rater)
    real, calls = NoiseRater.score_candidates, {"n": -1}
    bad_at = {1: float("nan"), 2: float("inf")}

    def scores(self, *a, **kw):
        calls["n"] += 1
        s = real(self, *a, **kw)
        if calls["n"] in bad_at:
            s = s.clone()
            s[0, 1] = bad_at[calls["n"]]
        return s

    monkeypatch.setattr(NoiseRater, "score_candidates", scores)
    # the policy itself refuses
    pol = get_policy("rater", 2, rater=load_rater(rpath))
    x0, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 500]), torch.tensor([1, 2])
    pol.select(x0, t, y, torch.randn(2, 2, 1, 8, 8))  # call 0: fine
    with pytest.raises(NonFiniteError, match="non-finite scores"):
        pol.select(x0, t, y, torch.randn(2, 2, 1, 8, 8))
    calls["n"] = -1
    for policy in ("rater", "rater_soft"):
        calls["n"] = -1
        run = tmp_path / policy
        train(tiny_cfg(run, steps=4, policy=policy, candidates=2, rater=str(rpath), max_bad_steps=3))
        events = [r for r in metrics(run) if r.get("event") == "nonfinite_skipped"]
        assert [e["step"] for e in events] == [1, 2], events
        assert all("rater returned" in e["cause"] for e in events)
    calls["n"] = -1
    bad_at.update({3: float("nan")})
    with pytest.raises(NumericsError, match="rater scores"):
        train(tiny_cfg(tmp_path / "stop", steps=6, policy="rater", candidates=2, rater=str(rpath), max_bad_steps=3))


def test_weights_that_overflow_are_never_checkpointed(tmp_path, monkeypatch, clean_runs):
    """An update that makes a weight inf (finite loss and gradient) must not overwrite the last good
    checkpoint; the run stops at once with a message naming the weight."""
    real_step, calls = torch.optim.AdamW.step, {"n": -1}

    def step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run = tmp_path / "run"
    with pytest.raises(NumericsError, match="became non-finite by step 4"):
        train(tiny_cfg(run, steps=10, ckpt_every=1))
    st = load_checkpoint(ckpt_path(run), kind="diffusion")
    assert st["step"] == 3
    assert all(torch.isfinite(v).all() for v in flat_tensors(st["model"]).values())
    assert_same_training_state(st, clean_runs[3])


def _meta_cfg(run, ckpt, **kw):
    from noiserater.metatrain import MetaTrainConfig

    return MetaTrainConfig(**{**META, "checkpoint": str(ckpt), "run_dir": str(run), **kw})


def test_metatrain_nonfinite_meta_gradients_are_skipped_then_stop(tmp_path, monkeypatch, diffusion_ckpt):
    """A NaN meta-gradient (injected on chosen outer steps) is skipped and logged; three in a row stop the
    run naming the step; the last good checkpoint (equal to a clean run's) stays loadable."""
    import noiserater.meta.outer as mt  # BilevelStep calls meta_gradient_info from here
    from noiserater.metatrain import metatrain

    clean = tmp_path / "clean"
    metatrain(_meta_cfg(clean, diffusion_ckpt, outer_steps=3, ckpt_every=1000))
    real, calls = mt.meta_gradient_info, {"n": -1}
    bad = {3, 4, 5}

    def info(*a, **kw):
        calls["n"] += 1
        res = real(*a, **kw)
        if calls["n"] in bad:
            res.grads = [g * float("nan") for g in res.grads]
        return res

    monkeypatch.setattr(mt, "meta_gradient_info", info)
    run = tmp_path / "run"
    with pytest.raises(NumericsError, match="3 outer steps in a row, last at step 6"):
        metatrain(_meta_cfg(run, diffusion_ckpt, outer_steps=10, ckpt_every=3, max_bad_steps=3))
    events = [r for r in metrics(run) if r.get("event") == "nonfinite_skipped"]
    assert [e["step"] for e in events] == [4, 5, 6]
    st = load_checkpoint(ckpt_path(run), kind="rater")
    assert_same_rater_state(st, load_checkpoint(ckpt_path(clean), kind="rater"))
    assert not temp_files(run)
    # one bad step is skipped and the run goes on
    calls["n"], bad = -1, {1}
    run2 = tmp_path / "run2"
    metatrain(_meta_cfg(run2, diffusion_ckpt, outer_steps=3, ckpt_every=1000))
    assert [r["step"] for r in metrics(run2) if r.get("event")] == [2]
    assert load_checkpoint(ckpt_path(run2), kind="rater")["step"] == 3


def test_metatrain_never_checkpoints_nonfinite_rater_weights(tmp_path, monkeypatch, diffusion_ckpt):
    from noiserater.metatrain import metatrain

    real_step, calls = torch.optim.Adam.step, {"n": -1}

    def step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    run = tmp_path / "run"
    with pytest.raises(NumericsError, match="became non-finite by step 3"):
        metatrain(_meta_cfg(run, diffusion_ckpt, outer_steps=6, ckpt_every=1))
    st = load_checkpoint(ckpt_path(run), kind="rater")
    assert st["step"] == 2 and all(torch.isfinite(v).all() for v in flat_tensors(st["rater"]).values())
    assert load_rater(run / "rater.pt") is not None


# ---- 5. locking and a full disk --------------------------------------------------------------------------


def test_a_second_writer_gets_a_clear_error_while_a_run_is_live(tmp_path):
    run = tmp_path / "run"
    args = cli_args(run, steps=100_000, ckpt_every=20)
    proc = spawn(args)
    try:
        assert wait_for_step(run, 3, proc) is not None, proc.communicate()[1]
        r = CliRunner()
        # second writers that would end at once if they got in (few steps), so a missing lock fails fast
        short = cli_args(run, steps=2, ckpt_every=20)
        for second in (short + ["--resume"], short, cli_args(run, steps=2, lr=0.5)):
            res = r.invoke(main, second)
            assert res.exit_code == 2, (res.output, res.exception)
            assert "is locked by another process" in res.stderr and "\n" not in res.stderr.strip()
        with pytest.raises(RunDirError, match="locked"):
            train(tiny_cfg(run, steps=2, ckpt_every=20), resume=True)
        with pytest.raises(RunDirError):
            RunLock(run).acquire()
        before = last_logged_step(run)
        assert wait_for_step(run, before + 3, proc) is not None  # the live run was not disturbed
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    st = load_checkpoint(ckpt_path(run), kind="diffusion")
    assert st["step"] == last_logged_step(run)
    # the lock went with the process: the run can be continued
    lock = RunLock(run).acquire()
    lock.release()


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    code = ("import sys, time; from noiserater.checkpoint import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=subprocess_env(), stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match="locked by another process"):
            RunLock(tmp_path).acquire()
    finally:
        p.kill()
        p.wait()
    RunLock(tmp_path).acquire().release()


class _FullDiskFile:
    """A file object that writes part of the data, then fails as a full disk does."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 3])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import noiserater.checkpoint as ck

    run = tmp_path / "run"
    real_fdopen, saves = os.fdopen, {"n": 0}

    def fdopen(fd, *a, **kw):
        f = real_fdopen(fd, *a, **kw)
        if "w" in (a[0] if a else kw.get("mode", "r")) and os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") \
                and ".latest.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            saves["n"] += 1
            if saves["n"] >= 2:
                return _FullDiskFile(f)
        return f

    monkeypatch.setattr(ck.os, "fdopen", fdopen)
    res = CliRunner().invoke(main, cli_args(run, steps=6, ckpt_every=2))
    assert res.exit_code == 2, (res.output, res.exception)
    assert "no space left on the device" in res.stderr and "is intact" in res.stderr
    assert saves["n"] == 2
    st = load_checkpoint(ckpt_path(run), kind="diffusion")
    assert st["step"] == 2
    assert not temp_files(run)
    monkeypatch.undo()  # space freed: the run continues from the checkpoint that survived
    res = CliRunner().invoke(main, cli_args(run, steps=6, ckpt_every=2) + ["--resume"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert json.loads(res.stdout)["start_step"] == 2


def _mount_tmpfs(path: Path, size: int) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_on_a_real_small_filesystem(tmp_path, clean_runs):
    """A tmpfs with room for one checkpoint and not two (needs root; skipped where mount is refused)."""
    probe = tmp_path / "probe"
    train(tiny_cfg(probe, steps=1, ckpt_every=1000))
    size = ckpt_path(probe).stat().st_size
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, int(size * 1.5) + 256 * 1024):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        run = mnt / "run"
        train(tiny_cfg(run, steps=2, ckpt_every=1000))
        with pytest.raises(DiskFullError, match="no space left"):
            train(tiny_cfg(run, steps=3, ckpt_every=1000), resume=True)
        st = load_checkpoint(ckpt_path(run), kind="diffusion")
        assert_same_training_state(st, clean_runs[2])
        assert not temp_files(run)
        # make room (a bigger filesystem), resume: exactly a clean run
        subprocess.run(["mount", "-o", f"remount,size={4 * size}", str(mnt)], check=True)
        train(tiny_cfg(run, steps=3, ckpt_every=1000), resume=True)
        assert_same_training_state(load_checkpoint(ckpt_path(run), kind="diffusion"), clean_runs[3])
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
