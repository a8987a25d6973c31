"""The evidence study (issue 13): does any rater beat its equal-cost control? `noiserater evidence`.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import atomic_write_text, write_json
from .config import ConfigError, from_dict, require
from .data import load_dataset
from .evidence_arms import ARMS, BANDS, band_key  # defined there, still importable from here
from .evidence_report import write_evidence_report
from .experiments import (
    PRETRAIN_SEED,
    copy_checkpoint,
    finished,
    fixed_triple_losses,
    pretrain_segments,
    run_stage,
    sample_metrics,
)
from .meta.train import MetaTrainConfig, metatrain
from .models.loading import load_diffusion
from .objectives import objective_from_config
from .provenance import version_info
from .report import median_throughput
from .selection import dit_passes, equal_cost_control
from .train import TrainConfig, train


@dataclass
class EvidencePreset:
    """One evidence study. Steps are optimiser steps; seeds come from the power analysis (docs)."""

    name: str
    data: str = "digits"
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
    continue_ema: float = 0.95  # 0.95^150 = 5e-4: a 150-step run's EMA forgets its start
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
    run_stages: list[int] = field(default_factory=list)  # the stages this invocation continues (empty: all)

    def validate(self) -> None:
        require(all(0 < s <= self.pretrain_steps for s in self.stages), "stages", "each in [1, pretrain_steps]")
        unknown = [a for a in self.arms if a not in ARMS]
        require(not unknown, "arms", f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
        require(self.k >= 2, "k", "selection needs k >= 2")
        require(len(self.seeds) >= 2, "seeds", "a paired interval needs at least 2 seeds")
        require(self.test_fraction > 0, "test_fraction", "the evidence study evaluates on a test split: set it > 0")
        require(set(self.run_stages) <= set(self.stages), "run_stages", f"each must be one of stages {self.stages}")


EVIDENCE_PRESETS: dict[str, EvidencePreset] = {
    # digits: DiT-T/2 on 8x8, the demo's scale; 12 seeds from the power analysis (docs/results/evidence-digits)
    "digits": EvidencePreset(name="digits", continue_ema=0.99, arms=[
        "vanilla", "uniform_soft", "max_norm", "rater", "rater_sample", "rater_sample_t0.3", "rater_soft",
        "distilled", "distilled_sample", "online", "oracle_amortised", "oracle", "oracle_anti", "oracle_cosine"]),
    # Fashion-MNIST 32x32: DiT-T/4 (64 tokens, as the digits model), fewer arms to fit a session
    "fashion-mnist": EvidencePreset(
        name="fashion-mnist", data="fashion-mnist", model="DiT-T/4", batch_size=64, pretrain_steps=2000,
        stages=[2000], seeds=list(range(8)), rater="Rater-N/4", online_rater="Rater-N/4", continue_ema=0.99,
        arms=["vanilla", "uniform_soft", "max_norm", "rater", "rater_sample", "rater_soft", "distilled",
              "distilled_sample", "oracle_amortised"],
    ),
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
    (the same for every arm and seed, :func:`noiserater.experiments.fixed_triple_losses`): the mean and the
    mean per timestep band of ``BANDS`` (in the DiT's time units: flow's t in [0, 1] as 1000 t)."""
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


def _split_kw(p: EvidencePreset) -> dict[str, Any]:
    return {"data": p.data, "split_seed": p.split_seed, "val_fraction": p.val_fraction, "test_fraction": p.test_fraction}


