"""`noiserater bench selection`: what noise selection costs per training step, relative to vanilla.

One process times every (policy, rater, k) configuration on the same DiT, batch and machine, in rounds:
each round runs every configuration once (in a shuffled order, vanilla five times spread over the
round), so slow drifts of a shared machine hit all configurations alike. ``step_time_s`` is the median
over rounds and ``ratio_vs_vanilla`` the median over rounds of (step time / that round's median vanilla
step time).

Clock: on CUDA, wall-clock time with synchronisation. On CPU the default is the process CPU time with one
torch thread (``--clock cpu --threads 1``): on a machine shared with other jobs, wall-clock time mostly
measures the neighbours, while the CPU time of a single-threaded process measures the work. Wall-clock
times and ratios are recorded beside it (``wall_step_time_s``, ``ratio_vs_vanilla_wall``).

A "training step" is what :func:`noiserater.train.train` does per step: draw k candidates per image,
select (or weight, for ``rater_soft``), forward, loss, backward, clip, AdamW, EMA update.

Peak memory (``peak_mem_bytes``) = the bytes of the persistent tensors this configuration needs (DiT,
EMA copy, AdamW state, its rater) + the peak growth of live memory during one step. On CUDA the growth
is ``max_memory_allocated`` minus the allocation before the step; on CPU it is the peak of glibc's in-use
heap (``mallinfo2``) sampled after every aten op of the step (forward, backward, optimiser) minus the
in-use heap before it.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from dataclasses import dataclass

import click
import torch

from ..speed import machine_info
from ._options import deprecated_alias
from ..config import ConfigError

DEFAULT_RATERS = "Rater-S/2,FastRater-S/2,Rater-M/4,FastRater-M/4,FastRater-T/2"


@dataclass(frozen=True)
class BenchConfig:
    policy: str
    rater: str | None
    k: int

    @property
    def key(self) -> str:
        return f"{self.policy}|{self.rater}|{self.k}"


@dataclass(frozen=True)
class Setup:
    model: str
    input_size: int
    channels: int
    classes: int
    batch: int
    device: str
    seed: int = 0


def build_configs(raters: list[str], ks: list[int], soft_raters: list[str], soft_ks: list[int]) -> list[BenchConfig]:
    out = [BenchConfig("vanilla", None, 1)]
    for policy in ("max_norm", "min_norm", "nearest"):
        out += [BenchConfig(policy, None, k) for k in ks]
    for r in raters:
        out += [BenchConfig("rater", r, k) for k in ks]
    for r in soft_raters:
        out += [BenchConfig("rater_soft", r, k) for k in soft_ks]
    return out


class _Stepper:
    """One DiT + AdamW + EMA shared by all configurations; a policy per configuration."""

    def __init__(self, setup: Setup, configs: list[BenchConfig]):
        from ..diffusion import GaussianDiffusion
        from ..models import build_dit, build_rater
        from ..selection import SelectionPolicy

        torch.manual_seed(setup.seed)
        self.setup = setup
        self.device = torch.device(setup.device)
        self.model = build_dit(setup.model, input_size=setup.input_size, in_channels=setup.channels,
                               num_classes=setup.classes, learn_sigma=True).to(self.device).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=self.device.type == "cuda" or None)
        self.diffusion = GaussianDiffusion()
        raters = {}
        for name in sorted({c.rater for c in configs if c.rater}):
            raters[name] = build_rater(name, input_size=setup.input_size, in_channels=setup.channels,
                                       num_classes=setup.classes).to(self.device)
        self.rater_params = {n: sum(p.numel() for p in r.parameters()) for n, r in raters.items()}
        self.policies = {c.key: SelectionPolicy(c.policy, c.k, raters.get(c.rater)) for c in configs}
        g = torch.Generator().manual_seed(setup.seed)
        B, C, S = setup.batch, setup.channels, setup.input_size
        self.x0 = torch.randn(B, C, S, S, generator=g).to(self.device)
        self.y = torch.randint(0, setup.classes, (B,), generator=g).to(self.device)

    def step(self, cfg: BenchConfig) -> None:
        from ..diffusion import per_sample_loss
        from ..selection import soft_selection_loss

        policy = self.policies[cfg.key]
        x0, y, model, diffusion = self.x0, self.y, self.model, self.diffusion
        B = x0.shape[0]
        t = torch.randint(0, diffusion.num_timesteps, (B,), device=self.device)
        cand = torch.randn((B, cfg.k, *x0.shape[1:]), device=self.device)
        if policy.soft:
            w = policy.weights(x0, t, y, cand)
            k = cfg.k
            loss = soft_selection_loss(
                lambda n: per_sample_loss(model, diffusion, x0.repeat_interleave(k, 0), t.repeat_interleave(k, 0),
                                          y.repeat_interleave(k, 0), n), cand, w)
        else:
            noise, _ = policy.select(x0, t, y, cand)
            loss = per_sample_loss(model, diffusion, x0, t, y, noise).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(model.parameters()), 1e-3)

    def timed_step(self, cfg: BenchConfig) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one step."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        self.step(cfg)
        sync()
        return time.perf_counter() - w0, time.process_time() - c0

    def persistent_bytes(self, cfg: BenchConfig) -> int:
        """Bytes of the tensors that live across steps for ``cfg``: DiT, EMA, AdamW state, its rater."""
        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)

        total = nbytes(self.model.parameters()) + nbytes(self.ema.parameters())
        total += nbytes(v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v))
        rater = self.policies[cfg.key].rater
        if rater is not None:
            total += nbytes(rater.parameters()) + nbytes(rater.buffers())
        return total


def _mallinfo():
    """glibc's ``mallinfo2`` (in-use heap bytes = uordblks + hblkhd), or None where unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    fn.restype = _MallInfo2

    def in_use() -> int:
        m = fn()
        return int(m.uordblks + m.hblkhd)

    return in_use


