"""`noiserater demo`: train a tiny DiT on the bundled digits for a few minutes and write a sample grid.

The body is :func:`run_demo`, so the reproduction pipeline can extend it stage by stage.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from ._options import SEED, FiniteFloat

# Tuned on a 2-core CPU: recognisable digits in about 2-3 minutes (see docs/performance-train.md).
DEMO_DEFAULTS = dict(model="DiT-T/2", steps=1500, batch_size=128, lr=1e-3, ema_decay=0.995, cfg_scale=2.0)


@dataclass
class DemoResult:
    """What the demo produced; ``rows`` is the summary table (one dict per line)."""

    out_dir: Path
    grid: Path
    checkpoint: Path
    rows: list[dict] = field(default_factory=list)


def run_demo(out_dir: str | Path = "demo", *, steps: int = DEMO_DEFAULTS["steps"], model: str = DEMO_DEFAULTS["model"],
             batch_size: int = DEMO_DEFAULTS["batch_size"], lr: float = DEMO_DEFAULTS["lr"],
             ema_decay: float = DEMO_DEFAULTS["ema_decay"], cfg_scale: float = DEMO_DEFAULTS["cfg_scale"],
             sample_steps: int = 50, seed: int = 0, progress: bool = True) -> DemoResult:
    """Stage 1 of the paper's protocol at CPU scale: pretrain a class-conditional DiT on digits, then
    draw one row of samples per class with DDIM + classifier-free guidance. Returns paths and a summary.

    Running it again with the same settings continues an interrupted run (or only re-samples a finished one).
    """
    from ..commands.sample import sample_from_checkpoint
    from ..train import TrainConfig, save_grid, train

    out = Path(out_dir)
    cfg = TrainConfig(data="digits", model=model, run_dir=str(out / "pretrain"), steps=steps, batch_size=batch_size,
                      lr=lr, ema_decay=ema_decay, seed=seed, cfg_scale=cfg_scale, sample_steps=sample_steps,
                      log_every=max(1, min(100, steps // 10 or 1)), sample_every=max(steps, 1),
                      ckpt_every=max(1, min(500, steps)), progress=progress)
    t0 = time.perf_counter()
    summary = train(cfg, resume=True)
    train_s = time.perf_counter() - t0
    ckpt = Path(summary["checkpoint"])
    t1 = time.perf_counter()
    samples, _ = sample_from_checkpoint(ckpt, num=100, labels="cycle", cfg_scale=cfg_scale, steps=sample_steps,
                                        seed=seed)
    sample_s = time.perf_counter() - t1
    # rows = classes 0..9, columns = 10 samples each
    grid_order = samples.reshape(10, 10, *samples.shape[1:]).transpose(0, 1).reshape(samples.shape)
    grid = out / "samples.png"
    save_grid(grid_order, grid, nrow=10)
    metrics = [json.loads(s) for s in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines() if s.strip()]
    speeds = [m["images_per_s"] for m in metrics if m.get("images_per_s")]
    rows = [
        {"stage": "pretrain", "what": f"{model} on digits (8x8, 10 classes)", "value": f"{summary['step']} steps"},
        {"stage": "pretrain", "what": "final training loss", "value": _fmt(summary.get("final_loss"))},
        {"stage": "pretrain", "what": "training speed", "value": f"{_median(speeds):.0f} img/s" if speeds else "-"},
        {"stage": "pretrain", "what": "wall time", "value": f"{train_s:.0f} s"},
        {"stage": "sample", "what": f"100 samples, DDIM {sample_steps} steps, CFG {cfg_scale}",
         "value": f"{sample_s:.1f} s"},
        {"stage": "sample", "what": "sample grid (rows = classes 0-9)", "value": str(grid)},
    ]
    return DemoResult(out, grid, ckpt, rows)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def format_table(rows: list[dict]) -> str:
    """A plain-text table with aligned columns."""
    keys = ["stage", "what", "value"]
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    line = "  ".join(k.ljust(widths[k]) for k in keys)
    sep = "  ".join("-" * widths[k] for k in keys)
    body = ["  ".join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join([line, sep, *body])


@click.command("demo")
@click.option("--out", "out_dir", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Output folder: pretrain/ (a run folder), samples.png.")
@click.option("--steps", default=DEMO_DEFAULTS["steps"], show_default=True, type=click.IntRange(min=1),
              help="Training steps (fewer = faster, blurrier digits).")
@click.option("--model", default=DEMO_DEFAULTS["model"], show_default=True, help="DiT config.")
@click.option("--batch-size", default=DEMO_DEFAULTS["batch_size"], show_default=True, type=click.IntRange(min=1),
              help="Training batch size.")
@click.option("--lr", default=DEMO_DEFAULTS["lr"], show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="AdamW learning rate (higher than DiT's 1e-4: the demo is short).")
@click.option("--sample-steps", default=50, show_default=True, type=click.IntRange(1, 1000), help="DDIM steps.")
@click.option("--cfg-scale", default=DEMO_DEFAULTS["cfg_scale"], show_default=True, type=FiniteFloat(min=0),
              help="Classifier-free guidance scale for the sample grid.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed for everything.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def command(out_dir, steps, model, batch_size, lr, sample_steps, cfg_scale, seed, progress) -> None:
    """Train a tiny DiT on the bundled 8x8 digits (a few minutes on a laptop CPU) and write a sample grid.

    Run it again with the same options to continue an interrupted demo (Ctrl-C saves a checkpoint).
    """
    result = run_demo(out_dir, steps=steps, model=model, batch_size=batch_size, lr=lr, cfg_scale=cfg_scale,
                      sample_steps=sample_steps, seed=seed, progress=progress)
    click.echo(format_table(result.rows))
    click.echo(f"\nsample grid: {result.grid}\ncheckpoint:  {result.checkpoint}")
