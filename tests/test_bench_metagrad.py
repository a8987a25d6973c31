"""`noiserater bench metagrad`: record format, the goal lines, and memory behaviour vs S."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from noiserater.bench.metagrad import goal_lines, markdown_table, run_child

TINY = {"model": "DiT-N/2", "rater": "Rater-N/2", "image_size": 8, "channels": 1, "batch": 2, "candidates": 2,
        "inner_optimizer": "sgd", "inner_lr": 0.01, "repeats": 1, "threads": 1, "device": "cpu", "seed": 0}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class _KnownClock:
    """Stands in for the ``time`` module of the benchmarks' clock (:func:`noiserater.bench.common.time_call`):
    each timed call lasts the next of the given CPU and wall durations."""

    def __init__(self, cpu, wall):
        self._cpu = iter(x for d in cpu for x in (0.0, d))
        self._wall = iter(x for d in wall for x in (0.0, d))

    def process_time(self):
        return next(self._cpu)

    def perf_counter(self):
        return next(self._wall)


def test_child_record_against_a_known_clock_and_an_independent_meta_gradient(monkeypatch):
    """The record's times are the medians of the repeats' own durations (a known clock: CPU 0.5, 0.2, 0.9 s,
    wall 1, 3, 2 s), per inner step over S=2; its meta-gradient norm is the one plain autograd through the
    unrolled inner steps gives on the same model, rater and batches; its peak memory holds at least the
    meta-gradient it returns (one float32 per rater parameter)."""
    from noiserater.bench import common
    from noiserater.bench import metagrad as bm
    from noiserater.meta import meta_gradient

    cfg = {**TINY, "method": "reverse", "inner_steps": 2, "repeats": 3}
    monkeypatch.setattr(common, "time", _KnownClock(cpu=[0.5, 0.2, 0.9], wall=[1.0, 3.0, 2.0]))
    rec = run_child(cfg)
    assert rec["method"] == "reverse" and rec["inner_steps"] == 2
    assert rec["time_s"] == pytest.approx(0.5) and rec["wall_time_s"] == pytest.approx(2.0)
    assert rec["time_per_inner_step_s"] == pytest.approx(0.25)
    model, rater, train, val = bm._build(cfg)
    ref = meta_gradient(model, rater, train, val, inner_lr=cfg["inner_lr"], method="unrolled", inner_optimizer="sgd")
    ref_norm = float(torch.cat([g.reshape(-1) for g in ref]).norm())
    assert ref_norm > 0 and rec["meta_grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    rater_bytes = sum(p.numel() * 4 for p in rater.parameters())
    assert rec["peak_mem_bytes"] >= rater_bytes
    assert rec["params_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # the FLOPs are those of the measured S=2 call (not the S=1 warm-up): about twice one inner step's
    monkeypatch.setattr(common, "time", _KnownClock(cpu=[0.1], wall=[0.1]))
    one = run_child({**cfg, "inner_steps": 1, "repeats": 1})
    assert 1.7 < rec["flops"] / one["flops"] < 2.3 and rec["flops_per_inner_step"] == rec["flops"] / 2


def test_a_memory_budget_skips_the_rebuild_of_its_steps():
    """reverse@W: each kept step saves the same FLOPs (its gradient is not computed a second time), so the count
    falls linearly in W, and the kept graphs cost memory; the meta-gradient is unchanged."""
    cfg = {**TINY, "inner_steps": 3, "repeats": 1}
    recs = {m: run_child({**cfg, "method": m}) for m in ("unrolled", "reverse", "reverse@1", "reverse@3")}
    f = {m: r["flops"] for m, r in recs.items()}
    one_step = f["reverse"] - f["reverse@1"]
    assert one_step > 0 and f["reverse@1"] - f["reverse@3"] == pytest.approx(2 * one_step, rel=0.02)
    assert f["unrolled"] < f["reverse@3"]  # what remains: the rater forward each backward step recomputes
    assert recs["reverse@3"]["peak_mem_bytes"] > recs["reverse"]["peak_mem_bytes"]
    for m in ("reverse@1", "reverse@3"):
        assert recs[m]["meta_grad_norm"] == pytest.approx(recs["unrolled"]["meta_grad_norm"], rel=1e-4)


def test_goal_lines_and_table():
    recs = [{"method": m, "inner_steps": s, "time_s": t, "time_per_inner_step_s": t / s, "peak_mem_bytes": mem,
             "flops": f, "flops_per_inner_step": f / s}
            for m, s, t, mem, f in [("unrolled", 1, 1.0, 100, 10), ("unrolled", 4, 4.0, 400, 40),
                                    ("reverse", 1, 1.5, 120, 18), ("reverse", 4, 6.0, 130, 56)]]
    lines = "\n".join(goal_lines(recs))
    assert "reverse: FLOPs / unrolled FLOPs at equal S: 1.80 (S=1), 1.40 (S=4)" in lines
    assert "reverse: peak memory S=4 / S=1 = 1.08" in lines and "unrolled: peak memory S=4 / S=1 = 4.00" in lines
    assert "1.50 .. 1.50" in lines
    assert markdown_table(recs).count("\n") == 5


def test_bad_options_are_clear():
    from noiserater.cli import main

    r = CliRunner().invoke(main, ["bench", "metagrad", "--methods", "magic"])
    assert r.exit_code == 2 and "unknown methods" in r.output
    r = CliRunner().invoke(main, ["bench", "metagrad", "--methods", "unrolled@2"])  # a budget is for reverse only
    assert r.exit_code == 2 and "unknown methods" in r.output
    r = CliRunner().invoke(main, ["bench", "metagrad", "--inner-steps-list", "1,x"])
    assert r.exit_code == 2 and "--inner-steps-list" in r.output


@pytest.mark.slow
def test_reverse_memory_is_flat_and_unrolled_grows(tmp_path):
    """Fresh processes per configuration: unrolled's live memory grows with S, reverse's does not."""
    from noiserater.cli import main

    out = tmp_path / "m.json"
    r = CliRunner().invoke(main, ["bench", "metagrad", "--json", str(out), "--inner-steps-list", "1,4",
                                  "--methods", "unrolled,reverse", "--image-size", "8", "--repeats", "1"])
    assert r.exit_code == 0, r.output
    recs = {(x["method"], x["inner_steps"]): x for x in json.loads(out.read_text())}
    assert recs[("unrolled", 4)]["peak_mem_bytes"] > 2.5 * recs[("unrolled", 1)]["peak_mem_bytes"]
    assert recs[("reverse", 4)]["peak_mem_bytes"] < 1.2 * recs[("reverse", 1)]["peak_mem_bytes"]
