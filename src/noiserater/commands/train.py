"""`noiserater train`: pretrain a DiT, or continue one with a noise-selection policy (paper stage iii)."""

from __future__ import annotations

import click

from ..selection import policy_help
from ..train import TrainConfig, train
from ._options import config_options, deprecated_alias
from ._summary import echo_run_summary

TRAIN_HELP = {
    "data": "Dataset: 'digits' (bundled), 'fashion-mnist' (Debian package), an image folder, or a latent cache.",
    "model": "DiT config: DiT-{S,B,L,XL}/{2,4,8} as in the DiT paper, or tiny CPU configs DiT-T/*, DiT-N/*.",
    "run_dir": "Run folder: config.yaml, metrics.jsonl, tb/, samples/, checkpoints/.",
    "steps": "Total optimiser steps (a resumed run continues up to this number).",
    "batch_size": "Global batch size, split evenly over torchrun processes.",
    "lr": "AdamW learning rate (DiT: 1e-4).",
    "weight_decay": "AdamW weight decay (DiT: 0).",
    "ema_decay": "Decay of the exponential moving average of the weights (DiT: 0.9999 for long runs).",
    "ema_warmup": "EMA warmup: decay min(--ema-decay, (1+n)/(10+n)) at the run's n-th step, so a short run's "
                  "EMA is not dominated by its initial weights (off: the plain --ema-decay from the first step).",
    "grad_clip": "Clip the global gradient norm to this value (0 disables).",
    "amp": "bf16 autocast for the forward pass.",
    "seed": "Seed for initialisation, data order, timesteps, label dropout and noise.",
    "unconditional": "Train without labels (every label is the null class).",
    "label_dropout": "Probability of replacing a label by the null class (classifier-free guidance).",
    "learn_sigma": "Give the DiT 2C output channels as in DiT (only the epsilon half is trained here).",
    "val_fraction": "Fraction of the data held out as the validation split (the rater's meta-validation set).",
    "test_fraction": "Fraction held out as a test split that no training, rater or oracle sees (held-out "
                     "evaluation; 0 = none, as in earlier releases).",
    "split_seed": "Seed of the train/val/test split (default: --seed). Fix it across runs that must share splits.",
    "init_checkpoint": "Continue from this pretrained diffusion checkpoint (weights and EMA, fresh optimiser).",
    "objective": "Training objective: ddpm (epsilon prediction, integer t in [0, 1000)) or flow (rectified flow: "
                 "x_t = (1-t) x0 + t eps, velocity target eps - x0, t in [0, 1]). A checkpoint continues with its own.",
    "time_sampling": "flow: how t is drawn: uniform, or logit-normal (SD3: t = sigmoid(mean + std * N(0, 1))).",
    "logit_mean": "flow, logit-normal: mean of the normal before the sigmoid (SD3: 0).",
    "logit_std": "flow, logit-normal: standard deviation of the normal before the sigmoid (SD3: 1).",
    "policy": "Noise selection (the policies of noiserater.selection's registry; this text is generated from it).",
    "candidates": "Number k of candidate noises per image (vanilla: 1; batch_ot, class_ot: 1 or more; every other "
                  "policy: 2 or more).",
    "rater": "Rater checkpoint (from `noiserater metatrain`) for rater, rater_sample and rater_soft; the "
             "initial rater for rater_online (optional).",
    "temperature": "Softmax temperature of the rater's scores: rater_soft's weights, rater_sample's draw.",
    "noise_scale": "Multiply every chosen noise (input and target) by C, in [0.25, 4]: the k=1 control of a "
                   "policy that changes the noise's norm (max_norm at k=4 is a scale of about 1.09 at d=64, "
                   "1.02 at d=1024; `noiserater.selection.max_norm_scale(d, k)`). 1 = plain N(0, I) noise.",
    "input_perturbation": "DDPM-IP (Ning et al. 2023, arXiv 2301.11706): build x_t from eps + GAMMA * xi with a "
                          "fresh xi ~ N(0, I) while the target stays eps; GAMMA in [0, 1], the paper uses 0.1, "
                          "0 = off.",
    "oracle_val_batch": "Oracle policies: meta-validation (image, timestep, noise) triples per validation gradient.",
    "oracle_every": "Oracle policies: recompute the validation gradient every N steps (N > 1: the amortised oracle).",
    "online_every": "rater_online: re-distil the rater onto the oracle at the current weights every N steps.",
    "online_steps": "rater_online: Adam steps of distillation per refresh.",
    "online_batch": "rater_online: training images per distillation step (each with k candidates).",
    "online_lr": "rater_online: Adam learning rate of the distillation.",
    "online_rater": "rater_online: rater architecture (as metatrain --rater-arch) when --rater gives no initial rater.",
    "distill_temperature": "rater_online: temperature of the oracle's standardised ranking used as the target.",
    "log_every": "Write a metrics.jsonl line every this many steps.",
    "sample_every": "Write a sample grid (EMA weights, the objective's sampler) every this many steps.",
    "ckpt_every": "Write a checkpoint every this many steps (always at the end and on SIGINT/SIGTERM).",
    "sample_steps": "Sampling steps (DDIM, or Euler/Heun for flow) for the periodic sample grids.",
    "sampler": "Sampler of the periodic sample grids: ddim (ddpm), euler or heun (flow); default: the objective's.",
    "cfg_scale": "Classifier-free guidance scale of the periodic sample grids only (training is unaffected); 1.25 "
                 "as `noiserater sample`: mild guidance for grids to look at.",
    "max_bad_steps": "Stop after this many non-finite losses/gradients in a row (each one is skipped).",
    "compile": "torch.compile the model for training.",
    "tf32": "Allow TF32 matmuls and convolutions on CUDA (faster fp32 on Ampere and newer; as DiT trains).",
    "grad_checkpointing": "Recompute each DiT block in the backward pass: much less activation memory for large "
                          "DiTs at about 30% more compute; gradients are unchanged.",
    "tensorboard": "Write TensorBoard logs under RUN_DIR/tb.",
    "progress": "Show a progress bar.",
    "device": "Device: auto (CUDA when available), cpu, cuda or cuda:N.",
}


class _TrainCommand(click.Command):
    """``train``: the --policy help is read from the policy registry when help is shown, so a policy
    registered after import (a plugin, a test) is listed too."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for param in self.params:
            if param.name == "policy":
                param.help = policy_help()
        super().format_help(ctx, formatter)


@click.command("train", cls=_TrainCommand)
@deprecated_alias("--online-rater", "--online-rater-arch")
@deprecated_alias("--online-batch", "--online-batch-size")
@deprecated_alias("--oracle-val-batch", "--oracle-val-batch-size")
@config_options(TrainConfig, TRAIN_HELP, flags={"online_rater": "online-rater-arch", "online_batch": "online-batch-size",
                                                "oracle_val_batch": "oracle-val-batch-size"})
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last checkpoint.")
def command(cfg: TrainConfig, resume: bool) -> None:
    """Train a DiT with the DDPM epsilon loss or the rectified-flow velocity loss (EMA, AdamW, checkpoints, exact resume).

    Multi-process: `torchrun --nproc_per_node N -m noiserater train ...` (gloo on CPU, NCCL on GPU).
    """
    echo_run_summary(train(cfg, resume=resume), "step")
