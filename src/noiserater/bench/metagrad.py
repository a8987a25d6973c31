"""Time and peak memory of one meta-gradient vs the number of inner steps S (``noiserater bench metagrad``).

Every (method, S) runs in a fresh Python process on the same model, rater and batches (seeded), so one
configuration's freed-but-cached memory never hides another's growth.

Peak memory (``peak_mem_bytes``): the growth of live memory during one ``meta_gradient`` call over what
the process held just before it (interpreter, torch, model, rater, batches):
- CPU: the peak of glibc's in-use heap (``mallinfo2``: uordblks + hblkhd, i.e. the bytes of live
  allocations, tensors included) sampled after every aten op of the call by a TorchDispatchMode, minus the
  in-use heap before the call (:func:`noiserater.bench.common.live_memory_probe`). The growth of the
  resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; ``ru_maxrss`` without
  that: :class:`noiserater.bench.common.PeakRssGrowth`) is recorded beside it as ``rss_growth_bytes``: it
  also counts memory glibc keeps after a free (fragmentation, its dynamic mmap threshold), which is what
  the process costs but not what the algorithm needs.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocation before.

The live-memory figure is taken after a warm-up call with S=1 (first-call initialisation inside torch is
not the method's memory); ``rss_growth_bytes`` comes from a second fresh process whose first call is
measured cold.

Operations (``flops``): the floating-point operations of one call as PyTorch's ``FlopCounterMode`` counts
them (matmuls and convolutions, backward and double-backward included): the same on every machine, so the
ratio of two methods' FLOPs is the floor their time ratio tends to where compute dominates (a GPU), and
where a method's recomputation shows.

Time (``time_s``): the median of ``--repeats`` calls after the measured one. On CPU it is the process CPU
time with one torch thread (a shared machine's wall clock mostly measures the neighbours; the wall-clock
median is recorded as ``wall_time_s``); on CUDA it is wall-clock time with synchronisation.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..meta import meta_gradient
from ..meta.gradient import METHODS
from ..models import build_dit, build_rater
from ..plotting import figure, label_axes, legend, savefig
from .common import (
    FreshProcessError,
    PeakRssGrowth,
    default_device,
    in_fresh_process,
    live_memory_probe,
    machine_info,
    tensor_bytes,
    time_call,
)

DEFAULT_METHODS = "unrolled,reverse,reverse_fwd,alignment"


def _build(cfg: dict):
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    C, H, classes = cfg["channels"], cfg["image_size"], 10
    model = build_dit(cfg["model"], input_size=H, in_channels=C, num_classes=classes, learn_sigma=False)
    with torch.no_grad():  # a "trained" model: adaLN-Zero gates and output layer away from zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    rater = build_rater(cfg["rater"], input_size=H, in_channels=C, num_classes=classes)
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    B, K = cfg["batch"], cfg["candidates"]

    def batch(k):
        shape = (B, k, C, H, H) if k else (B, C, H, H)
        return tuple(x.to(device) for x in (torch.randn(B, C, H, H, generator=g), torch.randint(0, classes + 1, (B,), generator=g),
                                            torch.randint(0, 1000, (B,), generator=g), torch.randn(shape, generator=g)))

    train = [batch(K) for _ in range(cfg["inner_steps"])]
    return model.to(device), rater.to(device), train, batch(0)


def run_child(cfg: dict) -> dict:
    """Measure one configuration in this (fresh) process."""
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    model, rater, train, val = _build(cfg)

    method, budget = parse_method(cfg["method"])

    def call(batches=train):
        return meta_gradient(model, rater, batches, val, inner_lr=cfg["inner_lr"], method=method,
                             inner_optimizer=cfg["inner_optimizer"],
                             **({"memory_budget": min(budget, len(batches))} if budget else {}))

    if cfg.get("measure") == "rss":  # its own fresh process: the heap probe below allocates too
        with PeakRssGrowth() as rss:
            call()
        return {"rss_growth_bytes": rss.growth}
    call(train[:1])  # warm-up with S=1 (lazy initialisation of kernels and modules is not the method's memory)
    probe = live_memory_probe(device)
    with probe:
        grads = call()
    gnorm = float(torch.cat([x.reshape(-1) for x in grads]).norm())
    del grads
    with FlopCounterMode(display=False) as flops:  # after the memory probe: the counter holds its own state
        call()
    wall_times, cpu_times = zip(*(time_call(call, device) for _ in range(cfg["repeats"])))
    wall = statistics.median(wall_times)
    cuda = device.type == "cuda"
    t = wall if cuda else statistics.median(cpu_times)
    return {
        "method": cfg["method"], "inner_steps": cfg["inner_steps"], "time_s": t, "peak_mem_bytes": int(probe.growth),
        "time_per_inner_step_s": t / cfg["inner_steps"], "wall_time_s": wall,
        "clock": "cuda wall-clock" if cuda else f"process CPU time, {cfg['threads']} thread(s)",
        "memory": f"{probe.method} during the call",
        "params_bytes": tensor_bytes(p for p in model.parameters() if p.requires_grad),
        "meta_grad_norm": gnorm, "flops": int(flops.get_total_flops()),
        "flops_per_inner_step": flops.get_total_flops() / cfg["inner_steps"],
    }


def parse_method(name: str) -> tuple[str, int]:
    """``reverse@W`` -> ('reverse', W): a reverse method keeping the last W steps' graphs (``memory_budget``)."""
    method, sep, budget = name.partition("@")
    if method not in METHODS or (sep and (method not in ("reverse", "reverse_fwd") or not budget.isdigit())):
        raise ValueError(f"unknown method {name!r}: one of {', '.join(METHODS)}, or reverse@W / reverse_fwd@W "
                         "(keep the last W inner steps' graphs)")
    return method, int(budget) if sep else 0


