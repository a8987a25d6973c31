"""`noiserater metatrain`: meta-learn a noise rater on top of a frozen diffusion checkpoint (paper stage ii)."""

from __future__ import annotations

import click

from ..metatrain import MetaTrainConfig, metatrain
from ._options import config_options, deprecated_alias
from ._summary import echo_run_summary

METATRAIN_HELP = {
    "checkpoint": "Frozen diffusion checkpoint to meta-train on (a `noiserater train` run's checkpoints/latest.pt). Required.",
    "run_dir": "Run folder: config.yaml, metrics.jsonl, inner_lr_sweep.json, rater.pt, checkpoints/.",
    "rater": "Rater architecture: Rater-{S,B,M,T,N}/{2,4,8} (S is the paper's; N is cheap on CPU) or FastRater-*.",
    "ablation": "Rater inputs (paper Table 2): full, no_timestep, no_image, no_image_class, noise_only.",
    "objective": "Meta-objective: bilevel: meta-gradient through S inner steps (the paper); distill: fit the rater's "
                 "within-group softmax to the alignment oracle <grad L_val, grad l_k> at the frozen checkpoint (no "
                 "inner steps). The diffusion objective (ddpm/flow) is the checkpoint's.",
    "outer_steps": "Number of rater updates (a resumed run continues up to this number).",
    "inner_steps": "S: inner optimiser steps on the diffusion model per outer step (paper: 5).",
    "candidates": "K: grouped noises per image whose weights the rater sets (paper: 8).",
    "batch_size": "Images per inner batch, global over all processes (each with K noises).",
    "val_batch_size": "Images per validation batch (validation split of the checkpoint's dataset), global.",
    "method": "Meta-gradient: reverse (exact, memory flat in S), reverse_fwd (exact, forward-over-reverse), "
              "unrolled (exact, memory grows with S), alignment (Theorem 4.2 first-order estimate), implicit_cg / "
              "implicit_neumann (Theorem 4.1 at theta_S as if it were the inner optimum: biased, cost flat in S).",
    "implicit_damping": "implicit_*: damping added to the Hessian, (H + damping I) v = grad L_val "
                        "(default 1/(S * inner lr)).",
    "implicit_iterations": "implicit_*: Hessian-vector products per solve (CG iterations or Neumann terms).",
    "memory_budget": "reverse / reverse_fwd: the number of last inner steps whose gradient graph the forward sweep "
                     "keeps, so the backward sweep does not rebuild them: 0 = memory-flat (each step's gradient "
                     "computed twice), --inner-steps = the memory and compute of unrolled.",
    "implicit_alpha": "implicit_neumann: step size of the Neumann series, < 2 / largest Hessian eigenvalue "
                      "(default: the inner lr).",
    "inner_optimizer": "Inner optimiser: sgd, or adam (betas 0.9/0.999, eps 1e-8, fresh state each outer step).",
    "inner_lr": "Inner learning rate, or 'auto': a short sweep picks the lr with the largest uniform inner gain.",
    "sweep_lrs": "Comma-separated inner lrs tried by --inner-lr auto (default: 1e-4..1 for sgd, 1e-6..1e-3 for adam).",
    "sweep_steps": "Outer batches averaged per lr in the --inner-lr auto sweep.",
    "temperature": "Softmax temperature of the group weights w = softmax(scores / T).",
    "lr": "Adam learning rate of the rater.",
    "weight_decay": "Adam weight decay of the rater.",
    "grad_clip": "Clip the meta-gradient's global norm to this value (0 disables).",
    "carry_inner": "Carry the inner weights theta_S on to the next outer step instead of restarting from the checkpoint.",
    "label_dropout": "Label dropout of the inner and validation batches (default: the checkpoint's training value).",
    "use_ema": "Start from the checkpoint's EMA weights instead of its raw weights (the ones training continues from).",
    "data": "Dataset (default: the one the checkpoint was trained on; its train/val split is reused).",
    "seed": "Seed for the rater's initialisation and every batch, timestep and noise.",
    "log_every": "Write a metrics.jsonl line every this many outer steps.",
    "ckpt_every": "Write a checkpoint every this many outer steps (always at the end and on SIGINT/SIGTERM).",
    "max_bad_steps": "Stop after this many non-finite meta-gradients in a row (each one is skipped).",
    "distill_val_batch_size": "distill: meta-validation (image, noise, timestep) draws behind each step's oracle "
                              "validation gradient (redrawn every step), global.",
    "distill_oracle": "distill: align (<grad L_val, grad l_k>, Theorem 4.2; favours large-gradient candidates) or cosine "
                      "(the same over ||grad l_k||: direction only); anti is a diagnostic.",
    "distill_temperature": "distill: temperature of the target softmax over the within-group standardised alignments.",
    "eval_every": "Held-out meta-validation at step 0 and every this many outer steps (make --outer-steps a "
                  "multiple of it to evaluate the final rater); 0 disables it.",
    "eval_batches": "Fixed held-out outer batches (bilevel) or group batches (distill) per held-out evaluation.",
    "heldout_fraction": "Share of the validation split kept apart for the held-out evaluation only (the outer loss "
                        "and the oracle use the rest); 0 keeps none apart.",
    "patience": "Stop after this many held-out evaluations without an improvement beyond one standard error (0: never).",
    "planted_scale": "Sanity check: candidate 0 of every group is this multiple of a standard normal (1: no plant); "
                     "a working meta-training learns to down-weight a harmful plant such as 2.5.",
    "progress": "Show a progress bar.",
    "device": "Device: auto (CUDA when available), cpu, cuda or cuda:N.",
}


@click.command("metatrain")
@deprecated_alias("--rater", "--rater-arch")
@deprecated_alias("--use-ema/--no-use-ema", "--ema")
@deprecated_alias("--objective", "--meta-objective")
@config_options(MetaTrainConfig, METATRAIN_HELP, flags={"rater": "rater-arch", "use_ema": "ema", "objective": "meta-objective"})
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last checkpoint.")
def command(cfg: MetaTrainConfig, resume: bool) -> None:
    """Meta-learn a noise rater through S inner steps on a frozen diffusion checkpoint.

    Each outer step logs the validation loss after rater-weighted and after uniform inner steps on the same
    batches and noises (metrics.jsonl). The rater is written to RUN_DIR/rater.pt, ready for
    `noiserater train --policy rater --rater RUN_DIR/rater.pt`.

    The diffusion objective (ddpm or flow) is the checkpoint's own. `--meta-objective distill` instead fits
    the rater to the alignment oracle's within-group ranking. Every --eval-every steps a held-out check on a part of the validation split the outer loss never sees is
    logged ("eval" records), the best rater kept as RUN_DIR/rater_best.pt and plotted in
    RUN_DIR/heldout_curve.png; --patience stops a run on a plateau.

    Multi-process: `torchrun --nproc_per_node N -m noiserater metatrain ...` (gloo on CPU, NCCL on GPU).
    """
    echo_run_summary(metatrain(cfg, resume=resume), "outer step")