def pretrain_stage(p: EvidencePreset, root: Path, log=print) -> dict[str, str]:
    """Pretrain the DiT with the study's splits; a checkpoint per stage (segments resume bit-exactly)."""
    def fn(folder: Path) -> dict:
        def config_at(s: int) -> TrainConfig:
            return TrainConfig(model=p.model, run_dir=str(folder / "run"), steps=s, batch_size=p.batch_size,
                               lr=p.pretrain_lr, seed=PRETRAIN_SEED, log_every=10, sample_every=max(s, 1),
                               ckpt_every=max(100, s // 10), progress=False, tensorboard=False, ema_warmup=False,
                               **_split_kw(p))

        return {"checkpoints": pretrain_segments(folder, root, p.stages, p.pretrain_steps, config_at)}

    cfg = {"model": p.model, "steps": p.pretrain_steps, "stages": sorted(p.stages), "batch_size": p.batch_size,
           "lr": p.pretrain_lr, **_split_kw(p)}
    return run_stage(root / "pretrain", cfg, fn, log)["checkpoints"]


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
        return {"rater": str(keep.relative_to(root)), "summary": json.loads(json.dumps(summary, default=str))}

    cfg = {"checkpoint": ckpt, "kind": kind, "rater": p.rater, "steps": steps, "S": p.bilevel_inner_steps,
           "K": p.bilevel_candidates, "lr": p.bilevel_lr if kind == "bilevel" else p.distill_lr,
           "eval_every": p.meta_eval_every, "patience": p.meta_patience,
           **({"batch_size": p.distill_batch_size} if kind == "distill" else {})}
    return run_stage(root / f"stage-{stage}" / f"rater-{kind}", cfg, fn, log)["rater"]


def arm_run(p: EvidencePreset, root: Path, stage: int, ckpt: str, arm: str, seed: int, rater: str | None,
            log=print) -> dict:
    """Continue the stage checkpoint with one arm and seed, then evaluate it on the test split."""
    policy, uses_k, extra, _ = ARMS[arm]
    k = p.k if uses_k else 1
    folder = root / f"stage-{stage}" / "runs" / arm / f"seed{seed}"
    overrides = {"online_rater": p.online_rater, "oracle_val_batch": p.oracle_val_batch} if policy.startswith(
        ("oracle", "rater_online")) else {}

    def fn(folder: Path) -> dict:
        cfg = TrainConfig(model=p.model, run_dir=str(folder / "run"), steps=p.continue_steps, batch_size=p.batch_size,
                          lr=p.continue_lr, ema_decay=p.continue_ema, seed=seed, init_checkpoint=str(root / ckpt),
                          policy=policy, candidates=k, rater=str(root / rater) if rater else None, log_every=10,
                          sample_every=p.continue_steps, ckpt_every=max(50, p.continue_steps // 3), progress=False,
                          tensorboard=False, ema_warmup=False, **_split_kw(p), **overrides, **extra)
        t0 = time.perf_counter()
        summary = finished(train(cfg, resume=True), str(folder))
        train_s = time.perf_counter() - t0
        ckpt_out = Path(summary["checkpoint"])
        control = equal_cost_control(policy, k)
        result = {"stage": stage, "arm": arm, "policy": policy, "k": k, "seed": seed, "rater": rater,
                  "dit_passes": dit_passes(policy, k), "control": "uniform_soft" if control[0] == "uniform_soft" else "vanilla",
                  "train_wall_s": train_s, "images_per_s": _finite_or_none(median_throughput(ckpt_out)),
                  "checkpoint": str(ckpt_out.relative_to(root)), "commit": version_info().get("git_commit")}
        result.update(test_split_loss(ckpt_out, p.data, p.split_seed, p.val_fraction, p.test_fraction, p.test_draws))
        result.update(sample_metrics(p, str(ckpt_out), folder))  # reads eval_samples, eval_ddim_steps, cfg_scale
        return result

    cfg = {"init": ckpt, "arm": arm, "policy": policy, "k": k, "extra": extra, "overrides": overrides, "seed": seed,
           "rater": rater, "steps": p.continue_steps, "lr": p.continue_lr, "ema": p.continue_ema,
           "batch_size": p.batch_size, "eval_samples": p.eval_samples, "eval_ddim_steps": p.eval_ddim_steps,
           "cfg_scale": p.cfg_scale, "test_draws": p.test_draws, **_split_kw(p)}
    return run_stage(folder, cfg, fn, log)


def evidence(p: EvidencePreset, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Run the study ``p`` under ``out`` (resumable), append every run to results.jsonl, write the report."""
    p.validate()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    study = root / "study.json"  # every invocation is recorded: a study extended later names each commit
    runs = json.loads(study.read_text()).get("invocations", []) if study.exists() else []
    prov = version_info()
    write_json(study, {"preset": p.name, "settings": dataclasses.asdict(p), "provenance": prov,
                       "invocations": runs + [{"time": time.time(), **prov, "arms": p.arms, "seeds": p.seeds}]})
    ckpts = pretrain_stage(p, root, log)
    rows = []
    for stage in p.run_stages or p.stages:
        ckpt = ckpts[str(stage)]
        kinds = sorted({ARMS[a][3] for a in p.arms if ARMS[a][3]})
        raters = {kind: rater_stage(p, root, stage, ckpt, kind, log) for kind in kinds}
        for seed in p.seeds:
            for arm in p.arms:
                kind = ARMS[arm][3]
                res = arm_run(p, root, stage, ckpt, arm, seed, raters[kind] if kind else None, log)
                rows.append(res)
                _write_results(root, rows)
    _write_results(root, rows)
    return write_evidence_report(root)


def _write_results(root: Path, rows: list[dict]) -> None:
    atomic_write_text(root / "results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))
