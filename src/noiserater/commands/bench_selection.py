"""`noiserater bench selection`: what noise selection costs per training step, relative to vanilla.

The benchmark is :mod:`noiserater.bench.selection` (what a step is, the clocks and the memory measure are
described there); this module parses the options, runs it, writes the JSON and prints the table.
"""

from __future__ import annotations

import click
import torch

from ..bench.common import write_result
from ..bench.selection import (
    DEFAULT_RATERS,
    Setup,
    assignment_cost,
    build_configs,
    format_assignment_table,
    format_table,
    run_benchmark,
)
from ..models import DIT_CONFIGS, RATER_CONFIGS
from ._options import deprecated_alias


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
@click.option("--assignment-batch-sizes", "assign_sizes", default="", show_default=True,
              help="Comma-separated images per process B at which to time batch_ot / class_ot's exact assignment "
                   "alone (B x kB, at each of --candidates-list); empty to skip.")
def command(json_path, model, input_size, channels, classes, batch, raters, ks, soft_raters, soft_ks, repeats,
            device, threads, clock, memory, assign_sizes) -> None:
    """Step time of each selection policy at k=1,2,4,8 relative to vanilla, and peak memory."""
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
    assign = []
    if assign_sizes.strip():
        assign = assignment_cost(_int_list(assign_sizes, "--assignment-batch-sizes"), _int_list(ks, "--candidates-list"),
                                 (channels, input_size, input_size), classes, device, repeats)
    write_result(json_path, records + assign)
    click.echo(format_table(records))
    if assign:
        click.echo("\n" + format_assignment_table(assign))