def _in_child(cfg: dict, env: dict, timeout_s: float) -> dict:
    return in_fresh_process(f"{__name__}.run_child", {"cfg": cfg}, timeout_s, env)


def run_metagrad_benchmark(methods: list[str], steps: list[int], *, model: str = "DiT-N/2", rater: str = "Rater-N/2",
                           image_size: int = 16, channels: int = 1, batch: int = 4, candidates: int = 8,
                           inner_optimizer: str = "sgd", inner_lr: float = 0.01, repeats: int = 2, threads: int = 1,
                           device: str = "auto", timeout_s: float = 600, seed: int = 0,
                           log: Callable[[str], object] = print) -> list[dict]:
    """One record per (method, S), each measured by :func:`run_child` in a fresh process (and, on CPU, its
    ``rss_growth_bytes`` by a second one); a failed or timed-out configuration is a record with ``error``."""
    device = str(default_device(device))
    base = {"model": model, "rater": rater, "image_size": image_size, "channels": channels, "batch": batch,
            "candidates": candidates, "inner_optimizer": inner_optimizer, "inner_lr": inner_lr, "repeats": repeats,
            "threads": threads, "device": device, "seed": seed}
    setup = _setup(base)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    records = []
    for method in methods:
        for S in steps:
            cfg = {**base, "method": method, "inner_steps": S}
            try:
                rec = {**_in_child(cfg, env, timeout_s), **setup}
            except subprocess.TimeoutExpired:
                log(f"{method} S={S}: timed out after {timeout_s} s")
                records.append({**setup, "method": method, "inner_steps": S, "time_s": None,
                                "peak_mem_bytes": None, "error": f"timeout {timeout_s}s"})
                continue
            except FreshProcessError as e:
                log(f"{method} S={S}: failed: {e}")
                records.append({**setup, "method": method, "inner_steps": S, "time_s": None,
                                "peak_mem_bytes": None, "error": str(e)[:300]})
                continue
            if not device.startswith("cuda"):
                try:
                    rec["rss_growth_bytes"] = _in_child({**cfg, "measure": "rss"}, env, timeout_s)["rss_growth_bytes"]
                except (subprocess.TimeoutExpired, FreshProcessError):
                    rec["rss_growth_bytes"] = None
            records.append(rec)
            rss = rec.get("rss_growth_bytes")
            log(f"{method:12s} S={S:3d}  time {rec['time_s']:8.3f} s  ({rec['time_per_inner_step_s']:.3f} s/step)  "
                f"peak +{rec['peak_mem_bytes'] / 2**20:8.1f} MiB"
                + (f"  (RSS +{rss / 2**20:.1f} MiB)" if rss is not None else ""))
    return records


def _setup(base: dict) -> dict:
    return {"model": base["model"], "rater": base["rater"], "image": f"{base['channels']}x{base['image_size']}x{base['image_size']}",
            "batch": base["batch"], "candidates": base["candidates"], "inner_optimizer": base["inner_optimizer"],
            "device": base["device"], "machine": machine_info(base["device"])}


