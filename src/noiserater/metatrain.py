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

``objective="distill"`` (flag ``--meta-objective distill``) replaces steps 2-5: each outer step draws one group batch from the
train split (B images x K candidates, timesteps, label dropout as above), computes the alignment oracle
``a_bk = <grad L_val, grad l_bk>`` at the frozen checkpoint with a validation gradient on a LARGE fresh
meta-validation draw (``distill_val_batch_size`` image/noise/timestep triples, redrawn every step), and
takes one Adam step on the listwise ``distillation_loss(scores, a, distill_temperature)``. No inner steps,
no inner-lr sweep.

Held-out meta-validation, at step 0 and every ``eval_every`` outer steps (choose
``outer_steps`` as a multiple of it to evaluate the final rater):
the validation split is cut once, by the data seed, into two halves. The *meta* half feeds every outer
loss, the oracle's validation gradients and the inner-lr sweep; the *held-out* half (``heldout_fraction``
of it) is used only here, on ``eval_batches`` FIXED draws from their own seed stream (so their train-split
batches and noises are never training batches either). Bilevel: the held-out rater advantage
``L_ho(theta_S^uniform) - L_ho(theta_S^rater)`` per fixed outer batch, mean and standard error. Distill: the
within-group Spearman and argmax agreement of the rater with the oracle computed from held-out validation
gradients, on fixed groups, mean and standard error over groups. Each evaluation is one ``{"step", "eval"}``
record in metrics.jsonl; the best rater so far is ``rater_best.pt`` (an evaluation counts as better when
it beats the best by more than its own standard error), ``patience`` evaluations without such an
improvement stop the run, and ``heldout_curve.png`` plots the curve. The test split (``test_fraction`` of
the checkpoint's config) is never loaded.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    check_run_config,
    get_rng_state,
    write_json,
)
from .config import ConfigError, dump_yaml, require, to_dict
from .meta.batches import MetaBatches, checkpoint_splits, split_heldout
from .meta.gradient import IMPLICIT_ITERATIONS, METHODS, Reducer, check_implicit_options
from .meta.inner_optim import INNER_OPTIMIZERS, InnerOptimizer
from .meta.oracle import ORACLE_MODES
from .meta.outer import BilevelStep, DistillStep, set_params, sweep_inner_lr, trainable_params, weight_entropy
from .models.loading import load_diffusion, save_rater
from .models.rater import ABLATIONS, RATER_CONFIGS, NoiseRater, RaterSpec
from .objectives import objective_from_config
from .plotting import figure, label_axes, legend, savefig
from .run.folder import eval_records, truncate_metrics
from .run.loop import BadStepGuard, Run, StopFlag, check_finite_weights, open_run, resume_from

OBJECTIVES = ("bilevel", "distill")
DEFAULT_SWEEP = {"sgd": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
                 "adam": (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3)}


# Keys added after meta-training runs were first written, with the value that reproduces those runs (no
# held-out evaluation, the whole validation split for the outer loss): such a run folder resumes when the
# config asks for exactly that.
LEGACY_VALUES = {"objective": "bilevel", "distill_val_batch_size": 512, "distill_temperature": 0.5,
                 "distill_oracle": "align", "eval_every": 0, "eval_batches": 8, "heldout_fraction": 0.5,
                 "patience": 0, "planted_scale": 1.0, "implicit_damping": None,
                 "implicit_iterations": IMPLICIT_ITERATIONS, "implicit_alpha": None, "memory_budget": 0}


