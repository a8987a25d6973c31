"""The paper's protocol end to end (section 5.1) at a chosen scale: `noiserater reproduce`.

Stages, each a folder under the study root that is skipped when its ``stage.json`` exists with the same
config (and resumed from its checkpoint when it was interrupted):

1. ``pretrain``: train a DiT, keeping checkpoints at the steps the other stages need.
2. ``rater/<name>``: meta-train raters on frozen checkpoints (main rater, Table 2 ablations, Table 5 stages).
3. ``runs/<table>/<policy>-k<k>/seed<s>``: continue training from the checkpoint with each policy; every
   policy sees the same seeds, the same data order and the same candidate noises (``runs/main``: Tables 1
   and 3, policies and k).
4. ``eval``: per continuation run, the held-out diffusion loss on fixed (image, noise, timestep) triples
   and classifier-FID / precision / recall / class accuracy of samples.
5. ``transfer``: a larger backbone, the step matched by the training-loss curve (paper eq. 10), and a
   continuation with the frozen small-model rater (Table 4).

Table numbers are the paper's (:data:`noiserater.study.presets.PAPER_TABLES`); report headings come from there.

The report (`noiserater report`) reads ``results.jsonl`` and writes ``report.md`` and plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..analysis.rater_stats import StagesConfig, analyze_stages, match_stage
from ..checkpoint import RunDirError, load_checkpoint, weights_fingerprint, write_json
from ..data import load_dataset
from ..evaluate import EvalConfig, evaluate_checkpoint
from ..metatrain import MetaTrainConfig, metatrain
from ..models.loading import load_diffusion
from ..objectives import Objective, default_objective, objective_from_config
from ..train import TrainConfig, train
from .presets import PRESETS, ReproducePreset, get_preset  # noqa: F401  (defined there, still importable from here)

# Pretraining's seed: far from the continuation seeds (0, 1, 2, ...), so no continuation replays the data
# order, timesteps or noise of the pretraining it starts from.
PRETRAIN_SEED = 1000
# Offset of the generator seed of the fixed held-out (image, timestep, noise) triples: a prime, so they are not
# drawn from the stream of anything seeded directly with a small seed (0, 1, 2, ...). Changing it changes
# every published held-out loss.
HELDOUT_SEED_OFFSET = 10_007


# ---- stages ------------------------------------------------------------------------------------------


class StageProgress:
    """A ``log`` for :func:`run_stage` that numbers the stages of a study and says elapsed time and ETA:
    ``[ 5/18] run  runs/main/vanilla/seed0  (1m05s elapsed, ~3m left)``. Other messages pass through.
    The ETA assumes the stages still to run take the mean time of those run since the second one (the first,
    pretraining, is usually much longer)."""

    def __init__(self, total: int, log: Callable[[str], None] = print, root: Path | None = None):
        self.total, self.log, self.root = max(total, 1), log, root
        self.done = self.ran = 0
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        for tag, ran in (("[run ] ", True), ("[skip] ", False)):
            if msg.startswith(tag):
                self.done += 1
                self.ran += ran
                folder = msg[len(tag):]
                if self.root is not None:
                    folder = folder.replace(str(self.root).rstrip("/") + "/", "")
                el = time.perf_counter() - self.t0
                if ran and self.ran == 2:  # the first stage (pretraining) is no guide to the rest
                    self.t_second = el
                left = ((el - self.t_second) / (self.ran - 2) * (self.total - self.done)
                        if self.ran > 2 and getattr(self, "t_second", None) is not None else None)
                eta = f", ~{_duration(left)} left" if left is not None and self.done < self.total else ""
                word = "run " if ran else "skip"
                self.log(f"[{self.done:>{len(str(self.total))}}/{self.total}] {word} {folder}  ({_duration(el)} elapsed{eta})")
                return
        self.log(msg)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def planned_stages(preset: "ReproducePreset") -> int:
    """How many run_stage calls :func:`reproduce` makes for ``preset`` (for the progress line)."""
    n = 2 + len(preset.seeds) * (1 + len(preset.ks) * len(preset.policies)) + 2 * len(preset.power_seeds)
    n += len(preset.ablations) * (1 + len(preset.seeds))
    other = [s for s in preset.stage_steps if s != preset.meta_stage]
    n += len(other) * (1 + 2 * len(preset.seeds)) + 1  # stage raters + their runs, the analysis
    if preset.transfer_model:
        n += 1 + 2 * len(preset.seeds)
    return n


class StudyInterrupted(Exception):
    """A stage's training was stopped by SIGINT/SIGTERM (its checkpoint is saved): the study stops too,
    and running the same command again resumes it. ``signum`` is the signal."""

    def __init__(self, what: str, signum: int | None):
        self.signum = int(signum or 2)
        super().__init__(f"interrupted by signal {self.signum} during {what}; its checkpoint is saved: run the "
                         "same command again to resume the study")


def finished(summary: dict, what: str) -> dict:
    """``summary`` of a train/metatrain call, or StudyInterrupted if it stopped on a signal: an interrupted
    stage must not be evaluated and recorded as done."""
    if summary.get("interrupted"):
        raise StudyInterrupted(what, summary.get("signal"))
    return summary


# the log prefixes of a stage that trains (run_stage's "[run ]" and "[redo]"; a finished one logs "[skip]")
TRAINED_MARKS = ("[run ]", "[redo]")


def run_stage(folder: Path, config: dict, fn: Callable[[Path], dict], log: Callable[[str], None] = print,
              needs: Callable[[dict], list[Path]] | None = None) -> dict:
    """Run ``fn(folder)`` unless ``folder/stage.json`` records the same config; then return its result.

    A stage interrupted half-way has no stage.json: ``fn`` runs again and resumes from its checkpoints.
    ``needs(result)``: the files later stages read from this one. A stage whose record is here but whose
    files are not (a published copy of a study, which keeps no DiT checkpoints) is rebuilt from its config,
    and where the record kept ``fingerprints`` (:func:`weights_fingerprint` by name) the rebuilt files must
    match them bit for bit, so a study extended elsewhere never mixes two versions of one stage.
    """
    marker = folder / "stage.json"
    config = json.loads(json.dumps(config, default=str))
    recorded = None
    if marker.exists():
        rec = json.loads(marker.read_text())
        if rec.get("config") != config:
            diff = sorted(k for k in set(config) | set(rec.get("config", {})) if config.get(k) != rec["config"].get(k))
            raise RunDirError(
                f"stage {folder} was run with a different config ({diff[0]}: {rec['config'].get(diff[0])!r} there, "
                f"{config.get(diff[0])!r} now); use another --out or delete that folder"
            )
        missing = [p for p in (needs(rec["result"]) if needs else []) if not Path(p).exists()]
        if not missing:
            log(f"[skip] {folder} (done)")
            return rec["result"]
        recorded = rec["result"]
        log(f"[redo] {folder} ({Path(missing[0]).name} is not here: rebuilding it from its recorded config)")
    else:
        log(f"[run ] {folder}")
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    result = fn(folder)
    result["wall_s"] = time.perf_counter() - t0
    if recorded is not None:
        check_rebuilt(folder, recorded.get("fingerprints"), result.get("fingerprints"), log)
    write_json(marker, {"config": config, "result": result})
    return result


def check_rebuilt(folder: Path, recorded: dict | None, rebuilt: dict | None, log: Callable[[str], None]) -> None:
    """A rebuilt stage's weights must equal the recorded ones (``{name: fingerprint}``); without a record
    there is nothing to compare, and the log says so."""
    if not recorded:
        log(f"[note] {folder}: its record keeps no fingerprint, so the rebuilt weights are not checked against it")
        return
    for name, want in recorded.items():
        got = (rebuilt or {}).get(name)
        if got != want:
            raise RunDirError(
                f"stage {folder} rebuilt differently from its record ({name}: weights {str(got)[:12]} now, "
                f"{want[:12]} recorded): another code version, torch build, thread count or machine made it. "
                "Continue the study where it ran (same commit, OMP_NUM_THREADS), or rerun it whole under a new --out"
            )


@torch.no_grad()
def fixed_triple_losses(model, images: torch.Tensor, labels: torch.Tensor, draws: int, seed: int,
                        batch: int = 512, objective: Objective | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-triple losses of ``objective`` (default DDPM) [N*draws] (float64) and their timesteps on FIXED
    (image, timestep, noise) triples: the images repeated ``draws`` times, timesteps and noise from a
    generator seeded by ``seed`` alone, so every policy and continuation seed is scored on exactly the same
    triples."""
    objective = objective or default_objective()
    g = torch.Generator().manual_seed(HELDOUT_SEED_OFFSET + seed)
    x0, y = images.repeat(draws, 1, 1, 1), labels.repeat(draws)
    t = objective.sample_t(x0.shape[0], g)
    noise = torch.randn(x0.shape, generator=g)
    losses = [objective.loss(model, x0[i:i + batch], y[i:i + batch], t[i:i + batch], noise[i:i + batch])
              for i in range(0, x0.shape[0], batch)]
    return torch.cat(losses).double(), t


