"""`noiserater signal check`: the alignment oracle's stability and a few-step held-out gain on a checkpoint."""

from __future__ import annotations

import click

from ..analysis.candidate_signal import SignalCheckConfig, format_summary, signal_check
from ..checkpoint import write_json
from ..run.distributed import resolve_device
from ._options import config_options, deprecated_alias

SIGNAL_HELP = {
    "checkpoint": "Diffusion checkpoint (a `noiserater train` run's checkpoints/latest.pt). Required.",
    "k": "Candidate noises per group (chance argmax agreement: 1/k).",
    "groups": "Training groups (images x k noises) whose alignments are compared.",
    "val_images": "Size of each meta-validation draw (image, noise, timestep triples) behind a validation gradient.",
    "steps": "Optimiser steps of the few-step held-out comparison (oracle-chosen vs plain noise; 0 skips it).",
    "seeds": "Independent batch streams of the few-step comparison (its standard error is over these).",
    "batch_size": "Images per few-step training batch (0: the checkpoint's training batch size).",
    "lr": "Learning rate of the few-step comparison (0: the checkpoint's training lr).",
    "optimizer": "adamw (continuing the checkpoint's optimiser state where it fits) or sgd.",
    "eval_draws": "(noise, timestep) draws per held-out image for the held-out loss.",
    "chunk": "Groups per forward-mode product (memory knob).",
    "use_ema": "Use the checkpoint's EMA weights instead of its raw (training) weights.",
    "data": "Dataset (default: the checkpoint's, split as it was trained).",
    "seed": "Seed of every draw.",
}


@click.command("check")
@deprecated_alias("--k", "--candidates")
@deprecated_alias("--use-ema/--no-use-ema", "--ema")
@config_options(SignalCheckConfig, SIGNAL_HELP, flags={"k": "candidates", "use_ema": "ema"})
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the result as JSON here.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def command(cfg: SignalCheckConfig, json_path: str | None, progress: bool) -> None:
    """Is there a per-candidate signal worth learning at this checkpoint? (before hours of metatrain)

    Alignments <grad L_val, grad l_k> from two independent validation draws (Spearman, argmax agreement),
    their correlation with the noise norm and the loss, and N steps choosing noise by the oracle vs plain
    noise, compared on the test split (or the validation half the oracle never sees).
    """
    res = signal_check(cfg, device=resolve_device("auto"), progress=progress)
    if json_path:
        write_json(json_path, res)
    click.echo(format_summary(res))
