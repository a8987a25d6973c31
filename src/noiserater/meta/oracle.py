"""The alignment oracle (paper Theorem 4.2) at the model's *current* weights, and distillation onto it.

One SGD step on candidate k changes the validation loss by ``-lr * <grad L_val, grad l_bk> + O(lr^2)``, so
the candidate whose loss gradient is most aligned with the validation gradient is the one a single step
would most like to train on. This module computes, for a batch of K grouped noises per image,

- ``validation_gradient``: ``g = grad_theta L_val(theta)`` on a meta-validation batch (one backward);
- ``candidate_alignments``: ``a_bk = <grad_theta l_bk(theta), g>`` for all B*K candidates in ONE
  forward-mode product (``torch.func.jvp`` of the per-candidate losses along g);
- ``candidate_grad_norms``: ``||grad_theta l_bk||`` from per-sample gradients (``vmap(grad)``), for the
  cosine variant ``a_bk / ||grad l_bk||`` ("better direction" rather than "bigger step");
- ``distillation_loss``: listwise softmax cross-entropy between a rater's scores and the oracle's
  within-group ranking, the objective of a rater *distilled* onto the oracle.

Every function leaves the model's weights and train/eval flag unchanged, evaluates with the MATH attention
kernel (forward-mode AD has no fused-attention rule) and in float32 outside autocast.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping

import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp, vmap

from ..objectives import Objective, default_objective
from .gradient import Reducer
from .losses import Batch, candidate_losses, eval_mode, flatten_groups, math_attention, val_loss

ORACLE_MODES = ("align", "anti", "cosine")


@contextlib.contextmanager
def _exact(model: nn.Module) -> Iterator[None]:
    """Eval mode, MATH attention, no autocast: the oracle is a measurement, not a training step."""
    device_type = next(model.parameters()).device.type
    with eval_mode(model), math_attention(), torch.autocast(device_type, enabled=False):
        yield


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def validation_gradient(model: nn.Module, val_batch: Batch, *, objective: Objective | None = None
                        ) -> tuple[float, dict[str, torch.Tensor]]:
    """(L_val, grad_theta L_val) at the model's current trainable weights; the gradient as name -> tensor."""
    theta = {n: p.clone().requires_grad_() for n, p in _trainable(model).items()}
    with _exact(model):
        lv = val_loss(model, val_batch, params=theta, objective=objective)
        gs = torch.autograd.grad(lv, list(theta.values()), allow_unused=True)
    return float(lv.detach()), {n: (torch.zeros_like(p) if g is None else g.detach())
                                for (n, p), g in zip(theta.items(), gs)}


def candidate_alignments(model: nn.Module, batch: Batch, direction: Mapping[str, torch.Tensor], *,
                         objective: Objective | None = None) -> torch.Tensor:
    """a [B,K] = <grad_theta l_bk(theta), direction>: the directional derivative of every candidate loss
    along ``direction`` (e.g. the validation gradient), all candidates in one ``jvp``.

    ``batch`` = (x0 [B,C,H,W], y [B], t [B], eps [B,K,C,H,W]); ``direction`` names trainable parameters."""
    theta = _trainable(model)
    names = [n for n in theta if n in direction]
    primals = tuple(theta[n] for n in names)
    tangents = tuple(direction[n].to(theta[n].dtype) for n in names)

    def losses(*th: torch.Tensor) -> torch.Tensor:
        return candidate_losses(model, batch, params=dict(zip(names, th)), objective=objective)

    with _exact(model):
        _, a = jvp(losses, primals, tangents)
    return a.detach()