def heldout_loss(checkpoint: str | Path, data_source: str, seed: int, num_images: int, draws: int,
                 split_seed: int = 0, batch: int = 512) -> float:
    """Diffusion loss of a checkpoint's EMA weights on fixed triples of the first ``num_images`` images of
    the validation split (by ``split_seed``), see :func:`fixed_triple_losses`."""
    model, spec, state = load_diffusion(checkpoint)
    model.eval()
    val = load_dataset(data_source, "val", seed=split_seed)
    n = min(num_images, len(val))
    losses, _ = fixed_triple_losses(model, val.images[:n], val.labels[:n], draws, seed, batch,
                                    objective_from_config(state.get("config")))
    # summed in float32 batch sums as before, so earlier studies' figures reproduce
    return float(sum(float(losses[i:i + batch].float().sum()) for i in range(0, len(losses), batch))) / len(losses)


def sample_metrics(preset: ReproducePreset, checkpoint: str, folder: Path, num_samples: int | None = None,
                   steps: int | None = None) -> dict:
    """Classifier-FID, precision, recall and class accuracy of EMA samples (fixed seed: repeatable), against
    the preset's reference split (``eval_reference_split``: 'test' = images the model never trained on;
    default all images of the source); ``num_samples`` and ``steps`` (of the objective's default sampler)
    override the preset's ``eval_samples`` and ``eval_ddim_steps``."""
    n = preset.eval_samples if num_samples is None else num_samples
    if n <= 0:
        return {}
    cfg = EvalConfig(checkpoint=checkpoint, num_samples=n, steps=preset.eval_ddim_steps if steps is None else steps,
                     cfg_scale=preset.cfg_scale, seed=0, extractors=preset.eval_extractors, run_dir=str(folder),
                     progress=False, reference_split=getattr(preset, "eval_reference_split", None))
    rec = evaluate_checkpoint(cfg)[0]
    return {**{k: rec.get(k) for k in ("fid", "precision", "recall", "class_accuracy")},
            "fid_reference_images": rec["reference"]["num_images"]}


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy via a temp name + rename so a stage checkpoint is never half-written."""
    tmp = dst.with_suffix(".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


# ---- the protocol ------------------------------------------------------------------------------------


def _stage_settings(preset: ReproducePreset, key: str) -> dict[str, Any]:
    """The per-stage settings of a full-scale preset (``train`` / ``metatrain`` dicts of
    :class:`noiserater.study.presets.FullScalePreset`); empty for the CPU presets."""
    return dict(getattr(preset, key, None) or {})


def _train_cfg(preset: ReproducePreset, **kw):
    """A TrainConfig for one stage: the preset's ``train`` settings, then the plan's own values (``kw``) win."""
    # the protocol's runs keep the EMA without warmup they were published with (a preset may say otherwise)
    return TrainConfig(**{"ema_warmup": False, **_stage_settings(preset, "train"), "progress": False,
                          "tensorboard": False, **kw})


def pretrain_config(preset: ReproducePreset, folder: Path, model: str, steps: int):
    """The TrainConfig of one pretraining segment (up to ``steps``) of ``model`` in ``folder``."""
    return _train_cfg(preset, data=preset.data, model=model, run_dir=str(folder / "run"), steps=steps,
                      batch_size=preset.batch_size, lr=preset.pretrain_lr, seed=PRETRAIN_SEED,
                      log_every=10, sample_every=max(steps, 1), ckpt_every=max(100, steps // 10))


def metatrain_config(preset: ReproducePreset, folder: Path, checkpoint: str, ablation: str = "full"):
    """The MetaTrainConfig of one rater: the preset's ``metatrain`` settings, the plan's values win."""
    plan = dict(checkpoint=checkpoint, data=preset.data, run_dir=str(folder / "run"), rater=preset.rater,
                ablation=ablation, outer_steps=preset.meta_outer_steps, inner_steps=preset.meta_inner_steps,
                candidates=preset.meta_candidates, inner_lr=preset.meta_inner_lr or "auto", lr=preset.meta_lr,
                seed=0, progress=False)
    return MetaTrainConfig(**{**_stage_settings(preset, "metatrain"), **plan})


def rel_to(path: str | Path, root: Path) -> str:
    """``path`` relative to the study root: stage records hold these, so a study folder can be moved."""
    return os.path.relpath(path, root)


def under(path: str | Path, root: Path) -> str:
    """A path a stage record holds, resolved against the study root (absolute paths pass through)."""
    return str(path) if os.path.isabs(path) else str(Path(root) / path)


def pretrain_segments(folder: Path, root: Path, stages: list[int], steps: int,
                      config_at: Callable[[int], TrainConfig]) -> dict[str, str]:
    """Train in ``folder/run`` segment by segment up to each of ``stages`` and ``steps`` (``config_at(s)``: the
    TrainConfig of the segment ending at step s), keeping a copy ``folder/step_XXXXXXX.pt`` of each end
    checkpoint; a segment whose copy exists is skipped. Segment by segment is bit-exact (tested). Returns
    {step: copy path relative to ``root``}."""
    ckpts = {}
    latest = folder / "run" / "checkpoints" / "latest.pt"
    for s in sorted(set(stages) | {steps}):
        dst = folder / f"step_{s:07d}.pt"
        if not dst.exists():
            if latest.exists() and load_checkpoint(latest)["step"] > s:
                raise RunDirError(f"{dst} is missing but {folder / 'run'} has trained past step {s}: its weights at "
                                  f"step {s} cannot be recovered; delete {folder} to retrain it from the start")
            finished(train(config_at(s), resume=True), str(folder))
            copy_checkpoint(folder / "run" / "checkpoints" / "latest.pt", dst)
        ckpts[str(s)] = rel_to(dst, root)
    return ckpts


def fingerprints(root: Path, paths: dict[str, str]) -> dict[str, str]:
    """{name: weights fingerprint} of checkpoints given relative to the study root (see :func:`run_stage`)."""
    return {name: weights_fingerprint(under(path, root)) for name, path in paths.items()}


def needs_checkpoints(root: Path) -> Callable[[dict], list[Path]]:
    """``run_stage``'s ``needs`` for a stage whose result lists its checkpoints under ``checkpoints``."""
    return lambda result: [Path(under(path, root)) for path in result["checkpoints"].values()]


