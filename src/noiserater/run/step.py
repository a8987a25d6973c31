"""One optimiser step of diffusion training: the loss of the chosen noise (or the weighted loss of all k, for a
soft policy), backward and clipping (:func:`train_step`), then the update and the EMA once every process agrees
the step is finite (:func:`apply_update`). :func:`noiserater.train.train` and the training benchmarks share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..objectives import Objective
from ..selection import NoiseNormStats, NonFiniteError, SelectionPolicy, soft_selection_loss
from .speed import autocast


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
