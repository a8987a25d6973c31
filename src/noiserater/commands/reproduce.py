"""`noiserater reproduce --preset NAME`: the paper's three-stage protocol, resumable, then the report."""

from __future__ import annotations

import click

from ..experiments import PRESETS, get_preset, reproduce


@click.command("reproduce")
@click.option("--preset", "preset", default="digits-quick", show_default=True,
              help=f"Study scale: {', '.join(PRESETS)} (CPU) or imagenet-dit-s2 (GPUs, latent cache).")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Study folder (default runs/reproduce-<preset>). Rerunning skips finished stages.")
@click.option("--seeds", "seeds", default=None, type=click.IntRange(min=1),
              help="Override the number of continuation seeds (0..N-1).")
@click.option("--continue-steps", "continue_steps", default=None, type=click.IntRange(min=1),
              help="Override the continuation length in steps.")
def command(preset: str, out: str | None, seeds: int | None, continue_steps: int | None) -> None:
    """Pretrain, meta-train raters, continue with every policy over several seeds, evaluate, report.

    Stages: (i) pretrain a DiT (checkpoints kept at the Table 5 stages), (ii) meta-train the main rater,
    the Table 3 ablations and the Table 5 stage raters on frozen checkpoints, (iii) continue training
    with vanilla, max_norm, min_norm, nearest, rater and rater_soft at each k (Table 1), then the
    ablations, stages and the transfer to a larger backbone at the loss-matched step (Table 2).
    """
    overrides = {}
    if seeds is not None:
        overrides["seeds"] = list(range(seeds))
    if continue_steps is not None:
        overrides["continue_steps"] = continue_steps
    p = get_preset(preset, **overrides)
    result = reproduce(p, out or f"runs/reproduce-{preset}")
    click.echo(f"report: {result['report']}")
