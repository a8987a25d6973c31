"""Meta-training a rater on top of a frozen diffusion checkpoint (paper stage ii, Algorithm 1).

One outer step ``n``:
  1. draw S inner batches from the train split (B images, K grouped noises each, timesteps, label dropout)
     and one validation batch from the validation split, all as a pure function of (seed, n);
  2. start from the frozen weights theta_0 (or, with ``carry_inner``, from the previous step's theta_S);
  3. compute the meta-gradient d L_val(theta_S) / d eta (``method``, default ``reverse``) and, with the same
     batches and noises, the uniform-weight baseline theta_S^unif;
  4. log L_val(theta_0), L_val(theta_S) (rater weights), L_val(theta_S^unif), the uniform inner gain
     L_val(theta_0) - L_val(theta_S^unif) and the rater advantage L_val(theta_S^unif) - L_val(theta_S);
  5. update eta with Adam (gradient clipping), skipping non-finite steps.

The split is the diffusion checkpoint's own (its dataset, seed and validation fraction), so the validation
loss is measured on images the diffusion model never trained on. Multi-process (torchrun): every batch is
split over the ranks and the inner gradients, Hessian-vector products and the meta-gradient are averaged,
so N processes compute exactly what one process computes on the global batch.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import (
    CheckpointError,
    RunLock,
    atomic_write_text,
    check_run_config,
    get_rng_state,
    load_checkpoint,
    load_state_dict_checked,
    set_rng_state,
    write_json,
)
from ..config import ConfigError, dump_yaml, require, to_dict
from ..data import ImageData, load_dataset
from ..diffusion import GaussianDiffusion
from ..models.rater import ABLATIONS, RATER_CONFIGS, NoiseRater, RaterSpec
from ..train import batch_indices, log_metrics, step_generator, truncate_metrics
from .gradient import METHODS, Reducer, inner_steps, meta_gradient_info
from .inner_optim import INNER_OPTIMIZERS, InnerOptimizer
from .losses import eval_mode, uniform_weights, val_loss

SHIFT_ONLY_PARAMS = ("head.bias", "head_norm.bias")
DEFAULT_SWEEP = {"sgd": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
                 "adam": (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3)}


@dataclass
class MetaTrainConfig:
    """Everything a meta-training run depends on; saved as ``config.yaml`` in the run folder."""

    checkpoint: str = ""
    run_dir: str = "runs/metatrain"
    rater: str = "Rater-N/2"
    ablation: str = "full"
    outer_steps: int = 300
    inner_steps: int = 5
    candidates: int = 8
    batch_size: int = 8
    val_batch_size: int = 64
    method: str = "reverse"
    inner_optimizer: str = "sgd"
    inner_lr: str | float = "auto"
    sweep_lrs: str = ""
    sweep_steps: int = 4
    temperature: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    carry_inner: bool = False
    label_dropout: float | None = None
    use_ema: bool = False
    data: str | None = None
    seed: int = 0
    log_every: int = 1
    ckpt_every: int = 50
    max_bad_steps: int = 5
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.inner_lr, str) and self.inner_lr != "auto":
            try:
                self.inner_lr = float(self.inner_lr)
            except ValueError:
                raise ConfigError(f"invalid inner_lr: {self.inner_lr!r} is neither a number nor 'auto'") from None

    def validate(self) -> None:
        require(bool(self.checkpoint), "checkpoint", "pass --checkpoint PATH to a diffusion checkpoint (noiserater train)")
        require(self.rater in RATER_CONFIGS, "rater", f"{self.rater!r} is not one of {', '.join(RATER_CONFIGS)}")
        require(self.ablation in ABLATIONS, "ablation", f"choose one of {', '.join(ABLATIONS)}")
        require(self.method in METHODS, "method", f"choose one of {', '.join(METHODS)}")
        require(self.inner_optimizer in INNER_OPTIMIZERS, "inner_optimizer", f"choose one of {', '.join(INNER_OPTIMIZERS)}")
        require(self.inner_lr == "auto" or (isinstance(self.inner_lr, float) and self.inner_lr > 0), "inner_lr",
                "must be a number > 0 or 'auto'")
        for key in ("outer_steps",):
            require(getattr(self, key) >= 0, key, "must be >= 0")
        for key in ("inner_steps", "batch_size", "val_batch_size", "sweep_steps", "log_every", "ckpt_every",
                    "max_bad_steps"):
            require(getattr(self, key) >= 1, key, "must be >= 1")
        require(self.candidates >= 2, "candidates", "K must be >= 2 (with one noise per image there is nothing to weight)")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(self.lr > 0, "lr", "the rater's learning rate must be > 0")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.label_dropout is None or 0 <= self.label_dropout < 1, "label_dropout", "must be in [0, 1)")
        require(self.inner_lr == "auto" or math.isfinite(self.inner_lr), "inner_lr", "must be a finite number > 0 or 'auto'")
        require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")
        self.sweep_grid()

    def sweep_grid(self) -> tuple[float, ...]:
        if not self.sweep_lrs:
            return DEFAULT_SWEEP[self.inner_optimizer]
        try:
            grid = tuple(float(x) for x in self.sweep_lrs.split(","))
        except ValueError:
            raise ConfigError(f"invalid sweep_lrs: {self.sweep_lrs!r}; use comma-separated numbers like 0.01,0.1,1") from None
        require(all(math.isfinite(x) and x > 0 for x in grid), "sweep_lrs", "every learning rate must be a finite number > 0")
        return grid


# ---- the batches of one outer step -----------------------------------------------------------------


def _generator(seed: int, step: int, stream: int) -> torch.Generator:
    return step_generator(seed, step, stream, streams=64)  # stream 0: validation, 1..S: inner steps


@dataclass
class _Sampler:
    train: ImageData
    val: ImageData
    num_classes: int
    seed: int
    S: int
    K: int
    B: int
    Bv: int
    label_dropout: float
    unconditional: bool
    num_timesteps: int

    def _labels(self, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.unconditional:
            return torch.full_like(y, self.num_classes)
        drop = torch.rand(y.shape[0], generator=g) < self.label_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def outer(self, n: int, rank: int, world: int, device, dtype=torch.float32, seed_offset: int = 0):
        """(S train batches, val batch) of outer step ``n``: rank ``rank``'s slice of the global batches."""
        seed = self.seed + seed_offset
        b, bv = self.B // world, self.Bv // world
        sl, slv = slice(rank * b, (rank + 1) * b), slice(rank * bv, (rank + 1) * bv)
        shape = tuple(self.train.images.shape[1:])
        batches = []
        for s in range(self.S):
            g = _generator(seed, n, 1 + s)
            idx = batch_indices(len(self.train), self.B, n * self.S + s, seed)
            t = torch.randint(0, self.num_timesteps, (self.B,), generator=g)
            y = self._labels(self.train.labels[idx], g)
            eps = torch.randn((self.B, self.K, *shape), generator=g)
            batches.append(tuple(x[sl].to(device) for x in (self.train.images[idx].to(dtype), y, t, eps.to(dtype))))
        g = _generator(seed, n, 0)
        idx = batch_indices(len(self.val), self.Bv, n, seed + 1)
        t = torch.randint(0, self.num_timesteps, (self.Bv,), generator=g)
        y = self._labels(self.val.labels[idx], g)
        eps = torch.randn((self.Bv, *shape), generator=g)
        val = tuple(x[slv].to(device) for x in (self.val.images[idx].to(dtype), y, t, eps.to(dtype)))
        return batches, val