def markdown_table(records: list[dict]) -> str:
    rows = ["| method | S | time (s) | time / inner step (s) | GFLOP / inner step | peak live memory growth (MiB) | RSS growth (MiB) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if r.get("time_s") is None:
            rows.append(f"| {r['method']} | {r['inner_steps']} | {r.get('error', 'failed')} | | | | |")
            continue
        rss, fl = r.get("rss_growth_bytes"), r.get("flops_per_inner_step")
        rows.append(f"| {r['method']} | {r['inner_steps']} | {r['time_s']:.3f} | {r['time_per_inner_step_s']:.3f} | "
                    f"{'' if fl is None else f'{fl / 1e9:.2f}'} | "
                    f"{r['peak_mem_bytes'] / 2**20:.1f} | {'' if rss is None else f'{rss / 2**20:.1f}'} |")
    return "\n".join(rows)


def goal_lines(records: list[dict]) -> list[str]:
    """The issue's goals, checked on these records (reverse memory flat in S; time per step vs unrolled)."""
    ok = {(r["method"], r["inner_steps"]): r for r in records if r.get("time_s") is not None}
    out = []
    steps = sorted({s for _, s in ok})
    if not steps:
        return out
    lo, hi = steps[0], steps[-1]
    for m in ("reverse", "reverse_fwd", "unrolled"):
        if (m, lo) in ok and (m, hi) in ok:
            ratio = ok[(m, hi)]["peak_mem_bytes"] / max(ok[(m, lo)]["peak_mem_bytes"], 1)
            line = f"{m}: peak memory S={hi} / S={lo} = {ratio:.2f}" + (" (goal <= 1.3)" if m.startswith("reverse") else "")
            a, b = ok[(m, hi)].get("rss_growth_bytes"), ok[(m, lo)].get("rss_growth_bytes")
            if a and b:
                line += f"; RSS growth ratio {a / b:.2f}"
            out.append(line)
    for m in dict.fromkeys(r["method"] for r in records if r["method"].startswith("reverse")):
        ratios = [ok[(m, s)]["time_s"] / ok[("unrolled", s)]["time_s"] for s in steps if (m, s) in ok and ("unrolled", s) in ok]
        if ratios:
            out.append(f"{m}: time / unrolled time at equal S: {min(ratios):.2f} .. {max(ratios):.2f} (goal <= 1.3 at S >= 5)")
        flops = [(s, ok[(m, s)]["flops"] / ok[("unrolled", s)]["flops"]) for s in steps
                 if (m, s) in ok and ("unrolled", s) in ok and ok[(m, s)].get("flops") and ok[("unrolled", s)].get("flops")]
        if flops:
            out.append(f"{m}: FLOPs / unrolled FLOPs at equal S: " + ", ".join(f"{r:.2f} (S={s})" for s, r in flops)
                       + ": the floor of the time ratio where compute dominates")
    return out


def plot(records: list[dict], path: str) -> None:
    """Peak memory growth and time per inner step vs S, one line per method (noiserater.plotting style)."""
    r0 = records[0] if records else {}
    setup = (f"{r0.get('model')} + {r0.get('rater')}, {r0.get('image')} images, batch {r0.get('batch')}, "
             f"K={r0.get('candidates')} candidates, {r0.get('inner_optimizer')} inner steps, {r0.get('device')}")
    fig, axes = figure(2, width=5.5, title=f"Cost of one meta-gradient vs inner steps S ({setup})")
    for m in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == m and r.get("time_s") is not None]
        if not rs:
            continue
        S = [r["inner_steps"] for r in rs]
        axes[0].plot(S, [r["peak_mem_bytes"] / 2**20 for r in rs], marker="o", label=m)
        axes[1].plot(S, [r["time_per_inner_step_s"] for r in rs], marker="o", label=m)
    label_axes(axes[0], xlabel="inner steps S", ylabel="peak live memory growth", yunit="MiB", lower_is_better=True,
               title="(a) memory of one meta-gradient")
    label_axes(axes[1], xlabel="inner steps S", ylabel="time per inner step", yunit="s", lower_is_better=True,
               title="(b) time of one meta-gradient / S")
    steps = sorted({r["inner_steps"] for r in records if r.get("time_s") is not None})
    for ax in axes:
        ax.set_xscale("log")
        if steps:  # ticks at the measured S, in plain numbers
            ax.set_xticks(steps, [str(v) for v in steps])
            ax.minorticks_off()
        legend(ax, title="method")
    clock = r0.get("clock", "CUDA wall-clock" if str(r0.get("device", "")).startswith("cuda") else "process CPU time")
    savefig(fig, path, caption=(
        f"Each point: one fresh process per (method, S), median of the timed calls ({clock}); memory: the peak "
        "growth of live allocations over the model and rater already in memory. Failed or timed-out "
        "configurations are left out (see the JSON/table)."))