@dataclass
class MetaTrainConfig:
    """Everything a meta-training run depends on; saved as ``config.yaml`` in the run folder."""

    checkpoint: str = ""
    run_dir: str = "runs/metatrain"
    rater: str = "Rater-N/2"
    ablation: str = "full"
    objective: str = "bilevel"
    outer_steps: int = 300
    inner_steps: int = 5
    candidates: int = 8
    batch_size: int = 8
    val_batch_size: int = 64
    method: str = "reverse"
    implicit_damping: float | None = None
    implicit_iterations: int = IMPLICIT_ITERATIONS
    implicit_alpha: float | None = None
    memory_budget: int = 0  # reverse / reverse_fwd: inner steps whose graph the forward sweep keeps (0: memory-flat)
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
    distill_val_batch_size: int = 512
    distill_temperature: float = 0.5
    distill_oracle: str = "align"
    eval_every: int = 10
    eval_batches: int = 8
    heldout_fraction: float = 0.5
    patience: int = 0
    planted_scale: float = 1.0
    progress: bool = True
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N

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
        require(self.objective in OBJECTIVES, "objective", f"choose one of {', '.join(OBJECTIVES)}")
        require(self.method in METHODS, "method", f"choose one of {', '.join(METHODS)}")
        require(self.memory_budget >= 0, "memory_budget", "must be a whole number of inner steps >= 0 (0 = memory-flat)")
        check_implicit_options(self.implicit_damping, self.implicit_iterations, self.implicit_alpha,
                               ("implicit_damping", "implicit_iterations", "implicit_alpha"))
        require(self.inner_optimizer in INNER_OPTIMIZERS, "inner_optimizer", f"choose one of {', '.join(INNER_OPTIMIZERS)}")
        require(self.inner_lr == "auto" or (isinstance(self.inner_lr, float) and self.inner_lr > 0), "inner_lr",
                "must be a number > 0 or 'auto'")
        for key in ("outer_steps", "eval_every", "patience"):
            require(getattr(self, key) >= 0, key, "must be >= 0")
        for key in ("inner_steps", "batch_size", "val_batch_size", "sweep_steps", "log_every", "ckpt_every",
                    "max_bad_steps", "distill_val_batch_size", "eval_batches"):
            require(getattr(self, key) >= 1, key, "must be >= 1")
        require(self.candidates >= 2, "candidates", "K must be >= 2 (with one noise per image there is nothing to weight)")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(self.lr > 0, "lr", "the rater's learning rate must be > 0")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.label_dropout is None or 0 <= self.label_dropout < 1, "label_dropout", "must be in [0, 1)")
        require(self.inner_lr == "auto" or math.isfinite(self.inner_lr), "inner_lr", "must be a finite number > 0 or 'auto'")
        require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")
        require(math.isfinite(self.distill_temperature) and self.distill_temperature > 0, "distill_temperature",
                "must be a finite number > 0")
        require(self.distill_oracle in ORACLE_MODES, "distill_oracle", f"choose one of {', '.join(ORACLE_MODES)}")
        require(0 <= self.heldout_fraction < 1, "heldout_fraction",
                "must be in [0, 1): the share of the validation split kept for the held-out check (0: none kept apart)")
        require(math.isfinite(self.planted_scale) and self.planted_scale > 0, "planted_scale",
                "must be a finite number > 0 (1 plants nothing)")
        require(self.patience == 0 or self.eval_every > 0, "patience", "plateau stopping needs --eval-every > 0")
        require(not (self.carry_inner and self.objective == "distill"), "carry_inner",
                "only the bilevel objective has inner steps to carry; drop --carry-inner with --meta-objective distill")
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


def plot_heldout_curve(evals: list[dict], path: Path, objective: str) -> Path:
    """The held-out curve (mean ± 1 SE per evaluation) as a PNG, the best evaluation marked."""
    steps = [r["step"] for r in evals]
    n = evals[-1]["eval"].get("n")
    fig, (ax,) = figure(width=6.0, height=3.8, title=f"Held-out meta-validation ({objective})")
    if objective == "distill":
        for key, label, color in (("spearman", "within-group Spearman with the oracle", "#0072B2"),
                                  ("argmax_agreement", "argmax agreement with the oracle", "#D55E00")):
            ax.errorbar(steps, [r["eval"][key] for r in evals], yerr=[r["eval"][key + "_se"] for r in evals],
                        marker="o", ms=3, capsize=2, color=color, label=label)
        ax.axhline(evals[-1]["eval"]["chance"], color="#D55E00", lw=0.8, ls=":", label="argmax chance (1/K)")
        ax.axhline(0.0, color="#999999", lw=0.8, ls="--")
        ylabel, what = "agreement with the held-out oracle", f"{n} fixed held-out groups"
    else:
        ax.errorbar(steps, [r["eval"]["rater_advantage"] for r in evals],
                    yerr=[r["eval"]["rater_advantage_se"] for r in evals], marker="o", ms=3, capsize=2,
                    color="#009E73", label="rater advantage")
        ax.axhline(0.0, color="#999999", lw=0.8, ls="--", label="uniform weights")
        ylabel, what = "L_ho(uniform) - L_ho(rater)", f"{n} fixed held-out outer batches"
    best = max(evals, key=lambda r: (r["eval"].get("best", False), r["step"]))
    if best["eval"].get("best"):
        ax.axvline(best["step"], color="#000000", lw=0.8, ls="-.", label=f"best (step {best['step']})")
    label_axes(ax, xlabel="outer step", ylabel=ylabel, higher_is_better=True)
    legend(ax)
    return savefig(fig, path, caption=f"Points: mean per evaluation; error bars: ±1 SE over {what}.")


