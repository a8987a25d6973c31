"""`noiserater bench train`: training images/s and peak memory, and our step against a plain-PyTorch one.

For each config, one process times two formulations of the same training step, interleaved in rounds
(each round runs ``steps`` steps of each, in alternating order, so slow drifts of a shared machine hit both):

- ``ours``: what :func:`noiserater.train.train` does per step with the vanilla policy: draw the step's
  randomness, index the batch, ``per_sample_loss`` through :class:`noiserater.models.DiT`, backward,
  gradient clipping, AdamW, EMA update.
- ``plain``: :class:`PlainDiT`, the fastest plain-PyTorch formulation of the same function we found on
  CPU: patchify by reshape + one Linear, the adaLN modulation of all blocks in ONE matmul, LayerNorm +
  modulation as ``addcmul``, fused SDPA attention, tanh-GELU, q_sample coefficients precomputed in
  float32, AdamW with ``fused=True`` (supported on CPU), foreach clipping and EMA. Its weights are
  copied from ours (a test checks that both compute the same outputs).

``ratio`` = median over rounds of (ours step time / plain step time); > 1 means ours is slower. The same
ratio of process CPU time is reported too: on a shared machine it is the steadier of the two.
For configs with bundled data the end-to-end ``train()`` loop's images/s is measured too.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size
(``VmHWM``, or ``ru_maxrss`` off Linux) of a fresh subprocess per (config, formulation) that builds the model and runs a few
steps, and its increase over the same process right after building the model (``step_rss_mb``).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..speed import machine_info
from ._options import deprecated_alias


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
    """The vanilla-policy step of :func:`noiserater.train.train` (same calls, same optimiser settings)."""

    def __init__(self, cfg: TrainBenchConfig, device: torch.device, seed: int = 0):
        from ..diffusion import GaussianDiffusion
        from ..models import DiTSpec, build_dit_from_spec
        from ..train import TrainConfig, make_adamw

        torch.manual_seed(seed)
        self.spec = DiTSpec(cfg.model, cfg.size, cfg.channels, cfg.num_classes, False, 0.0)
        self.model = build_dit_from_spec(self.spec).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = make_adamw(self.model.parameters(), 1e-4, 0.0, device)
        self.tc = TrainConfig(model=cfg.model, batch_size=cfg.batch_size)
        self.diffusion = GaussianDiffusion()
        self.cfg, self.device, self.step_i = cfg, device, 0
        g = torch.Generator().manual_seed(seed + 1)
        self.images = torch.randn(max(512, cfg.batch_size), cfg.channels, cfg.size, cfg.size, generator=g).clamp(-1, 1)
        self.labels = torch.randint(0, cfg.num_classes, (self.images.shape[0],), generator=g)

    def step(self) -> None:
        from ..diffusion import per_sample_loss
        from ..run.randomness import batch_indices
        from ..train import draw_step_randomness

        cfg, tc = self.cfg, self.tc
        idx = batch_indices(len(self.images), cfg.batch_size, self.step_i, tc.seed)
        t, y, cand = draw_step_randomness(tc, self.step_i, self.labels[idx], cfg.num_classes,
                                          (cfg.channels, cfg.size, cfg.size), self.diffusion.num_timesteps)
        x0 = self.images[idx].to(self.device)
        t, y, noise = t.to(self.device), y.to(self.device), cand[:, 0].to(self.device)
        loss = per_sample_loss(self.model, self.diffusion, x0, t, y, noise).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        if bool(torch.isfinite(loss.detach()) & torch.isfinite(gnorm)):
            self.opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - tc.ema_decay)
        self.step_i += 1


class _Plain:
    """The same step with :class:`PlainDiT` and the fastest optimiser settings available on the device."""

    def __init__(self, cfg: TrainBenchConfig, device: torch.device, seed: int = 0):
        from ..diffusion import GaussianDiffusion

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(runner, steps: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step, averaged over ``steps`` consecutive steps. CPU time is
    the steadier measure on a shared machine (time spent waiting for a core does not count)."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        runner.step()
    _sync(device)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def bench_speed(cfg: TrainBenchConfig, steps: int, rounds: int, warmup: int, device: torch.device) -> dict:
    runners = {k: f(cfg, device) for k, f in FORMULATIONS.items()}
    for r in runners.values():
        if warmup:
            time_steps(r, warmup, device)
    per = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    ratios, cpu_ratios = [], []
    for i in range(rounds):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        got = {k: time_steps(runners[k], steps, device) for k in order}
        for k, (wall, c) in got.items():
            per[k].append(wall)
            cpu[k].append(c)
        ratios.append(got["ours"][0] / got["plain"][0])
        cpu_ratios.append(got["ours"][1] / got["plain"][1])
    med = {k: statistics.median(v) for k, v in per.items()}
    return {
        "ours_step_s": med["ours"], "plain_step_s": med["plain"],
        "ours_images_per_s": cfg.batch_size / med["ours"], "plain_images_per_s": cfg.batch_size / med["plain"],
        "ratio_ours_over_plain": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "ours_cpu_s_per_step": statistics.median(cpu["ours"]), "plain_cpu_s_per_step": statistics.median(cpu["plain"]),
        "cpu_time_ratio_ours_over_plain": statistics.median(cpu_ratios),
        "rounds": rounds, "steps_per_round": steps,
    }


def bench_train_loop(cfg: TrainBenchConfig, steps: int) -> float | None:
    """images/s of the real ``train()`` loop (second half of ``2*steps`` steps), for bundled datasets."""
    if cfg.data is None:
        return None
    from ..train import TrainConfig, train

    with tempfile.TemporaryDirectory() as d:
        tc = TrainConfig(data=cfg.data, model=cfg.model, run_dir=d + "/run", steps=2 * steps, batch_size=cfg.batch_size,
                         log_every=steps, sample_every=10**9, ckpt_every=10**9, tensorboard=False, progress=False)
        tc.sample_every = tc.ckpt_every = 2 * steps + 1  # no sampling/checkpoint inside the timed window
        train(tc)
        recs = [json.loads(s) for s in Path(d, "run", "metrics.jsonl").read_text().splitlines()]
        return [r for r in recs if r.get("step") == 2 * steps][0]["images_per_s"]


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process. Linux: VmHWM of /proc/self/status, which belongs to the
    current address space (``ru_maxrss`` of a freshly exec'd child still holds its parent's peak at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _memory_child(name: str, which: str, steps: int) -> dict:
    """Runs in a fresh process: RSS after building, peak RSS after ``steps`` steps (MiB)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runner = FORMULATIONS[which](CONFIGS[name], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _peak_rss_bytes()
    for _ in range(steps):
        runner.step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": peak / 2**20, "step_mb": (peak - base) / 2**20, "kind": "cuda_max_memory_allocated"}
    peak = _peak_rss_bytes()
    return {"peak_mb": peak / 2**20, "step_mb": (peak - base) / 2**20, "kind": "cpu_peak_rss"}


def bench_memory(name: str, which: str, steps: int = 3) -> dict:
    code = ("import json,sys; from noiserater.commands.bench_train import _memory_child as m; "
            "print(json.dumps(m(sys.argv[1], sys.argv[2], int(sys.argv[3]))))")
    proc = subprocess.run([sys.executable, "-c", code, name, which, str(steps)], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {name}/{which} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


@click.command("train")
@deprecated_alias("--configs", "--setups")
@deprecated_alias("--rounds", "--repeats")
@deprecated_alias("--out", "--json")
@click.option("--setups", "configs", default=",".join(CONFIGS), show_default=True,
              help=f"Comma-separated benchmark setups to measure: {', '.join(CONFIGS)}.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1),
              help="Training steps per formulation per round.")
@click.option("--repeats", "rounds", default=5, show_default=True, type=click.IntRange(min=1),
              help="Times each measurement is repeated (interleaved rounds; the median over rounds is reported).")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0),
              help="Untimed steps per formulation before the rounds.")
