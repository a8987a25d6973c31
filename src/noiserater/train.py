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
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    check_run_config,
    get_rng_state,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
)
from .config import ConfigError, dump_yaml, require, to_dict
from .data import ImageData, load_dataset
from .models import DIT_CONFIGS, DiTSpec, build_dit_from_spec
from .models.loading import load_diffusion, load_rater
from .models.rater import RATER_CONFIGS
from .objectives import OBJECTIVES, TIME_SAMPLINGS, Objective, objective_from_config
from .randomness import batch_indices, condition_labels, step_generator
from .run.folder import truncate_metrics
from .run.loop import BadStepGuard, Run, StopFlag, check_finite_weights, open_run, resume_from
from .run.speed import autocast, set_tf32
from .sampling import sample_grid_labels, save_grid
from .selection import (
    RENAMED_POLICIES,
    NoiseNormStats,
    NonFiniteError,
    SelectionPolicy,
    policy_class,
    policy_names,
    record_selection,
    soft_selection_loss,
)

# the fixed seed of the sample grids written during training (the same noise at every sample step)
SAMPLE_GRID_SEED_OFFSET = 12345


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.yaml`` in the run folder."""

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
    objective: str = "ddpm"  # ddpm (epsilon prediction) or flow (rectified flow); see noiserater.objectives
    time_sampling: str = "uniform"  # flow: t ~ uniform or logit-normal (SD3)
    logit_mean: float = 0.0  # flow, logit-normal: t = sigmoid(mean + std * n)
    logit_std: float = 1.0
    policy: str = "vanilla"
    candidates: int = 1
    rater: str | None = None
    temperature: float = 1.0
    noise_scale: float = 1.0  # every chosen noise times C (the k=1 control of a norm-changing policy)
    input_perturbation: float = 0.0  # DDPM-IP gamma: x_t from eps + gamma * xi, the target stays eps
    oracle_val_batch: int = 256  # meta-validation triples behind the oracle's validation gradient
    oracle_every: int = 1  # refresh the oracle's validation gradient every N steps (amortised oracle: N > 1)
    online_every: int = 50  # rater_online: re-distil the rater onto the oracle every N steps
    online_steps: int = 10  # rater_online: distillation steps per refresh
    online_batch: int = 32  # rater_online: images per distillation step (x k candidates)
    online_lr: float = 1e-3
    online_rater: str = "Rater-N/2"  # rater_online: architecture when --rater gives no initial rater
    distill_temperature: float = 0.5  # sharpness of the oracle's ranking as a distillation target
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
        for key in ("oracle_val_batch", "oracle_every", "online_every", "online_steps", "online_batch"):
            require(getattr(self, key) >= 1, key, "must be >= 1")
        require(math.isfinite(self.online_lr) and self.online_lr > 0, "online_lr", "must be a finite number > 0")
        require(self.online_rater in RATER_CONFIGS, "online_rater", f"choose one of {', '.join(RATER_CONFIGS)}")
        require(math.isfinite(self.distill_temperature) and self.distill_temperature > 0, "distill_temperature",
                "must be a finite number > 0")
        require(math.isfinite(self.temperature) and self.temperature > 0, "temperature", "must be a finite number > 0")
        require(math.isfinite(self.noise_scale) and 0.25 <= self.noise_scale <= 4.0, "noise_scale",
                "must be in [0.25, 4] (1 = plain N(0, I) noise; max_norm's k=1 control is about 1.09 at d=64, k=4)")
        require(math.isfinite(self.input_perturbation) and 0 <= self.input_perturbation <= 1, "input_perturbation",
                "must be in [0, 1] (0 = off; DDPM-IP uses 0.1)")
        for key in ("log_every", "sample_every", "ckpt_every", "sample_steps", "max_bad_steps"):
            require(getattr(self, key) >= 1, key, "must be >= 1")
        require(math.isfinite(self.cfg_scale) and self.cfg_scale >= 0, "cfg_scale", "must be a finite number >= 0")
        require(math.isfinite(self.grad_clip), "grad_clip", "must be finite (0 disables clipping)")
        require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")
        require(self.objective in OBJECTIVES, "objective", f"choose one of {', '.join(OBJECTIVES)}")
        require(self.time_sampling in TIME_SAMPLINGS, "time_sampling", f"choose one of {', '.join(TIME_SAMPLINGS)}")
        require(math.isfinite(self.logit_mean), "logit_mean", "must be a finite number")
        require(math.isfinite(self.logit_std) and self.logit_std > 0, "logit_std", "must be a finite number > 0")
        for key, ddpm_value in (("time_sampling", "uniform"), ("logit_mean", 0.0), ("logit_std", 1.0)):
            require(self.objective == "flow" or getattr(self, key) == ddpm_value, key,
                    "only the flow objective draws real-valued t: drop it or pass --objective flow")
        objective = train_objective(self)
        require(self.sampler is None or self.sampler in objective.samplers, "sampler",
                f"{self.sampler!r} does not fit the {self.objective} objective: choose one of "
                f"{', '.join(objective.samplers)}")
        require(self.objective != "ddpm" or self.sample_steps <= 1000, "sample_steps",
                "DDIM steps must be <= 1000 (the diffusion has 1000 timesteps)")


# Config keys added after runs were first written, with the value that reproduces what those runs did:
# a run folder from before a key existed resumes when the config asks for exactly that value.
LEGACY_VALUES = {"ema_warmup": False, "test_fraction": 0.0, "split_seed": None, "oracle_val_batch": 256,
                 "oracle_every": 1, "online_every": 50, "online_steps": 10, "online_batch": 32, "online_lr": 1e-3,
                 "online_rater": "Rater-N/2", "distill_temperature": 0.5, "objective": "ddpm",
                 "time_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "sampler": None,
                 "noise_scale": 1.0, "input_perturbation": 0.0}


def train_objective(cfg: TrainConfig) -> Objective:
    """The run's training objective (:mod:`noiserater.objectives`), from its config."""
    return objective_from_config({"objective": cfg.objective, "time_sampling": cfg.time_sampling,
                                  "logit_mean": cfg.logit_mean, "logit_std": cfg.logit_std})


