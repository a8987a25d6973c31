"""`noiserater reproduce --preset NAME`: the paper's three-stage protocol, resumable, then the report."""

from __future__ import annotations

import click

from ..config import parse_overrides
from ..study.presets import CPU_PRESETS, FULL_SCALE_PRESETS, get_preset, paper_table
from ..study.reproduce import reproduce


def study_overrides(preset: str, seeds: int | None = None, continue_steps: int | None = None,
                    pretrain_steps: int | None = None, sets: tuple[str, ...] = ()) -> dict:
    """Preset field overrides from the shortcut options and ``--set KEY=VALUE`` (which wins)."""
    base = get_preset(preset)
    overrides: dict = {}
    if seeds is not None:
        overrides["seeds"] = list(range(seeds))
    if continue_steps is not None:
        overrides["continue_steps"] = continue_steps
    if pretrain_steps is not None:  # the stage checkpoints keep their fraction of pretraining
        scale = pretrain_steps / base.pretrain_steps
        overrides.update(pretrain_steps=pretrain_steps,
                         stage_steps=sorted({max(1, min(pretrain_steps, round(s * scale))) for s in base.stage_steps}),
                         meta_stage=max(1, min(pretrain_steps, round(base.meta_stage * scale))))
    overrides.update(parse_overrides(type(base), sets))
    return overrides


SET_HELP = ("Override any preset field, repeatable: --set meta_outer_steps=300 --set 'ks=[2, 4]'. Fields: see "
            "ReproducePreset in noiserater/presets.py (also written to the study's study.json).")


T = paper_table
REPRODUCE_HELP = f"""Pretrain, meta-train raters, continue with every policy over several seeds, evaluate, report.

    Stages: (i) pretrain a DiT (checkpoints kept at the {T('stages')} stages), (ii) meta-train the main rater,
    the {T('ablations')} ablations and the {T('stages')} stage raters on frozen checkpoints, (iii) continue
    training with vanilla, max_norm, min_norm, nearest, rater and rater_soft ({T('policies')}) at each k
    ({T('k')}), then the ablations, stages and the transfer to a larger backbone at the loss-matched step
    ({T('transfer')}), and the rater analysis. A stage whose folder holds a finished result with the same
    settings is skipped.
    """


@click.command("reproduce", help=REPRODUCE_HELP)
@click.option("--preset", "preset", default="digits-quick", show_default=True,
              help=f"Study scale: {', '.join(CPU_PRESETS)} (CPU) or {', '.join(FULL_SCALE_PRESETS)} (GPUs, latent cache).")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Study folder (default runs/reproduce-<preset>). Rerunning skips finished stages.")
@click.option("--seeds", "seeds", default=None, type=click.IntRange(min=1),
              help="Override the number of continuation seeds (0..N-1).")
@click.option("--continue-steps", "continue_steps", default=None, type=click.IntRange(min=1),
              help="Override the continuation length in steps.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def command(preset: str, out: str | None, seeds: int | None, continue_steps: int | None, sets: tuple[str, ...]) -> None:
    """`noiserater reproduce`: see :data:`REPRODUCE_HELP` (the table numbers come from presets.PAPER_TABLES)."""
    p = get_preset(preset, **study_overrides(preset, seeds, continue_steps, sets=sets))
    result = reproduce(p, out or f"runs/reproduce-{preset}", log=click.echo)
    click.echo(f"report: {result['report']}")