def candidate_grad_norms(model: nn.Module, batch: Batch, *, objective: Objective | None = None,
                         chunk: int = 64) -> torch.Tensor:
    """||grad_theta l_bk|| [B,K] over all trainable weights, from per-sample gradients (``vmap(grad)``)
    evaluated ``chunk`` candidates at a time (memory: chunk x the parameter count)."""
    objective = objective or default_objective()
    B, K = batch[3].shape[:2]
    x0k, tk, yk, noise = flatten_groups(batch)
    theta = _trainable(model)

    def one(th: dict, x: torch.Tensor, ti: torch.Tensor, yi: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        f = lambda xx, tt, yy: functional_call(model, th, (xx, tt, yy))  # noqa: E731
        return objective.error(f, x[None], yi[None], ti[None], n[None]).pow(2).mean()

    per = vmap(grad(one), in_dims=(None, 0, 0, 0, 0))
    out = []
    with _exact(model):
        for i in range(0, B * K, chunk):
            sl = slice(i, i + chunk)
            g = per(theta, x0k[sl], tk[sl], yk[sl], noise[sl])
            out.append(torch.sqrt(sum(v.flatten(1).pow(2).sum(dim=1) for v in g.values())))
    return torch.cat(out).view(B, K)


def oracle_scores(model: nn.Module, batch: Batch, direction: Mapping[str, torch.Tensor], mode: str = "align", *,
                  objective: Objective | None = None) -> torch.Tensor:
    """Scores [B,K] whose argmax is the oracle's pick: ``align`` a_bk, ``anti`` -a_bk (the worst candidate,
    a diagnostic), ``cosine`` a_bk / ||grad l_bk|| (the validation gradient's norm is shared by a group)."""
    if mode not in ORACLE_MODES:
        raise ValueError(f"unknown oracle mode {mode!r}; choose one of {', '.join(ORACLE_MODES)}")
    a = candidate_alignments(model, batch, direction, objective=objective)
    if mode == "anti":
        return -a
    if mode == "cosine":
        return a / candidate_grad_norms(model, batch, objective=objective).clamp_min(1e-12)
    return a


def standardize_in_group(a: torch.Tensor) -> torch.Tensor:
    """(a - group mean) / group std per row [B,K]; rows with no spread become zeros."""
    centred = a - a.mean(dim=1, keepdim=True)
    return centred / centred.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)


def distillation_targets(alignments: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Target distribution [B,K] over each group: softmax of the within-group standardised alignments / T.
    Standardising removes the per-image scale (which varies by orders of magnitude with t), so every
    group contributes its *ranking*, sharpened by ``temperature``."""
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    return torch.softmax(standardize_in_group(alignments.double()) / temperature, dim=1).to(alignments.dtype)


def distillation_loss(scores: torch.Tensor, alignments: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Listwise softmax cross-entropy -sum_k p_bk log softmax_k(s_bk), mean over groups, with p from
    :func:`distillation_targets` (the alignments carry no gradient)."""
    p = distillation_targets(alignments.detach(), temperature)
    return -(p * torch.log_softmax(scores, dim=1)).sum(dim=1).mean()


def oracle_at(model: nn.Module, batch: Batch, val: Batch, reducer: Reducer, mode: str = "align",
              objective: Objective | None = None) -> tuple[float, torch.Tensor]:
    """(L_val at the current weights, oracle scores [B,K] of this rank's candidates: the alignments
    <grad L_val, grad l_bk>, or for ``mode="cosine"`` those over ||grad l_bk||) with the validation
    gradient averaged over the ranks (equal slices: the global batch's gradient)."""
    lv, g = validation_gradient(model, val, objective=objective)
    if reducer.active:
        names = list(g)
        avg = reducer.mean([g[k] for k in names] + [torch.tensor(lv, dtype=torch.float64)])
        g, lv = dict(zip(names, avg[:-1])), float(avg[-1])
    return lv, oracle_scores(model, batch, g, mode, objective=objective)


# ---- agreement of a rater's ranking with the oracle's ---------------------------------------------


def within_group_spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` ([G,K] -> [G], float64);
    ranks by sorting (continuous scores: ties have probability 0); 0 where a row is constant."""
    ra = a.double().argsort(dim=1).argsort(dim=1).double()
    rb = b.double().argsort(dim=1).argsort(dim=1).double()
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    den = (ra.pow(2).sum(dim=1) * rb.pow(2).sum(dim=1)).sqrt()
    const = (a.double().std(dim=1) == 0) | (b.double().std(dim=1) == 0)
    return torch.where(const, torch.zeros_like(den), (ra * rb).sum(dim=1) / den.clamp_min(1e-300))


def rank_agreement(scores: torch.Tensor, target: torch.Tensor, reducer: Reducer | None = None) -> dict:
    """How well ``scores`` [G,K] rank the candidates as ``target`` [G,K] does, over all G groups (of all
    ranks when ``reducer`` averages over processes with equal slices): mean within-group Spearman and
    argmax agreement, each with its standard error over groups; ``chance`` = 1/K for the argmax."""
    rho = within_group_spearman(scores, target)
    hit = (scores.argmax(dim=1) == target.argmax(dim=1)).double()
    m = [rho.mean(), rho.pow(2).mean(), hit.mean()]
    if reducer is not None:
        m = reducer.mean(m)
    n = rho.numel() * (reducer.world if reducer is not None else 1)
    r1, r2, p = (float(x) for x in m)
    se_rho = math.sqrt(max(r2 - r1 * r1, 0.0) / max(n - 1, 1))
    return {"spearman": r1, "spearman_se": se_rho, "argmax_agreement": p,
            "argmax_agreement_se": math.sqrt(max(p * (1 - p), 0.0) / max(n - 1, 1)), "chance": 1.0 / scores.shape[1],
            "groups": n}
