"""The run scaffold both training loops share (noiserater.run): the lock and clean-up of open_run, the
bad-step guard, the finite-weights check, and the one all-reduce by which DDP ranks agree to apply a step
and to stop (checked with two real gloo processes)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from noiserater.checkpoint import RunDirError, RunLock
from noiserater.config import ConfigError
from noiserater.errors import NumericsError
from noiserater.randomness import batch_indices, condition_labels, drop_labels, step_generator
from noiserater.run.folder import eval_records, log_metrics, read_metrics, truncate_metrics
from noiserater.run.loop import BadStepGuard, Run, check_finite_weights, open_run


def test_open_run_locks_the_folder_and_releases_it(tmp_path):
    run_dir = tmp_path / "run"
    with open_run(run_dir, "cpu", {"batch_size": 8}) as run:
        assert (run.rank, run.world, run.is_main) == (0, 1, True)
        (run_dir / "config.yaml").write_text("x: 1\n")
        with pytest.raises(RunDirError, match="locked by another process"):
            RunLock(run_dir).acquire()
    RunLock(run_dir).acquire().release()  # released on the way out
    assert (run_dir / "config.yaml").exists()


def test_a_failure_before_anything_is_written_leaves_no_folder(tmp_path):
    run_dir = tmp_path / "fresh"
    with pytest.raises(ValueError, match="bad input"):
        with open_run(run_dir, "cpu", {}):
            assert (run_dir / ".lock").exists()
            raise ValueError("bad input")
    assert not run_dir.exists()
    # a folder that existed before is never removed, and one with files in it neither
    kept = tmp_path / "kept"
    with pytest.raises(ValueError):
        with open_run(kept, "cpu", {}):
            (kept / "metrics.jsonl").write_text("{}\n")
            raise ValueError("later failure")
    assert (kept / "metrics.jsonl").exists()


def test_batches_that_do_not_split_over_the_processes_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with open_run(tmp_path / "ok", "cpu", {"batch_size": 7}):
        pass
    # the check itself, for 3 processes (no process group needed to test the message)
    from noiserater.run.distributed import require_divisible

    with pytest.raises(ConfigError, match=r"invalid val_batch_size: 8 is not divisible by the 3 processes \(flag --val-batch-size\)"):
        require_divisible({"batch_size": 9, "val_batch_size": 8}, 3)


def test_bad_step_guard_counts_in_a_row_and_names_the_step_and_fix(tmp_path):
    ckpt = tmp_path / "latest.pt"
    g = BadStepGuard(3, "loss or gradient", "lower --lr")
    g.bad(1, ckpt)
    g.bad(2, ckpt)
    g.good()  # a good step resets the streak
    g.bad(4, ckpt)
    g.bad(5, ckpt)
    with pytest.raises(NumericsError) as e:
        g.bad(6, ckpt, " (batch 7)")
    msg = str(e.value)
    assert "non-finite loss or gradient for 3 steps in a row, last at step 6 (batch 7)" in msg
    assert "no checkpoint was written" in msg and msg.endswith("lower --lr")
    ckpt.write_bytes(b"x")
    g2 = BadStepGuard(1, "meta-gradient", "use --grad-clip", unit="outer steps", in_row=0)
    with pytest.raises(NumericsError, match=f"1 outer steps in a row, last at step 2; the last good checkpoint is {ckpt}"):
        g2.bad(2, ckpt)


def test_check_finite_weights_names_the_weight():
    m = torch.nn.Linear(2, 2)
    check_finite_weights(3, "c.pt", "fix", m)  # finite: nothing
    with torch.no_grad():
        m.bias[1] = float("inf")
    with pytest.raises(NumericsError, match="weight bias became non-finite by step 3"):
        check_finite_weights(3, "c.pt", "fix", m)


def test_should_save_cadence():
    saves = [s for s in range(1, 11) if Run.should_save(s, 10, 4, stop=False)]
    assert saves == [4, 8, 10]
    assert Run.should_save(3, 10, 4, stop=True)


def test_metrics_roundtrip_truncate_and_eval_records(tmp_path):
    for rec in ({"step": 1, "loss": 0.5}, {"step": 2, "loss": float("nan")}, {"step": 2, "event": "nonfinite_skipped"},
                {"step": 3, "eval": {"value": 1.0}}, {"step": 4, "loss": 0.1}):
        log_metrics(tmp_path, True, rec)
    log_metrics(tmp_path, False, {"step": 99})  # not the main process: nothing written
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut by a crash
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 2, 3, 4] and recs[1]["loss"] is None  # NaN -> null
    assert eval_records(tmp_path / "metrics.jsonl") == [{"step": 3, "eval": {"value": 1.0}}]
    truncate_metrics(tmp_path / "metrics.jsonl", 3)  # resume from a checkpoint after 3 steps
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # train's events carry the index of their step: the event of step 2 happened in the 3rd step, kept
    assert [r["step"] for r in kept] == [1, 2, 2, 3]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_randomness_is_a_pure_function_of_seed_and_step():
    a = torch.randn(5, generator=step_generator(3, 10, stream=1))
    assert torch.equal(a, torch.randn(5, generator=step_generator(3, 10, stream=1)))
    assert not torch.equal(a, torch.randn(5, generator=step_generator(3, 10, stream=2)))
    assert not torch.equal(a, torch.randn(5, generator=step_generator(3, 11, stream=1)))
    # consecutive steps cover each epoch exactly once (a permutation), also across the epoch boundary
    idx = torch.cat([batch_indices(10, 4, s, seed=1) for s in range(5)])
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:20].tolist()) == list(range(10))
    y = torch.arange(2000) % 10
    dropped = drop_labels(y, 10, 0.25, torch.Generator().manual_seed(0))
    frac = (dropped == 10).float().mean().item()
    assert abs(frac - 0.25) < 4 * (0.25 * 0.75 / 2000) ** 0.5  # binomial, 4 standard deviations
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(condition_labels(y, 10, 0.5, True, g), torch.full_like(y, 10))
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn
    g2 = torch.Generator().manual_seed(0)
    drop_labels(y, 10, 0.0, g2, draw_at_zero=True)
    assert not torch.equal(g2.get_state(), torch.Generator().manual_seed(0).get_state())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agree_worker(rank, port, out):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    with open_run(os.path.join(out, "run"), "cpu", {"batch_size": 4}) as run:
        cases = [(True, False), (rank == 0, False), (True, rank == 1), (rank == 1, rank == 0)]
        got = [run.agree(a, s) for a, s in cases]
        run.barrier()
    import torch.distributed as dist

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"got": got, "group_alive": dist.is_initialized(), "world": run.world}, f)


def test_two_processes_agree_to_skip_and_to_stop_together(tmp_path):
    mp.spawn(_agree_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["world"] == 2
        # apply only if every rank's step is finite; stop if any rank got a signal
        assert r["got"] == [[True, False], [False, False], [True, True], [False, True]]
        assert r["group_alive"] is False  # open_run destroyed the process group it started
