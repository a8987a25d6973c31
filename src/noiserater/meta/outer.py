"""One outer step of each meta-objective, and its held-out evaluation (what :mod:`noiserater.metatrain` loops over).

- :class:`BilevelStep`: the rater's meta-gradient through S rater-weighted inner steps (``meta.gradient``)
  plus the uniform-weight baseline on the same batches; :class:`BilevelEval` its held-out rater advantage.
- :class:`DistillStep`: one listwise distillation step on the alignment oracle; :class:`DistillEval` the
  rater's held-out agreement with the oracle.

Both steps leave the gradient in the rater's ``.grad`` and return an :class:`OuterResult`; the loop owns the
optimiser, clipping, logging, checkpoints and the held-out schedule, the same for both.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from ..objectives import Objective
from ..stats import mean_se
from .batches import EVAL_SEED_OFFSET, SWEEP_SEED_OFFSET, MetaBatches
from .gradient import Reducer, inner_steps, meta_gradient_info
from .losses import candidate_weights, eval_mode, rater_scores_of, uniform_weights, val_loss
from .oracle import distillation_loss, oracle_at, rank_agreement

# The group softmax ignores a shift shared by all K scores, so the head's bias and its LayerNorm's bias (which
# only shift every score) have an exactly zero meta-gradient (and distillation gradient); Adam would scale its
# round-off to lr-sized steps. They stay at their initial values.
SHIFT_ONLY_PARAMS = ("head.bias", "head_norm.bias")


def trainable_params(rater) -> list[torch.nn.Parameter]:
    """The rater's parameters an outer step updates (all but :data:`SHIFT_ONLY_PARAMS`)."""
    return [p for n, p in rater.named_parameters() if p.requires_grad and n not in SHIFT_ONLY_PARAMS]


def val_loss_value(model, batch, params, reducer: Reducer, objective: Objective) -> float:
    """The validation loss at ``params`` (None: the model's own weights), averaged over the ranks."""
    with torch.no_grad(), eval_mode(model):
        lv = val_loss(model, batch, params=params, objective=objective)
    return float(reducer.mean([lv])[0])


def set_params(model, params: dict[str, torch.Tensor]) -> None:
    """Copy ``params`` (name -> tensor) into the model's parameters of those names."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in params:
                p.copy_(params[n])


def weight_entropy(w: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of weights [B, K] (nats)."""
    return -(w * w.clamp_min(1e-30).log()).sum(dim=1)


def sweep_inner_lr(model, sampler: MetaBatches, grid, opt_name: str, steps: int, rank: int, world: int, device,
                   reducer: Reducer) -> tuple[float, list[dict]]:
    """Pick the inner lr with the largest mean uniform inner gain Lval_loss_value(theta_0) - Lval_loss_value(theta_S^unif)
    over ``steps`` outer batches (drawn apart from the training batches). Falls back to the smallest lr."""
    rows = []
    draws = [sampler.outer(n, rank, world, device, seed_offset=SWEEP_SEED_OFFSET) for n in range(steps)]
    obj = sampler.objective
    base = [val_loss_value(model, val, None, reducer, obj) for _, val in draws]
    for lr in grid:
        gains = []
        for (batches, val), l0 in zip(draws, base):
            theta = inner_steps(model, batches, [uniform_weights(b) for b in batches], inner_lr=lr,
                                inner_optimizer=opt_name, reducer=reducer, objective=obj)
            gains.append(l0 - val_loss_value(model, val, theta, reducer, obj))
        mean = sum(gains) / len(gains)
        rows.append({"inner_lr": lr, "uniform_gain": mean if math.isfinite(mean) else None})
    finite = [r for r in rows if r["uniform_gain"] is not None]
    best = max(finite, key=lambda r: r["uniform_gain"]) if finite else None
    if best is None or best["uniform_gain"] <= 0:
        return min(grid), rows
    return best["inner_lr"], rows