def pretrain(preset: ReproducePreset, root: Path, model: str, steps: int, stages: list[int], log=print) -> dict:
    """Pretrain ``model`` up to ``steps`` in segments, keeping a checkpoint at each of ``stages``. The
    returned paths are relative to ``root`` (resolve them with :func:`under`)."""
    def fn(folder: Path) -> dict:
        ckpts = pretrain_segments(folder, root, stages, steps, lambda s: pretrain_config(preset, folder, model, s))
        return {"checkpoints": ckpts, "fingerprints": fingerprints(root, ckpts),
                "metrics": rel_to(folder / "run" / "metrics.jsonl", root)}

    cfg = {"data": preset.data, "model": model, "steps": steps, "stages": sorted(stages),
           "batch_size": preset.batch_size, "lr": preset.pretrain_lr}
    if _stage_settings(preset, "train"):  # recorded only when set, so the CPU studies' stages still match
        cfg["train_settings"] = _stage_settings(preset, "train")
    return run_stage(root / f"pretrain-{model.replace('/', '_')}", cfg, fn, log, needs=needs_checkpoints(root))


def continuation(preset: ReproducePreset, root: Path, table: str, init: str, policy: str, k: int, seed: int,
                 rater: str | None, model: str | None = None, variant: str = "", log=print) -> dict:
    """Continue training ``init`` with one policy and seed, then evaluate it (held-out loss, samples).
    ``init`` and ``rater`` are relative to ``root`` (as stage records hold them), or absolute.

    Results land in ``root/runs/<table>/<label>/seed<s>/stage.json``; ``variant`` prefixes the label
    (e.g. the rater ablation)."""
    label = "vanilla" if policy == "vanilla" else f"{policy} k={k}"
    label = f"{variant}: {label}" if variant else label
    folder = root / "runs" / table / label.replace(" ", "_").replace(":", "").replace("=", "") / f"seed{seed}"

    def fn(folder: Path) -> dict:
        cfg = _train_cfg(preset, data=preset.data, model=model or preset.model, run_dir=str(folder / "run"),
                         steps=preset.continue_steps, batch_size=preset.batch_size, lr=preset.continue_lr,
                         ema_decay=preset.continue_ema, seed=seed, init_checkpoint=under(init, root), policy=policy, candidates=k,
                         rater=under(rater, root) if rater else None,
                         log_every=10, sample_every=preset.continue_steps, ckpt_every=max(50, preset.continue_steps // 4))
        t0 = time.perf_counter()
        summary = finished(train(cfg, resume=True), str(folder))
        train_s = time.perf_counter() - t0
        ckpt = summary["checkpoint"]
        result = {"table": table, "label": label, "policy": policy, "k": k, "seed": seed, "init": init,
                  "checkpoint": rel_to(ckpt, root), "train_wall_s": train_s, "final_train_loss": summary["final_loss"],
                  "heldout_loss": heldout_loss(ckpt, preset.data, seed=0, num_images=preset.heldout_images,
                                               draws=preset.heldout_draws)}
        result.update(sample_metrics(preset, ckpt, folder))
        return result

    cfg = {"init": init, "policy": policy, "k": k, "seed": seed, "rater": rater, "steps": preset.continue_steps,
           "lr": preset.continue_lr, "ema": preset.continue_ema, "batch_size": preset.batch_size, "eval_samples": preset.eval_samples,
           "eval_ddim_steps": preset.eval_ddim_steps, "cfg_scale": preset.cfg_scale, "label": label}
    if preset.eval_extractors != "classifier":  # recorded only when not the default, so earlier studies still match
        cfg["eval_extractors"] = preset.eval_extractors
    if _stage_settings(preset, "train"):
        cfg["train_settings"] = _stage_settings(preset, "train")
    return run_stage(folder, cfg, fn, log)


def meta_train_rater(preset: ReproducePreset, root: Path, name: str, checkpoint: str, ablation: str = "full",
                     log=print) -> str:
    """Meta-train one rater on a frozen checkpoint (paper stage ii); returns the rater checkpoint path."""
    def fn(folder: Path) -> dict:
        summary = finished(metatrain(metatrain_config(preset, folder, under(checkpoint, root), ablation), resume=True),
                           str(folder))
        rater = rel_to(summary["rater"], root)
        return {"rater": rater, "fingerprints": fingerprints(root, {"rater": rater}),
                "summary": json.loads(json.dumps(summary, default=str))}

    cfg = {"checkpoint": checkpoint, "rater": preset.rater, "ablation": ablation, "outer": preset.meta_outer_steps,
           "inner": preset.meta_inner_steps, "K": preset.meta_candidates, "inner_lr": preset.meta_inner_lr,
           "lr": preset.meta_lr}
    if _stage_settings(preset, "metatrain"):  # recorded only when set, so the CPU studies' stages still match
        cfg["metatrain_settings"] = _stage_settings(preset, "metatrain")
    return run_stage(root / "rater" / name, cfg, fn, log,
                     needs=lambda result: [Path(under(result["rater"], root))])["rater"]


def analyze_raters(preset: ReproducePreset, root: Path, raters: dict[str, str], log=print) -> dict:
    """What the raters learned (paper Fig. 2-3): Spearman(score, noise norm), score spread and agreement with
    the heuristic policies, by timestep and across the pretraining stages; ``raters`` maps diffusion
    checkpoint -> its rater."""
    absolute = {under(c, root): under(r, root) for c, r in raters.items()}

    def fn(folder: Path) -> dict:
        cfg = StagesConfig(checkpoints=",".join(absolute), out=str(folder), num_images=preset.analysis_images,
                           num_noises=16, timesteps=11, seed=0, progress=False)
        summary = analyze_stages(cfg, rater_factory=lambda ckpt, _folder: absolute[ckpt], log=log)
        stages = [{k: r[k] for k in ("step", "rater", "pooled", "agreement_k4")} for r in summary["stages"]]
        for r in stages:  # paths relative to the study root, so the folder can move
            r["rater"] = rel_to(r["rater"], root)
        return {"figures": summary["figures"], "stages": stages}  # figures: file names in the analysis folder

    return run_stage(root / "analysis", {"raters": raters, "images": preset.analysis_images, "agreement_k": 4}, fn, log)


def reproduce(preset: ReproducePreset, out: str | Path, log=print) -> dict:
    """Run the whole protocol for ``preset`` under ``out`` (resumable), then write the report."""
    from .reproduce_report import write_report  # pandas + scipy (~1.4 s): cli.py imports this module for every command

    preset.validate()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "study.json", {"preset": preset.name, "settings": dataclasses.asdict(preset)})
    log = StageProgress(planned_stages(preset), log, root)
    pre = pretrain(preset, root, preset.model, preset.pretrain_steps, [*preset.stage_steps, preset.meta_stage], log)
    ckpts = pre["checkpoints"]
    base = ckpts[str(preset.meta_stage)]
    main_rater = meta_train_rater(preset, root, "main", base, log=log)

    for seed in preset.seeds:  # Tables 1 and 3: every policy and k on the same seeds, data order and candidate noises
        continuation(preset, root, "main", base, "vanilla", 1, seed, None, log=log)
        for k in preset.ks:
            for policy in preset.policies:
                continuation(preset, root, "main", base, policy, k, seed,
                             main_rater if policy.startswith("rater") else None, log=log)
    for seed in preset.power_seeds:  # more seeds for the headline pair only: enough power for a 1% change
        continuation(preset, root, "main", base, "vanilla", 1, seed, None, log=log)
        continuation(preset, root, "main", base, "rater", preset.headline_k, seed, main_rater, log=log)
    for ablation in preset.ablations:  # Table 2 (compared with the main vanilla runs: same init and seeds)
        r = meta_train_rater(preset, root, f"ablation-{ablation}", base, ablation, log)
        for seed in preset.seeds:
            continuation(preset, root, "ablation", base, "rater", preset.ablation_k, seed, r, variant=ablation, log=log)
    stage_raters = {s: main_rater if s == preset.meta_stage else meta_train_rater(preset, root, f"stage-{s}", ckpts[str(s)], log=log)
                    for s in preset.stage_steps}
    for stage in preset.stage_steps:  # Table 5: one table per pretraining stage, each with its own vanilla
        if stage == preset.meta_stage:  # exactly the main vanilla and rater runs: the report reuses them
            continue
        for seed in preset.seeds:
            for policy, k, rr in (("vanilla", 1, None), ("rater", preset.stage_k, stage_raters[stage])):
                continuation(preset, root, f"stage-{stage}", ckpts[str(stage)], policy, k, seed, rr, log=log)
    analyze_raters(preset, root, {ckpts[str(s)]: r for s, r in stage_raters.items()} | {base: main_rater}, log)
    if preset.transfer_model:  # Table 4: the frozen small-model rater on a larger backbone
        grid = sorted({max(1, preset.transfer_steps * i // 20) for i in range(1, 21)})
        big = pretrain(preset, root, preset.transfer_model, preset.transfer_steps, grid, log)
        # Losses are logged every 10 steps: windows of 20 logged steps = 200 optimiser steps.
        try:
            match = match_stage(under(pre["metrics"], root), preset.meta_stage, under(big["metrics"], root),
                                smooth_window=20, stability_window=20)
            matched, note = match["target_step"], "matched by eq. 10"
        except ValueError as e:  # the target never reached the source's loss: use its last checkpoint
            matched, note = preset.transfer_steps, f"not matched ({e}); using the last checkpoint"
        use = min([s for s in grid if s >= matched] or [grid[-1]])
        log(f"stage matching: {preset.model}@{preset.meta_stage} ~ {preset.transfer_model}@{matched} (using checkpoint {use})")
        write_json(root / "transfer.json", {"source": preset.model, "source_step": preset.meta_stage, "note": note,
                                            "target": preset.transfer_model, "matched_step": matched, "used_step": use})
        for seed in preset.seeds:
            for policy, k, rr in (("vanilla", 1, None), ("rater", preset.transfer_k, main_rater)):
                continuation(preset, root, "transfer", big["checkpoints"][str(use)], policy, k, seed, rr,
                             model=preset.transfer_model, log=log)
    return write_report(root, headline_k=preset.headline_k)
