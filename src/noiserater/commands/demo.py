"""`noiserater demo`: the paper's protocol at demo scale (`reproduce --preset digits-quick`), then the report.

Pretrains a tiny DiT on the bundled 8x8 digits, meta-trains a rater on the frozen checkpoint, continues
training with vanilla noise, max_norm and the rater over two seeds, evaluates every run, writes
``report.md`` with its plots, draws a sample grid from the rater-trained model and prints the headline
table. The body is :func:`run_demo`, so tests and notebooks call the same code as the command.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..checkpoint import atomic_write_text
from ..sampling import sample_from_checkpoint, save_grid
from ..study.presets import paper_table
from ..study.reproduce import get_preset, reproduce
from ..study.reproduce_report import format_mean_ci, format_vs_vanilla, load_results
from .reproduce import SET_HELP, study_overrides

DEMO_PRESET = "digits-quick"
SMOKE_TEST_BANNER = (
    "> **Smoke test, not evidence.** This is the demo: a tiny DiT pretrained briefly, a rater meta-trained for "
    "only a few outer steps, two seeds. Its numbers show that the pipeline runs end to end. For the evidence "
    "(every arm against its equal-cost control, on a test split nobody selects with) see the published "
    "studies: [docs/results/evidence-digits/report.md](../docs/results/evidence-digits/report.md) and "
    "[docs/results/evidence-fashion-mnist/report.md](../docs/results/evidence-fashion-mnist/report.md).\n\n"
)


@dataclass
class DemoResult:
    """What the demo produced; ``rows`` is the headline table (one dict per policy of Table 1)."""

    out_dir: Path
    grid: Path
    report: Path
    checkpoint: Path
    rows: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


def run_demo(out_dir: str | Path = "demo", *, preset: str = DEMO_PRESET, sample_steps: int = 50,
             cfg_scale: float = 2.0, log=print, **overrides) -> DemoResult:
    """Run ``reproduce`` for ``preset`` (with ``overrides`` of its fields) under ``out_dir``, then sample a
    10 x 10 grid (rows = classes 0-9) from the seed-0 continuation with the rater at the preset's k.

    Running it again continues an interrupted demo; finished stages are skipped.
    """
    p = get_preset(preset, **overrides)
    t0 = time.perf_counter()
    result = reproduce(p, out_dir, log=log)
    out = Path(out_dir)
    report = Path(result["report"])
    if preset == DEMO_PRESET and not report.read_text().startswith("> **Smoke test"):
        atomic_write_text(report, SMOKE_TEST_BANNER + report.read_text())
    main = json.loads((out / "report.json").read_text())["tables"].get("main", [])
    runs = load_results(out)
    runs = runs[(runs["table"] == "main") & (runs["seed"] == p.seeds[0])]
    k = p.headline_k if p.headline_k in p.ks else p.ks[0]
    pick = runs[(runs["policy"] == "rater") & (runs["k"] == k)]
    ckpt = Path((pick if len(pick) else runs).iloc[0]["checkpoint"])
    samples, _ = sample_from_checkpoint(ckpt, num=100, labels="cycle", cfg_scale=cfg_scale, steps=sample_steps, seed=0)
    grid_order = samples.reshape(10, 10, *samples.shape[1:]).transpose(0, 1).reshape(samples.shape)
    grid = out / "samples.png"
    save_grid(grid_order, grid, nrow=10)

    def num(r, key):  # report.json writes NaN as null
        v = r.get(key)
        return float("nan") if v is None else v

    rows = [{"policy": r["label"], "seeds": r["seeds"],
             "classifier-FID": format_mean_ci(num(r, "fid_mean"), num(r, "fid_ci"), 2),
             "FID vs vanilla": format_vs_vanilla(num(r, "fid_vs_vanilla_pct"), num(r, "fid_vs_vanilla_ci"), num(r, "fid_p")),
             "held-out loss": format_mean_ci(num(r, "heldout_loss_mean"), num(r, "heldout_loss_ci"), 5),
             "loss vs vanilla": format_vs_vanilla(num(r, "heldout_loss_vs_vanilla_pct"),
                                                  num(r, "heldout_loss_vs_vanilla_ci"), num(r, "heldout_loss_p")),
             "cost": f"{num(r, 'cost_ratio'):.2f}x"} for r in main]
    return DemoResult(out, grid, Path(result["report"]), ckpt, rows, time.perf_counter() - t0)


def format_table(rows: list[dict]) -> str:
    """A plain-text table with aligned columns (keys of the first row)."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    line = "  ".join(k.ljust(widths[k]) for k in keys)
    sep = "  ".join("-" * widths[k] for k in keys)
    body = ["  ".join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join([line, sep, *body])


@click.command("demo")
@click.option("--out", "out_dir", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Study folder: pretrain, raters, runs/, report.md with plots, samples.png.")
@click.option("--preset", default=DEMO_PRESET, show_default=True,
              help="Study scale (see `noiserater reproduce --help`); the demo's is minutes on 2 cores.")
@click.option("--seeds", default=None, type=click.IntRange(min=1),
              help="Override the number of continuation seeds (0..N-1).")
@click.option("--pretrain-steps", default=None, type=click.IntRange(min=2),
              help="Override the pretraining length (stage checkpoints shrink with it).")
@click.option("--continue-steps", default=None, type=click.IntRange(min=1),
              help="Override the continuation length in steps.")
@click.option("--sample-steps", default=50, show_default=True, type=click.IntRange(1, 1000),
              help="DDIM steps for the sample grid (drawn at guidance scale 2.0, stronger than sample's 1.25 so a "
                   "briefly trained model's rows read as their digits; the report's FIDs use the preset's).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def command(out_dir, preset, seeds, pretrain_steps, continue_steps, sample_steps, sets) -> None:
    """The paper's protocol on the bundled 8x8 digits in a few minutes: pretrain, meta-train a rater,
    continue with vanilla / max_norm / rater noise over 2 seeds, evaluate, report, sample grid.

    Run it again with the same options to continue an interrupted demo (finished stages are skipped).
    """
    overrides = study_overrides(preset, seeds, continue_steps, pretrain_steps, sets)
    with warnings.catch_warnings(record=True) as caught:  # library warnings (scipy, matplotlib) would bury
        warnings.simplefilter("always")                    # the progress lines: summarised at the end
        result = run_demo(out_dir, preset=preset, sample_steps=sample_steps, log=click.echo, **overrides)
    click.echo("\nSmoke test: a briefly trained rater on 2 seeds; the published studies are linked from the report.")
    click.echo(f"\n{paper_table('policies')} at demo scale (mean ± 95% interval over seeds; 'vs vanilla' paired over seeds):\n")
    click.echo(format_table(result.rows))
    click.echo(f"\nreport:      {result.report}\nsample grid: {result.grid} (rows = digits 0-9, "
               f"rater-trained model)\ntotal:       {result.wall_s:.0f} s")
    if caught:
        kinds = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:100]}" for w in caught})
        click.echo(f"({len(caught)} library warnings suppressed during the demo; e.g. {kinds[0]})")
