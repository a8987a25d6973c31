"""What noise selection costs per training step, relative to vanilla (``noiserater bench selection``).

One process times every (policy, rater, k) configuration on the same DiT, batch and machine, in rounds:
each round runs every configuration once (in a shuffled order, vanilla five times spread over the
round), so slow drifts of a shared machine hit all configurations alike. ``step_time_s`` is the median
over rounds and ``ratio_vs_vanilla`` the median over rounds of (step time / that round's median vanilla
step time).

Clock: on CUDA, wall-clock time with synchronisation. On CPU the default is the process CPU time with one
torch thread (``--clock cpu --threads 1``): on a machine shared with other jobs, wall-clock time mostly
measures the neighbours, while the CPU time of a single-threaded process measures the work. Wall-clock
times and ratios are recorded beside it (``wall_step_time_s``, ``ratio_vs_vanilla_wall``).

A "training step" is the step :func:`noiserater.train.train` takes, by its own functions
(:class:`noiserater.bench.common.TrainingStep`): index the batch, draw the step's timesteps, label dropout
and k candidates per image, select (or weight, for ``rater_soft``), forward, loss, backward, clip, AdamW
(``make_adamw``: fused on CPU and CUDA), EMA update. Every configuration steps the same DiT and optimiser.

Peak memory (``peak_mem_bytes``) = the bytes of the persistent tensors this configuration needs (DiT,
EMA copy, AdamW state, its rater) + the peak growth of live memory during one step
(:func:`noiserater.bench.common.live_memory_probe`: on CUDA ``max_memory_allocated`` minus the allocation
before the step; on CPU the peak of glibc's in-use heap (``mallinfo2``) sampled after every aten op of the
step (forward, backward, optimiser) minus the in-use heap before it).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ConfigError
from ..models import build_rater
from ..selection import get_policy, min_cost_assignment, squared_distances
from ..train import TrainConfig
from .common import TrainingStep, live_memory_probe, machine_info, ratio_stats, tensor_bytes, time_call

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
    for policy in ("max_norm", "min_norm", "knn", "batch_ot", "class_ot"):
        out += [BenchConfig(policy, None, k) for k in ks]
    for r in raters:
        out += [BenchConfig("rater", r, k) for k in ks]
    for r in soft_raters:
        out += [BenchConfig("rater_soft", r, k) for k in soft_ks]
    return out


class _Stepper:
    """One training run (DiT + AdamW + EMA, :class:`TrainingStep`) shared by all configurations; a policy per
    configuration. The DiT learns sigma, as the paper's DiT-S/2 does."""

    def __init__(self, setup: Setup, configs: list[BenchConfig]):
        self.setup = setup
        self.device = torch.device(setup.device)
        tc = TrainConfig(model=setup.model, batch_size=setup.batch, seed=setup.seed, learn_sigma=True)
        self.runner = TrainingStep(tc, setup.input_size, setup.channels, setup.classes, self.device,
                                   policy=get_policy("vanilla"))
        self.model, self.ema, self.opt = self.runner.model, self.runner.ema, self.runner.opt
        raters = {}
        for name in sorted({c.rater for c in configs if c.rater}):
            raters[name] = build_rater(name, input_size=setup.input_size, in_channels=setup.channels,
                                       num_classes=setup.classes).to(self.device)
        self.rater_params = {n: sum(p.numel() for p in r.parameters()) for n, r in raters.items()}
        self.policies = {c.key: get_policy(c.policy, c.k, rater=raters.get(c.rater)) for c in configs}
        g = torch.Generator().manual_seed(setup.seed)
        B, C, S = setup.batch, setup.channels, setup.input_size
        self.x0 = torch.randn(B, C, S, S, generator=g)  # the data: one batch, in memory
        self.y = torch.randint(0, setup.classes, (B,), generator=g)

    def step(self, cfg: BenchConfig) -> None:
        self.runner(self.x0, self.y, self.policies[cfg.key])

    def timed_step(self, cfg: BenchConfig) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one step."""
        return time_call(lambda: self.step(cfg), self.device)

    def persistent_bytes(self, cfg: BenchConfig) -> int:
        """Bytes of the tensors that live across steps for ``cfg``: DiT, EMA, AdamW state, its rater."""
        total = tensor_bytes(self.model.parameters()) + tensor_bytes(self.ema.parameters())
        total += tensor_bytes(v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v))
        rater = self.policies[cfg.key].rater
        if rater is not None:
            total += tensor_bytes(rater.parameters()) + tensor_bytes(rater.buffers())
        return total

    def step_growth(self, cfg: BenchConfig) -> int:
        """Peak growth of live memory during one step of ``cfg``."""
        with live_memory_probe(self.device) as probe:
            self.step(cfg)
        return probe.growth


def run_benchmark(setup: Setup, configs: list[BenchConfig], repeats: int, memory: bool = True,
                  threads: int | None = None, clock: str = "cpu", log: Callable[[str], object] = print) -> list[dict]:
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
    vanilla_medians: list[tuple[float, float]] = []  # per round: (wall, CPU) median of its vanilla steps
    others = configs[1:]
    t_start = time.perf_counter()
    for r in range(repeats):
        order = others[:]
        rng.shuffle(order)
        slots = {round(i * len(order) / 4) for i in range(5)}  # vanilla 5 times, spread over the round
        v_times = []
        for i in range(len(order) + 1):
            if i in slots:
                v_times.append(stepper.timed_step(vanilla))
            if i < len(order):
                times[order[i].key].append(stepper.timed_step(order[i]))
        times[vanilla.key].extend(v_times)
        vanilla_medians.append((statistics.median(v[0] for v in v_times), statistics.median(v[1] for v in v_times)))
        log(f"round {r + 1}/{repeats}: vanilla {vanilla_medians[-1][pick]:.3f}s ({clock}), "
            f"{time.perf_counter() - t_start:.0f}s elapsed")

    def ratio(cfg: BenchConfig, which: int) -> float:
        if cfg is vanilla:
            return 1.0
        return ratio_stats([t[which] for t in times[cfg.key]], [v[which] for v in vanilla_medians])[0]

    peaks: dict[str, int | None] = {}
    mem_method = None
    if memory:
        probe = live_memory_probe(stepper.device)
        if not probe.available:
            log("memory: glibc mallinfo2 is not available on this system; peak_mem_bytes left empty")
        else:
            mem_method = f"persistent tensors + {probe.method} during one step"
            for cfg in configs:
                peaks[cfg.key] = stepper.persistent_bytes(cfg) + stepper.step_growth(cfg)
    records = []
    for cfg in configs:
        records.append({
            "policy": cfg.policy,
            "rater": cfg.rater,
            "k": cfg.k,
            "step_time_s": statistics.median(t[pick] for t in times[cfg.key]),
            "ratio_vs_vanilla": ratio(cfg, pick),
            "peak_mem_bytes": peaks.get(cfg.key),
            "clock": "process CPU time" if clock == "cpu" else "wall clock",
            "wall_step_time_s": statistics.median(t[0] for t in times[cfg.key]),
            "ratio_vs_vanilla_wall": ratio(cfg, 0),
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


def assignment_cost(batch_sizes: list[int], ks: list[int], shape: tuple[int, int, int], classes: int,
                    device: str = "cpu", repeats: int = 3, seed: int = 0) -> list[dict]:
    """What the exact assignment of ``batch_ot`` / ``class_ot`` costs per training step at each batch size B
    (the images of one process) and k: the squared-distance matrix [B, kB] on ``device`` plus scipy's
    linear_sum_assignment on the CPU, exactly as the policies compute it, on Gaussian images and noises of
    ``shape`` (C, H, W); ``class_ot`` with labels uniform over ``classes``. Median wall and process CPU time
    over ``repeats``."""
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    records = []
    for B in batch_sizes:
        for k in ks:
            x0 = torch.randn((B, *shape), generator=g).to(dev)
            cand = torch.randn((B, k, *shape), generator=g).to(dev)
            y = torch.randint(0, classes, (B,), generator=g).to(dev)
            t = torch.zeros(B, dtype=torch.long, device=dev)
            for policy in ("batch_ot", "class_ot"):
                pol = get_policy(policy, k)
                times = [time_call(lambda: pol.select(x0, t, y, cand), dev) for _ in range(repeats)]
                dist = [time_call(lambda: squared_distances(x0, cand.reshape(B * k, *shape)), dev)[0]
                        for _ in range(repeats)]
                cost = squared_distances(x0, cand.reshape(B * k, *shape))
                solve = [time_call(lambda: min_cost_assignment(cost), dev)[0] for _ in range(repeats)]
                records.append({"kind": "assignment", "policy": policy, "k": k, "batch": B,
                                "input": list(shape), "num_classes": classes if policy == "class_ot" else None,
                                "select_wall_s": statistics.median(w for w, _ in times),
                                "select_cpu_s": statistics.median(c for _, c in times),
                                "distance_wall_s": statistics.median(dist) if policy == "batch_ot" else None,
                                "solve_wall_s": statistics.median(solve) if policy == "batch_ot" else None,
                                "repeats": repeats, "device": device, "machine": machine_info(device)})
    return records


def format_assignment_table(records: list[dict]) -> str:
    """A markdown table of :func:`assignment_cost` records."""
    lines = ["| policy | images B | k | cost matrix | select per step, wall (s) | of which scipy (s) |",
             "|---|---|---|---|---|---|"]
    for r in records:
        solve = f"{r['solve_wall_s']:.4f}" if r.get("solve_wall_s") is not None else "-"
        lines.append(f"| {r['policy']} | {r['batch']} | {r['k']} | {r['batch']} x {r['batch'] * r['k']} | "
                     f"{r['select_wall_s']:.4f} | {solve} |")
    return "\n".join(lines)


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