@click.option("--loop-steps", default=50, show_default=True, type=click.IntRange(min=0),
              help="Steps of the timed window of the end-to-end train() loop (0 skips it).")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure peak memory in a fresh subprocess per config and formulation.")
@click.option("--json", "out", default=None, type=click.Path(dir_okay=False),
              help="Write the results as JSON to this file (machine info and one record per config). Without it "
                   "nothing is written; the table goes to stdout.")
def command(configs, steps, rounds, warmup, loop_steps, memory, out) -> None:
    """Training images/s and peak memory; our step vs the fastest plain-PyTorch formulation."""
    from ..checkpoint import write_json

    names = [c.strip() for c in configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise click.BadParameter(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}", param_hint="--setups")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = []
    for name in names:
        cfg = CONFIGS[name]
        click.echo(f"[{name}] timing ours vs plain ({rounds} rounds x {steps} steps)...", err=True)
        rec = {"config": name, **asdict(cfg), **bench_speed(cfg, steps, rounds, warmup, device)}
        if loop_steps:
            click.echo(f"[{name}] end-to-end train() loop...", err=True)
            rec["train_loop_images_per_s"] = bench_train_loop(cfg, loop_steps)
        if memory:
            click.echo(f"[{name}] peak memory (fresh subprocesses)...", err=True)
            rec["memory"] = {w: bench_memory(name, w) for w in FORMULATIONS}
        records.append(rec)
    result = {"benchmark": "train", "machine": machine_info(), "records": records,
              "note": "ratio_ours_over_plain > 1 means our training step is slower than the plain formulation"}
    if out:
        write_json(out, result)
    click.echo(markdown_table(records))
    if out:
        click.echo(f"wrote {out}", err=True)
