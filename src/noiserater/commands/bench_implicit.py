"""`noiserater bench implicit`: bias of the implicit meta-gradients against `unrolled` on a trained checkpoint.

The measurement is :mod:`noiserater.bench.implicit`; this module parses the options, runs it, writes the
JSON where asked and prints the summary table.
"""

from __future__ import annotations

import click

from ..bench.common import write_result
from ..bench.implicit import DEFAULT_VARIANTS, markdown_table, parse_variants, run_implicit_bias
from ..meta.gradient import IMPLICIT_ITERATIONS
from ._options import SEED, FiniteFloat


@click.command("implicit")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A diffusion checkpoint (`noiserater train`); its raw weights and its own train/val split are used.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Write {setup, summary, records} as JSON to this file. Without it nothing is written.")
@click.option("--methods", "variants", default=DEFAULT_VARIANTS, show_default=True,
              help="Comma-separated implicit methods, each optionally METHOD:DAMPING (default damping 1/(S * inner lr)).")
@click.option("--inner-steps-list", "steps", default="1,5,20", show_default=True, help="Comma-separated inner step counts S.")
@click.option("--outer-batches", "draws", default=3, show_default=True, type=click.IntRange(min=1),
              help="Outer batches (metatrain draws 0..N-1) measured per S.")
@click.option("--inner-lr", default=1e-3, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="Inner SGD learning rate.")
@click.option("--implicit-iterations", "iterations", default=IMPLICIT_ITERATIONS, show_default=True,
              type=click.IntRange(min=1), help="Hessian-vector products per implicit solve.")
@click.option("--implicit-alpha", "alpha", default=None, type=FiniteFloat(min=0, min_open=True),
              help="Neumann step size (default: the inner lr).")
@click.option("--rater-arch", "rater", default="Rater-N/2", show_default=True, help="Rater architecture (fresh, seeded).")
@click.option("--candidates", default=8, show_default=True, type=click.IntRange(min=2), help="K noises per image.")
@click.option("--batch-size", "batch", default=8, show_default=True, type=click.IntRange(min=1), help="Images per inner batch.")
@click.option("--val-batch-size", "val_batch", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per validation batch.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="torch CPU threads.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the rater and of every batch and noise.")
def command(checkpoint, json_path, variants, steps, draws, inner_lr, iterations, alpha, rater, candidates, batch,
            val_batch, threads, seed) -> None:
    """Cosine and norm ratio of implicit_cg / implicit_neumann against unrolled at each S (CPU)."""
    try:
        variant_list = parse_variants(variants)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--methods") from None
    try:
        step_list = [int(s) for s in steps.split(",")]
    except ValueError:
        raise click.BadParameter(f"{steps!r}: use comma-separated integers like 1,5,20", param_hint="--inner-steps-list") from None
    if not step_list or any(s < 1 for s in step_list):
        raise click.BadParameter("every S must be >= 1", param_hint="--inner-steps-list")
    result = run_implicit_bias(checkpoint, step_list, variants=variant_list, draws=draws, inner_lr=inner_lr, rater=rater,
                               candidates=candidates, batch=batch, val_batch=val_batch, iterations=iterations,
                               alpha=alpha, seed=seed, threads=threads, log=lambda m: click.echo(m, err=True))
    if json_path:
        write_result(json_path, result)
        click.echo(f"wrote {json_path}", err=True)
    click.echo(markdown_table(result))
