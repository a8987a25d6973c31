"""The evidence study: does any rater beat its equal-cost control? `noiserater evidence`.

Unlike ``reproduce`` (the paper's protocol), every arm here is judged against the control that costs the
same: ``rater_soft`` against ``uniform_soft`` (the same k noises averaged), every one-pass policy against
vanilla. Splits are fixed by one seed for the whole study: the DiT trains on ``train``; raters, the oracle
and the online rater see only ``val`` (meta-validation); the held-out loss is measured on ``test``, which
no training, selection or meta-learning ever touches.

Layout under the study root (every folder resumable, skipped when its ``stage.json`` matches):

- ``pretrain/``: one DiT trained with the study's splits, checkpoints at each of ``stages``;
- ``stage-<s>/rater-<kind>/``: the bilevel and distilled raters meta-trained on that frozen checkpoint;
- ``stage-<s>/runs/<arm>/seed<n>/``: one continuation per (arm, seed), then its evaluation (test-split
  loss overall and by timestep band, classifier-FID / precision / recall / class accuracy of samples).

Runs are ordered seed-major (all arms of seed 0, then of seed 1, ...), so a study stopped early still
compares every arm on the same seeds. ``write_evidence_report`` turns ``results.jsonl`` into the report.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import atomic_write_text, write_json
from ..config import ConfigError, from_dict, require
from ..data import load_dataset
from ..data.datasets import source_dimension
from ..eval.extractors import build_extractor
from ..eval.frechet import feature_stats, frechet_distance
from ..eval.reference import default_reference, reference_features
from ..metatrain import MetaTrainConfig, metatrain
from ..models.loading import load_diffusion, save_rater
from ..models.rater import NoiseRater, RaterSpec
from ..objectives import OBJECTIVES, objective_from_config
from ..run.folder import read_metrics
from ..run.provenance import version_info
from ..selection import dit_passes, equal_cost_control, max_norm_scale, policy_class, policy_norm_scale
from ..train import TrainConfig, train
from .arms import ARMS, BANDS, band_key
from .evidence_report import write_evidence_report
from .reproduce import (
    PRETRAIN_SEED,
    TRAINED_MARKS,
    copy_checkpoint,
    fingerprints,
    finished,
    fixed_triple_losses,
    needs_checkpoints,
    pretrain_segments,
    run_stage,
    sample_metrics,
)
from .reproduce_report import median_throughput


@dataclass
class EvidencePreset:
    """One evidence study. Steps are optimiser steps; seeds come from the power analysis (docs)."""

    name: str
    data: str = "digits"
    objective: str = "ddpm"  # the training objective of every run: ddpm or flow (noiserater.objectives)
    model: str = "DiT-T/2"
    batch_size: int = 64
    pretrain_steps: int = 1500
    pretrain_lr: float = 1e-3
    stages: list[int] = field(default_factory=lambda: [1500, 300])  # mature first: the headline
    split_seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    k: int = 4
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: list(range(12)))
    continue_steps: int = 150
    continue_lr: float = 1e-4
    continue_ema: float = 0.99
    # EMA warmup (decay min(continue_ema, (1+n)/(10+n))): the continuation's EMA forgets the pretrained EMA it
    # starts from (it keeps prod_n (1+n)/(10+n) ~ 1e-15 of it after 150 steps; without warmup 0.99^150 = 22%)
    continue_ema_warmup: bool = True
    online_rater: str = "Rater-N/2"
    oracle_val_batch: int = 256
    rater: str = "Rater-N/2"
    bilevel_outer_steps: int = 300
    bilevel_inner_steps: int = 5
    bilevel_candidates: int = 8
    bilevel_lr: float = 1e-3
    distill_outer_steps: int = 300
    distill_lr: float = 1e-3
    distill_batch_size: int = 32  # groups per distillation step (x k candidates)
    meta_eval_every: int = 25  # held-out meta-validation cadence (outer steps)
    meta_patience: int = 4  # evaluations without an improvement beyond one SE stop meta-training
    eval_samples: int = 500
    eval_ddim_steps: int = 25
    eval_extractors: str = "classifier"
    cfg_scale: float = 1.25
    test_draws: int = 8
    eval_reference_split: str = "test"  # FID against images no run trained on (the study's test split)
    fid_large_samples: int = 2000  # a second FID at this many samples for ``fid_large_arms`` (sample-size bias)
    fid_large_arms: list[str] = field(default_factory=list)
    # FID of every arm also at these sampler step counts (flow: Euler steps; the few-step regime OT claims)
    eval_extra_steps: list[int] = field(default_factory=list)
    random_raters: int = 5  # fresh, never-trained rater initialisations: the null of every rater arm
    random_rater_seeds: list[int] = field(default_factory=list)  # of ``seeds``, those the random raters run (empty: all)
    run_stages: list[int] = field(default_factory=list)  # the stages this invocation continues (empty: all)
    # From scratch (the peers' protocol): when set, every arm trains a fresh DiT (initial weights by its seed) at
    # pretrain_lr and is evaluated at each of these steps, instead of continuing a stage checkpoint. Rater arms
    # use the rater meta-trained on the first of ``stages`` (the study still pretrains for it).
    scratch_steps: list[int] = field(default_factory=list)
    scratch_ema: float = 0.999  # EMA decay of the from-scratch runs (with warmup)

    def validate(self) -> None:
        require(all(0 < s <= self.pretrain_steps for s in self.stages), "stages", "each in [1, pretrain_steps]")
        unknown = [a for a in self.arms if a not in ARMS]
        require(not unknown, "arms", f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
        require(self.k >= 2, "k", "selection needs k >= 2")
        require(len(self.seeds) >= 2, "seeds", "a paired interval needs at least 2 seeds")
        require(self.test_fraction > 0, "test_fraction", "the evidence study evaluates on a test split: set it > 0")
        require(set(self.run_stages) <= set(self.stages), "run_stages", f"each must be one of stages {self.stages}")
        require(self.objective in OBJECTIVES, "objective", f"choose one of {', '.join(OBJECTIVES)}")
        require(self.eval_reference_split in ("all", "test"), "eval_reference_split",
                "use test (held-out images) or all")
        require(set(self.fid_large_arms) <= set(ARMS), "fid_large_arms", f"each must be an arm: {', '.join(ARMS)}")
        require(self.random_raters >= 2 or not any(ARMS[a][3] == "random" for a in self.arms), "random_raters",
                "a null distribution needs at least 2 random initialisations")
        require(all(s >= 1 for s in self.scratch_steps), "scratch_steps", "each evaluation step must be >= 1")
        require(all(n >= 1 for n in self.eval_extra_steps), "eval_extra_steps", "each sampler step count must be >= 1")
        require(0 <= self.scratch_ema < 1, "scratch_ema", "must be in [0, 1)")


# A study is its preset: every setting and the seed plan are fixed here before its runs start, and the shipped
# preset reruns the published study (`noiserater evidence --preset NAME --out DIR`). Seeds: the paired FID spread
# of the earlier digits runs was about 2.6% per seed, so 8 seeds give a +-2.2% interval (t quantile).
CONTROL_ARMS = ["vanilla", "max_norm", "noise_scale", "noise_scale_down", "input_perturbation", "uniform_soft"]
RATER_ARMS = ["rater", "rater_sample", "rater_soft", "rater_random", "rater_random_sample"]
# the arms every rung of the dimension ladder runs (digits runs them inside its fuller arm list)
LADDER_ARMS = ["vanilla", "max_norm", "noise_scale", "input_perturbation", "knn", "rater", "rater_random"]
# from scratch: the peers' couplings, each norm-changing arm with the k=1 control of its noise length
SCRATCH_ARMS = ["vanilla", "max_norm", "noise_scale", "knn", "noise_scale_knn", "batch_ot", "rater", "rater_random"]
NOISE_SCALE_SWEEP = ["noise_scale_x0.95", "noise_scale_x1.05", "noise_scale_x1.15", "noise_scale_x1.25"]
EVIDENCE_PRESETS: dict[str, EvidencePreset] = {
    # digits 8x8 (d=64), DiT-T/2; a 25% test split (449 images) is the FID reference nobody trained on
    "digits": EvidencePreset(
        name="digits", test_fraction=0.25, seeds=list(range(8)), stages=[1500, 300],
        arms=CONTROL_ARMS + RATER_ARMS + NOISE_SCALE_SWEEP, random_raters=5, random_rater_seeds=[0, 1, 2, 3],
        fid_large_arms=["vanilla", "max_norm", "noise_scale", "rater"], bilevel_outer_steps=60,
        meta_eval_every=20, meta_patience=3, test_draws=8),
    # The dimension ladder's Fashion-MNIST points, one recipe (a mature stage, the same 150-step continuation
    # as digits) at d = 1024 (32x32, DiT-T/8, 16 tokens) and d = 256 (the same images averaged to 16x16,
    # DiT-T/4, 16 tokens): the sizes the 2-core CPU affords. Mature: 6000 pretraining steps (8 epochs; the
    # earlier 2000-step stage sampled at FID ~305). Arms cut before seeds to what the ladder fits (rater_sample,
    # uniform_soft, rater_soft and the noise-scale sweep are left to a GPU); the random-rater null runs 5
    # inits on 2 seeds. FID against Fashion-MNIST's official test file (10k images nobody trained on).
    "fashion-mnist": EvidencePreset(
        name="fashion-mnist", data="fashion-mnist", model="DiT-T/8", rater="Rater-N/8", online_rater="Rater-N/8",
        pretrain_steps=6000, stages=[6000], seeds=list(range(6)), eval_reference_split="all", arms=LADDER_ARMS,
        random_raters=5, random_rater_seeds=[0, 1], fid_large_arms=[], bilevel_outer_steps=40,
        meta_eval_every=20, meta_patience=2, test_draws=1),
    "fashion-mnist-16": EvidencePreset(
        name="fashion-mnist-16", data="fashion-mnist@16", model="DiT-T/4", rater="Rater-N/4",
        online_rater="Rater-N/4", pretrain_steps=6000, stages=[6000], seeds=list(range(6)),
        eval_reference_split="all", arms=LADDER_ARMS, random_raters=5, random_rater_seeds=[0, 1],
        fid_large_arms=[], bilevel_outer_steps=40, meta_eval_every=20, meta_patience=2, test_draws=1),
    # The ladder with the images held fixed: digits upsampled to 32x32 (bilinear; d = 1024, DiT-T/8: 16 tokens, as
    # fashion-mnist), the digits recipe (1500-step stage, 25% test split). Beside digits (d = 64) it isolates d:
    # the same images, 16x the noise dimension. Random-rater null on seeds 0 and 3 (two processes of 3 seeds).
    "digits-1024": EvidencePreset(
        name="digits-1024", data="digits@32", model="DiT-T/8", rater="Rater-N/8", online_rater="Rater-N/8",
        test_fraction=0.25, seeds=list(range(6)), stages=[1500], arms=LADDER_ARMS, random_raters=5,
        random_rater_seeds=[0, 3], fid_large_arms=[], bilevel_outer_steps=60, meta_eval_every=20, meta_patience=3,
        test_draws=8),
    # From scratch, the protocol of the peers (Immiscible Diffusion's KNN, OT-CFM): each arm trains a fresh DiT-T/2
    # on digits for 1500 steps, evaluated at 300, 600, 1000 and 1500 (4 points along training); the rater arms use
    # the rater of the mature stage. About 4.5 CPU-hours on 2 cores: runs are seed-major, so a part of ~2 hours
    # compares every arm on seeds 0-1.
    "digits-scratch": EvidencePreset(
        name="digits-scratch", test_fraction=0.25, seeds=list(range(4)), stages=[1500],
        scratch_steps=[300, 600, 1000, 1500],
        arms=SCRATCH_ARMS,
        random_raters=5, random_rater_seeds=[0, 1], fid_large_arms=[], bilevel_outer_steps=60, meta_eval_every=20,
        meta_patience=3, test_draws=8),
    # Flow, from scratch: FID also at 4 and 8 Euler steps (25 is eval_ddim_steps). Cut before its runs started
    # (to about 2 hours on 2 cores): the random-rater null runs its 5 initialisations on seed 0 only.
    "digits-flow-scratch": EvidencePreset(
        name="digits-flow-scratch", objective="flow", test_fraction=0.25, seeds=list(range(4)), stages=[1500],
        eval_extra_steps=[4, 8],
        scratch_steps=[300, 600, 1000, 1500],
        arms=["vanilla", "max_norm", "noise_scale", "knn", "batch_ot", "rater", "rater_random"],
        random_raters=5, random_rater_seeds=[0], fid_large_arms=[], bilevel_outer_steps=60, meta_eval_every=20,
        meta_patience=3, test_draws=8),
    # Flow, as continuation (the paper's protocol): the digits recipe (a 1500-step flow
    # checkpoint continued 150 steps at k = 4) with every coupling and its controls: knn against the k=1 control of
    # its own (shorter) noise length, batch_ot and class_ot (one pass, no norm change), and the rater with its
    # deployment-matched sample, the distilled rater and the random-rater null (seeds 0-1). FID at 25, 8 and 4
    # Euler steps. Fixed before any run; about 70 runs of 1-3 minutes, so about an hour on 2 cores. Not yet run.
    "digits-flow": EvidencePreset(
        name="digits-flow", objective="flow", test_fraction=0.25, seeds=list(range(6)), stages=[1500],
        eval_extra_steps=[4, 8],
        arms=["vanilla", "max_norm", "noise_scale", "knn", "noise_scale_knn", "batch_ot", "class_ot", "rater",
              "rater_sample", "distilled", "rater_random"],
        random_raters=5, random_rater_seeds=[0, 1], fid_large_arms=[], bilevel_outer_steps=60, meta_eval_every=20,
        meta_patience=3, distill_outer_steps=300, test_draws=8),
    # Fashion-MNIST from scratch, at the ladder's mature 16x16 rung (d = 256, DiT-T/4): 3000 steps (4 epochs),
    # evaluated at 4 points, FID against the official test file. The rater is meta-trained on the 3000-step
    # vanilla pretrain (the end of the horizon). Sized from the fashion-mnist-16 study (6000 steps took 22 min on
    # one core): 33 runs. Measured at dcc24ca: about 6.5 min a run on one thread, about 2.5 hours on 2 cores with --jobs 2.
    "fashion-mnist-16-scratch": EvidencePreset(
        name="fashion-mnist-16-scratch", data="fashion-mnist@16", model="DiT-T/4", rater="Rater-N/4",
        online_rater="Rater-N/4", pretrain_steps=3000, stages=[3000], seeds=list(range(4)),
        eval_reference_split="all", scratch_steps=[500, 1000, 2000, 3000],
        arms=SCRATCH_ARMS,
        random_raters=5, random_rater_seeds=[0], fid_large_arms=[], bilevel_outer_steps=40, meta_eval_every=20,
        meta_patience=2, test_draws=1),
    # Its flow twin, fixed with it: FID also at 4 and 8 Euler steps. Measured at 4ddad53: about 8 min a run on one
    # thread, about 2 h 15 min on 2 cores with --jobs 2.
    "fashion-mnist-16-flow-scratch": EvidencePreset(
        name="fashion-mnist-16-flow-scratch", objective="flow", data="fashion-mnist@16", model="DiT-T/4",
        rater="Rater-N/4", online_rater="Rater-N/4", pretrain_steps=3000, stages=[3000], seeds=list(range(4)),
        eval_reference_split="all", scratch_steps=[500, 1000, 2000, 3000], eval_extra_steps=[4, 8],
        arms=SCRATCH_ARMS,
        random_raters=5, random_rater_seeds=[0], fid_large_arms=[], bilevel_outer_steps=40, meta_eval_every=20,
        meta_patience=2, test_draws=1),
    # Flow as continuation on Fashion-MNIST at the ladder's mature 16x16 rung (d = 256, DiT-T/4): the
    # fashion-mnist-16 recipe (a 6000-step stage continued 150 steps at k = 4, FID against the official test file)
    # with digits-flow's arms. Fixed before any run; about 76 runs of ~3 minutes plus a 22-minute pretrain: about 4
    # CPU-hours, so two 2-hour parts on 2 cores (seed-major: a part compares every arm on its seeds). Not yet run.
    "fashion-mnist-16-flow": EvidencePreset(
        name="fashion-mnist-16-flow", objective="flow", data="fashion-mnist@16", model="DiT-T/4", rater="Rater-N/4",
        online_rater="Rater-N/4", pretrain_steps=6000, stages=[6000], seeds=list(range(6)),
        eval_reference_split="all", eval_extra_steps=[4, 8],
        arms=["vanilla", "max_norm", "noise_scale", "knn", "noise_scale_knn", "batch_ot", "class_ot", "rater",
              "rater_sample", "distilled", "rater_random"],
        random_raters=5, random_rater_seeds=[0, 1], fid_large_arms=[], bilevel_outer_steps=40, meta_eval_every=20,
        meta_patience=2, test_draws=1),
    # The couplings the digits study (d = 64) did not run, for the ladder's lowest rung: the digits recipe and
    # seeds (its 1500-step stage, 150-step continuation at k = 4, 25% test split, 8 seeds), with knn against the
    # k=1 control of its own noise length and batch_ot (k = 1, one pass). A separate study, fixed after the
    # digits study and before its own runs; its vanilla arm repeats the digits study's (equal when the code
    # paths are unchanged). About 35 runs of about a minute.
    "digits-couplings": EvidencePreset(
        name="digits-couplings", test_fraction=0.25, seeds=list(range(8)), stages=[1500],
        arms=["vanilla", "knn", "noise_scale_knn", "batch_ot"], fid_large_arms=[], random_raters=5, test_draws=8),
    # uniform_soft's gain in the digits study (-0.95% test loss) costs k = 4 DiT passes per image and was judged
    # against vanilla at one. This study gives it the other equal-cost control: vanilla at 4x the batch (256) for
    # the same 150 steps, the same passes spent on more images. The digits recipe and its 8 seeds; fixed before
    # its runs. About 25 runs of 1-3 minutes.
    "digits-equal-compute": EvidencePreset(
        name="digits-equal-compute", test_fraction=0.25, seeds=list(range(8)), stages=[1500],
        arms=["vanilla", "uniform_soft", "vanilla_batch_xk"], fid_large_arms=[], random_raters=5, test_draws=8),
    # The ladder's check at the paper's d = 4096 on a GPU (scripts/gpu_ladder_check.sh, about 10 minutes on one
    # H100): the digits recipe on the same images upsampled to 64x64 (1x64x64 = 4096, DiT-T/8: 64 tokens), only
    # the cheapest arms of the radial prediction (k=1 noise scale and max_norm against vanilla). The noise has
    # the paper's dimension; the images keep digits' content, so it tests the radial argument, not latents.
    "digits-4096": EvidencePreset(
        name="digits-4096", data="digits@64", model="DiT-T/8", test_fraction=0.25, seeds=list(range(6)),
        stages=[1500], arms=["vanilla", "max_norm", "noise_scale"], fid_large_arms=[], random_raters=5),
}


def get_evidence_preset(name: str, **overrides: Any) -> EvidencePreset:
    if name not in EVIDENCE_PRESETS:
        raise ConfigError(f"unknown evidence preset {name!r} (flag --preset); choose one of {', '.join(EVIDENCE_PRESETS)}")
    return from_dict(EvidencePreset, {**dataclasses.asdict(EVIDENCE_PRESETS[name]), **overrides})


# ---- evaluation on the test split -------------------------------------------------------------------


@torch.no_grad()
def test_split_loss(checkpoint: str | Path, data: str, split_seed: int, val_fraction: float, test_fraction: float,
                    draws: int, seed: int = 0, batch: int = 512) -> dict[str, Any]:
    """Loss of a checkpoint's EMA weights (its own objective) on fixed (test image, timestep, noise) triples
    (the same for every arm and seed, :func:`noiserater.study.reproduce.fixed_triple_losses`): the mean and
    the mean per timestep band of ``BANDS`` (in the DiT's time units: flow's t in [0, 1] as 1000 t)."""
    model, _, state = load_diffusion(checkpoint)
    model.eval()
    objective = objective_from_config(state.get("config"))
    test = load_dataset(data, "test", seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction)
    losses, t = fixed_triple_losses(model, test.images, test.labels, draws, seed, batch, objective)
    t = objective.model_time(t)
    out: dict[str, Any] = {"test_loss": float(losses.mean()), "test_triples": int(losses.numel())}
    for lo, hi in BANDS:
        m = (t >= lo) & (t < hi)
        out[band_key(lo, hi)] = float(losses[m].mean())
    return out


# ---- stages ------------------------------------------------------------------------------------------


def _finite_or_none(x: float) -> float | None:
    return x if x == x else None  # stage records are strict JSON: no NaN


def _objective_kw(p: EvidencePreset) -> dict[str, Any]:
    """The study's training objective as TrainConfig / stage-record keys (none for ddpm: the records of
    studies from before objectives existed stay valid)."""
    return {} if p.objective == "ddpm" else {"objective": p.objective}


def _split_kw(p: EvidencePreset) -> dict[str, Any]:
    return {"data": p.data, "split_seed": p.split_seed, "val_fraction": p.val_fraction, "test_fraction": p.test_fraction}


def pretrain_stage(p: EvidencePreset, root: Path, log=print) -> dict[str, str]:
    """Pretrain the DiT with the study's splits; a checkpoint per stage (segments resume bit-exactly)."""
    def fn(folder: Path) -> dict:
        def config_at(s: int) -> TrainConfig:
            return TrainConfig(model=p.model, run_dir=str(folder / "run"), steps=s, batch_size=p.batch_size,
                               lr=p.pretrain_lr, seed=PRETRAIN_SEED, log_every=10, sample_every=max(s, 1),
                               ckpt_every=max(100, s // 10), progress=False, tensorboard=False, ema_warmup=False,
                               **_split_kw(p), **_objective_kw(p))

        ckpts = pretrain_segments(folder, root, p.stages, p.pretrain_steps, config_at)
        return {"checkpoints": ckpts, "fingerprints": fingerprints(root, ckpts)}

    cfg = {"model": p.model, "steps": p.pretrain_steps, "stages": sorted(p.stages), "batch_size": p.batch_size,
           "lr": p.pretrain_lr, **_split_kw(p), **_objective_kw(p)}
    return run_stage(root / "pretrain", cfg, fn, log, needs=needs_checkpoints(root))["checkpoints"]


def rater_stage(p: EvidencePreset, root: Path, stage: int, ckpt: str, kind: str, log=print) -> str:
    """Meta-train the ``kind`` ('bilevel' or 'distill') rater on the frozen stage checkpoint; returns the
    best rater by the held-out meta-validation (path relative to the study root)."""
    steps = p.bilevel_outer_steps if kind == "bilevel" else p.distill_outer_steps

    def fn(folder: Path) -> dict:
        cfg = MetaTrainConfig(checkpoint=str(root / ckpt), run_dir=str(folder / "run"), rater=p.rater,
                              objective=kind, outer_steps=steps, inner_steps=p.bilevel_inner_steps,
                              candidates=p.bilevel_candidates if kind == "bilevel" else p.k,
                              lr=p.bilevel_lr if kind == "bilevel" else p.distill_lr, eval_every=p.meta_eval_every,
                              patience=p.meta_patience, seed=0, progress=False,
                              **({"batch_size": p.distill_batch_size} if kind == "distill" else {}))
        summary = finished(metatrain(cfg, resume=True), str(folder))
        best = Path(summary.get("best_rater") or summary["rater"])
        keep = folder / "rater.pt"
        copy_checkpoint(best, keep)
        rel = str(keep.relative_to(root))
        return {"rater": rel, "fingerprints": fingerprints(root, {"rater": rel}),
                "summary": json.loads(json.dumps(summary, default=str))}

    cfg = {"checkpoint": ckpt, "kind": kind, "rater": p.rater, "steps": steps, "S": p.bilevel_inner_steps,
           "K": p.bilevel_candidates, "lr": p.bilevel_lr if kind == "bilevel" else p.distill_lr,
           "eval_every": p.meta_eval_every, "patience": p.meta_patience,
           **({"batch_size": p.distill_batch_size} if kind == "distill" else {})}
    return run_stage(root / f"stage-{stage}" / f"rater-{kind}", cfg, fn, log,
                     needs=lambda result: [root / result["rater"]])["rater"]


# the initial weights of the never-trained raters of the random-rater null (init i: seed + i)
RANDOM_RATER_SEED = 20_000


def random_rater_stage(p: EvidencePreset, root: Path, stage: int, ckpt: str, log=print) -> list[str]:
    """``p.random_raters`` raters of the study's architecture at fresh seeded initialisations, never
    trained: the null distribution of a rater's argmax / sample (paths relative to the study root)."""
    def fn(folder: Path) -> dict:
        _, spec, _ = load_diffusion(root / ckpt)
        paths = []
        for i in range(p.random_raters):
            with torch.random.fork_rng():
                torch.manual_seed(RANDOM_RATER_SEED + i)
                rater = NoiseRater(RaterSpec(p.rater, spec.input_size, spec.in_channels, spec.num_classes))
            path = folder / f"init{i}.pt"
            save_rater(path, rater, {"init_seed": RANDOM_RATER_SEED + i, "trained": False,
                                     "diffusion": {"objective": p.objective}})  # the units of t it would score
            paths.append(str(path.relative_to(root)))
        return {"raters": paths, "fingerprints": fingerprints(root, {f"init{i}": r for i, r in enumerate(paths)})}

    cfg = {"checkpoint": ckpt, "kind": "random", "rater": p.rater, "inits": p.random_raters,
           "init_seed": RANDOM_RATER_SEED}
    return run_stage(root / f"stage-{stage}" / "rater-random", cfg, fn, log,
                     needs=lambda result: [root / r for r in result["raters"]])["raters"]


def resolve_overrides(p: EvidencePreset, extra: dict[str, Any]) -> dict[str, Any]:
    """An arm's TrainConfig overrides with the symbolic values made numbers (see ``ARMS``): max_norm's noise
    scale in closed form, a data-dependent policy's (``knn``) measured on the study's training split, a batch of
    "k" as k times the study's batch (an arm without one trains at the study's batch: :func:`arm_batch`)."""
    out = dict(extra)
    if out.get("batch_size") == "k":
        out["batch_size"] = p.batch_size * p.k
    name = out.get("noise_scale")
    if name in ("max_norm", "1/max_norm"):
        c = max_norm_scale(source_dimension(p.data), p.k)
        out["noise_scale"] = c if name == "max_norm" else 1.0 / c
    elif isinstance(name, str):
        train_images = load_dataset(p.data, "train", seed=p.split_seed, val_fraction=p.val_fraction,
                                    test_fraction=p.test_fraction).images
        out["noise_scale"] = policy_norm_scale(name, train_images, p.k, p.batch_size, seed=p.split_seed)
    return out


def noise_norm_summary(run_dir: Path) -> dict[str, float]:
    """The run's mean ||eps||^2/d and mean KS distance of the noise norms from chi_d, over its log records."""
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "noise_sq_norm_per_dim" in r]
    if not recs:
        return {}
    return {key: sum(r[key] for r in recs) / len(recs) for key in ("noise_sq_norm_per_dim", "noise_norm_ks")}


