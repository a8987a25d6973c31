"""The two losses of the bilevel problem (paper eq. 3 and 5), shared by meta-training and analysis.

A *train batch* is a tuple ``(x0 [B,C,H,W], y [B], t [B], eps [B,K,C,H,W])`` holding K grouped noises per
image; a *validation batch* is ``(x0, y, t, eps [B,C,H,W])`` with one fixed noise per image.

- ``candidate_losses``: l_bk = the objective's per-sample loss of candidate k (DDPM: mean over C,H,W of
  (eps_bk - eps_theta(x_t^k, t, y))^2 with x_t^k = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_bk; flow: the
  velocity loss with x_t^k = (1 - t) x0 + t eps_bk); the same eps_bk builds x_t^k and the target.
- ``candidate_weights``: w_b = softmax_k(rater(eps_bk, model_time(t), x0, y) / temperature).
- ``inner_loss``: L_in = mean_b sum_k w_bk l_bk.
- ``val_loss``: L_val = mean over the batch and C,H,W of the plain loss of the validation batch.

``objective`` (:mod:`noiserater.objectives`) defaults to DDPM; t is in the objective's units.

Every function keeps the dtype of its inputs (float64 checks stay float64). Labels are used as given: the
meta code drops labels explicitly when it builds a batch and evaluates the DiT without its own random
label dropout (see :func:`eval_mode`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models.rater import group_weights
from ..objectives import Objective, default_objective

Batch = Sequence[torch.Tensor]  # (x0, y, t, eps)

def model_fn(model: nn.Module, params: Mapping[str, torch.Tensor] | None = None) -> Callable:
    """``f(x_t, t, y)``: the model itself, or the model evaluated at ``params`` (a name -> tensor dict of
    some of its parameters; the others are the module's own) via ``torch.func.functional_call``."""
    if params is None:
        return model
    return lambda x, t, y: functional_call(model, dict(params), (x, t, y))


def check_train_batch(batch: Batch, what: str = "train batch") -> None:
    if len(batch) != 4:
        raise ValueError(f"{what} must be a tuple (x0, y, t, eps), got {len(batch)} items")
    x0, y, t, eps = batch
    if x0.dim() != 4 or eps.dim() != 5 or eps.shape[0] != x0.shape[0] or eps.shape[2:] != x0.shape[1:]:
        raise ValueError(
            f"{what}: expected x0 [B,C,H,W] and eps [B,K,C,H,W] with matching B,C,H,W, "
            f"got x0 {list(x0.shape)} and eps {list(eps.shape)}"
        )
    if y.shape != (x0.shape[0],) or t.shape != (x0.shape[0],):
        raise ValueError(f"{what}: y and t must have shape [B]=[{x0.shape[0]}], got {list(y.shape)} and {list(t.shape)}")


def check_val_batch(batch: Batch) -> None:
    if len(batch) != 4:
        raise ValueError(f"val batch must be a tuple (x0, y, t, eps), got {len(batch)} items")
    x0, y, t, eps = batch
    if x0.dim() != 4 or eps.shape != x0.shape:
        raise ValueError(
            f"val batch: expected x0 and eps both [B,C,H,W] (one noise per image), got {list(x0.shape)} and {list(eps.shape)}"
        )
    if y.shape != (x0.shape[0],) or t.shape != (x0.shape[0],):
        raise ValueError(f"val batch: y and t must have shape [B]=[{x0.shape[0]}], got {list(y.shape)} and {list(t.shape)}")


def flatten_groups(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A train batch with K noises per image as B*K single samples (x0, t, y, noise), candidate-minor."""
    x0, y, t, eps = batch
    B, K = eps.shape[:2]
    noise = eps.reshape(B * K, *eps.shape[2:])
    x0k = x0.unsqueeze(1).expand_as(eps).reshape(B * K, *x0.shape[1:])
    return x0k, t.repeat_interleave(K), y.repeat_interleave(K), noise


def candidate_losses(
    model: nn.Module | Callable, batch: Batch, *, params: Mapping[str, torch.Tensor] | None = None,
    objective: Objective | None = None,
) -> torch.Tensor:
    """l_bk [B,K]: per-candidate loss of the objective, mean over C,H,W (all K candidates in one forward)."""
    B, K = batch[3].shape[:2]
    f = model_fn(model, params) if isinstance(model, nn.Module) else model
    x0k, tk, yk, noise = flatten_groups(batch)
    return (objective or default_objective()).loss(f, x0k, yk, tk, noise).view(B, K)


def rater_scores_of(rater: nn.Module, batch: Batch, objective: Objective | None = None) -> torch.Tensor:
    """Scores [B,K] of a train batch; the rater sees t as the DiT does (``objective.model_time``)."""
    x0, y, t, eps = batch
    return rater.score_candidates(eps, (objective or default_objective()).model_time(t), x0, y)


def candidate_weights(rater: nn.Module, batch: Batch, temperature: float = 1.0,
                      objective: Objective | None = None) -> torch.Tensor:
    """w [B,K] = softmax over the K candidates of rater scores / temperature (differentiable in eta)."""
    return group_weights(rater_scores_of(rater, batch, objective), temperature)


def uniform_weights(batch: Batch) -> torch.Tensor:
    """w [B,K] = 1/K: the same inner loss without a rater (the honest baseline)."""
    x0, _, _, eps = batch
    B, K = eps.shape[:2]
    return torch.full((B, K), 1.0 / K, dtype=x0.dtype, device=x0.device)


def weighted_loss(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_b sum_k w_bk l_bk."""
    return (weights * losses).sum(dim=1).mean()


def inner_loss(
    model: nn.Module, rater: nn.Module | None, batch: Batch, *, temperature: float = 1.0,
    params: Mapping[str, torch.Tensor] | None = None, weights: torch.Tensor | None = None,
    objective: Objective | None = None,
) -> torch.Tensor:
    """L_in = mean_b sum_k w_bk l_bk with w from ``rater`` (or the given ``weights``, e.g. uniform)."""
    if weights is None:
        if rater is None:
            raise ValueError("inner_loss needs a rater or explicit weights")
        weights = candidate_weights(rater, batch, temperature, objective)
    return weighted_loss(candidate_losses(model, batch, params=params, objective=objective), weights)


def val_loss(
    model: nn.Module | Callable, batch: Batch, *, params: Mapping[str, torch.Tensor] | None = None,
    objective: Objective | None = None,
) -> torch.Tensor:
    """L_val: plain loss of the objective (mean over batch and C,H,W) of a validation batch with fixed noise."""
    x0, y, t, eps = batch
    f = model_fn(model, params) if isinstance(model, nn.Module) else model
    return (objective or default_objective()).error(f, x0, y, t, eps).pow(2).mean()


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Evaluate modules in eval mode (no random label dropout inside the DiT); restore the flags after."""
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, f in zip(modules, flags):
            m.train(f)


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Route scaled_dot_product_attention to the MATH kernel: the fused kernels support neither
    forward-mode AD nor double backward, which every meta-gradient method needs."""
    with sdpa_kernel(SDPBackend.MATH):
        yield