def _warn(msg: str, is_main: bool) -> None:
    if is_main:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


# ---- the loop ----------------------------------------------------------------------------------------


def metatrain(cfg: MetaTrainConfig, resume: bool = False) -> dict:
    """Meta-train a rater (see module docstring); returns a summary dict."""
    cfg.validate()
    sizes = {k: getattr(cfg, k) for k in ("batch_size", "val_batch_size", "distill_val_batch_size")}
    with open_run(cfg.run_dir, cfg.device, sizes) as run:
        return _metatrain(cfg, resume, run)


def _load_inputs(cfg: MetaTrainConfig, device, is_main: bool) -> tuple:
    """The frozen diffusion model and the meta batches: (model, spec, dstate, sampler, split_info, val_data,
    heldout_data). The split is the checkpoint's own; the validation split is cut into its meta and held-out halves."""
    distill = cfg.objective == "distill"
    model, spec, dstate = load_diffusion(cfg.checkpoint, use_ema=cfg.use_ema, device=device)
    model.eval()
    dcfg = dstate.get("config", {}) or {}
    objective = objective_from_config(dcfg)  # the checkpoint's own objective decides every loss below
    source = cfg.data or dcfg.get("data", "digits")
    train_data, val_all, split_info = checkpoint_splits(dcfg, source)
    if (train_data.channels, train_data.image_size, train_data.num_classes) != (spec.in_channels, spec.input_size, spec.num_classes):
        raise CheckpointError(
            f"dataset {source!r} has {train_data.channels}x{train_data.image_size}px images in {train_data.num_classes} classes, "
            f"but {cfg.checkpoint} is a model of {spec.in_channels}x{spec.input_size}px with {spec.num_classes} classes; "
            "pass the dataset the checkpoint was trained on (--data)"
        )
    # the meta half feeds every outer loss; the held-out half only the held-out check (none without one)
    val_data, heldout_data = split_heldout(val_all, cfg.heldout_fraction if cfg.eval_every > 0 else 0.0,
                                           split_info["split_seed"])
    if not distill and len(val_data) < cfg.val_batch_size:
        _warn(f"the meta-validation split has {len(val_data)} images, fewer than --val-batch-size {cfg.val_batch_size}: "
              "validation batches repeat images", is_main)
    label_dropout = cfg.label_dropout if cfg.label_dropout is not None else float(dcfg.get("label_dropout", 0.1))
    sampler = MetaBatches(train_data, val_data, spec.num_classes, cfg.seed, 1 if distill else cfg.inner_steps,
                          cfg.candidates, cfg.batch_size, cfg.val_batch_size, label_dropout,
                          bool(dcfg.get("unconditional", False)), planted_scale=cfg.planted_scale, objective=objective)
    return model, spec, dstate, sampler, split_info, val_data, heldout_data


def _choose_inner_lr(cfg: MetaTrainConfig, model, sampler: MetaBatches, run: Run, reducer: Reducer) -> tuple:
    """(inner lr, sweep rows or None): the configured lr, or the sweep's best uniform inner gain (``auto``)."""
    if cfg.inner_lr != "auto":
        return float(cfg.inner_lr), None
    inner_lr, sweep = sweep_inner_lr(model, sampler, cfg.sweep_grid(), cfg.inner_optimizer, cfg.sweep_steps,
                                     run.rank, run.world, run.device, reducer)
    if all(r["uniform_gain"] is None or r["uniform_gain"] <= 0 for r in sweep):
        _warn(f"no inner lr in {list(cfg.sweep_grid())} lowers the validation loss with uniform weights; "
              f"using the smallest, {inner_lr}; try smaller --sweep-lrs", run.is_main)
    return inner_lr, sweep


def _score_stats(res, reducer: Reducer, world: int, candidates: int) -> tuple[dict, float]:
    """Global moments of the step's scores and weights (equal slices per rank: N processes log what one does),
    and the mean weight of candidate 0 (the planted one in a planted-signal check)."""
    scores, w = torch.cat(res.scores).double(), torch.cat(res.weights).double()
    m1, m2, in_group, ent, wmax, w0 = reducer.mean([scores.mean(), scores.pow(2).mean(), scores.std(dim=1).mean(),
                                                    weight_entropy(w).mean(), w.max(dim=1).values.mean(), w[:, 0].mean()])
    n = scores.numel() * world
    return {"score_mean": float(m1), "score_std": math.sqrt(max(float(m2 - m1 * m1), 0.0) * n / max(n - 1, 1)),
            "score_std_in_group": float(in_group), "weight_entropy": float(ent),
            "weight_entropy_uniform": math.log(candidates), "weight_max": float(wmax)}, float(w0)