def reference_floor(p: EvidencePreset, root: Path, log=print) -> dict[str, Any]:
    """FID of REAL images against the study's FID reference: ``eval_samples`` training-split images (and, if
    there are enough, ``fid_large_samples``) vs the reference split. The lowest FID a perfect generator could
    reach at that sample size: it shows how much of an arm's FID is the estimator's own bias and noise."""
    def fn(folder: Path) -> dict:
        split = p.eval_reference_split
        ex = build_extractor(p.eval_extractors.split(",")[0], p.data, progress=False)
        args = {"seed": p.split_seed, "val_fraction": p.val_fraction, "test_fraction": p.test_fraction}
        source, ref_split = (p.data, split) if split != "all" else default_reference(p.data)
        ref = reference_features(source, ref_split, ex, progress=False, split_args=args if split != "all" else None)
        train_imgs = load_dataset(p.data, "train", **args).images
        out = {"reference_split": split, "reference_images": int(ref["n"]), "train_images": len(train_imgs)}
        for n in sorted({p.eval_samples, p.fid_large_samples}):
            if 0 < n <= len(train_imgs):
                g = torch.Generator().manual_seed(n)
                idx = torch.randperm(len(train_imgs), generator=g)[:n]
                out[f"real_train_fid_{n}"] = frechet_distance(*feature_stats(ex(train_imgs[idx])), ref["mu"], ref["sigma"])
        return out

    cfg = {"split": p.eval_reference_split, "samples": sorted({p.eval_samples, p.fid_large_samples}),
           "extractor": p.eval_extractors, **_split_kw(p)}
    return run_stage(root / "reference-floor", cfg, fn, log)