def _cpu_step_growth(stepper: _Stepper, cfg: BenchConfig, in_use) -> int:
    """Peak growth of the in-use heap during one step, sampled after every aten op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Peak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.peak = in_use()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, in_use())
            return out

    before = in_use()
    with _Peak() as p:
        stepper.step(cfg)
    return max(0, p.peak - before)


def _cuda_step_growth(stepper: _Stepper, cfg: BenchConfig) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    stepper.step(cfg)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def run_benchmark(setup: Setup, configs: list[BenchConfig], repeats: int, memory: bool = True,
                  threads: int | None = None, clock: str = "cpu", log=print) -> list[dict]:
    """Time every configuration in ``repeats`` interleaved rounds; returns the records."""
    if clock not in ("cpu", "wall"):
        raise ConfigError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    if setup.device.startswith("cuda") and clock == "cpu":
        raise ConfigError("--clock cpu measures host CPU time; on CUDA use --clock wall")
    if threads:
        torch.set_num_threads(threads)
    machine = machine_info(setup.device)
    stepper = _Stepper(setup, configs)
    vanilla = configs[0]
    if vanilla.policy != "vanilla":
        raise ConfigError("the first configuration must be vanilla (the reference)")
    for cfg in configs:  # warm-up: allocations, kernel selection, optimizer state
        stepper.step(cfg)
    rng = random.Random(setup.seed)
    pick = 1 if clock == "cpu" else 0
    times: dict[str, list[tuple[float, float]]] = {c.key: [] for c in configs}
    ratios: dict[str, list[float]] = {c.key: [] for c in configs}
    ratios_wall: dict[str, list[float]] = {c.key: [] for c in configs}
    others = configs[1:]
    t_start = time.perf_counter()
    for r in range(repeats):
        order = others[:]
        rng.shuffle(order)
        slots = {round(i * len(order) / 4) for i in range(5)}  # vanilla 5 times, spread over the round
        round_times: dict[str, tuple[float, float]] = {}
        v_times = []
        for i in range(len(order) + 1):
            if i in slots:
                v_times.append(stepper.timed_step(vanilla))
            if i < len(order):
                round_times[order[i].key] = stepper.timed_step(order[i])
        v_med = statistics.median(v[pick] for v in v_times)
        v_med_wall = statistics.median(v[0] for v in v_times)
        times[vanilla.key].extend(v_times)
        ratios[vanilla.key].append(1.0)
        ratios_wall[vanilla.key].append(1.0)
        for key, tt in round_times.items():
            times[key].append(tt)
            ratios[key].append(tt[pick] / v_med)
            ratios_wall[key].append(tt[0] / v_med_wall)
        log(f"round {r + 1}/{repeats}: vanilla {v_med:.3f}s ({clock}), {time.perf_counter() - t_start:.0f}s elapsed")
    peaks: dict[str, int | None] = {}
    mem_method = None
    if memory:
        if stepper.device.type == "cuda":
            mem_method = "persistent tensors + torch.cuda.max_memory_allocated growth during one step"
            for cfg in configs:
                peaks[cfg.key] = stepper.persistent_bytes(cfg) + _cuda_step_growth(stepper, cfg)
        else:
            in_use = _mallinfo()
            if in_use is None:
                log("memory: glibc mallinfo2 is not available on this system; peak_mem_bytes left empty")
            else:
                mem_method = "persistent tensors + peak growth of glibc in-use heap (mallinfo2) during one step"
                for cfg in configs:
                    peaks[cfg.key] = stepper.persistent_bytes(cfg) + _cpu_step_growth(stepper, cfg, in_use)
    records = []
    for cfg in configs:
        records.append({
            "policy": cfg.policy,
            "rater": cfg.rater,
            "k": cfg.k,
            "step_time_s": statistics.median(t[pick] for t in times[cfg.key]),
            "ratio_vs_vanilla": statistics.median(ratios[cfg.key]),
            "peak_mem_bytes": peaks.get(cfg.key),
            "clock": "process CPU time" if clock == "cpu" else "wall clock",
            "wall_step_time_s": statistics.median(t[0] for t in times[cfg.key]),
            "ratio_vs_vanilla_wall": statistics.median(ratios_wall[cfg.key]),
            "rater_params": stepper.rater_params.get(cfg.rater) if cfg.rater else None,
            "model": setup.model,
            "input": [setup.channels, setup.input_size, setup.input_size],
            "num_classes": setup.classes,
            "batch": setup.batch,
            "repeats": repeats,
            "step_times_s": [t[pick] for t in times[cfg.key]],
            "memory_method": mem_method,
            "machine": machine,
        })
    return records


def format_table(records: list[dict]) -> str:
    """A markdown table of the records (policy, rater, k, ratio, step time, peak memory)."""
    lines = ["| policy | rater | rater params | k | ratio vs vanilla | step time (s) | wall ratio | peak memory (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") else "-"
        params = f"{r['rater_params'] / 1e6:.1f}M" if r.get("rater_params") else "-"
        lines.append(f"| {r['policy']} | {r['rater'] or '-'} | {params} | {r['k']} | {r['ratio_vs_vanilla']:.2f} | "
                     f"{r['step_time_s']:.3f} | {r['ratio_vs_vanilla_wall']:.2f} | {mem} |")
    return "\n".join(lines)


def _int_list(text: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{what} must be integers >= 1, got {text!r}")
    return out


@click.command("selection")
@deprecated_alias("--input-size", "--image-size")
@deprecated_alias("--batch", "--batch-size")
@deprecated_alias("--raters", "--rater-archs")
@deprecated_alias("--k", "--candidates-list")
@deprecated_alias("--soft-raters", "--soft-rater-archs")
@deprecated_alias("--soft-k", "--soft-candidates-list")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), required=True,
              help="Write the list of records as JSON to this file (e.g. benchmarks/selection.json).")
@click.option("--model", default="DiT-S/2", show_default=True, help="DiT config being trained.")
@click.option("--image-size", "input_size", default=32, show_default=True, type=click.IntRange(min=1), help="Image/latent side (32 = 256px through the VAE).")
@click.option("--channels", default=4, show_default=True, type=click.IntRange(min=1), help="Image/latent channels.")
@click.option("--classes", default=1000, show_default=True, type=click.IntRange(min=1), help="Number of classes.")
@click.option("--batch-size", "batch", default=2, show_default=True, type=click.IntRange(min=1), help="Batch size (small on CPU; ratios, not absolute numbers).")
@click.option("--rater-archs", "raters", default=DEFAULT_RATERS, show_default=True,
              help="Comma-separated rater architectures for the 'rater' policy.")
@click.option("--candidates-list", "ks", default="1,2,4,8", show_default=True,
              help="Comma-separated candidate counts k.")
@click.option("--soft-rater-archs", "soft_raters", default="FastRater-T/2", show_default=True,
              help="Comma-separated rater architectures for 'rater_soft' (empty to skip).")
@click.option("--soft-candidates-list", "soft_ks", default="2,4", show_default=True,
              help="Comma-separated candidate counts k for rater_soft.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Times each measurement is repeated (interleaved rounds, each config once per round).")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True,
              help="cpu, cuda or cuda:N (default: cuda when available).")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="torch CPU threads (default: 1 with --clock cpu, torch's default otherwise).")
@click.option("--clock", type=click.Choice(["cpu", "wall"]), default=None,
              help="Time with process CPU time (default on CPU) or wall clock (default on CUDA).")
@click.option("--memory/--no-memory", default=True, show_default=True, help="Measure peak memory per config.")
def command(json_path, model, input_size, channels, classes, batch, raters, ks, soft_raters, soft_ks, repeats,
            device, threads, clock, memory) -> None:
    """Step time of each selection policy at k=1,2,4,8 relative to vanilla, and peak memory."""
    from ..checkpoint import write_json
    from ..models import DIT_CONFIGS, RATER_CONFIGS

    if model not in DIT_CONFIGS:
        raise click.BadParameter(f"unknown model {model!r}; choose one of {', '.join(DIT_CONFIGS)}", param_hint="--model")
    rater_list = [r.strip() for r in raters.split(",") if r.strip()]
    soft_list = [r.strip() for r in soft_raters.split(",") if r.strip()]
    for r in rater_list + soft_list:
        if r not in RATER_CONFIGS:
            raise click.BadParameter(f"unknown rater {r!r}; choose from {', '.join(RATER_CONFIGS)}",
                                     param_hint="--rater-archs")
    if repeats < 1 or batch < 1:
        raise click.BadParameter("--repeats and --batch-size must be >= 1")
    setup = Setup(model, input_size, channels, classes, batch, device)
    configs = build_configs(rater_list, _int_list(ks, "--candidates-list"), soft_list, _int_list(soft_ks, "--soft-candidates-list"))
    click.echo(f"{len(configs)} configurations x {repeats} rounds on {device}, {model} batch {batch}", err=True)
    clock = clock or ("wall" if device.startswith("cuda") else "cpu")
    if threads is None and clock == "cpu":
        threads = 1  # process CPU time counts every thread's spinning; one thread measures the work
    records = run_benchmark(setup, configs, repeats, memory=memory, threads=threads, clock=clock,
                            log=lambda m: click.echo(m, err=True))
    write_json(json_path, records)
    click.echo(format_table(records))