def _heldout_evaluator(cfg: MetaTrainConfig, outer, sampler: MetaBatches, heldout_data, run: Run):
    """The held-out evaluation of the meta-objective (None without ``eval_every``), on the held-out half."""
    if cfg.eval_every <= 0:
        return None
    if heldout_data is None:
        _warn("--heldout-fraction 0: the held-out check draws fresh batches from the same validation images the "
              "outer loss uses", run.is_main)
    return outer.evaluator(replace(sampler, val=heldout_data if heldout_data is not None else sampler.val),
                           run.rank, run.world, run.device)


def _finish_summary(summary: dict, cfg: MetaTrainConfig, run: Run, outer, evaluator, heldout: dict, plateau: bool,
                    window: list[dict]) -> dict:
    """The run's summary: why it stopped, the best held-out rater and its curve, the last steps' means."""
    if plateau:
        summary["stopped"] = (f"plateau: {heldout['since_best']} held-out evaluations without an improvement beyond "
                              f"one standard error (patience {cfg.patience})")
    if evaluator is not None and heldout["best"] is not None:
        summary["best_rater"] = str(run.run_dir / "rater_best.pt")
        summary["best_eval"] = dict(heldout["best"], metric=evaluator.metric)
        evals = eval_records(run.run_dir / "metrics.jsonl") if run.is_main else []
        if evals:
            summary["heldout_curve"] = str(plot_heldout_curve(evals, run.run_dir / "heldout_curve.png", cfg.objective))
    if window:
        summary["last_steps"] = outer.last_steps(window)
        if cfg.planted_scale != 1.0:
            summary["last_steps"]["planted_weight"] = sum(r["planted_weight"] for r in window) / len(window)
    return summary


