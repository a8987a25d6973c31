"""Differentiable inner optimisers: pure functions of (parameters, gradients, state) on lists of tensors.

Both start from a fresh state at every outer step (Adam's moments are zero, its step counter 1).

SGD:   theta_s = theta_{s-1} - lr * g_s

Adam (Kingma & Ba, with bias correction; ``torch.optim.Adam`` without weight decay or amsgrad):
    m_s = b1 m_{s-1} + (1 - b1) g_s,          v_s = b2 v_{s-1} + (1 - b2) g_s^2,
    theta_s = theta_{s-1} - lr * (m_s / (1 - b1^s)) / (sqrt(v_s / (1 - b2^s)) + eps)
with defaults b1 = 0.9, b2 = 0.999, eps = 1e-8. The square root is given derivative 0 where v_s = 0
(a coordinate whose gradients were all exactly zero so far): there m_s = 0 too and that is the exact
limit, where plain autograd would produce inf * 0 = NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError

INNER_OPTIMIZERS = ("sgd", "adam")

Tensors = list[torch.Tensor]


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


@dataclass(frozen=True)
class InnerOptimizer:
    """``name`` in ('sgd', 'adam'), learning rate ``lr``; Adam's ``betas`` and ``eps`` as above."""

    name: str
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in INNER_OPTIMIZERS:
            raise ConfigError(f"unknown inner optimizer {self.name!r}; choose one of {', '.join(INNER_OPTIMIZERS)}")
        if not self.lr > 0:
            raise ValueError(f"inner learning rate must be > 0, got {self.lr}")
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"Adam betas must be in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"Adam eps must be > 0, got {self.eps}")

    @property
    def state_size(self) -> int:
        """Number of per-parameter state tensors (SGD 0, Adam 2: m and v)."""
        return 2 if self.name == "adam" else 0

    def init_state(self, params: Tensors) -> list[Tensors]:
        """Fresh state: [] for SGD, [m, v] (zeros like the parameters) for Adam."""
        return [[torch.zeros_like(p) for p in params] for _ in range(self.state_size)]

    def step(self, params: Tensors, grads: Tensors, state: list[Tensors], s: int) -> tuple[Tensors, list[Tensors]]:
        """One update at inner step ``s`` (1-based, for Adam's bias correction). Differentiable in all inputs."""
        if self.name == "sgd":
            return [p - self.lr * g for p, g in zip(params, grads)], []
        b1, b2 = self.betas
        m = [b1 * mi + (1 - b1) * g for mi, g in zip(state[0], grads)]
        v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(state[1], grads)]
        c1, c2 = 1 - b1**s, 1 - b2**s
        new = [p - self.lr * (mi / c1) / (_safe_sqrt(vi / c2) + self.eps) for p, mi, vi in zip(params, m, v)]
        return new, [m, v]