def check_objective_matches(cfg: TrainConfig, state: dict, what: str) -> None:
    """A checkpoint continues with the objective it was trained with: a mismatch is a one-line error."""
    theirs = objective_from_config(state.get("config")).name
    if theirs != cfg.objective:
        raise ConfigError(f"{what} was trained with the {theirs} objective, but this run asks for --objective "
                          f"{cfg.objective}: pass --objective {theirs} (a model continues with the objective it was "
                          "trained with)")


def ema_decay_at(decay: float, step: int, warmup: bool) -> float:
    """EMA decay of the update after optimiser step ``step`` (0-based) of this run: ``decay``, or with
    ``warmup`` min(decay, (1 + step) / (10 + step)) (the warmup of DiT-style EMA implementations), so the
    average of a short run is not dominated by its starting weights (0.999**1500 = 0.22 of them remain
    without warmup; with it, 1500 steps average over the last ~10% of the run)."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def draw_step_randomness(cfg: TrainConfig, step: int, y: torch.Tensor, num_classes: int, shape: tuple,
                         objective: Objective):
    """(t [B] in the objective's units, y after dropout [B], candidates [B,k,C,H,W]) for the global batch of
    ``step``.

    Candidates are drawn candidate-major ([k,B,...], then viewed [B,k,...]): candidate j of every image is
    the same whatever k is, so vanilla (k=1) trains on exactly candidate 0 of every k>1 arm of the same
    seed, and arms of a study share their noises, not only their data order and timesteps."""
    g = step_generator(cfg.seed, step)
    B = y.shape[0]
    t = objective.sample_t(B, g)
    y = condition_labels(y, num_classes, cfg.label_dropout, cfg.unconditional, g)
    candidates = torch.randn((cfg.candidates, B, *shape), generator=g).transpose(0, 1)
    return t, y, candidates


def draw_input_perturbation(cfg: TrainConfig, step: int, shape: tuple, batch: int) -> torch.Tensor | None:
    """gamma * xi [B,C,H,W] of DDPM-IP for the global batch of ``step`` (its own stream, so the candidates
    stay paired with the other arms), or None when ``input_perturbation`` is 0."""
    if cfg.input_perturbation <= 0:
        return None
    g = step_generator(cfg.seed, step, stream=2)
    return cfg.input_perturbation * torch.randn((batch, *shape), generator=g)


def load_splits(cfg: TrainConfig, split: str) -> ImageData:
    """One split ('train', 'val' or 'test') of the run's data, by its split seed and fractions."""
    seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    return load_dataset(cfg.data, split, seed=seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)


def make_adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel on CUDA and CPU (one pass over all parameters; on a 2-core CPU it
    takes a third of the time of the default per-tensor loop), the default implementation elsewhere."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def build_policy(cfg: TrainConfig, spec: DiTSpec, device, model: torch.nn.Module | None = None,
                 train_data: ImageData | None = None) -> SelectionPolicy:
    """The run's selection policy (:meth:`SelectionPolicy.from_config` of its registered class); the
    state-dependent ones score with ``model`` (the live model) against the meta-validation split, and
    ``rater_online`` distils on ``train_data``."""
    cls = policy_class(cfg.policy)
    rater = load_rater(cfg.rater, expect=spec).to(device) if cfg.rater else None
    objective = train_objective(cfg)
    if cfg.rater:  # a rater scores (eps, t) in the units of the objective it was meta-trained with
        trained = objective_from_config(load_checkpoint(cfg.rater, kind="rater").get("diffusion")).name
        if trained != objective.name:
            raise ConfigError(f"rater {cfg.rater} was meta-trained on a {trained} checkpoint, but this run trains "
                              f"--objective {objective.name}: meta-train a rater on a {objective.name} checkpoint "
                              "(noiserater metatrain)")
    val = load_splits(cfg, "val") if cls.state_dependent else None
    return cls.from_config(cfg, rater=rater, model=model, val=val, train_data=train_data, spec=spec,
                           objective=objective)


