"""`noiserater bench metagrad`: time and peak memory of one meta-gradient vs the number of inner steps S.

Every (method, S) runs in a fresh Python process on the same model, rater and batches (seeded), so one
configuration's freed-but-cached memory never hides another's growth.

Peak memory (``peak_mem_bytes``): the growth of live memory during one ``meta_gradient`` call over what
the process held just before it (interpreter, torch, model, rater, batches):
- CPU: the peak of glibc's in-use heap (``mallinfo2``: uordblks + hblkhd, i.e. the bytes of live
  allocations, tensors included) sampled after every aten op of the call by a TorchDispatchMode, minus the
  in-use heap before the call. The growth of the resident set (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``; ``ru_maxrss`` without that) is recorded beside it as ``rss_growth_bytes``: it
  also counts memory glibc keeps after a free (fragmentation, its dynamic mmap threshold), which is what
  the process costs but not what the algorithm needs.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocation before.

The live-memory figure is taken after a warm-up call with S=1 (first-call initialisation inside torch is
not the method's memory); ``rss_growth_bytes`` comes from a second fresh process whose first call is
measured cold.

Time (``time_s``): the median of ``--repeats`` calls after the measured one. On CPU it is the process CPU
time with one torch thread (a shared machine's wall clock mostly measures the neighbours; the wall-clock
median is recorded as ``wall_time_s``); on CUDA it is wall-clock time with synchronisation.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

from ._options import SEED, FiniteFloat, deprecated_alias

DEFAULT_METHODS = "unrolled,reverse,reverse_fwd,alignment"


def _build(cfg: dict):
    import torch

    from ..models import build_dit, build_rater

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


def _rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class _HeapPeak:
    """Peak of glibc's in-use heap bytes (``mallinfo2``: uordblks + hblkhd) sampled after every aten op."""

    def __init__(self):
        import ctypes

        class _Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

        try:
            libc = ctypes.CDLL("libc.so.6")
            self._fn = libc.mallinfo2
            self._fn.restype = _Info
            self.available = True
        except (OSError, AttributeError):
            self.available = False

    def in_use(self) -> int:
        m = self._fn()
        return m.uordblks + m.hblkhd

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer.peak = max(outer.peak, outer.in_use())
                return out

        self.before = self.peak = self.in_use()
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def run_child(cfg: dict) -> dict:
    """Measure one configuration in this (fresh) process."""
    import resource

    import torch

    from ..meta import meta_gradient

    torch.set_num_threads(cfg["threads"])
    cuda = cfg["device"].startswith("cuda")
    model, rater, train, val = _build(cfg)

    def call():
        return meta_gradient(model, rater, train, val, inner_lr=cfg["inner_lr"], method=cfg["method"],
                             inner_optimizer=cfg["inner_optimizer"])

    if cfg.get("measure") == "rss":  # its own fresh process: the dispatch mode below allocates too
        rss_before = _status_kb("VmRSS")
        before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reset = rss_before is not None and _rss_reset()
        call()
        if reset:
            return {"rss_growth_bytes": (_status_kb("VmHWM") - rss_before) * 1024}
        return {"rss_growth_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_max) * 1024}
    # Warm-up with S=1 (lazy initialisation of kernels and modules is not the method's memory).
    meta_gradient(model, rater, train[:1], val, inner_lr=cfg["inner_lr"], method=cfg["method"],
                  inner_optimizer=cfg["inner_optimizer"])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        grads = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        mem_method = "torch.cuda.max_memory_allocated growth during the call"
    else:
        heap = _HeapPeak()
        if not heap.available:
            raise RuntimeError("glibc mallinfo2 is not available here; CPU peak memory cannot be measured")
        with heap:
            grads = call()
        peak = heap.peak - heap.before
        mem_method = "peak growth of glibc's in-use heap (mallinfo2), sampled after every aten op of the call"
    gnorm = float(torch.cat([x.reshape(-1) for x in grads]).norm())
    del grads
    cpu_times, wall_times = [], []
    for _ in range(cfg["repeats"]):
        if cuda:
            torch.cuda.synchronize()
        c0, w0 = time.process_time(), time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        cpu_times.append(time.process_time() - c0)
        wall_times.append(time.perf_counter() - w0)
    wall = statistics.median(wall_times)
    t = wall if cuda else statistics.median(cpu_times)
    return {
        "method": cfg["method"], "inner_steps": cfg["inner_steps"], "time_s": t, "peak_mem_bytes": int(peak),
        "time_per_inner_step_s": t / cfg["inner_steps"], "wall_time_s": wall,
        "clock": "cuda wall-clock" if cuda else f"process CPU time, {cfg['threads']} thread(s)",
        "memory": mem_method, "params_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        "meta_grad_norm": gnorm,
    }


@click.command("metagrad")
@deprecated_alias("--steps", "--inner-steps-list")
@deprecated_alias("--rater", "--rater-arch")
@deprecated_alias("--batch", "--batch-size")
@deprecated_alias("--plot", "--figure")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Write the records as JSON to this file: a list of {method, inner_steps, time_s, peak_mem_bytes, "
                   "...}. Without it nothing is written; the table goes to stdout.")
@click.option("--methods", default=DEFAULT_METHODS, show_default=True, help="Comma-separated meta-gradient methods.")
@click.option("--inner-steps-list", "steps", default="1,2,5,10,20", show_default=True,
              help="Comma-separated inner step counts S.")
@click.option("--model", default="DiT-N/2", show_default=True, help="DiT config (random weights).")
@click.option("--rater-arch", "rater", default="Rater-N/2", show_default=True, help="Rater architecture.")
@click.option("--image-size", default=16, show_default=True, type=click.IntRange(min=2), help="Image side (pixels or latents).")
@click.option("--channels", default=1, show_default=True, type=click.IntRange(min=1), help="Image channels.")
@click.option("--batch-size", "batch", default=4, show_default=True, type=click.IntRange(min=1), help="Images per inner batch.")
@click.option("--candidates", default=8, show_default=True, type=click.IntRange(min=2), help="K noises per image.")
@click.option("--inner-optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adam"]),
              help="Inner optimiser (as metatrain --inner-optimizer).")
