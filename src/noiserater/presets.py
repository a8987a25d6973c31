"""Full-scale presets: the paper's own settings (section 5.1, appendix B), for GPUs and a latent cache.

Each preset is a :class:`FullScalePreset`: the study plan of :class:`noiserater.experiments.ReproducePreset`
(what `noiserater reproduce` runs) plus four plain dicts that say how each stage is configured:

- ``cache``: the `noiserater cache-latents` arguments that make ``data`` (the latent cache folder).
- ``train``: :class:`noiserater.train.TrainConfig` fields for pretraining and continuations (keys are
  TrainConfig field names; the plan's ``batch_size``/``pretrain_lr``/``continue_lr`` win for those).
- ``metatrain``: :class:`noiserater.meta.train.MetaTrainConfig` fields for the rater (stage ii).
- ``eval``: how FID is measured (sampler, steps, samples, guidance, weights, reference, schedule).
- ``hardware``: what the paper ran on and how long it took (to compare costs, not a setting).

Where the paper does not give a number we say so next to our choice (its Table 6, the rater's
hyperparameters, is not in the text we work from).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .experiments import ReproducePreset

# The paper's tables (section 5) by what they show: the one place their numbers live. Study folders are named
# by what they hold (runs/main, runs/ablation, runs/stage-<s>, runs/transfer), never by a table number.
PAPER_TABLES: dict[str, int] = {"policies": 1, "ablations": 2, "k": 3, "transfer": 4, "stages": 5}


def paper_table(what: str) -> str:
    """``"Table N"``: the paper's table that shows ``what`` (a key of :data:`PAPER_TABLES`)."""
    return f"Table {PAPER_TABLES[what]}"


@dataclass
class FullScalePreset(ReproducePreset):
    """A :class:`ReproducePreset` plus the per-stage settings of a GPU-scale run (see module docstring)."""

    cache: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    metatrain: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    description: str = ""


IMAGENET_DIT_S2 = FullScalePreset(
    name="imagenet-dit-s2",
    description="DiT-S/2 on ImageNet 256x256 in sd-vae-ft-mse latents, class-conditional (paper section 5.1, "
                "appendix B). Make the cache first (see `cache`), then pass its folder as data.",
    # --- the study plan (ReproducePreset fields) ---
    data="latents/imagenet256-sdvae",  # the cache-latents --out folder; override with the real path
    model="DiT-S/2",
    batch_size=256,  # global, split over the torchrun processes (4 GPUs x 64)
    pretrain_steps=500_000,  # stage (i) is 400k; Table 5 also attaches raters at 100k and 500k
    pretrain_lr=1e-4,  # AdamW, constant, as DiT
    stage_steps=[100_000, 400_000, 500_000],  # Table 5
    meta_stage=400_000,  # the main rater sits on the 400k checkpoint
    rater="Rater-S/2",  # appendix B.1: DiT-S/2 blocks, dual stream, ~60M parameters
    meta_outer_steps=2_000,  # "we train the noise rater for 2k steps"
    meta_inner_steps=5,  # appendix B.2: 5 inner steps
    meta_candidates=8,  # K in section 4.1 ("e.g., K = 8")
    meta_inner_lr=0.0,  # not in the text (Table 6): 0 = the automatic sweep
    meta_lr=1e-4,  # not in the text (Table 6): our choice
    continue_steps=80_000,  # stage (iii)
    continue_lr=1e-4,
    seeds=[0],  # the paper reports one run per setting
    policies=["max_norm", "min_norm", "rater"],  # Table 1 (vanilla always runs)
    ks=[2, 4, 8],  # Table 3; k=4 is the main setting
    ablations=["no_timestep", "no_image", "no_image_class", "noise_only"],  # Table 2
    ablation_k=4,
    stage_k=2,  # Table 5 uses k=2
    transfer_model="DiT-B/2",  # Table 4 (also DiT-L/2 at 100k); the step is matched by eq. 10
    transfer_steps=300_000,  # enough to reach the matched step (211k for B/2) plus headroom
    transfer_k=2,
    eval_samples=50_000,  # FID-50K
    eval_ddim_steps=250,  # not in the text: DiT's usual 250 sampling steps, here with DDIM (eta = 0)
    eval_extractors="inception",  # FID-50K against the source images (set NOISERATER_INCEPTION_WEIGHTS)
    cfg_scale=1.25,
    heldout_images=5_000,
    heldout_draws=8,
    # --- per-stage settings ---
    cache={"resolution": 256, "flip": True, "latent": "sample", "dtype": "float32",
           "vae": "a local copy of stabilityai/sd-vae-ft-mse (diffusers folder)", "scaling_factor": 0.18215,
           "latent_shape": [4, 32, 32]},
    train={"model": "DiT-S/2", "batch_size": 256, "lr": 1e-4, "weight_decay": 0.0, "ema_decay": 0.9999,
           "label_dropout": 0.1, "learn_sigma": False,  # epsilon-only loss: a variance head would stay untrained
           "grad_clip": 0.0,  # DiT does not clip
           "amp": True, "tf32": True, "compile": False, "grad_checkpointing": False,
           "log_every": 100, "sample_every": 20_000, "ckpt_every": 20_000, "sample_steps": 50, "cfg_scale": 1.25},
    metatrain={"rater": "Rater-S/2", "outer_steps": 2_000, "inner_steps": 5, "candidates": 8, "method": "reverse",
               "inner_optimizer": "sgd", "inner_lr": "auto", "lr": 1e-4, "use_ema": True, "label_dropout": 0.1},
    eval={"metric": "FID-50K", "num_samples": 50_000, "sampler": "ddim", "eta": 0.0, "steps": 250,
          "cfg_scale": 1.25, "cfg_channels": "all", "ema": True, "labels": "random", "extractor": "inception",
          "reference": "ImageNet train, 256x256 center crops (50k images)", "every_steps": 20_000},
    hardware={"gpus": 4, "gpu": "NVIDIA H100", "paper_hours": {
        "pretrain_400k": 22.0, "rater_2k": 4.0, "continue_80k": {"k1": 4.3, "k2": 5.6, "k4": 7.0, "k8": 9.0},
        "dit_b2_continue_80k": {"k1": 5.4, "k2_rater": 6.7}, "dit_l2_continue_80k": {"k1": 9.2, "k2_rater": 10.4}},
        # 400k steps x 256 images / 22 h / 4 GPUs: the paper's DiT-S/2 throughput per GPU
        "paper_images_per_s_per_gpu": round(400_000 * 256 / (22 * 3600) / 4, 1),
        "paper_selection_overhead": {"k2": round(5.6 / 4.3, 2), "k4": round(7.0 / 4.3, 2), "k8": round(9.0 / 4.3, 2)}},
)

PRESETS: dict[str, FullScalePreset] = {"imagenet-dit-s2": IMAGENET_DIT_S2}