class BilevelEval:
    """Held-out rater advantage on ``n`` fixed outer batches (their own seed stream; validation batches
    from the held-out half): L_ho(theta_S^uniform) - L_ho(theta_S^rater) per batch, mean and SE."""

    metric = "rater_advantage"

    def __init__(self, model, sampler: MetaBatches, n: int, inner_lr: float, inner_opt, temperature: float,
                 reducer: Reducer, rank: int, world: int, device, cache_uniform: bool):
        self.model, self.inner_lr, self.inner_opt, self.temperature = model, inner_lr, inner_opt, temperature
        self.reducer, self.cache_uniform = reducer, cache_uniform
        self.objective = sampler.objective
        self.draws = [sampler.outer(i, rank, world, device, seed_offset=EVAL_SEED_OFFSET) for i in range(n)]
        self._uniform: list[tuple[float, float]] | None = None

    def _baseline(self) -> list[tuple[float, float]]:
        if self._uniform is not None:
            return self._uniform
        out = []
        for batches, val in self.draws:
            l0 = val_loss_value(self.model, val, None, self.reducer, self.objective)
            theta = inner_steps(self.model, batches, [uniform_weights(b) for b in batches], inner_lr=self.inner_lr,
                                inner_optimizer=self.inner_opt, reducer=self.reducer, objective=self.objective)
            out.append((l0, val_loss_value(self.model, val, theta, self.reducer, self.objective)))
        if self.cache_uniform:  # the starting weights are the frozen checkpoint's at every evaluation
            self._uniform = out
        return out

    def __call__(self, rater) -> dict:
        adv, gain = [], []
        for (batches, val), (l0, l_unif) in zip(self.draws, self._baseline()):
            with torch.no_grad(), eval_mode(rater):
                weights = [candidate_weights(rater, b, self.temperature, self.objective) for b in batches]
            theta = inner_steps(self.model, batches, weights, inner_lr=self.inner_lr, inner_optimizer=self.inner_opt,
                                reducer=self.reducer, objective=self.objective)
            adv.append(l_unif - val_loss_value(self.model, val, theta, self.reducer, self.objective))
            gain.append(l0 - l_unif)
        m, se = mean_se(adv)
        g, g_se = mean_se(gain)
        return {"metric": self.metric, "value": m, "se": se, "n": len(adv), "rater_advantage": m,
                "rater_advantage_se": se, "uniform_gain": g, "uniform_gain_se": g_se,
                "relative_advantage": m / g if g > 0 else None}


class DistillEval:
    """Agreement of the rater with the oracle on ``n`` fixed group batches (their own seed stream), the
    oracle's validation gradients drawn from the held-out half; the alignments are computed once (the
    diffusion model is frozen under distillation)."""

    metric = "spearman"

    def __init__(self, model, sampler: MetaBatches, n: int, val_size: int, reducer: Reducer, rank: int, world: int,
                 device, mode: str = "align"):
        self.reducer, self.objective = reducer, sampler.objective
        self.groups, self.targets = [], []
        for i in range(n):
            batch = sampler.train_batch(i, 0, rank, world, device, seed_offset=EVAL_SEED_OFFSET)
            self.groups.append(batch)
            self.targets.append(oracle_at(model, batch, sampler.val_batch(i, val_size, rank, world, device,
                                                                       seed_offset=EVAL_SEED_OFFSET), reducer, mode,
                                              objective=self.objective)[1])

    def __call__(self, rater) -> dict:
        with torch.no_grad(), eval_mode(rater):
            scores = torch.cat([rater_scores_of(rater, g, self.objective) for g in self.groups])
        agree = rank_agreement(scores, torch.cat(self.targets), self.reducer)
        return {"metric": self.metric, "value": agree["spearman"], "se": agree["spearman_se"], "n": agree["groups"],
                **agree}


@dataclass
class OuterResult:
    """What one outer step measured: the loss whose finiteness decides the update, the scores and weights of
    its groups (lists of [B, K]), the record fields, and the rater-weighted inner weights (bilevel)."""

    loss: float
    scores: list[torch.Tensor]
    weights: list[torch.Tensor]
    fields: dict
    theta: dict | None = None


def _warn(msg: str, is_main: bool) -> None:
    if is_main:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


