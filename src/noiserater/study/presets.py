"""The study presets of `noiserater reproduce`, and the paper's table numbers.

- :class:`ReproducePreset`: one scale of the paper's protocol (what :func:`noiserater.study.reproduce.reproduce`
  runs); the CPU scales are :data:`CPU_PRESETS`.
- :class:`FullScalePreset`: the paper's own settings (section 5.1, appendix B), for GPUs and a latent cache
  (:data:`FULL_SCALE_PRESETS`): the study plan plus plain dicts that say how each stage is configured:

  - ``cache``: the `noiserater cache-latents` arguments that make ``data`` (the latent cache folder).
  - ``train``: :class:`noiserater.train.TrainConfig` fields for pretraining and continuations (keys are
    TrainConfig field names; the plan's ``batch_size``/``pretrain_lr``/``continue_lr`` win for those).
  - ``metatrain``: :class:`noiserater.metatrain.MetaTrainConfig` fields for the rater (stage ii).
  - ``eval``: how FID is measured (sampler, steps, samples, guidance, weights, reference, schedule).
  - ``hardware``: what the paper ran on and how long it took (to compare costs, not a setting).

:data:`PRESETS` holds both; :func:`get_preset` returns a validated copy with overrides. Where the paper does
not give a number we say so next to our choice (its Table 6, the rater's hyperparameters, is not in the
text we work from).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import from_dict, require

# The paper's tables (section 5) by what they show: the one place their numbers live. Study folders are named
# by what they hold (runs/main, runs/ablation, runs/stage-<s>, runs/transfer), never by a table number.
PAPER_TABLES: dict[str, int] = {"policies": 1, "ablations": 2, "k": 3, "transfer": 4, "stages": 5}


def paper_table(what: str) -> str:
    """``"Table N"``: the paper's table that shows ``what`` (a key of :data:`PAPER_TABLES`)."""
    return f"Table {PAPER_TABLES[what]}"


@dataclass
class ReproducePreset:
    """One scale of the paper's protocol. Steps are optimiser steps; k lists are candidate counts."""

    name: str
    data: str = "digits"
    model: str = "DiT-T/2"
    batch_size: int = 64
    pretrain_steps: int = 3000
    pretrain_lr: float = 1e-3
    stage_steps: list[int] = field(default_factory=lambda: [300, 1000, 3000])  # Table 5 checkpoints
    meta_stage: int = 3000  # checkpoint the main rater is meta-trained on and continuations start from
    rater: str = "Rater-T/2"
    meta_outer_steps: int = 200
    meta_inner_steps: int = 5
    meta_candidates: int = 8
    meta_inner_lr: float = 0.0  # 0 = automatic sweep
    meta_lr: float = 1e-4
    continue_steps: int = 500
    continue_lr: float = 1e-4
    continue_ema: float = 0.99  # short continuations: the EMA must forget the initial weights (0.99^200 = 0.13)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    headline_k: int = 4  # the headline comparison: rater at this k vs vanilla (the paper's main setting)
    power_seeds: list[int] = field(default_factory=list)  # extra seeds for the headline pair only (power)
    policies: list[str] = field(default_factory=lambda: ["max_norm", "min_norm", "nearest", "rater", "rater_soft"])
    ks: list[int] = field(default_factory=lambda: [2, 4, 8])
    ablations: list[str] = field(default_factory=lambda: ["no_timestep", "no_image", "no_image_class", "noise_only"])
    ablation_k: int = 4
    stage_k: int = 2
    transfer_model: str | None = "DiT-S/4"
    transfer_steps: int = 3000
    transfer_k: int = 2
    eval_samples: int = 1000
    eval_ddim_steps: int = 25
    eval_extractors: str = "classifier"  # "classifier" (small data) or "inception" (needs local weights)
    cfg_scale: float = 1.25
    heldout_images: int = 180
    heldout_draws: int = 8
    analysis_images: int = 64  # images the rater analysis scores (x 16 noises x 11 timesteps)

    def validate(self) -> None:
        require(self.pretrain_steps >= 1, "pretrain_steps", "must be >= 1")
        require(all(0 < s <= self.pretrain_steps for s in self.stage_steps), "stage_steps",
                "each stage must be in [1, pretrain_steps]")
        require(0 < self.meta_stage <= self.pretrain_steps, "meta_stage", "must be in [1, pretrain_steps]")
        require(len(self.seeds) >= 1, "seeds", "need at least one seed")
        require(all(k >= 2 for k in self.ks), "ks", "selection needs k >= 2 (k=1 is vanilla)")
        require(not set(self.power_seeds) & set(self.seeds), "power_seeds", "must not repeat a seed of `seeds`")
        require(self.headline_k >= 2, "headline_k", "selection needs k >= 2")


CPU_PRESETS: dict[str, ReproducePreset] = {
    # The demo: minutes on 2 cores. Small everything; the numbers are a smoke test, not evidence.
    "digits-quick": ReproducePreset(
        # one stage (Table 5's early-stage rater is left to the studies): the demo stays within 5 minutes
        name="digits-quick", pretrain_steps=600, stage_steps=[600], meta_stage=600,
        rater="FastRater-N/2", meta_outer_steps=20, meta_inner_steps=3, meta_candidates=4, meta_inner_lr=1e-3,
        continue_steps=100, seeds=[0, 1], policies=["max_norm", "rater"], ks=[4], ablations=[],
        stage_k=4, transfer_model=None, eval_samples=200, heldout_images=180, heldout_draws=2, analysis_images=32,
    ),
    # The paper's protocol on digits (its first run is archived: docs/results/archive/digits).
    "digits": ReproducePreset(
        name="digits", batch_size=32, pretrain_steps=2000, stage_steps=[300, 2000], meta_stage=2000,
        rater="Rater-N/2", meta_outer_steps=60, meta_inner_steps=3, meta_candidates=8, continue_steps=200,
        continue_lr=1e-4, seeds=[0, 1, 2], power_seeds=list(range(3, 60)), ks=[2, 4, 8], transfer_model="DiT-M/2",
        transfer_steps=4000,
        transfer_k=2, stage_k=2, ablation_k=4, eval_samples=500, eval_ddim_steps=25, heldout_images=180,
        heldout_draws=8,
    ),
    "fashion-mnist": ReproducePreset(
        name="fashion-mnist", data="fashion-mnist", model="DiT-T/4", batch_size=64, pretrain_steps=6000,
        stage_steps=[500, 2000, 6000], meta_stage=6000, rater="Rater-T/4", continue_steps=1000,
        transfer_model="DiT-M/4", transfer_steps=6000, eval_samples=2000, heldout_images=1000,
    ),
}


# ---- full scale (GPUs, a latent cache) ----------------------------------------------------------


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

FULL_SCALE_PRESETS: dict[str, FullScalePreset] = {"imagenet-dit-s2": IMAGENET_DIT_S2}

# every preset `noiserater reproduce --preset` accepts
PRESETS: dict[str, ReproducePreset] = {**CPU_PRESETS, **FULL_SCALE_PRESETS}


def get_preset(name: str, **overrides: Any) -> ReproducePreset:
    """The preset ``name`` (a fresh copy) with ``overrides`` of its fields, type-checked and validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[name]
    return from_dict(type(base), {**dataclasses.asdict(base), **overrides})

