"""Diffusion training (pretraining and the paper's stage-iii continuation with a selection policy).

:func:`train` reads top to bottom: set up data, model, EMA, optimiser and the selection policy, resume,
then loop: draw the step's randomness, :func:`train_step` (select noise, loss, backward, clip), apply the
update and the EMA when every process agrees the step is finite, log, sample, checkpoint. The run folder,
lock, signals, bad-step guard and DDP agreement are the shared scaffold (:mod:`noiserater.run.loop`).

Randomness is a pure function of (seed, step) (:mod:`noiserater.run.randomness`): each step draws
timesteps, label-dropout masks and k candidate noises for the GLOBAL batch; each DDP rank takes its slice.
So a resumed run and a 2-process run see exactly the noise a straight 1-process run sees.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    check_run_config,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
)
from .config import ConfigError, dump_yaml, require, to_dict
from .data import ImageData, load_dataset
from .models import DIT_CONFIGS, DiTSpec, build_dit_from_spec
from .models.loading import diffusion_state, load_diffusion, load_rater
from .objectives import ObjectiveOptions, objective_from_config
from .randomness import batch_indices, draw_input_perturbation, draw_step_randomness, step_generator
from .run.folder import tensorboard_writer, truncate_metrics
from .run.loop import BadStepGuard, Run, StopFlag, check_finite_weights, open_run, resume_from
from .run.speed import make_adamw, set_tf32
from .run.step import apply_update, train_step
from .sampling import save_sample_grid
from .selection import (
    RENAMED_POLICIES,
    NoiseNormStats,
    PolicyOptions,
    SelectionPolicy,
    policy_class,
    policy_names,
    record_selection,
)

# the fixed seed of the sample grids written during training (the same noise at every sample step)
SAMPLE_GRID_SEED_OFFSET = 12345


@dataclass
class TrainConfig(ObjectiveOptions, PolicyOptions):
    """Everything a training run depends on; saved as ``config.yaml`` in the run folder. The objective's and
    the policies' own settings are declared with them (:class:`ObjectiveOptions`, :class:`PolicyOptions`)."""

    data: str = "digits"
    model: str = "DiT-T/2"
    run_dir: str = "runs/train"
    steps: int = 2000
    batch_size: int = 64  # global, over all processes
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1+n)/(10+n)) at the run's n-th update: a short run's EMA forgets its start
    grad_clip: float = 1.0
    amp: bool = False  # bf16 autocast
    seed: int = 0
    unconditional: bool = False
    label_dropout: float = 0.1
    learn_sigma: bool = False
    val_fraction: float = 0.1
    test_fraction: float = 0.0  # a test split nobody trains or selects with (held-out evaluation only)
    split_seed: int | None = None  # seed of the train/val/test split; None = ``seed`` (earlier releases)
    init_checkpoint: str | None = None  # continue from a pretrained diffusion checkpoint (stage iii)
    policy: str = "vanilla"  # its own options: selection.PolicyOptions; the objective's: objectives.ObjectiveOptions
    candidates: int = 1
    rater: str | None = None
    noise_scale: float = 1.0  # every chosen noise times C (the k=1 control of a norm-changing policy)
    input_perturbation: float = 0.0  # DDPM-IP gamma: x_t from eps + gamma * xi, the target stays eps
    log_every: int = 50
    sample_every: int = 500
    ckpt_every: int = 500
    sample_steps: int = 50
    sampler: str | None = None  # sampler of the periodic grids; None: the objective's default (ddim / euler)
    cfg_scale: float = 1.25
    max_bad_steps: int = 5
    compile: bool = False
    tf32: bool = True  # TF32 matmuls/convolutions on CUDA (as DiT trains); no effect on CPU
    grad_checkpointing: bool = False  # recompute DiT blocks in backward: less memory, ~30% more compute
    tensorboard: bool = True
    progress: bool = True
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N

    def __post_init__(self) -> None:
        if self.policy in RENAMED_POLICIES:  # an old config or run folder: read it with the policy's new name
            warnings.warn(f"policy {self.policy!r} is now called {RENAMED_POLICIES[self.policy]!r}; "
                          "write that in new configs", FutureWarning, stacklevel=3)
            self.policy = RENAMED_POLICIES[self.policy]

    def validate(self) -> None:
        require(self.model in DIT_CONFIGS, "model", f"{self.model!r} is not one of {', '.join(DIT_CONFIGS)}")
        require(self.steps >= 1, "steps", "must be >= 1 (with 0 there is nothing to train)")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", "learning rate must be a finite number > 0")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be a finite number >= 0")
        require(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        require(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        require(0 <= self.label_dropout < 1, "label_dropout", "must be in [0, 1)")
        require(self.policy in policy_names(), "policy", f"choose one of {', '.join(policy_names())}")
        policy_class(self.policy).check_run(self)  # k and --rater rules, each policy's own limits
        require(0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1, "test_fraction",
                "must be in [0, 1) with val_fraction + test_fraction < 1")
        require(self.split_seed is None or 0 <= self.split_seed < 2**32, "split_seed", "must be in [0, 2**32)")
        self.validate_policy_options()
        require(math.isfinite(self.noise_scale) and 0.25 <= self.noise_scale <= 4.0, "noise_scale",
                "must be in [0.25, 4] (1 = plain N(0, I) noise; max_norm's k=1 control is about 1.09 at d=64, k=4)")
        require(math.isfinite(self.input_perturbation) and 0 <= self.input_perturbation <= 1, "input_perturbation",
                "must be in [0, 1] (0 = off; DDPM-IP uses 0.1)")
        for key in ("log_every", "sample_every", "ckpt_every", "sample_steps", "max_bad_steps"):
            require(getattr(self, key) >= 1, key, "must be >= 1")
        require(math.isfinite(self.cfg_scale) and self.cfg_scale >= 0, "cfg_scale", "must be a finite number >= 0")
        require(math.isfinite(self.grad_clip), "grad_clip", "must be finite (0 disables clipping)")
        require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")
        self.validate_objective_options()
        objective = self.training_objective()
        require(self.sampler is None or self.sampler in objective.samplers, "sampler",
                f"{self.sampler!r} does not fit the {self.objective} objective: choose one of "
                f"{', '.join(objective.samplers)}")
        require(self.objective != "ddpm" or self.sample_steps <= 1000, "sample_steps",
                "DDIM steps must be <= 1000 (the diffusion has 1000 timesteps)")


# Config keys added after runs were first written, with the value that reproduces what those runs did:
# a run folder from before a key existed resumes when the config asks for exactly that value.
LEGACY_VALUES = {"ema_warmup": False, "test_fraction": 0.0, "split_seed": None, "sampler": None, "noise_scale": 1.0,
                 "input_perturbation": 0.0, **PolicyOptions.LEGACY_VALUES, **ObjectiveOptions.LEGACY_VALUES}


def ema_decay_at(decay: float, step: int, warmup: bool) -> float:
    """EMA decay of the update after optimiser step ``step`` (0-based) of this run: ``decay``, or with
    ``warmup`` min(decay, (1 + step) / (10 + step)) (the warmup of DiT-style EMA implementations), so the
    average of a short run is not dominated by its starting weights (0.999**1500 = 0.22 of them remain
    without warmup; with it, 1500 steps average over the last ~10% of the run)."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def load_splits(cfg: TrainConfig, split: str) -> ImageData:
    """One split ('train', 'val' or 'test') of the run's data, by its split seed and fractions."""
    seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    return load_dataset(cfg.data, split, seed=seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)


def build_policy(cfg: TrainConfig, spec: DiTSpec, device, model: torch.nn.Module | None = None,
                 train_data: ImageData | None = None) -> SelectionPolicy:
    """The run's selection policy (:meth:`SelectionPolicy.from_config` of its registered class); the
    state-dependent ones score with ``model`` (the live model) against the meta-validation split, and
    ``rater_online`` distils on ``train_data``."""
    cls = policy_class(cfg.policy)
    rater = load_rater(cfg.rater, expect=spec).to(device) if cfg.rater else None
    objective = cfg.training_objective()
    if cfg.rater:  # a rater scores (eps, t) in the units of the objective it was meta-trained with
        trained = objective_from_config(load_checkpoint(cfg.rater, kind="rater").get("diffusion")).name
        if trained != objective.name:
            raise ConfigError(f"rater {cfg.rater} was meta-trained on a {trained} checkpoint, but this run trains "
                              f"--objective {objective.name}: meta-train a rater on a {objective.name} checkpoint "
                              "(noiserater metatrain)")
    val = load_splits(cfg, "val") if cls.state_dependent else None
    return cls.from_config(cfg, rater=rater, model=model, val=val, train_data=train_data, spec=spec,
                           objective=objective)


# ---- the training loop ------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or continue training) a DiT; returns a summary dict. See the module docstring."""
    cfg.validate()
    with open_run(cfg.run_dir, cfg.device, {"batch_size": cfg.batch_size}) as run:
        return _train(cfg, resume, run)


def _check_run_folder(cfg: TrainConfig, run_dir: Path, resume: bool) -> None:
    """The run folder may be (re)used with this config: a resumed run keeps its objective and its settings."""
    saved = run_dir / "config.yaml"
    if resume and saved.exists() and (run_dir / "checkpoints" / "latest.pt").exists():
        try:
            old = yaml.safe_load(saved.read_text())
        except yaml.YAMLError:
            old = None  # check_run_config says the folder is damaged
        if isinstance(old, dict):
            cfg.check_matches({"config": old}, f"--resume: the run in {run_dir}")
    check_run_config(run_dir, to_dict(cfg), resume, legacy=LEGACY_VALUES, renamed={"policy": RENAMED_POLICIES})


def _load_init_checkpoint(cfg: TrainConfig, spec: DiTSpec, model: torch.nn.Module) -> dict:
    """Stage iii: load the pretrained model's weights into ``model``; returns its checkpoint (its EMA too)."""
    _, init_spec, init_state = load_diffusion(cfg.init_checkpoint)
    cfg.check_matches(init_state, f"--init-checkpoint {cfg.init_checkpoint}")
    if (init_spec.input_size, init_spec.in_channels, init_spec.num_classes) != (spec.input_size, spec.in_channels, spec.num_classes) or init_spec.name != spec.name:
        raise CheckpointError(
            f"--init-checkpoint {cfg.init_checkpoint} is a {init_spec.name} at {init_spec.in_channels}x{init_spec.input_size}px "
            f"with {init_spec.num_classes} classes; this run is {spec.name} on {cfg.data} "
            f"({spec.in_channels}x{spec.input_size}px, {spec.num_classes} classes)"
        )
    load_state_dict_checked(model, init_state["model"], f"checkpoint {cfg.init_checkpoint}")
    return init_state


def _train(cfg: TrainConfig, resume: bool, run: Run) -> dict:
    run_dir, device, is_main = run.run_dir, run.device, run.is_main
    if is_main:
        _check_run_folder(cfg, run_dir, resume)
    data = load_splits(cfg, "train")
    num_classes = data.num_classes
    spec = DiTSpec(cfg.model, data.image_size, data.channels, num_classes, cfg.learn_sigma, 0.0)
    objective = cfg.training_objective()
    torch.manual_seed(cfg.seed)
    model = build_dit_from_spec(spec).to(device)
    model.grad_checkpointing = cfg.grad_checkpointing
    if device.type == "cuda":
        set_tf32(cfg.tf32)
    init_state = _load_init_checkpoint(cfg, spec, model) if cfg.init_checkpoint else None
    init_step = int(init_state["step"]) if init_state else 0
    ema = build_dit_from_spec(spec).to(device)
    ema.load_state_dict(model.state_dict() if not cfg.init_checkpoint else init_state["ema"])
    ema.requires_grad_(False).eval()
    opt = make_adamw(model.parameters(), cfg.lr, cfg.weight_decay, device)
    policy = build_policy(cfg, spec, device, model, data)
    step = 0
    resumed_noise_stats = None
    ckpt_path = run_dir / "checkpoints" / "latest.pt"
    if resume and ckpt_path.exists():
        state = resume_from(ckpt_path, "diffusion", spec.to_dict(), model, "model", opt, "model")
        ema.load_state_dict(state["ema"])
        policy.load_state_dict(state.get("selection_state") or {})
        step = int(state["step"])
        resumed_noise_stats = state.get("noise_stats")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        # policy, k, rater path + sha256 (a batch coupling: the images each process couples) -> run_info.json
        record_selection(run_dir, policy, cfg.rater, resume, cfg.batch_size // run.world)
        truncate_metrics(run_dir / "metrics.jsonl", step)
    fwd = model
    if run.world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)
    writer = tensorboard_writer(run_dir, step) if is_main and cfg.tensorboard else None
    local_bs = cfg.batch_size // run.world
    shape = (data.channels, data.image_size, data.image_size)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True) if is_main and cfg.progress else None
    guard = BadStepGuard(cfg.max_bad_steps, "loss, gradient or rater scores",
                         "lower --lr, enable --grad-clip or check the data")
    last_loss, t_last, seen = float("nan"), time.perf_counter(), 0
    noise_stats = NoiseNormStats()  # the norms of the noise trained on since the last log record
    if resumed_noise_stats:
        noise_stats.load_state_dict(resumed_noise_stats)
    summary: dict = {"run_dir": str(run_dir), "start_step": step}
    model.train()
    with StopFlag() as stopper:
        while step < cfg.steps:
            idx = batch_indices(len(data), cfg.batch_size, step, cfg.seed)
            t, y, cand = draw_step_randomness(cfg, step, data.labels[idx], num_classes, shape, objective)
            sl = slice(run.rank * local_bs, (run.rank + 1) * local_bs)
            x0 = data.images[idx[sl]].to(device, non_blocking=True)
            t, y, cand = t[sl].to(device), y[sl].to(device), cand[sl].to(device)
            perturb = draw_input_perturbation(cfg, step, shape, cfg.batch_size)
            perturb = None if perturb is None else perturb[sl].to(device)
            policy.before_step(step)  # state-dependent scorers refresh at the weights of this step
            res = train_step(fwd, model, objective, policy, opt, x0, t, y, cand, step_generator(cfg.seed, step, stream=1),
                             cfg.grad_clip, cfg.amp, cfg.noise_scale, perturb, noise_stats)
            # read the stop flag once (the handler may flip it at any time); every rank must agree to skip
            # and to stop, or DDP ranks diverge
            apply, stop_now = run.agree(res.finite, stopper.stop)
            if apply:
                apply_update(opt, model, ema, ema_decay_at(cfg.ema_decay, step, cfg.ema_warmup))
                guard.good()
                last_loss = float(res.loss)
            else:
                run.log({"step": step, "event": "nonfinite_skipped", "loss": float(res.loss),
                         "grad_norm": float(res.grad_norm), "batch": idx.tolist(),
                         "cause": res.cause or "non-finite loss or gradient"})
                guard.bad(step, ckpt_path, f" (batch indices {idx.tolist()[:8]}...)")
            step += 1
            seen += cfg.batch_size
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                rec = {"step": step, "loss": last_loss, "grad_norm": float(res.grad_norm),
                       "images_per_s": seen / (now - t_last), "lr": cfg.lr, "time": time.time(),
                       **noise_stats.summary()}  # this process's share of the batch
                t_last, seen = now, 0
                noise_stats.reset()
                run.log(rec)
                if writer is not None:
                    writer.add_scalar("train/loss", last_loss, step)
                    writer.add_scalar("train/images_per_s", rec["images_per_s"], step)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rec['images_per_s']:.0f}")
            if is_main and (step % cfg.sample_every == 0 or step == cfg.steps):
                save_sample_grid(ema, objective, data, run_dir / "samples" / f"step_{step:07d}.png",
                                 seed=cfg.seed + SAMPLE_GRID_SEED_OFFSET, unconditional=cfg.unconditional,
                                 cfg_scale=cfg.cfg_scale, sampler=cfg.sampler, steps=cfg.sample_steps, device=device)
            if run.should_save(step, cfg.steps, cfg.ckpt_every, stop_now):
                check_finite_weights(step, ckpt_path, "the loss and gradient were finite: the update overflowed, "
                                     "is --lr too large?", model, ema)
                if is_main:
                    state = diffusion_state(step, spec, model, ema, opt, cfg, data)
                    if policy.scorer is not None:  # the oracle's cached gradient / the online rater: exact resume
                        state["selection_state"] = policy.state_dict()
                    state["noise_stats"] = noise_stats.state_dict()
                    save_checkpoint(ckpt_path, state, kind="diffusion")
                if stop_now:
                    summary["interrupted"] = True
                    summary["signal"] = stopper.signum
                    break
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    run.barrier()
    summary.update({"step": step, "final_loss": last_loss, "checkpoint": str(ckpt_path), "init_step": init_step})
    return summary
