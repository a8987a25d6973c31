"""Noise-selection policies used after meta-training (paper section 4.3) behind one interface.

Every policy sees the same k candidate noises ``candidates [B,k,C,H,W]`` for a batch (x0, t, y) and
returns the chosen noise ``[B,C,H,W]`` (the exact tensor that builds x_t and is the loss target) and the
chosen index ``[B]``. ``rater_soft`` instead weights all k candidates with the rater's group softmax,
the objective the rater was meta-learned for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .models.rater import NoiseRater, group_weights

POLICIES = ("vanilla", "max_norm", "min_norm", "nearest", "rater", "rater_soft")


def _norms(candidates: torch.Tensor) -> torch.Tensor:
    return candidates.flatten(2).norm(dim=-1)  # [B,k]


def _take(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), index]


@dataclass
class SelectionPolicy:
    """A named policy; ``rater`` is required for ``rater`` and ``rater_soft``."""

    name: str
    k: int = 1
    rater: NoiseRater | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"unknown selection policy {self.name!r}; choose one of {', '.join(POLICIES)}")
        if self.k < 1:
            raise ValueError(f"the number of candidates k must be >= 1, got {self.k}")
        if self.name == "vanilla" and self.k != 1:
            raise ValueError("policy 'vanilla' uses one plain Gaussian noise: set k (--candidates) to 1")
        if self.name in ("rater", "rater_soft") and self.rater is None:
            raise ValueError(f"policy {self.name!r} needs a rater checkpoint (--rater PATH)")
        if self.rater is not None:
            self.rater.eval().requires_grad_(False)

    @property
    def soft(self) -> bool:
        return self.name == "rater_soft"

    def scores(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Rater scores [B,k] for all candidates in one batched forward, without autograd."""
        assert self.rater is not None
        with torch.inference_mode():
            return self.rater.score_candidates(candidates, t, x0, y).float()

    def select(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor):
        """candidates [B,k,C,H,W] -> (noise [B,C,H,W], index [B])."""
        if candidates.dim() != 5 or candidates.shape[1] != self.k:
            raise ValueError(f"expected candidates [B,{self.k},C,H,W], got {list(candidates.shape)}")
        B = candidates.shape[0]
        if self.name == "vanilla" or self.k == 1:
            index = torch.zeros(B, dtype=torch.long, device=candidates.device)
        elif self.name == "max_norm":
            index = _norms(candidates).argmax(dim=1)
        elif self.name == "min_norm":
            index = _norms(candidates).argmin(dim=1)
        elif self.name == "nearest":
            # Immiscible-Diffusion-style: the candidate closest in L2 to its image.
            index = (candidates - x0[:, None]).flatten(2).norm(dim=-1).argmin(dim=1)
        elif self.name in ("rater", "rater_soft"):
            index = self.scores(x0, t, y, candidates).argmax(dim=1)
        return _take(candidates, index), index

    def weights(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Group-softmax weights [B,k] of the frozen rater (``rater_soft``); uniform for other policies."""
        if self.rater is None:
            return torch.full(candidates.shape[:2], 1.0 / candidates.shape[1], device=candidates.device)
        return group_weights(self.scores(x0, t, y, candidates), self.temperature)

    def __call__(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, k: int | None = None,
                 generator: torch.Generator | None = None):
        """Draw k candidates from N(0, I) and select: (noise [B,C,H,W], index [B])."""
        if k is not None and k != self.k:
            raise ValueError(f"this policy was built for k={self.k}, called with k={k}")
        cand = torch.randn((x0.shape[0], self.k, *x0.shape[1:]), generator=generator, device=x0.device,
                           dtype=x0.dtype)
        return self.select(x0, t, y, cand)


def soft_selection_loss(per_sample: Callable[[torch.Tensor], torch.Tensor], candidates: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
    """mean_b sum_k w_bk l_bk, where ``per_sample(noise [B*k,...]) -> [B*k]`` evaluates the losses."""
    B, k = candidates.shape[:2]
    losses = per_sample(candidates.reshape(B * k, *candidates.shape[2:])).reshape(B, k)
    return (weights * losses).sum(dim=1).mean()