def _metatrain(cfg: MetaTrainConfig, resume: bool, run: Run) -> dict:
    run_dir, rank, world, device, is_main = run.run_dir, run.rank, run.world, run.device, run.is_main
    distill = cfg.objective == "distill"
    if is_main:
        check_run_config(run_dir, to_dict(cfg), resume, legacy=LEGACY_VALUES)
    model, spec, dstate, sampler, split_info, val_data, heldout_data = _load_inputs(cfg, device, is_main)
    torch.manual_seed(cfg.seed)
    rater = NoiseRater(RaterSpec(cfg.rater, spec.input_size, spec.in_channels, spec.num_classes, cfg.ablation)).to(device)
    trainable = trainable_params(rater)
    opt = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    reducer = Reducer()
    ckpt_path, best_path = run_dir / "checkpoints" / "latest.pt", run_dir / "rater_best.pt"
    step, inner_lr, sweep, carried = 0, None, None, None
    guard = BadStepGuard(cfg.max_bad_steps, f"{'distillation' if distill else 'meta'}-gradient or loss",
                         "lower --inner-lr or --lr, or use --grad-clip", unit="outer steps")
    heldout: dict = {"best": None, "since_best": 0}
    if resume and ckpt_path.exists():
        state = resume_from(ckpt_path, "rater", rater.spec.to_dict(), rater, "rater", opt, "rater")
        step, sweep, carried = int(state["step"]), state.get("sweep"), state.get("inner_params")
        inner_lr = None if state.get("inner_lr") is None else float(state["inner_lr"])
        guard.in_row = int(state.get("bad_in_row", 0))
        heldout = state.get("heldout") or heldout
    if inner_lr is None and not distill:
        inner_lr, sweep = _choose_inner_lr(cfg, model, sampler, run, reducer)
    if carried is not None:
        set_params(model, carried)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        truncate_metrics(run_dir / "metrics.jsonl", step, events_count_done=True)
        if sweep is not None and step == 0:
            write_json(run_dir / "inner_lr_sweep.json", {"chosen": inner_lr, "grid": sweep})
    # the one dispatch on the meta-objective: everything below is the same for both
    outer = DistillStep(cfg, model, sampler, reducer, trainable) if distill else \
        BilevelStep(cfg, model, sampler, reducer, inner_lr, InnerOptimizer(cfg.inner_optimizer, inner_lr))
    data_info = {**split_info, "meta_val_images": len(val_data),
                 "heldout_val_images": len(heldout_data) if heldout_data is not None else 0}
    evaluator = _heldout_evaluator(cfg, outer, sampler, heldout_data, run)

    def rater_extra() -> dict:
        return {"step": step, "config": to_dict(cfg), "inner_lr": inner_lr, "objective": cfg.objective,
                "diffusion": {"checkpoint": str(cfg.checkpoint), "step": int(dstate.get("step", 0)), "spec": spec.to_dict(),
                              **sampler.objective.options()}, "data": data_info}

    def save() -> None:
        check_finite_weights(step, ckpt_path, "lower --lr or use --grad-clip", rater)
        if not is_main:
            return
        extra = {**rater_extra(), "optimizer": opt.state_dict(), "rng": get_rng_state(), "sweep": sweep,
                 "bad_in_row": guard.in_row, "heldout": heldout}
        if cfg.carry_inner:
            extra["inner_params"] = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        save_rater(ckpt_path, rater, extra)
        save_rater(run_dir / "rater.pt", rater, rater_extra())

    def evaluate() -> bool:
        """One held-out evaluation at ``step``: log it, keep the best rater; True when the run has plateaued."""
        res = evaluator(rater)
        improved = heldout["best"] is None or res["value"] > heldout["best"]["value"] + res["se"]
        heldout["since_best"] = 0 if improved else heldout["since_best"] + 1
        if improved:
            heldout["best"] = {"step": step, "value": res["value"], "se": res["se"]}
            if is_main:
                save_rater(best_path, rater, {**rater_extra(), "eval": res})
        run.log({"step": step, "eval": {**res, "best": improved, "evals_since_best": heldout["since_best"]},
                 "time": time.time()})
        return cfg.patience > 0 and heldout["since_best"] >= cfg.patience

    bar = tqdm(total=cfg.outer_steps, initial=step, desc="metatrain", dynamic_ncols=True) if is_main and cfg.progress else None
    summary: dict = {"run_dir": str(run_dir), "start_step": step, "inner_lr": inner_lr, "method": cfg.method,
                     "objective": cfg.objective}
    window: list[dict] = []
    plateau = cfg.patience > 0 and heldout["since_best"] >= cfg.patience  # a resumed run that had stopped
    if evaluator is not None and step == 0 and heldout["best"] is None:
        plateau = evaluate()  # the initial rater: the level every later evaluation is compared with
    with StopFlag() as stopper:
        while step < cfg.outer_steps and not plateau:
            t0 = time.perf_counter()
            res = outer(rater, step, rank, world, device)
            gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            finite = math.isfinite(float(gnorm)) and math.isfinite(res.loss)
            if finite:  # the gradient and loss are all-reduced: every rank decides alike
                opt.step()
                guard.good()
            else:
                run.log({"step": step + 1, "event": "nonfinite_skipped", outer.loss_key: res.loss,
                         "meta_grad_norm": float(gnorm)})
                guard.bad(step + 1, ckpt_path)
            opt.zero_grad(set_to_none=True)
            if cfg.carry_inner and finite:
                set_params(model, res.theta)
            step += 1
            stats, planted = _score_stats(res, reducer, world, cfg.candidates)
            rec = {"step": step, **res.fields, outer.grad_key: float(gnorm), **stats, "inner_lr": inner_lr,
                   "time_s": time.perf_counter() - t0, "time": time.time()}
            if cfg.planted_scale != 1.0:
                rec["planted_weight"] = planted  # mean weight of the planted candidate 0 (uniform: 1/K)
            window = (window + [rec])[-50:]
            if step % cfg.log_every == 0 or step == cfg.outer_steps:
                run.log(rec)
            outer.check(window, is_main)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(**outer.postfix(window, rec))
            if evaluator is not None and step % cfg.eval_every == 0:  # on the grid only: a run extended by
                plateau = evaluate()  # --resume with a larger --outer-steps evaluates exactly where a straight run does
            # a signal may reach one rank only: all stop together or the others hang in a collective
            _, stop_now = run.agree(True, stopper.stop)
            if run.should_save(step, cfg.outer_steps, cfg.ckpt_every, stop_now or plateau):
                save()
                if stop_now:
                    summary.update(interrupted=True, signal=stopper.signum)
                    break
    if bar is not None:
        bar.close()
    run.barrier()
    if step == summary["start_step"] and is_main and not (run_dir / "rater.pt").exists():
        save()
    summary.update({"step": step, "rater": str(run_dir / "rater.pt"), "checkpoint": str(ckpt_path)})
    return _finish_summary(summary, cfg, run, outer, evaluator, heldout, plateau, window)