@click.option("--inner-lr", default=0.01, show_default=True, type=FiniteFloat(min=0, min_open=True), help="Inner learning rate.")
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1), help="Timed calls per configuration.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="torch CPU threads.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--figure", "figure_path", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG figure of memory and time vs S to this file. Without it no figure is written.")
@click.option("--timeout", "timeout_s", default=600, show_default=True, type=click.IntRange(min=1), help="Seconds allowed per configuration.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the random weights, images and noises.")
@click.option("--child", default=None, hidden=True)
def command(json_path, methods, steps, model, rater, image_size, channels, batch, candidates, inner_optimizer, inner_lr,
            repeats, threads, device, figure_path, timeout_s, seed, child) -> None:
    """Meta-gradient cost vs S: one fresh process per (method, S); a Markdown table on stdout, and JSON
    (--json) and a figure (--figure) only where asked."""
    if child is not None:
        click.echo("RESULT " + json.dumps(run_child(json.loads(child))))
        return
    from ..meta import METHODS

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in method_list if m not in METHODS]
    if bad:
        raise click.BadParameter(f"unknown methods {bad}; choose from {', '.join(METHODS)}", param_hint="--methods")
    try:
        step_list = [int(s) for s in steps.split(",")]
    except ValueError:
        raise click.BadParameter(f"{steps!r}: use comma-separated integers like 1,2,5", param_hint="--inner-steps-list") from None
    if any(s < 1 for s in step_list):
        raise click.BadParameter("every S must be >= 1", param_hint="--inner-steps-list")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    base = {"model": model, "rater": rater, "image_size": image_size, "channels": channels, "batch": batch,
            "candidates": candidates, "inner_optimizer": inner_optimizer, "inner_lr": inner_lr, "repeats": repeats,
            "threads": threads, "device": device, "seed": seed}
    records = []
    for method in method_list:
        for S in step_list:
            cfg = {**base, "method": method, "inner_steps": S}
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            try:
                proc = subprocess.run([sys.executable, "-m", "noiserater", "bench", "metagrad", "--child", json.dumps(cfg)],
                                      capture_output=True, text=True, timeout=timeout_s, env=env)
            except subprocess.TimeoutExpired:
                click.echo(f"{method} S={S}: timed out after {timeout_s} s", err=True)
                records.append({**_setup(base), "method": method, "inner_steps": S, "time_s": None,
                                "peak_mem_bytes": None, "error": f"timeout {timeout_s}s"})
                continue
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                click.echo(f"{method} S={S}: failed: {tail}", err=True)
                records.append({**_setup(base), "method": method, "inner_steps": S, "time_s": None,
                                "peak_mem_bytes": None, "error": tail[:300]})
                continue
            rec = {**json.loads(lines[-1][len("RESULT "):]), **_setup(base)}
            if not device.startswith("cuda"):
                rec["rss_growth_bytes"] = _run_rss_child(cfg, env, timeout_s)
            records.append(rec)
            rss = rec.get("rss_growth_bytes")
            click.echo(f"{method:12s} S={S:3d}  time {rec['time_s']:8.3f} s  ({rec['time_per_inner_step_s']:.3f} s/step)  "
                       f"peak +{rec['peak_mem_bytes'] / 2**20:8.1f} MiB"
                       + (f"  (RSS +{rss / 2**20:.1f} MiB)" if rss is not None else ""), err=True)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        from ..checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps(records, indent=2) + "\n")
        click.echo(f"wrote {path}", err=True)
    click.echo(markdown_table(records))
    for line in goal_lines(records):
        click.echo(line)
    if figure_path:
        plot(records, figure_path)
        click.echo(f"wrote {figure_path}", err=True)