class BilevelStep:
    """Bilevel meta-objective: the meta-gradient of L_val(theta_S) with S rater-weighted inner steps, and the
    uniform-weight baseline on the same batches (the rater advantage is measured against it)."""

    loss_key, grad_key = "val_loss_rater", "meta_grad_norm"

    def __init__(self, cfg, model, sampler: MetaBatches, reducer: Reducer, inner_lr: float, inner_opt):
        self.cfg, self.model, self.sampler, self.reducer = cfg, model, sampler, reducer
        self.inner_lr, self.inner_opt, self.objective = inner_lr, inner_opt, sampler.objective
        self.warned = False

    def evaluator(self, sampler: MetaBatches, rank: int, world: int, device) -> BilevelEval:
        return BilevelEval(self.model, sampler, self.cfg.eval_batches, self.inner_lr, self.inner_opt,
                           self.cfg.temperature, self.reducer, rank, world, device, cache_uniform=not self.cfg.carry_inner)

    def __call__(self, rater, step: int, rank: int, world: int, device) -> OuterResult:
        cfg, model, obj, reducer = self.cfg, self.model, self.objective, self.reducer
        batches, val = self.sampler.outer(step, rank, world, device)
        l0 = val_loss_value(model, val, None, reducer, obj)
        res = meta_gradient_info(model, rater, batches, val, inner_lr=self.inner_lr, method=cfg.method,
                                 inner_optimizer=self.inner_opt, temperature=cfg.temperature, reducer=reducer,
                                 objective=obj, implicit_damping=cfg.implicit_damping,
                                 implicit_iterations=cfg.implicit_iterations, implicit_alpha=cfg.implicit_alpha,
                                 memory_budget=cfg.memory_budget)
        theta_rater, l_rater = res.params, res.val_loss
        if theta_rater is None:  # alignment: the rater-weighted trajectory is not part of the estimate
            theta_rater = inner_steps(model, batches, res.weights, inner_lr=self.inner_lr,
                                      inner_optimizer=self.inner_opt, reducer=reducer, objective=obj)
            l_rater = val_loss_value(model, val, theta_rater, reducer, obj)
        theta_unif = inner_steps(model, batches, [uniform_weights(b) for b in batches], inner_lr=self.inner_lr,
                                 inner_optimizer=self.inner_opt, reducer=reducer, objective=obj)
        l_unif = val_loss_value(model, val, theta_unif, reducer, obj)
        for (name, p), g in zip(rater.named_parameters(), res.grads):
            p.grad = g.detach().clone() if p.requires_grad and name not in SHIFT_ONLY_PARAMS else None
        fields = {"val_loss_init": l0, "val_loss_rater": l_rater, "val_loss_uniform": l_unif,
                  "uniform_gain": l0 - l_unif, "rater_advantage": l_unif - l_rater}
        return OuterResult(l_rater, res.scores, res.weights, fields, theta_rater)

    def check(self, window: list[dict], is_main: bool) -> None:
        """Warn once when uniform inner steps do not lower the validation loss (nothing for a rater to improve)."""
        if not self.warned and len(window) >= min(10, self.cfg.outer_steps) and sum(r["uniform_gain"] for r in window) <= 0:
            _warn(f"uniform inner steps do not lower the validation loss (mean uniform gain "
                  f"{sum(r['uniform_gain'] for r in window) / len(window):.3g} over {len(window)} steps at inner lr "
                  f"{self.inner_lr}): the rater can only learn to undo damage; use --inner-lr auto or a smaller lr",
                  is_main)
            self.warned = True

    @staticmethod
    def postfix(window: list[dict], rec: dict) -> dict:
        adv = sum(r["rater_advantage"] for r in window) / len(window)
        return {"val": f"{rec['val_loss_rater']:.4f}", "adv": f"{adv:+.2e}", "gain": f"{rec['uniform_gain']:+.2e}"}

    @staticmethod
    def last_steps(window: list[dict]) -> dict:
        n = len(window)
        mean = lambda key: sum(r[key] for r in window) / n  # noqa: E731
        return {"n": n, "val_loss_init": mean("val_loss_init"), "val_loss_rater": mean("val_loss_rater"),
                "val_loss_uniform": mean("val_loss_uniform"), "rater_advantage": mean("rater_advantage"),
                "rater_better_fraction": sum(r["rater_advantage"] > 0 for r in window) / n}


class DistillStep:
    """Distillation meta-objective: one listwise step of the rater's scores on the alignment oracle
    a_bk = <grad L_val, grad l_bk> at the frozen checkpoint (a large fresh validation draw each step)."""

    loss_key, grad_key = "distill_loss", "grad_norm"

    def __init__(self, cfg, model, sampler: MetaBatches, reducer: Reducer, trainable: list):
        self.cfg, self.model, self.sampler, self.reducer, self.trainable = cfg, model, sampler, reducer, trainable
        self.objective = sampler.objective

    def evaluator(self, sampler: MetaBatches, rank: int, world: int, device) -> DistillEval:
        return DistillEval(self.model, sampler, self.cfg.eval_batches, self.cfg.distill_val_batch_size, self.reducer,
                           rank, world, device, self.cfg.distill_oracle)

    def __call__(self, rater, step: int, rank: int, world: int, device) -> OuterResult:
        cfg, reducer = self.cfg, self.reducer
        groups = self.sampler.train_batch(step, 0, rank, world, device)
        l0, align = oracle_at(self.model, groups, self.sampler.val_batch(step, cfg.distill_val_batch_size, rank, world,
                                                                         device), reducer, cfg.distill_oracle,
                              objective=self.objective)
        scores_b = rater_scores_of(rater, groups, self.objective)
        loss = distillation_loss(scores_b, align, cfg.distill_temperature)
        grads = torch.autograd.grad(loss, self.trainable, allow_unused=True)  # e.g. the last block's image MLP
        grads = reducer.mean([torch.zeros_like(p) if g is None else g for p, g in zip(self.trainable, grads)])
        for p, g in zip(self.trainable, grads):
            p.grad = g.detach().clone()
        loss_value = float(reducer.mean([loss.detach().double()])[0])
        agree = rank_agreement(scores_b.detach(), align, reducer)
        fields = {"distill_loss": loss_value, "val_loss_init": l0, "spearman": agree["spearman"],
                  "argmax_agreement": agree["argmax_agreement"]}
        return OuterResult(loss_value, [scores_b.detach()], [torch.softmax(scores_b.detach() / cfg.temperature, dim=1)],
                           fields)

    def check(self, window: list[dict], is_main: bool) -> None:
        pass

    @staticmethod
    def postfix(window: list[dict], rec: dict) -> dict:
        return {"loss": f"{rec['distill_loss']:.4f}", "rho": f"{sum(r['spearman'] for r in window) / len(window):+.3f}"}

    @staticmethod
    def last_steps(window: list[dict]) -> dict:
        n = len(window)
        return {"n": n, **{key: sum(r[key] for r in window) / n for key in ("distill_loss", "spearman", "argmax_agreement")}}