def diffusion_state(step: int, spec: DiTSpec, model, ema, opt, cfg: TrainConfig, data: ImageData) -> dict:
    """Everything a diffusion checkpoint holds (resume: weights, EMA, optimiser, RNG; reuse: spec, config, data)."""
    return {
        "step": step,
        "spec": spec.to_dict(),
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict() if opt is not None else {},
        "rng": get_rng_state(),
        "config": to_dict(cfg),
        "data": {"name": data.name, "num_classes": data.num_classes, "class_names": data.class_names,
                 **({"latent": data.latent_info} if getattr(data, "latent_info", None) else {})},
    }


# ---- one step ----------------------------------------------------------------------------------------


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, detached
    grad_norm: torch.Tensor  # before clipping
    cause: str | None  # why the step must be skipped even if the numbers are finite (NaN rater scores)

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.loss) & torch.isfinite(self.grad_norm)) and self.cause is None


def train_step(fwd: Callable, model: torch.nn.Module, objective: Objective, policy: SelectionPolicy,
               opt: torch.optim.Optimizer, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               candidates: torch.Tensor, generator: torch.Generator, grad_clip: float, amp: bool,
               noise_scale: float = 1.0, perturbation: torch.Tensor | None = None,
               noise_stats: NoiseNormStats | None = None) -> StepResult:
    """The loss of one step and its gradient in ``model``'s ``.grad``, clipped (``grad_clip`` 0: not clipped).

    x0 [B,C,H,W], t [B], y [B], candidates [B,k,C,H,W]; ``fwd`` is ``model`` or its DDP / compiled
    wrapper. A hard policy picks one noise per image (``generator`` for its random draws) and the loss is
    the mean loss of ``objective``; ``rater_soft`` / ``uniform_soft`` weigh all k losses. The chosen noise
    (every candidate, for the soft policies) is multiplied by ``noise_scale`` after selection;
    ``perturbation`` ([B,C,H,W], DDPM-IP's gamma * xi) is added to the noise that builds x_t, not to the
    target; ``noise_stats`` records the norms of the noise the model trains on. Non-finite rater scores
    still run a forward/backward (on the first candidate), so DDP ranks stay in step; the step is then
    marked to be skipped. The optimiser update is :func:`apply_update`, once every process agrees.
    """
    cause = None
    with autocast(x0.device, amp):
        try:
            if policy.soft:
                w = policy.weights(x0, t, y, candidates)
                k = candidates.shape[1]
                noises = candidates * noise_scale if noise_scale != 1.0 else candidates
                perturb = None if perturbation is None else perturbation.repeat_interleave(k, 0)
                loss = soft_selection_loss(
                    lambda n: objective.loss(fwd, x0.repeat_interleave(k, 0), y.repeat_interleave(k, 0),
                                             t.repeat_interleave(k, 0), n, None if perturb is None else n + perturb),
                    noises, w)
            else:
                noise, _ = policy.select(x0, t, y, candidates, generator)
                noises = noise * noise_scale if noise_scale != 1.0 else noise
                loss = objective.loss(fwd, x0, y, t, noises,
                                      None if perturbation is None else noises + perturbation).mean()
            if noise_stats is not None:
                noise_stats.update(noises)
        except NonFiniteError as e:
            cause = str(e)
            loss = objective.loss(fwd, x0, y, t, candidates[:, 0]).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    return StepResult(loss.detach(), gnorm, cause)