def _run_rss_child(cfg: dict, env: dict, timeout_s: int) -> int | None:
    try:
        proc = subprocess.run([sys.executable, "-m", "noiserater", "bench", "metagrad", "--child",
                               json.dumps({**cfg, "measure": "rss"})], capture_output=True, text=True,
                              timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])["rss_growth_bytes"] if lines and proc.returncode == 0 else None


def _setup(base: dict) -> dict:
    return {"model": base["model"], "rater": base["rater"], "image": f"{base['channels']}x{base['image_size']}x{base['image_size']}",
            "batch": base["batch"], "candidates": base["candidates"], "inner_optimizer": base["inner_optimizer"],
            "device": base["device"], "machine": platform.processor() or platform.machine()}


def markdown_table(records: list[dict]) -> str:
    rows = ["| method | S | time (s) | time / inner step (s) | peak live memory growth (MiB) | RSS growth (MiB) |",
            "|---|---:|---:|---:|---:|---:|"]
    for r in records:
        if r.get("time_s") is None:
            rows.append(f"| {r['method']} | {r['inner_steps']} | {r.get('error', 'failed')} | | | |")
            continue
        rss = r.get("rss_growth_bytes")
        rows.append(f"| {r['method']} | {r['inner_steps']} | {r['time_s']:.3f} | {r['time_per_inner_step_s']:.3f} | "
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
    for m in ("reverse", "reverse_fwd"):
        ratios = [ok[(m, s)]["time_s"] / ok[("unrolled", s)]["time_s"] for s in steps if (m, s) in ok and ("unrolled", s) in ok]
        if ratios:
            out.append(f"{m}: time / unrolled time at equal S: {min(ratios):.2f} .. {max(ratios):.2f} (goal <= 2)")
    return out


def plot(records: list[dict], path: str) -> None:
    """Peak memory growth and time per inner step vs S, one line per method (noiserater.plotting style)."""
    from ..plotting import figure, label_axes, legend, savefig

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
