"""`noiserater bench train`: training images/s and peak memory, and our step against a plain-PyTorch one.

The benchmark is :mod:`noiserater.bench.train` (what is timed and how memory is measured is described there);
this module parses the options, runs it, prints the table and writes the JSON.
"""

from __future__ import annotations

import click

from ..bench.common import write_result
from ..bench.train import (
    CONFIGS,
    markdown_table,
    run_train_benchmark,
)
from ._options import deprecated_alias


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
    names = [c.strip() for c in configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise click.BadParameter(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}", param_hint="--setups")
    result = run_train_benchmark(names, steps, rounds, warmup, loop_steps, memory, log=lambda m: click.echo(m, err=True))
    if out:
        write_result(out, result)
    click.echo(markdown_table(result["records"]))
    if out:
        click.echo(f"wrote {out}", err=True)
