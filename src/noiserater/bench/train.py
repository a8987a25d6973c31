"""Training images/s and peak memory, and our step against a plain-PyTorch one (``noiserater bench train``).

For each config, one process times two formulations of the same training step, interleaved in rounds
(each round runs ``steps`` steps of each, in alternating order, so slow drifts of a shared machine hit both):

- ``ours``: the step :func:`noiserater.train.train` takes with the vanilla policy, by train()'s own
  functions (:class:`noiserater.bench.common.TrainingStep`: ``batch_indices``, ``draw_step_randomness``,
  ``train_step`` through :class:`noiserater.models.DiT`, ``apply_update`` with ``make_adamw``'s AdamW,
  fused on CPU and CUDA, and the EMA).
- ``plain``: :class:`PlainDiT`, the fastest plain-PyTorch formulation of the same function we found on
  CPU: patchify by reshape + one Linear, the adaLN modulation of all blocks in ONE matmul, LayerNorm +
  modulation as ``addcmul``, fused SDPA attention, tanh-GELU, q_sample coefficients precomputed in
  float32, AdamW with ``fused=True``, foreach clipping and EMA. Its weights are copied from ours (a test
  checks that both compute the same outputs).

``ratio`` = median over rounds of (ours step time / plain step time); > 1 means ours is slower. The same
ratio of process CPU time is reported too: on a shared machine it is the steadier of the two.
For configs with bundled data the end-to-end ``train()`` loop's images/s is measured too.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size
(``VmHWM``, or ``ru_maxrss`` off Linux) of a fresh subprocess per (config, formulation) that builds the
model and runs a few steps, and its rise over the resident set right after building the model (``step_mb``).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..diffusion import GaussianDiffusion
from ..train import TrainConfig, train
from .common import (
    FreshProcessError,
    PeakRssGrowth,
    TrainingStep,
    default_device,
    in_fresh_process,
    live_memory_probe,
    machine_info,
    peak_rss_bytes,
    ratio_stats,
    time_call,
)


@dataclass(frozen=True)
class TrainBenchConfig:
    name: str
    model: str
    channels: int
    size: int
    num_classes: int
    batch_size: int
    data: str | None = None  # a bundled dataset: also time the end-to-end train() loop


CONFIGS = {
    # the demo's config: DiT-T/2 on 8x8 digits
    "digits-tiny": TrainBenchConfig("digits-tiny", "DiT-T/2", 1, 8, 10, 128, data="digits"),
    # DiT-S/2 on 32x32x4 latents (256px images through the VAE), ImageNet's 1000 classes, small CPU batch
    "dit-s2-latent32": TrainBenchConfig("dit-s2-latent32", "DiT-S/2", 4, 32, 1000, 8),
}


# ---- the plain-PyTorch reference formulation ---------------------------------------------------------


class PlainDiT(nn.Module):
    """The DiT function (no learned sigma) written for speed with plain PyTorch ops; see module docstring."""

    def __init__(self, depth: int, dim: int, heads: int, patch: int, channels: int, size: int, num_classes: int):
        super().__init__()
        self.depth, self.dim, self.heads, self.p, self.c, self.size = depth, dim, heads, patch, channels, size
        self.num_classes = num_classes
        self.grid = size // patch
        self.patch = nn.Linear(channels * patch * patch, dim)
        self.register_buffer("pos", torch.zeros(1, self.grid**2, dim))
        self.t1, self.t2 = nn.Linear(256, dim), nn.Linear(dim, dim)
        self.table = nn.Embedding(num_classes + 1, dim)
        self.ada = nn.Linear(dim, depth * 6 * dim + 2 * dim)  # every block's and the final layer's modulation
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.fc1 = nn.ModuleList(nn.Linear(dim, 4 * dim) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(4 * dim, dim) for _ in range(depth))
        self.out = nn.Linear(dim, patch * patch * channels)
        half = 128
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half))

    @classmethod
    def from_dit(cls, dit) -> "PlainDiT":
        """A PlainDiT computing exactly ``dit``'s function (``dit`` must not learn sigma)."""
        if dit.learn_sigma:
            raise ValueError("PlainDiT mirrors DiTs without learned sigma")
        blocks = dit.blocks
        D = dit.pos_embed.shape[-1]
        m = cls(len(blocks), D, blocks[0].attn.num_heads, dit.patch_size, dit.in_channels, dit.input_size,
                dit.num_classes)
        with torch.no_grad():
            w = dit.x_embedder.proj.weight  # [D, C, p, p] -> [D, C*p*p] (matches the patch flattening below)
            m.patch.weight.copy_(w.reshape(D, -1))
            m.patch.bias.copy_(dit.x_embedder.proj.bias)
            m.pos.copy_(dit.pos_embed)
            m.t1.load_state_dict(dit.t_embedder.mlp[0].state_dict())
            m.t2.load_state_dict(dit.t_embedder.mlp[2].state_dict())
            m.table.weight.copy_(dit.y_embedder.embedding_table.weight)
            ws = [b.adaLN_modulation[1].weight for b in blocks] + [dit.final_layer.adaLN_modulation[1].weight]
            bs = [b.adaLN_modulation[1].bias for b in blocks] + [dit.final_layer.adaLN_modulation[1].bias]
            m.ada.weight.copy_(torch.cat(ws))
            m.ada.bias.copy_(torch.cat(bs))
            for i, b in enumerate(blocks):
                m.qkv[i].load_state_dict(b.attn.qkv.state_dict())
                m.proj[i].load_state_dict(b.attn.proj.state_dict())
                m.fc1[i].load_state_dict(b.mlp.fc1.state_dict())
                m.fc2[i].load_state_dict(b.mlp.fc2.state_dict())
            m.out.load_state_dict(dit.final_layer.linear.state_dict())
        return m

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p, g, D, nh = self.p, self.grid, self.dim, self.heads
        patches = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
        h = torch.addmm(self.patch.bias, patches.reshape(-1, C * p * p), self.patch.weight.t()).view(B, g * g, D)
        h = h + self.pos
        args = t[:, None].float() * self.freqs[None]
        c = self.t2(F.silu(self.t1(torch.cat([torch.cos(args), torch.sin(args)], dim=-1)))) + self.table(y)
        mods = self.ada(F.silu(c)).view(B, -1, 1, D)  # [B, 6*depth+2, 1, D]
        T = g * g
        for i in range(self.depth):
            s1, sc1, g1, s2, sc2, g2 = mods[:, 6 * i: 6 * i + 6].unbind(1)
            a = torch.addcmul(s1, F.layer_norm(h, (D,), eps=1e-6), 1 + sc1)
            q, k, v = self.qkv[i](a).view(B, T, 3, nh, D // nh).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
            h = torch.addcmul(h, g1, self.proj[i](o))
            a = torch.addcmul(s2, F.layer_norm(h, (D,), eps=1e-6), 1 + sc2)
            h = torch.addcmul(h, g2, self.fc2[i](F.gelu(self.fc1[i](a), approximate="tanh")))
        shift, scale = mods[:, -2], mods[:, -1]
        out = self.out(torch.addcmul(shift, F.layer_norm(h, (D,), eps=1e-6), 1 + scale))
        return out.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


# ---- one training step of each formulation -------------------------------------------------------------


class _Ours:
    """The vanilla-policy step of :func:`noiserater.train.train`, taken by :class:`TrainingStep` on a pool of
    random images held in memory (as train() holds a bundled dataset)."""

    def __init__(self, cfg: TrainBenchConfig, device: torch.device, seed: int = 0):
        self.tc = TrainConfig(model=cfg.model, batch_size=cfg.batch_size, seed=seed)
        self.runner = TrainingStep(self.tc, cfg.size, cfg.channels, cfg.num_classes, device)
        self.model, self.cfg, self.device = self.runner.model, cfg, device
        g = torch.Generator().manual_seed(seed + 1)
        self.images = torch.randn(max(512, cfg.batch_size), cfg.channels, cfg.size, cfg.size, generator=g).clamp(-1, 1)
        self.labels = torch.randint(0, cfg.num_classes, (self.images.shape[0],), generator=g)

    def step(self) -> None:
        self.runner(self.images, self.labels)


class _Plain:
    """The same step with :class:`PlainDiT` and the fastest optimiser settings available on the device."""

    def __init__(self, cfg: TrainBenchConfig, device: torch.device, seed: int = 0):
        ours = _Ours(cfg, device, seed)
        self.model = PlainDiT.from_dit(ours.model).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.params = [p for p in self.model.parameters()]
        self.ema_params = [p for p in self.ema.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0, fused=True)
        abar = GaussianDiffusion().alphas_cumprod
        self.sa, self.s1a = abar.sqrt().float().to(device), (1 - abar).sqrt().float().to(device)
        self.images, self.labels, self.cfg, self.device = ours.images.to(device), ours.labels.to(device), cfg, device
        self.gen = torch.Generator(device=device).manual_seed(seed + 2)

    def step(self) -> None:
        B, n = self.cfg.batch_size, self.images.shape[0]
        idx = torch.randint(0, n, (B,), generator=self.gen, device=self.device)
        x0, y = self.images[idx], self.labels[idx]
        t = torch.randint(0, 1000, (B,), generator=self.gen, device=self.device)
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
        x_t = torch.addcmul(self.s1a[t].view(-1, 1, 1, 1) * noise, self.sa[t].view(-1, 1, 1, 1), x0)
        loss = F.mse_loss(self.model(x_t, t, y), noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        if bool(torch.isfinite(loss.detach()) & torch.isfinite(gnorm)):
            self.opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_params, self.params, 0.001)


FORMULATIONS = {"ours": _Ours, "plain": _Plain}


def time_steps(runner, steps: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step, averaged over ``steps`` consecutive steps."""
    def run():
        for _ in range(steps):
            runner.step()

    wall, cpu = time_call(run, device)
    return wall / steps, cpu / steps


def bench_speed(cfg: TrainBenchConfig, steps: int, rounds: int, warmup: int, device: torch.device) -> dict:
    runners = {k: f(cfg, device) for k, f in FORMULATIONS.items()}
    for r in runners.values():
        if warmup:
            time_steps(r, warmup, device)
    wall = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    for i in range(rounds):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        for k in order:
            w, c = time_steps(runners[k], steps, device)
            wall[k].append(w)
            cpu[k].append(c)
    ratio, ratio_min, ratio_max = ratio_stats(wall["ours"], wall["plain"])
    med = {k: statistics.median(v) for k, v in wall.items()}
    return {
        "ours_step_s": med["ours"], "plain_step_s": med["plain"],
        "ours_images_per_s": cfg.batch_size / med["ours"], "plain_images_per_s": cfg.batch_size / med["plain"],
        "ratio_ours_over_plain": ratio, "ratio_min": ratio_min, "ratio_max": ratio_max,
        "ours_cpu_s_per_step": statistics.median(cpu["ours"]), "plain_cpu_s_per_step": statistics.median(cpu["plain"]),
        "cpu_time_ratio_ours_over_plain": ratio_stats(cpu["ours"], cpu["plain"])[0],
        "rounds": rounds, "steps_per_round": steps,
    }


def bench_train_loop(cfg: TrainBenchConfig, steps: int) -> float | None:
    """images/s of the real ``train()`` loop (second half of ``2*steps`` steps), for bundled datasets."""
    if cfg.data is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        tc = TrainConfig(data=cfg.data, model=cfg.model, run_dir=d + "/run", steps=2 * steps, batch_size=cfg.batch_size,
                         log_every=steps, sample_every=2 * steps + 1, ckpt_every=2 * steps + 1, tensorboard=False,
                         progress=False)  # no sampling/checkpoint inside the timed window
        train(tc)
        recs = [json.loads(s) for s in Path(d, "run", "metrics.jsonl").read_text().splitlines()]
        return [r for r in recs if r.get("step") == 2 * steps][0]["images_per_s"]


def _memory_child(name: str, which: str, steps: int) -> dict:
    """Runs in a fresh process: peak memory after ``steps`` steps and its rise over the state right after
    building the model (MiB)."""
    device = default_device()
    runner = FORMULATIONS[which](CONFIGS[name], device)

    def run():
        for _ in range(steps):
            runner.step()

    if device.type == "cuda":
        with live_memory_probe(device) as m:
            run()
        return {"peak_mb": m.peak / 2**20, "step_mb": (m.peak - m.before) / 2**20, "kind": "cuda_max_memory_allocated"}
    with PeakRssGrowth() as m:
        run()
    return {"peak_mb": peak_rss_bytes() / 2**20, "step_mb": m.growth / 2**20, "kind": "cpu_peak_rss"}


def bench_memory(name: str, which: str, steps: int = 3) -> dict:
    """:func:`_memory_child` in a fresh process."""
    try:
        return in_fresh_process(f"{__name__}._memory_child", {"name": name, "which": which, "steps": steps},
                                timeout=1800)
    except FreshProcessError as e:
        raise RuntimeError(f"memory probe for {name}/{which} failed: {e}") from None


def run_train_benchmark(names: list[str], steps: int, rounds: int, warmup: int, loop_steps: int, memory: bool,
                        log: Callable[[str], object] = print) -> dict:
    """The records of every named config (speed, the train() loop unless ``loop_steps`` is 0, memory)."""
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    device = default_device()
    records = []
    for name in names:
        cfg = CONFIGS[name]
        log(f"[{name}] timing ours vs plain ({rounds} rounds x {steps} steps)...")
        rec = {"config": name, **asdict(cfg), **bench_speed(cfg, steps, rounds, warmup, device)}
        if loop_steps:
            log(f"[{name}] end-to-end train() loop...")
            rec["train_loop_images_per_s"] = bench_train_loop(cfg, loop_steps)
        if memory:
            log(f"[{name}] peak memory (fresh subprocesses)...")
            rec["memory"] = {w: bench_memory(name, w) for w in FORMULATIONS}
        records.append(rec)
    return {"benchmark": "train", "machine": machine_info(device), "records": records,
            "note": "ratio_ours_over_plain > 1 means our training step is slower than the plain formulation"}


def markdown_table(records: list[dict]) -> str:
    head = ("| config | model | input | batch | ours img/s | plain img/s | ours/plain wall time (min-max) "
            "| ours/plain CPU time | train() loop img/s | peak RSS ours / plain (MiB) |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in records:
        loop = f"{r['train_loop_images_per_s']:.0f}" if r.get("train_loop_images_per_s") else "-"
        mem = "-"
        if r.get("memory"):
            mem = f"{r['memory']['ours']['peak_mb']:.0f} / {r['memory']['plain']['peak_mb']:.0f}"
        rows.append(f"| {r['config']} | {r['model']} | {r['channels']}x{r['size']}x{r['size']} | {r['batch_size']} "
                    f"| {r['ours_images_per_s']:.3g} | {r['plain_images_per_s']:.3g} "
                    f"| {r['ratio_ours_over_plain']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) "
                    f"| {r['cpu_time_ratio_ours_over_plain']:.3f} | {loop} | {mem} |")
    return "\n".join([head, *rows])
