"""`noiserater bench metagrad`: time and peak memory of one meta-gradient vs the number of inner steps S.

The benchmark is :mod:`noiserater.bench.metagrad` (fresh processes per configuration; what memory and time
mean is described there); this module parses the options, runs it, writes the JSON and the figure where
asked and prints the table and the goal lines.
"""

from __future__ import annotations

import json

import click

from ..bench.common import write_result
from ..bench.metagrad import (
    DEFAULT_METHODS,
    goal_lines,
    markdown_table,
    parse_method,
    plot,
    run_child,
    run_metagrad_benchmark,
)
from ..meta import METHODS
from ._options import SEED, FiniteFloat, deprecated_alias


@click.command("metagrad")
@deprecated_alias("--steps", "--inner-steps-list")
@deprecated_alias("--rater", "--rater-arch")
@deprecated_alias("--batch", "--batch-size")
@deprecated_alias("--plot", "--figure")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Write the records as JSON to this file: a list of {method, inner_steps, time_s, peak_mem_bytes, "
                   "...}. Without it nothing is written; the table goes to stdout.")
@click.option("--methods", default=DEFAULT_METHODS, show_default=True,
              help="Comma-separated meta-gradient methods; reverse@W / reverse_fwd@W keep the last W inner steps' "
                   "graphs (metatrain --memory-budget W).")
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
    if child is not None:  # the hidden worker: measure one configuration in this process (the library's sweep
        # calls run_child in its fresh processes directly; this entry point stays for scripts that use it)
        click.echo("RESULT " + json.dumps(run_child(json.loads(child))))
        return
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    bad = []
    for m in method_list:
        try:
            parse_method(m)
        except ValueError:
            bad.append(m)
    if bad:
        raise click.BadParameter(f"unknown methods {bad}; choose from {', '.join(METHODS)}, or reverse@W / "
                                 "reverse_fwd@W", param_hint="--methods")
    try:
        step_list = [int(s) for s in steps.split(",")]
    except ValueError:
        raise click.BadParameter(f"{steps!r}: use comma-separated integers like 1,2,5", param_hint="--inner-steps-list") from None
    if any(s < 1 for s in step_list):
        raise click.BadParameter("every S must be >= 1", param_hint="--inner-steps-list")
    records = run_metagrad_benchmark(
        method_list, step_list, model=model, rater=rater, image_size=image_size, channels=channels, batch=batch,
        candidates=candidates, inner_optimizer=inner_optimizer, inner_lr=inner_lr, repeats=repeats, threads=threads,
        device=device, timeout_s=timeout_s, seed=seed, log=lambda m: click.echo(m, err=True))
    if json_path:
        write_result(json_path, records)
        click.echo(f"wrote {json_path}", err=True)
    click.echo(markdown_table(records))
    for line in goal_lines(records):
        click.echo(line)
    if figure_path:
        plot(records, figure_path)
        click.echo(f"wrote {figure_path}", err=True)
