"""`noiserater analyze ...`: what a rater learned (paper 5.3) and training-stage matching (paper eq. 10)."""

from __future__ import annotations

import json

import click

from ..analysis.rater_stats import AnalyzeConfig, StagesConfig, analyze_rater, analyze_stages, match_stage
from ._options import config_options, deprecated_alias

COMMON_HELP = {
    "num_images": "N: images drawn from the dataset (seeded).",
    "num_noises": "M: candidate noises per image (paper: 16); the same M noises are scored at every t.",
    "timesteps": "Number of normalised timesteps in [0, 1] (11 -> 0.0, 0.1, ..., 1.0; integer t = round(t*(T-1))).",
    "seed": "Seed for the images and noises.",
    "batch_size": "Images per rater forward (each with M noises).",
    "progress": "Show progress bars.",
}

RATER_HELP = {
    "rater": "Rater checkpoint (noiserater metatrain's RUN/rater.pt). Required.",
    "checkpoint": "The diffusion checkpoint the rater was trained on: gives the dataset, its split and label "
                  "handling, and checks the rater fits it.",
    "data": "Dataset to draw images from (default: the checkpoint's).",
    "split": "Split of the dataset: train, val or all (same seeded split as training).",
    "out": "Output folder: analysis.json, stats.npz, spearman_vs_t.png, score_std_vs_t.png, violins_t.png.",
    **COMMON_HELP,
}

STAGES_HELP = {
    "checkpoints": "Comma-separated diffusion checkpoints of one run at different training steps (the stages).",
    "out": "Output folder: stage_<step>/ (rater run and its analysis), stages.json, stages.png, stages_by_t.png "
           "and the by-t figures pooled over stages.",
    "rater": "Rater architecture meta-trained on every stage (same recipe for all; as metatrain --rater-arch).",
    "meta_outer_steps": "Outer (rater) steps of each short meta-training run (paper: 500).",
    "meta_config": "MetaTrainConfig YAML for the other meta-training settings (same for every stage).",
    **COMMON_HELP,
}


@click.group("analyze")
def command() -> None:
    """Rater analysis (paper section 5.3) and training-stage matching (paper eq. 10)."""


@command.command("rater")
@config_options(AnalyzeConfig, RATER_HELP)
def rater_cmd(cfg: AnalyzeConfig) -> None:
    """Score N images x M noises at each timestep: Spearman(score, noise norm) and score std by t.

    Writes analysis.json (statistics by t and pooled), stats.npz (per image and t) and three PNG figures.
    """
    res = analyze_rater(cfg)
    s = res["summary"]
    click.echo(f"{'t':>5}  {'mean Spearman':>13}  {'|rho|<0.1':>9}  {'mean score std':>14}")
    for row in s["by_t"]:
        sp, sd = row["spearman"], row["score_std"]
        click.echo(f"{row['t']:5.2f}  {sp.get('mean', float('nan')):13.3f}  {sp.get('frac_abs_below_0.1', float('nan')):9.2f}  "
                   f"{sd.get('mean', float('nan')):14.4f}")
    click.echo(f"wrote {cfg.out}/analysis.json and {', '.join(s['figures'])}")


@command.command("stages")
@deprecated_alias("--rater", "--rater-arch")
@config_options(StagesConfig, STAGES_HELP, flags={"rater": "rater-arch"})
def stages_cmd(cfg: StagesConfig) -> None:
    """Meta-train a short rater on each checkpoint (same recipe) and plot its statistics against the stage."""
    s = analyze_stages(cfg, log=lambda m: click.echo(m, err=True))
    for row in s["stages"]:
        click.echo(f"step {row['step']:>8}: mean Spearman {row['pooled']['spearman'].get('mean', float('nan')):+.3f}, "
                   f"median score std {row['pooled']['score_std'].get('median', float('nan')):.4f}")
    click.echo(f"wrote {cfg.out}/stages.json and {', '.join(s['figures'])}")


@command.command("match-stage")
@click.option("--source-log", required=True, type=click.Path(dir_okay=False),
              help="metrics.jsonl of the run the rater was trained on (e.g. the small backbone).")
@click.option("--source-step", required=True, type=click.IntRange(min=0), help="Training step of the source checkpoint.")
@click.option("--target-log", required=True, type=click.Path(dir_okay=False),
              help="metrics.jsonl of the run to match (e.g. the larger backbone).")
@click.option("--smooth-window", default=500, show_default=True, type=click.IntRange(min=1),
              help="Centred rolling-mean window, in logged steps (paper: 500).")
@click.option("--stability-window", default=1000, show_default=True, type=click.IntRange(min=0),
              help="W: the target loss must stay at or below the source loss for W logged steps (paper: 1000).")
@click.option("--key", default="loss", show_default=True, help="Metric of the log lines to match.")
def match_cmd(source_log, source_step, target_log, smooth_window, stability_window, key) -> None:
    """Print the target step whose smoothed training loss matches the source step's (paper eq. 10), as JSON."""
    click.echo(json.dumps(match_stage(source_log, source_step, target_log, smooth_window, stability_window, key),
                          indent=2))