def arm_batch(p: EvidencePreset, extra: dict[str, Any]) -> dict[str, Any]:
    """An arm's resolved overrides with its batch size: the study's unless the arm sets its own."""
    return {"batch_size": p.batch_size, **extra}


def arm_settings(p: EvidencePreset, arm: str) -> tuple[str, int, dict[str, Any], dict[str, Any]]:
    """(policy, k, the arm's TrainConfig overrides with numeric noise scales, the state-dependent policies'
    scorer settings from the preset) of one arm: what a continuation and a from-scratch run of it share."""
    policy, uses_k, extra, _ = ARMS[arm]
    overrides = {"online_rater": p.online_rater, "oracle_val_batch": p.oracle_val_batch} if policy_class(
        policy).state_dependent else {}
    return policy, p.k if uses_k else 1, resolve_overrides(p, extra), overrides


def arm_run(p: EvidencePreset, root: Path, stage: int, ckpt: str, arm: str, seed: int, rater: str | None,
            log=print, init: int | None = None) -> dict:
    """Continue the stage checkpoint with one arm and seed (for a random-rater arm: with random rater
    ``init``), then evaluate it: test-split loss, FID against held-out references."""
    policy, k, extra, overrides = arm_settings(p, arm)
    folder = root / f"stage-{stage}" / "runs" / arm / (f"init{init}" if init is not None else "") / f"seed{seed}"

    def fn(folder: Path) -> dict:
        cfg = TrainConfig(model=p.model, run_dir=str(folder / "run"), steps=p.continue_steps,
                          lr=p.continue_lr, ema_decay=p.continue_ema, seed=seed, init_checkpoint=str(root / ckpt),
                          policy=policy, candidates=k, rater=str(root / rater) if rater else None, log_every=10,
                          sample_every=p.continue_steps, ckpt_every=max(50, p.continue_steps // 3), progress=False,
                          tensorboard=False, ema_warmup=p.continue_ema_warmup, **_split_kw(p), **_objective_kw(p),
                          **overrides, **arm_batch(p, extra))
        t0 = time.perf_counter()
        summary = finished(train(cfg, resume=True), str(folder))
        return _evaluate_arm(p, root, Path(summary["checkpoint"]), folder, folder / "run", cfg,
                             {"stage": stage, "arm": arm, "seed": seed, "rater": rater, "rater_init": init},
                             time.perf_counter() - t0)

    cfg = {"init": ckpt, "arm": arm, "policy": policy, "k": k, "extra": extra, "overrides": overrides, "seed": seed,
           "rater": rater, "steps": p.continue_steps, "lr": p.continue_lr, "ema": p.continue_ema,
           "ema_warmup": p.continue_ema_warmup,
           "batch_size": arm_batch(p, extra)["batch_size"], "eval_samples": p.eval_samples, "eval_ddim_steps": p.eval_ddim_steps,
           "cfg_scale": p.cfg_scale, "test_draws": p.test_draws, "fid_reference": p.eval_reference_split,
           "fid_large": p.fid_large_samples if arm in p.fid_large_arms else 0, "rater_init": init, **_split_kw(p),
           **_objective_kw(p), **({"eval_extra_steps": p.eval_extra_steps} if p.eval_extra_steps else {})}
    return run_stage(folder, cfg, fn, log)


def _evaluate_arm(p: EvidencePreset, root: Path, ckpt: Path, folder: Path, run_dir: Path, cfg: TrainConfig,
                  ident: dict, train_s: float) -> dict:
    """One arm's record at one checkpoint: what it is, its cost, its test-split loss (overall and by band), the
    norms of its noise, FID / precision / recall / class accuracy against held-out references."""
    policy, k, arm = cfg.policy, cfg.candidates, ident["arm"]
    control = equal_cost_control(policy, k)
    result = {**{key: ident[key] for key in ("stage", "arm")}, "policy": policy, "k": k,
              **{key: ident[key] for key in ("seed", "rater", "rater_init")}, "noise_scale": cfg.noise_scale,
              "input_perturbation": cfg.input_perturbation,
              # per image of the study's batch: an arm at k times the batch makes k passes for each
              "dit_passes": dit_passes(policy, k) * (cfg.batch_size // p.batch_size),
              "control": "uniform_soft" if control[0] == "uniform_soft" else "vanilla", "train_wall_s": train_s,
              "images_per_s": _finite_or_none(median_throughput(ckpt)), "checkpoint": str(ckpt.relative_to(root)),
              "commit": version_info().get("git_commit")}
    result.update(test_split_loss(ckpt, p.data, p.split_seed, p.val_fraction, p.test_fraction, p.test_draws))
    result.update(noise_norm_summary(run_dir))
    result.update(sample_metrics(p, str(ckpt), folder))  # reads eval_samples, eval_ddim_steps, cfg_scale
    if arm in p.fid_large_arms and p.fid_large_samples > 0:
        big = sample_metrics(p, str(ckpt), folder, num_samples=p.fid_large_samples)
        result.update({f"{key}_{p.fid_large_samples}": big[key] for key in ("fid", "precision", "recall")})
    for n in p.eval_extra_steps:
        if p.eval_samples > 0:
            result[f"fid_steps{n}"] = sample_metrics(p, str(ckpt), folder / f"steps{n}", steps=n)["fid"]
    return result


def scratch_arm_runs(p: EvidencePreset, root: Path, arm: str, seed: int, rater: str | None, log=print,
                     init: int | None = None) -> list[dict]:
    """Train one arm and seed from initialisation (``scratch/runs/<arm>/seed<n>``, segment by segment, resumable)
    and evaluate it at each of ``scratch_steps`` (records under ``scratch-<step>/runs/...``, whose ``stage`` is
    the step)."""
    policy, k, extra, overrides = arm_settings(p, arm)
    sub = Path(arm) / (f"init{init}" if init is not None else "") / f"seed{seed}"
    train_dir = root / "scratch" / "runs" / sub

    def config_at(s: int) -> TrainConfig:
        return TrainConfig(model=p.model, run_dir=str(train_dir / "run"), steps=s,
                           lr=p.pretrain_lr, ema_decay=p.scratch_ema, seed=seed, policy=policy, candidates=k,
                           rater=str(root / rater) if rater else None, log_every=10, sample_every=max(s, 1),
                           ckpt_every=max(100, s // 10), progress=False, tensorboard=False, ema_warmup=True,
                           **_split_kw(p), **_objective_kw(p), **overrides, **arm_batch(p, extra))

    rows = []
    for s in sorted(p.scratch_steps):
        def fn(folder: Path, s: int = s) -> dict:
            t0 = time.perf_counter()
            ckpt = root / pretrain_segments(train_dir, root, [s], s, config_at)[str(s)]
            return _evaluate_arm(p, root, ckpt, folder, train_dir / "run", config_at(s),
                                 {"stage": s, "arm": arm, "seed": seed, "rater": rater, "rater_init": init},
                                 time.perf_counter() - t0)

        cfg = {"scratch_step": s, "arm": arm, "policy": policy, "k": k, "extra": extra, "overrides": overrides,
               "seed": seed, "rater": rater, "lr": p.pretrain_lr, "ema": p.scratch_ema, "batch_size": arm_batch(p, extra)["batch_size"],
               "eval_samples": p.eval_samples, "eval_ddim_steps": p.eval_ddim_steps, "cfg_scale": p.cfg_scale,
               "test_draws": p.test_draws, "fid_reference": p.eval_reference_split,
               "fid_large": p.fid_large_samples if arm in p.fid_large_arms else 0, "rater_init": init,
               **_split_kw(p), **_objective_kw(p), **({"eval_extra_steps": p.eval_extra_steps} if p.eval_extra_steps else {})}
        rows.append(run_stage(root / f"scratch-{s}" / "runs" / sub, cfg, fn, log))
    return rows


def evidence(p: EvidencePreset, out: str | Path, log: Callable[[str], None] = print, jobs: int = 1) -> Path:
    """Run the study ``p`` under ``out`` (resumable), append every run to results.jsonl, write the report.
    ``jobs`` > 1: after each stage's shared work (pretraining, raters) in this process, its (arm, seed) runs go
    to that many worker processes. Every part of the study, shared work included, then runs with this
    process's torch threads divided by ``jobs`` (at least 1), so its figures do not depend on ``jobs``."""
    p.validate()
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: the number of parallel runs must be >= 1")
    threads = max(1, torch.get_num_threads() // jobs)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _evidence(p, Path(out), log, jobs, threads)
    finally:
        torch.set_num_threads(before)


def _evidence(p: EvidencePreset, root: Path, log: Callable[[str], None], jobs: int, threads: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    study = root / "study.json"  # every invocation is recorded with its full settings and commit
    runs = json.loads(study.read_text()).get("invocations", []) if study.exists() else []
    prov = version_info()
    write_json(study, {"preset": p.name, "settings": dataclasses.asdict(p), "provenance": prov,
                       "invocations": runs + [{"time": time.time(), **prov, "jobs": jobs, "torch_threads": threads,
                                               "settings": dataclasses.asdict(p)}]})
    ckpts = pretrain_stage(p, root, log)
    if p.eval_samples > 0:
        reference_floor(p, root, log)
    rows = []
    # spawn: a fresh interpreter per worker (fork would copy this process's torch thread pools and locks)
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) if jobs > 1 else None
    try:
        # from scratch: one pass, raters from the first stage; otherwise each stage's checkpoint is continued
        for stage in ([p.stages[0]] if p.scratch_steps else p.run_stages or p.stages):
            ckpt = ckpts[str(stage)]
            kinds = sorted({ARMS[a][3] for a in p.arms if ARMS[a][3] and ARMS[a][3] != "random"})
            raters = {kind: rater_stage(p, root, stage, ckpt, kind, log) for kind in kinds}
            if any(ARMS[a][3] == "random" for a in p.arms):
                raters["random"] = random_rater_stage(p, root, stage, ckpt, log)
            todo = [(arm, seed, init, raters["random"][init] if init is not None else
                     raters[ARMS[arm][3]] if ARMS[arm][3] else None)
                    for seed in p.seeds for arm in p.arms
                    for init in ((None,) if ARMS[arm][3] != "random" else
                                 range(len(raters["random"])) if seed in random_seeds(p) else ())]
            progress = StudyProgress(len(todo), stage_name(p, stage), log, workers=jobs)
            if pool is None:
                for arm, seed, init, rater in todo:
                    with progress.run():
                        rows += arm_runs(p, root, stage, ckpt, arm, seed, rater, init, progress.log)
                    _write_results(root, rows)
            else:
                futures = [pool.submit(_arm_job, dataclasses.asdict(p), str(root), stage, ckpt, arm, seed, rater,
                                       init, threads) for arm, seed, init, rater in todo]
                for fut in as_completed(futures):
                    new, trained, seconds = fut.result()
                    rows += new
                    progress.record(seconds, trained)
                    _write_results(root, rows)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    _write_results(root, rows)
    return write_evidence_report(root)


def arm_runs(p: EvidencePreset, root: Path, stage: int, ckpt: str, arm: str, seed: int, rater: str | None,
             init: int | None, log: Callable[[str], None]) -> list[dict]:
    """One arm and seed (and random-rater init): a continuation of the stage checkpoint, or from scratch a
    training evaluated at each of ``scratch_steps``; its records."""
    if p.scratch_steps:
        return scratch_arm_runs(p, root, arm, seed, rater, log, init=init)
    return [arm_run(p, root, stage, ckpt, arm, seed, rater, log, init=init)]


def _arm_job(preset: dict, root: str, stage: int, ckpt: str, arm: str, seed: int, rater: str | None,
             init: int | None, threads: int) -> tuple[list[dict], bool, float]:
    """:func:`arm_runs` in a worker process of ``evidence(jobs=N)``: (records, whether it trained, seconds)."""
    torch.set_num_threads(threads)
    trained = False

    def log(line: str) -> None:
        nonlocal trained
        trained |= line.startswith(TRAINED_MARKS)
        print(line, flush=True)

    t0 = time.perf_counter()
    rows = arm_runs(from_dict(EvidencePreset, preset), Path(root), stage, ckpt, arm, seed, rater, init, log)
    return rows, trained, time.perf_counter() - t0


# What a published study keeps (relative to the study root): everything the report reads, the trained raters,
# and no DiT checkpoint. The layout is the study's own, so `evidence --report-only` on the published copy
# writes the same report. Random raters are not kept: they are rebuilt exactly from RANDOM_RATER_SEED.
PUBLISHED_FILES = ("study.json", "results.jsonl", "summary.json", "report.md", "forest-stage*.png", "noise-scale-stage*.png",
                   "training-curve.png",
                   "pretrain/stage.json", "reference-floor/stage.json", "stage-*/rater-*/stage.json",
                   "stage-*/rater-bilevel/rater.pt", "stage-*/rater-distill/rater.pt", "stage-*/rater-*/run/metrics.jsonl",
                   "stage-*/rater-*/run/config.yaml", "stage-*/rater-*/run/heldout_curve.png",
                   "stage-*/rater-*/analysis/analysis.json", "stage-*/runs/*/seed*/stage.json",
                   "stage-*/runs/*/init*/seed*/stage.json", "scratch-*/runs/*/seed*/stage.json",
                   "scratch-*/runs/*/init*/seed*/stage.json")


def publish_study(root: str | Path, dest: str | Path) -> list[Path]:
    """Copy a study's small artefacts (``PUBLISHED_FILES``) from ``root`` to ``dest`` (e.g. docs/results/NAME),
    each via a temporary file and a rename; returns the files written."""
    root, dest = Path(root), Path(dest)
    if not (root / "study.json").exists():
        raise ConfigError(f"{root} holds no evidence study (no study.json): run `noiserater evidence --out {root}` first")
    written = []
    for pattern in PUBLISHED_FILES:
        for src in sorted(root.glob(pattern)):
            out = dest / src.relative_to(root)
            out.parent.mkdir(parents=True, exist_ok=True)
            copy_checkpoint(src, out)  # temp name + rename: never half-written
            written.append(out)
    return written


def stage_name(p: EvidencePreset, stage: int) -> str:
    return "from scratch" if p.scratch_steps else f"stage {stage}"


def duration(seconds: float) -> str:
    """A wall-clock span for a progress line: '40 s', '12 min', '2 h 05 min'."""
    m = round(seconds / 60)
    return f"{seconds:.0f} s" if seconds < 60 else f"{m} min" if m < 60 else f"{m // 60} h {m % 60:02d} min"


class StudyProgress:
    """One line after each (arm, seed[, init]) of an invocation: how many are done, and the time left, estimated
    from the ones it trained (a finished run it skipped costs nothing) and the number of parallel ``workers``
    ("on N runs so far" sums the runs' own times). ``log`` passes the run lines through and notes whether a
    call trained ([run ] or [redo]) or only skipped."""

    def __init__(self, total: int, what: str, log: Callable[[str], None], workers: int = 1):
        self.total, self.what, self._log, self.workers = total, what, log, workers
        self.done = self.ran = 0
        self.spent = 0.0
        self._trained = False

    def log(self, line: str) -> None:
        self._trained |= line.startswith(TRAINED_MARKS)
        self._log(line)

    @contextmanager
    def run(self):
        """Time one job run in this process (its lines go through :meth:`log`)."""
        self._trained, t0 = False, time.perf_counter()
        yield
        self.record(time.perf_counter() - t0 if self._trained else 0.0, self._trained)

    def record(self, seconds: float, trained: bool) -> None:
        """One job finished (here or in a worker) after ``seconds``; ``trained``: it ran, not only skipped."""
        self.done += 1
        if not trained:
            return
        self.ran += 1
        self.spent += seconds
        left = self.spent / self.ran * (self.total - self.done) / self.workers
        self._log(f"[{self.done}/{self.total}] {self.what}: {duration(self.spent)} on {self.ran} run(s) so far"
                  + (f", about {duration(left)} left" if self.done < self.total else ", done"))


def random_seeds(p: EvidencePreset) -> list[int]:
    """The seeds the random-rater arms run: ``random_rater_seeds`` among ``seeds`` (all seeds when empty)."""
    return [s for s in p.seeds if not p.random_rater_seeds or s in p.random_rater_seeds]


def _write_results(root: Path, rows: list[dict]) -> None:
    atomic_write_text(root / "results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))