def apply_update(opt: torch.optim.Optimizer, model: torch.nn.Module, ema: torch.nn.Module, decay: float) -> None:
    """The optimiser step, then ema <- decay * ema + (1 - decay) * model."""
    opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


# ---- the training loop ------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or continue training) a DiT; returns a summary dict. See the module docstring."""
    cfg.validate()
    with open_run(cfg.run_dir, cfg.device, {"batch_size": cfg.batch_size}) as run:
        return _train(cfg, resume, run)


def _train(cfg: TrainConfig, resume: bool, run: Run) -> dict:
    run_dir, device, is_main = run.run_dir, run.device, run.is_main
    if is_main:
        saved = run_dir / "config.yaml"
        if resume and saved.exists() and (run_dir / "checkpoints" / "latest.pt").exists():
            try:
                old = yaml.safe_load(saved.read_text())
            except yaml.YAMLError:
                old = None  # check_run_config says the folder is damaged
            if isinstance(old, dict):
                check_objective_matches(cfg, {"config": old}, f"--resume: the run in {run_dir}")
        check_run_config(run_dir, to_dict(cfg), resume, legacy=LEGACY_VALUES, renamed={"policy": RENAMED_POLICIES})
    data = load_splits(cfg, "train")
    num_classes = data.num_classes
    spec = DiTSpec(cfg.model, data.image_size, data.channels, num_classes, cfg.learn_sigma, 0.0)
    objective = train_objective(cfg)
    torch.manual_seed(cfg.seed)
    model = build_dit_from_spec(spec).to(device)
    model.grad_checkpointing = cfg.grad_checkpointing
    if device.type == "cuda":
        set_tf32(cfg.tf32)
    init_step = 0
    if cfg.init_checkpoint:  # stage iii: continue from a pretrained model (its EMA too)
        _, init_spec, init_state = load_diffusion(cfg.init_checkpoint)
        check_objective_matches(cfg, init_state, f"--init-checkpoint {cfg.init_checkpoint}")
        if (init_spec.input_size, init_spec.in_channels, init_spec.num_classes) != (spec.input_size, spec.in_channels, spec.num_classes) or init_spec.name != spec.name:
            raise CheckpointError(
                f"--init-checkpoint {cfg.init_checkpoint} is a {init_spec.name} at {init_spec.in_channels}x{init_spec.input_size}px "
                f"with {init_spec.num_classes} classes; this run is {spec.name} on {cfg.data} "
                f"({spec.in_channels}x{spec.input_size}px, {spec.num_classes} classes)"
            )
        load_state_dict_checked(model, init_state["model"], f"checkpoint {cfg.init_checkpoint}")
        init_step = int(init_state["step"])
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
    writer = _tensorboard(run_dir, step) if is_main and cfg.tensorboard else None
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
                _sample_to_disk(ema, objective, data, cfg, run_dir / "samples" / f"step_{step:07d}.png", device)
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


def _tensorboard(run_dir: Path, step: int):
    """A TensorBoard writer for run_dir/tb, or None (with a warning) when the optional [tb] extra is missing."""
    try:  # lazy: tensorboard is optional; metrics.jsonl has the same numbers without it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: tensorboard is not installed (pip install 'noiserater[tb]'): no TensorBoard events, "
              "metrics.jsonl is still written", file=sys.stderr)
        return None
    return SummaryWriter(str(run_dir / "tb"), purge_step=step)


def _sample_to_disk(ema, objective: Objective, data: ImageData, cfg: TrainConfig, path: Path, device) -> None:
    n = 2 * data.num_classes if not cfg.unconditional else 16
    g = torch.Generator().manual_seed(cfg.seed + SAMPLE_GRID_SEED_OFFSET)
    noise = torch.randn((n, data.channels, data.image_size, data.image_size), generator=g).to(device)
    y = sample_grid_labels(data.num_classes, n, cfg.unconditional).to(device)
    scale = 1.0 if cfg.unconditional else cfg.cfg_scale
    x = objective.sample(ema, noise, y, sampler=cfg.sampler, steps=cfg.sample_steps, cfg_scale=scale, clip=True)
    save_grid(x, path, nrow=data.num_classes if not cfg.unconditional else None)