# ---- helpers -----------------------------------------------------------------------------------------


def _val(model, batch, params, reducer: Reducer) -> float:
    with torch.no_grad(), eval_mode(model):
        lv = val_loss(model, batch, params=params)
    return float(reducer.mean([lv])[0])


def _set_params(model, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in params:
                p.copy_(params[n])


def _entropy(w: torch.Tensor) -> torch.Tensor:
    return -(w * w.clamp_min(1e-30).log()).sum(dim=1)


def sweep_inner_lr(model, sampler: _Sampler, grid, opt_name: str, steps: int, rank: int, world: int, device,
                   reducer: Reducer) -> tuple[float, list[dict]]:
    """Pick the inner lr with the largest mean uniform inner gain L_val(theta_0) - L_val(theta_S^unif)
    over ``steps`` outer batches (drawn apart from the training batches). Falls back to the smallest lr."""
    rows = []
    draws = [sampler.outer(n, rank, world, device, seed_offset=100_003) for n in range(steps)]
    base = [_val(model, val, None, reducer) for _, val in draws]
    for lr in grid:
        gains = []
        for (batches, val), l0 in zip(draws, base):
            theta = inner_steps(model, batches, [uniform_weights(b) for b in batches], inner_lr=lr,
                                inner_optimizer=opt_name, reducer=reducer)
            gains.append(l0 - _val(model, val, theta, reducer))
        mean = sum(gains) / len(gains)
        rows.append({"inner_lr": lr, "uniform_gain": mean if math.isfinite(mean) else None})
    finite = [r for r in rows if r["uniform_gain"] is not None]
    best = max(finite, key=lambda r: r["uniform_gain"]) if finite else None
    if best is None or best["uniform_gain"] <= 0:
        return min(grid), rows
    return best["inner_lr"], rows


def _warn(msg: str, is_main: bool) -> None:
    if is_main:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


# ---- the loop ----------------------------------------------------------------------------------------


def metatrain(cfg: MetaTrainConfig, resume: bool = False) -> dict:
    """Meta-train a rater (see module docstring); returns a summary dict."""
    from ..train import init_distributed

    cfg.validate()
    rank, world, device = init_distributed()
    for key in ("batch_size", "val_batch_size"):
        if getattr(cfg, key) % world:
            raise ValueError(f"{key} {getattr(cfg, key)} is not divisible by the {world} processes; the global batch must split evenly")
    is_main = rank == 0
    run_dir = Path(cfg.run_dir)
    lock = RunLock(run_dir).acquire() if is_main else None
    try:
        return _metatrain(cfg, resume, rank, world, device, run_dir, is_main)
    finally:
        if lock is not None:
            lock.release()


def _metatrain(cfg: MetaTrainConfig, resume: bool, rank: int, world: int, device, run_dir: Path, is_main: bool) -> dict:
    from ..train import NumericsError, load_diffusion

    if is_main:
        check_run_config(run_dir, to_dict(cfg), resume)
    model, spec, dstate = load_diffusion(cfg.checkpoint, use_ema=cfg.use_ema, device=device)
    model.eval()
    dcfg = dstate.get("config", {}) or {}
    source = cfg.data or dcfg.get("data", "digits")
    split_seed, val_fraction = int(dcfg.get("seed", 0)), float(dcfg.get("val_fraction", 0.1))
    train_data = load_dataset(source, "train", seed=split_seed, val_fraction=val_fraction)
    val_data = load_dataset(source, "val", seed=split_seed, val_fraction=val_fraction)
    if (train_data.channels, train_data.image_size, train_data.num_classes) != (spec.in_channels, spec.input_size, spec.num_classes):
        raise CheckpointError(
            f"dataset {source!r} has {train_data.channels}x{train_data.image_size}px images in {train_data.num_classes} classes, "
            f"but {cfg.checkpoint} is a model of {spec.in_channels}x{spec.input_size}px with {spec.num_classes} classes; "
            "pass the dataset the checkpoint was trained on (--data)"
        )
    if len(val_data) < cfg.val_batch_size:
        _warn(f"the validation split has {len(val_data)} images, fewer than --val-batch-size {cfg.val_batch_size}: "
              "validation batches repeat images", is_main)
    label_dropout = cfg.label_dropout if cfg.label_dropout is not None else float(dcfg.get("label_dropout", 0.1))
    sampler = _Sampler(train_data, val_data, spec.num_classes, cfg.seed, cfg.inner_steps, cfg.candidates,
                       cfg.batch_size, cfg.val_batch_size, label_dropout, bool(dcfg.get("unconditional", False)),
                       GaussianDiffusion().num_timesteps)
    torch.manual_seed(cfg.seed)
    rater = NoiseRater(RaterSpec(cfg.rater, spec.input_size, spec.in_channels, spec.num_classes, cfg.ablation)).to(device)
    # The group softmax ignores a shift shared by all K scores, so the head's bias and its LayerNorm's bias
    # (which only shift every score) have an exactly zero meta-gradient; Adam would scale its round-off to
    # lr-sized steps. They stay at their initial values.
    trainable = [p for n, p in rater.named_parameters() if p.requires_grad and n not in SHIFT_ONLY_PARAMS]
    opt = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    reducer = Reducer()
    ckpt_path = run_dir / "checkpoints" / "latest.pt"
    step, inner_lr, sweep, carried, bad_in_row = 0, None, None, None, 0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, kind="rater")
        if state.get("spec") != rater.spec.to_dict():
            raise CheckpointError(f"{ckpt_path} holds rater {state.get('spec')}, this config builds {rater.spec.to_dict()}")
        load_state_dict_checked(rater, state["rater"], str(ckpt_path))
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        step, inner_lr, sweep = int(state["step"]), float(state["inner_lr"]), state.get("sweep")
        bad_in_row = int(state.get("bad_in_row", 0))
        carried = state.get("inner_params")
    if inner_lr is None:
        if cfg.inner_lr == "auto":
            inner_lr, sweep = sweep_inner_lr(model, sampler, cfg.sweep_grid(), cfg.inner_optimizer, cfg.sweep_steps,
                                             rank, world, device, reducer)
            if all(r["uniform_gain"] is None or r["uniform_gain"] <= 0 for r in sweep):
                _warn(f"no inner lr in {list(cfg.sweep_grid())} lowers the validation loss with uniform weights; "
                      f"using the smallest, {inner_lr}; try smaller --sweep-lrs", is_main)
        else:
            inner_lr = float(cfg.inner_lr)
    if carried is not None:
        _set_params(model, carried)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        truncate_metrics(run_dir / "metrics.jsonl", step, events_count_done=True)
        if sweep is not None and step == 0:
            write_json(run_dir / "inner_lr_sweep.json", {"chosen": inner_lr, "grid": sweep})
    inner_opt = InnerOptimizer(cfg.inner_optimizer, inner_lr)

    def log(rec: dict) -> None:
        log_metrics(run_dir, is_main, rec)

    def save(final: bool = False) -> None:
        for name, p in rater.named_parameters():  # never overwrite the last good checkpoint with NaN/inf weights
            if not bool(torch.isfinite(p).all()):
                raise NumericsError(f"rater weight {name} became non-finite by step {step}; not saving, the last good "
                                    f"checkpoint {ckpt_path} is untouched; lower --lr or use --grad-clip")
        if not is_main:
            return
        extra = {
            "optimizer": opt.state_dict(), "rng": get_rng_state(), "step": step, "config": to_dict(cfg),
            "inner_lr": inner_lr, "sweep": sweep, "bad_in_row": bad_in_row,
            "diffusion": {"checkpoint": str(cfg.checkpoint), "step": int(dstate.get("step", 0)), "spec": spec.to_dict()},
            "data": {"source": source, "split_seed": split_seed, "val_fraction": val_fraction},
        }
        if cfg.carry_inner:
            extra["inner_params"] = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        from ..checkpoint import save_rater

        save_rater(ckpt_path, rater, extra)
        save_rater(run_dir / "rater.pt", rater, {k: extra[k] for k in ("step", "config", "inner_lr", "diffusion", "data")})

    bar = None
    if is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.outer_steps, initial=step, desc="metatrain", dynamic_ncols=True)
    from ..train import _StopFlag

    summary: dict = {"run_dir": str(run_dir), "start_step": step, "inner_lr": inner_lr, "method": cfg.method}
    window: list[dict] = []
    warned = False
    with _StopFlag() as stopper:
        while step < cfg.outer_steps:
            t0 = time.perf_counter()
            batches, val = sampler.outer(step, rank, world, device)
            l0 = _val(model, val, None, reducer)
            res = meta_gradient_info(model, rater, batches, val, inner_lr=inner_lr, method=cfg.method,
                                     inner_optimizer=inner_opt, temperature=cfg.temperature, reducer=reducer)
            theta_rater, l_rater = res.params, res.val_loss
            if theta_rater is None:  # alignment: the rater-weighted trajectory is not part of the estimate
                theta_rater = inner_steps(model, batches, res.weights, inner_lr=inner_lr, inner_optimizer=inner_opt,
                                          reducer=reducer)
                l_rater = _val(model, val, theta_rater, reducer)
            theta_unif = inner_steps(model, batches, [uniform_weights(b) for b in batches], inner_lr=inner_lr,
                                     inner_optimizer=inner_opt, reducer=reducer)
            l_unif = _val(model, val, theta_unif, reducer)
            for (name, p), g in zip(rater.named_parameters(), res.grads):
                p.grad = g.detach().clone() if p.requires_grad and name not in SHIFT_ONLY_PARAMS else None
            gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            finite = math.isfinite(float(gnorm)) and math.isfinite(l_rater)
            if finite:
                opt.step()
                bad_in_row = 0
            else:
                bad_in_row += 1
                log({"step": step + 1, "event": "nonfinite_skipped", "val_loss_rater": l_rater, "meta_grad_norm": float(gnorm)})
                if bad_in_row >= cfg.max_bad_steps:
                    raise NumericsError(
                        f"non-finite meta-gradient or validation loss for {bad_in_row} outer steps in a row, last at step "
                        f"{step + 1}; the last good checkpoint is {ckpt_path}; lower --inner-lr or --lr, or use --grad-clip"
                    )
            opt.zero_grad(set_to_none=True)
            if cfg.carry_inner and finite:
                _set_params(model, theta_rater)
            step += 1
            scores = torch.cat(res.scores).double()
            w = torch.cat(res.weights).double()
            # global moments (equal slices per rank), so N processes log what one process logs
            m1, m2, in_group, ent, wmax = reducer.mean([scores.mean(), scores.pow(2).mean(), scores.std(dim=1).mean(),
                                                        _entropy(w).mean(), w.max(dim=1).values.mean()])
            n_scores = scores.numel() * world
            score_std = math.sqrt(max(float(m2 - m1 * m1), 0.0) * n_scores / max(n_scores - 1, 1))
            rec = {
                "step": step, "val_loss_init": l0, "val_loss_rater": l_rater, "val_loss_uniform": l_unif,
                "uniform_gain": l0 - l_unif, "rater_advantage": l_unif - l_rater, "meta_grad_norm": float(gnorm),
                "score_mean": float(m1), "score_std": score_std, "score_std_in_group": float(in_group),
                "weight_entropy": float(ent), "weight_entropy_uniform": math.log(cfg.candidates),
                "weight_max": float(wmax), "inner_lr": inner_lr, "time_s": time.perf_counter() - t0,
                "time": time.time(),
            }
            window.append(rec)
            window = window[-50:]
            if step % cfg.log_every == 0 or step == cfg.outer_steps:
                log(rec)
            if not warned and len(window) >= min(10, cfg.outer_steps) and sum(r["uniform_gain"] for r in window) <= 0:
                _warn(f"uniform inner steps do not lower the validation loss (mean uniform gain "
                      f"{sum(r['uniform_gain'] for r in window) / len(window):.3g} over {len(window)} steps at inner lr "
                      f"{inner_lr}): the rater can only learn to undo damage; use --inner-lr auto or a smaller lr", is_main)
                warned = True
            if bar is not None:
                bar.update(1)
                adv = sum(r["rater_advantage"] for r in window) / len(window)
                bar.set_postfix(val=f"{l_rater:.4f}", adv=f"{adv:+.2e}", gain=f"{rec['uniform_gain']:+.2e}")
            stop_now = stopper.stop  # read once: the handler may flip it at any time
            if world > 1:  # a signal may reach one rank only: all stop together or the others hang in a collective
                import torch.distributed as dist

                f = torch.tensor(1.0 if stop_now else 0.0, device=device)
                dist.all_reduce(f, op=dist.ReduceOp.MAX)
                stop_now = bool(f > 0)
            if step % cfg.ckpt_every == 0 or step == cfg.outer_steps or stop_now:
                save()
                if stop_now:
                    summary["interrupted"] = True
                    summary["signal"] = stopper.signum
                    break
    if bar is not None:
        bar.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if step == summary["start_step"] and is_main and not (run_dir / "rater.pt").exists():
        save()
    summary.update({"step": step, "rater": str(run_dir / "rater.pt"), "checkpoint": str(ckpt_path)})
    if window:
        n = len(window)
        summary["last_steps"] = {
            "n": n,
            "val_loss_init": sum(r["val_loss_init"] for r in window) / n,
            "val_loss_rater": sum(r["val_loss_rater"] for r in window) / n,
            "val_loss_uniform": sum(r["val_loss_uniform"] for r in window) / n,
            "rater_advantage": sum(r["rater_advantage"] for r in window) / n,
            "rater_better_fraction": sum(r["rater_advantage"] > 0 for r in window) / n,
        }
    return summary
