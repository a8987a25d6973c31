"""`noiserater train`: pretrain a DiT, or continue one with a noise-selection policy (paper stage iii)."""

from __future__ import annotations

import json
import sys

import click

from ..train import TrainConfig, train
from ._options import config_options

TRAIN_HELP = {
    "data": "Dataset: 'digits' (bundled), 'fashion-mnist' (Debian package), an image folder, or a latent cache.",
    "model": "DiT config: DiT-{S,B,L,XL}/{2,4,8} as in the DiT paper, or tiny CPU configs DiT-T/*, DiT-N/*.",
    "run_dir": "Run folder: config.yaml, metrics.jsonl, tb/, samples/, checkpoints/.",
    "steps": "Total optimiser steps (a resumed run continues up to this number).",
    "batch_size": "Global batch size, split evenly over torchrun processes.",
    "lr": "AdamW learning rate (DiT: 1e-4).",
    "weight_decay": "AdamW weight decay (DiT: 0).",
    "ema_decay": "Decay of the exponential moving average of the weights (DiT: 0.9999 for long runs).",
    "grad_clip": "Clip the global gradient norm to this value (0 disables).",
    "amp": "bf16 autocast for the forward pass.",
    "seed": "Seed for initialisation, data order, timesteps, label dropout and noise.",
    "unconditional": "Train without labels (every label is the null class).",
    "label_dropout": "Probability of replacing a label by the null class (classifier-free guidance).",
    "learn_sigma": "Give the DiT 2C output channels as in DiT (only the epsilon half is trained here).",
    "val_fraction": "Fraction of the data held out as the validation split (the rater's meta-validation set).",
    "init_checkpoint": "Continue from this pretrained diffusion checkpoint (weights and EMA, fresh optimiser).",
    "policy": "Noise selection: vanilla, max_norm, min_norm, nearest, rater, rater_soft.",
    "candidates": "Number k of candidate noises per image for selection (vanilla: 1).",
    "rater": "Rater checkpoint for the rater and rater_soft policies (from `noiserater metatrain`).",
    "temperature": "Softmax temperature of the rater's group weights (rater_soft).",
    "log_every": "Write a metrics.jsonl line every this many steps.",
    "sample_every": "Write a sample grid (EMA weights, DDIM) every this many steps.",
    "ckpt_every": "Write a checkpoint every this many steps (always at the end and on SIGINT/SIGTERM).",
    "sample_steps": "DDIM steps for the periodic sample grids.",
    "cfg_scale": "Classifier-free guidance scale for the periodic sample grids.",
    "max_bad_steps": "Stop after this many non-finite losses/gradients in a row (each one is skipped).",
    "compile": "torch.compile the model for training.",
    "tf32": "Allow TF32 matmuls and convolutions on CUDA (faster fp32 on Ampere and newer; as DiT trains).",
    "grad_checkpointing": "Recompute each DiT block in the backward pass: much less activation memory for large "
                          "DiTs at about 30% more compute; gradients are unchanged.",
    "tensorboard": "Write TensorBoard logs under RUN_DIR/tb.",
    "progress": "Show a progress bar.",
}


@click.command("train")
@config_options(TrainConfig, TRAIN_HELP)
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last checkpoint.")
def command(cfg: TrainConfig, resume: bool) -> None:
    """Train a DiT with the epsilon loss (EMA, AdamW, checkpoints, exact resume).

    Multi-process: `torchrun --nproc_per_node N -m noiserater train ...` (gloo on CPU, NCCL on GPU).
    """
    summary = train(cfg, resume=resume)
    click.echo(json.dumps(summary, indent=2))
    if summary.get("interrupted"):  # SIGINT/SIGTERM: checkpoint saved; exit 128+signal (130/143) like a shell
        signum = int(summary.get("signal") or 2)
        click.echo(f"interrupted by signal {signum} after step {summary['step']}; checkpoint saved to "
                   f"{summary['checkpoint']}; continue with --resume", err=True)
        sys.exit(128 + signum)
