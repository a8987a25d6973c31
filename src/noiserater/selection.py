"""Noise-selection policies used after meta-training (paper section 4.3) and a drop-in selector.

Every policy sees the same k candidate noises ``candidates [B,k,C,H,W]`` for a batch (x0, t, y) and
returns the chosen noise ``[B,C,H,W]`` (the exact tensor that builds x_t and is the loss target) and the
chosen index ``[B]``:

- ``vanilla``: k=1, plain N(0, I) noise;
- ``max_norm`` / ``min_norm``: the candidate of largest / smallest L2 norm (the paper's naive baselines);
- ``nearest``: the candidate closest in L2 to its image (Immiscible-Diffusion-style assignment);
- ``rater``: top-1 by the frozen rater's score, all k candidates scored in one batched forward
  under inference mode (paper eq. 7);
- ``rater_soft``: trains on all k candidates with the rater's group-softmax weights, the objective the
  rater was meta-learned for (``weights``); its cost is k forward/backward passes;
- ``rater_sample``: ONE candidate drawn with probability softmax(score / temperature): its expected loss is
  exactly the rater-weighted inner loss the rater was meta-trained on (argmax, ``rater``, is T -> 0; vanilla
  is T -> inf), at the cost of one pass;
- ``uniform_soft``: all k candidates with weights 1/k, the equal-cost control of ``rater_soft``;
- ``oracle_alignment`` / ``oracle_anti`` / ``oracle_cosine``: the candidate whose loss gradient is most
  (least) aligned with the meta-validation gradient at the model's CURRENT weights (Theorem 4.2), or most
  aligned in direction (alignment / gradient norm); state-dependent, one jvp over the k candidates per step
  plus one validation backward every ``refresh_every`` steps (:class:`AlignmentOracle`);
- ``rater_online``: argmax of a rater re-distilled onto the oracle at the current weights every N steps
  (:class:`OnlineRater`), the state-dependent version of the paper's frozen rater.

:class:`NoiseSelector` wraps a policy for any training loop::

    selector = NoiseSelector.from_checkpoint("rater.pt", k=4)
    eps = selector(x0, t, y)          # [B,C,H,W], use it to build x_t AND as the target
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import RunDirError, sha256_file, write_json
from .meta.losses import Batch, weighted_loss
from .meta.oracle import (
    ORACLE_MODES,
    candidate_alignments,
    distillation_loss,
    oracle_scores,
    validation_gradient,
)
from .models.loading import load_rater
from .models.rater import NoiseRater, group_weights
from .objectives import Objective, default_objective
from .randomness import STEP_MIX


class NonFiniteError(FloatingPointError):
    """Rater scores (or another quantity a step depends on) are NaN/inf; the training loop skips the step."""


POLICIES = ("vanilla", "max_norm", "min_norm", "nearest", "rater", "rater_soft", "rater_sample", "uniform_soft",
            "oracle_alignment", "oracle_anti", "oracle_cosine", "rater_online")
RATER_POLICIES = ("rater", "rater_soft", "rater_sample")  # need a frozen rater file (--rater)
SOFT_POLICIES = ("rater_soft", "uniform_soft")  # train on all k candidates with weights
ORACLE_POLICIES = {"oracle_alignment": "align", "oracle_anti": "anti", "oracle_cosine": "cosine"}
STATE_POLICIES = (*ORACLE_POLICIES, "rater_online")  # need the live model and the meta-validation split


def dit_passes(policy: str, k: int) -> float:
    """Cost class of a policy in DiT forward/backward passes per training image (selection overheads of a
    rater or of the oracle's jvp come on top and are measured by ``bench selection``)."""
    return float(k) if policy in SOFT_POLICIES else 1.0


def equal_cost_control(policy: str, k: int) -> tuple[str, int]:
    """The control each arm is judged against: soft weightings against uniform weights over the same k
    noises, every one-pass policy against vanilla."""
    if policy == "rater_soft":
        return "uniform_soft", k
    return "vanilla", 1


def _norms(candidates: torch.Tensor) -> torch.Tensor:
    return candidates.flatten(2).norm(dim=-1)  # [B,k]


def _take(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), index]


def gumbel_argmax(scores: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row drawn with probability softmax(scores / temperature) [B,k] -> [B] (Gumbel-max;
    the Gumbel noise comes from ``generator`` on the CPU, so a run is repeatable on any device)."""
    u = torch.rand(scores.shape, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
    gumbel = (-(-u.log()).log()).to(scores.device)
    return (scores.double() / temperature + gumbel).argmax(dim=1)


@dataclass
class SelectionPolicy:
    """A named policy. ``rater`` is required for the frozen-rater policies (and refused otherwise);
    ``scorer`` (an :class:`AlignmentOracle` or :class:`OnlineRater`) for the state-dependent ones."""

    name: str
    k: int = 1
    rater: NoiseRater | None = None
    temperature: float = 1.0
    scorer: "AlignmentOracle | OnlineRater | None" = None
    objective: Objective | None = None  # the training objective: t's units (the rater sees model_time(t))

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"unknown selection policy {self.name!r}; choose one of {', '.join(POLICIES)}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"the number of candidates k must be an integer >= 1, got {self.k!r}")
        if self.name == "vanilla" and self.k != 1:
            raise ValueError("policy 'vanilla' uses one plain Gaussian noise: set k (--candidates) to 1")
        if self.name in RATER_POLICIES and self.rater is None:
            raise ValueError(f"policy {self.name!r} needs a rater checkpoint (--rater PATH)")
        if self.name not in RATER_POLICIES and self.rater is not None:
            raise ValueError(
                f"policy {self.name!r} does not use a rater; drop --rater or choose --policy "
                + " / ".join(RATER_POLICIES)
            )
        if self.name in STATE_POLICIES and self.scorer is None:
            raise ValueError(f"policy {self.name!r} scores candidates at the model's current weights: build it "
                             "with scorer=AlignmentOracle(...) / OnlineRater(...) (the train loop does this)")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.rater is not None:
            self.rater.eval().requires_grad_(False)

    @property
    def soft(self) -> bool:
        return self.name in SOFT_POLICIES

    def scores(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Rater scores [B,k] for all candidates in one batched forward, without autograd."""
        if self.scorer is not None:
            return _check_finite(self.scorer.scores(x0, t, y, candidates), "scorer")
        if self.rater is None:
            raise ValueError(f"policy {self.name!r} has no rater to score with")
        return rater_scores(self.rater, x0, (self.objective or default_objective()).model_time(t), y, candidates)

    def select(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor,
               generator: torch.Generator | None = None):
        """candidates [B,k,C,H,W] -> (noise [B,C,H,W], index [B]); the noise is a row of ``candidates``.
        ``generator`` draws the sample of ``rater_sample`` (repeatable runs pass a seeded one)."""
        if candidates.dim() != 5 or candidates.shape[1] != self.k or candidates.shape[0] != x0.shape[0]:
            raise ValueError(
                f"expected candidates [B={x0.shape[0]},k={self.k},C,H,W], got {list(candidates.shape)}"
            )
        if candidates.shape[2:] != x0.shape[1:]:
            raise ValueError(f"candidates {list(candidates.shape)} do not match images {list(x0.shape)}")
        B = candidates.shape[0]
        if self.k == 1:  # every policy degenerates to plain Gaussian noise (and the rater is not run)
            index = torch.zeros(B, dtype=torch.long, device=candidates.device)
        elif self.name == "max_norm":
            index = _norms(candidates).argmax(dim=1)
        elif self.name == "min_norm":
            index = _norms(candidates).argmin(dim=1)
        elif self.name == "nearest":
            # Immiscible-Diffusion-style: the candidate closest in L2 to its image.
            index = (candidates - x0[:, None].to(candidates.dtype)).flatten(2).norm(dim=-1).argmin(dim=1)
        elif self.name == "rater_sample":
            index = gumbel_argmax(self.scores(x0, t, y, candidates), self.temperature, generator)
        elif self.name == "uniform_soft":  # a hard pick from uniform weights is plain vanilla noise
            index = torch.zeros(B, dtype=torch.long, device=candidates.device)
        else:  # rater, rater_soft (hard top-1), the oracles, rater_online
            index = self.scores(x0, t, y, candidates).argmax(dim=1)
        return _take(candidates, index), index

    def weights(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Group-softmax weights [B,k] of the frozen rater (``rater_soft``); uniform without a rater."""
        if self.rater is None:
            return torch.full(candidates.shape[:2], 1.0 / candidates.shape[1], device=candidates.device)
        return group_weights(self.scores(x0, t, y, candidates), self.temperature)

    def before_step(self, step: int) -> None:
        """Called once per training step before selection: state-dependent scorers refresh here."""
        if self.scorer is not None:
            self.scorer.before_step(step)

    def state_dict(self) -> dict[str, Any]:
        return self.scorer.state_dict() if self.scorer is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scorer is not None and state:
            self.scorer.load_state_dict(state)

    def __call__(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, k: int | None = None,
                 generator: torch.Generator | None = None):
        """Draw k candidates from N(0, I) and select: (noise [B,C,H,W], index [B])."""
        if k is not None and k != self.k:
            raise ValueError(f"this policy was built for k={self.k}, called with k={k}")
        return self.select(x0, t, y, draw_candidates(x0, self.k, generator), generator)


def _check_finite(scores: torch.Tensor, what: str) -> torch.Tensor:
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):  # argmax/softmax would silently pick or weight a NaN: refuse instead
        raise NonFiniteError(f"the {what} returned {int(bad.sum())} non-finite scores (NaN/inf) of {scores.numel()}")
    return scores


def rater_scores(rater: NoiseRater, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                 candidates: torch.Tensor) -> torch.Tensor:
    """A frozen rater's scores [B,k] for candidates [B,k,C,H,W], one batched forward without autograd."""
    p = next(rater.parameters())
    if p.device != candidates.device:
        raise ValueError(
            f"the rater is on {p.device} but the batch is on {candidates.device}; "
            "move the rater (NoiseSelector(..., device=...)) or the batch"
        )
    with torch.inference_mode():
        scores = rater.score_candidates(candidates.to(p.dtype), t, x0.to(p.dtype), y).float()
    return _check_finite(scores, "rater")


# ---- state-dependent scorers -------------------------------------------------------------------------


class AlignmentOracle:
    """Scores candidates by Theorem 4.2's alignment <grad L_val, grad l_k> at the model's current weights.

    ``model`` is the live model being trained (unwrapped from DDP); ``val_images``/``val_labels`` the
    meta-validation split (never the test split). The validation gradient is recomputed every
    ``refresh_every`` training steps on ``val_batch`` (image, timestep, noise) triples drawn as a pure
    function of (seed, refresh index): a resumed run restores the cached gradient from its checkpoint.
    """

    def __init__(self, model: torch.nn.Module, val_images: torch.Tensor, val_labels: torch.Tensor, *,
                 mode: str = "align", val_batch: int = 256, refresh_every: int = 1, seed: int = 0,
                 objective: Objective | None = None):
        if mode not in ORACLE_MODES:
            raise ValueError(f"unknown oracle mode {mode!r}; choose one of {', '.join(ORACLE_MODES)}")
        if val_batch < 1 or refresh_every < 1:
            raise ValueError("oracle val_batch and refresh_every must be >= 1")
        if len(val_images) == 0:
            raise ValueError("the oracle needs a non-empty meta-validation split")
        self.model, self.mode, self.val_batch, self.refresh_every, self.seed = model, mode, val_batch, refresh_every, seed
        self.val_images, self.val_labels = val_images, val_labels
        self.objective = objective or default_objective()
        self.direction: dict[str, torch.Tensor] | None = None
        self.key: int | None = None
        self.refreshes = 0
        self.last_val_loss = float("nan")

    def draw_val_batch(self, index: int) -> Batch:
        """The ``index``-th meta-validation draw: (x0, y, t, eps) on the model's device."""
        # seeded apart from the training steps' streams (noiserater.randomness) and from OnlineRater's groups
        g = torch.Generator().manual_seed(self.seed * STEP_MIX + 7 * index + 1)
        n = len(self.val_images)
        idx = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-self.val_batch // n))])[: self.val_batch]
        x0 = self.val_images[idx]
        t = self.objective.sample_t(self.val_batch, g)
        eps = torch.randn(x0.shape, generator=g)
        device = next(self.model.parameters()).device
        return tuple(v.to(device) for v in (x0, self.val_labels[idx], t, eps))

    def refresh(self, index: int) -> None:
        self.last_val_loss, self.direction = validation_gradient(self.model, self.draw_val_batch(index),
                                                                 objective=self.objective)
        self.key = index
        self.refreshes += 1

    def before_step(self, step: int) -> None:
        if self.key != step // self.refresh_every or self.direction is None:
            self.refresh(step // self.refresh_every)

    def alignments(self, x0, t, y, candidates) -> torch.Tensor:
        """a [B,k] at the current weights along the cached validation gradient."""
        if self.direction is None:
            self.refresh(0)
        return candidate_alignments(self.model, (x0, y, t, candidates), self.direction, objective=self.objective)

    def scores(self, x0, t, y, candidates) -> torch.Tensor:
        if self.direction is None:
            self.refresh(0)
        return oracle_scores(self.model, (x0.float(), y, t, candidates.float()), self.direction, self.mode,
                             objective=self.objective).float()

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key, "refreshes": self.refreshes,
                "direction": None if self.direction is None else {n: v.cpu() for n, v in self.direction.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(self.model.parameters()).device
        self.key, self.refreshes = state.get("key"), int(state.get("refreshes", 0))
        d = state.get("direction")
        self.direction = None if d is None else {n: v.to(device) for n, v in d.items()}


class OnlineRater:
    """A rater re-distilled onto the oracle at the model's CURRENT weights every ``every`` steps.

    At each refresh: a fresh validation gradient (``oracle``), then ``steps`` Adam steps of the listwise
    distillation loss on fresh groups of ``batch`` training images x k candidates (timesteps uniform, the
    training labels after the run's label dropout is NOT applied: the rater sees true labels). Between
    refreshes it selects by argmax of its scores like the frozen ``rater`` policy, at the cost of one
    rater forward. Its weights and optimiser state are saved in the training checkpoint.
    """

    def __init__(self, rater: NoiseRater, oracle: AlignmentOracle, train_images: torch.Tensor,
                 train_labels: torch.Tensor, *, k: int, every: int = 50, steps: int = 10, batch: int = 32,
                 lr: float = 1e-3, target_temperature: float = 0.5, seed: int = 0):
        if every < 1 or steps < 1 or batch < 1:
            raise ValueError("online rater every / steps / batch must be >= 1")
        self.rater, self.oracle = rater, oracle
        self.train_images, self.train_labels = train_images, train_labels
        self.k, self.every, self.steps, self.batch = k, every, steps, batch
        self.target_temperature, self.seed = target_temperature, seed
        self.opt = torch.optim.Adam([p for p in rater.parameters() if p.requires_grad], lr=lr)
        self.key: int | None = None
        self.last_loss = float("nan")
        self.refreshes = 0

    def _group_batch(self, index: int, j: int) -> Batch:
        # refresh ``index``, distillation step j < 1009; offset 500_000 keeps it apart from the oracle's draws
        g = torch.Generator().manual_seed(self.seed * STEP_MIX + 1009 * index + j + 500_000)
        idx = torch.randint(0, len(self.train_images), (self.batch,), generator=g)
        x0 = self.train_images[idx]
        t = self.oracle.objective.sample_t(self.batch, g)
        eps = torch.randn((self.batch, self.k, *x0.shape[1:]), generator=g)
        device = next(self.rater.parameters()).device
        return tuple(v.to(device) for v in (x0, self.train_labels[idx], t, eps))

    def refresh(self, index: int) -> None:
        self.oracle.refresh(index)
        self.rater.train()
        for j in range(self.steps):
            x0, y, t, eps = self._group_batch(index, j)
            a = self.oracle.alignments(x0, t, y, eps)
            loss = distillation_loss(self.rater.score_candidates(eps, self.oracle.objective.model_time(t), x0, y), a,
                                     self.target_temperature)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if all(torch.isfinite(p.grad).all() for p in self.rater.parameters() if p.grad is not None):
                self.opt.step()
            self.last_loss = float(loss.detach())
        self.rater.eval()
        self.key = index
        self.refreshes += 1

    def before_step(self, step: int) -> None:
        if self.key != step // self.every:
            self.refresh(step // self.every)

    def scores(self, x0, t, y, candidates) -> torch.Tensor:
        return rater_scores(self.rater, x0, self.oracle.objective.model_time(t), y, candidates)

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key, "refreshes": self.refreshes, "rater": self.rater.state_dict(),
                "optimizer": self.opt.state_dict(), "oracle": self.oracle.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.key, self.refreshes = state.get("key"), int(state.get("refreshes", 0))
        self.rater.load_state_dict(state["rater"])
        self.opt.load_state_dict(state["optimizer"])
        self.oracle.load_state_dict(state.get("oracle", {}))


def draw_candidates(x0: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k i.i.d. N(0, I) noises per image: [B,k,C,H,W] in x0's dtype (drawn in float32 for half types)."""
    dtype = x0.dtype if x0.dtype in (torch.float32, torch.float64) else torch.float32
    gen_device = generator.device if generator is not None else x0.device
    cand = torch.randn((x0.shape[0], k, *x0.shape[1:]), generator=generator, device=gen_device, dtype=dtype)
    return cand.to(device=x0.device, dtype=x0.dtype)


def soft_selection_loss(per_sample: Callable[[torch.Tensor], torch.Tensor], candidates: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
    """mean_b sum_k w_bk l_bk, where ``per_sample(noise [B*k,...]) -> [B*k]`` evaluates the losses."""
    B, k = candidates.shape[:2]
    return weighted_loss(per_sample(candidates.reshape(B * k, *candidates.shape[2:])).reshape(B, k), weights)


# ---- the norm of the chosen noise ------------------------------------------------------------------
# Any policy that prefers some candidates changes the distribution of the noise the model trains on. Its
# radial part is easy to see: the norm of an N(0, I_d) draw is chi-distributed with d degrees of freedom,
# and max_norm (min_norm, nearest) shifts it. These measure that shift, and the k=1 control that copies it.


def chi_cdf(x: torch.Tensor, d: int) -> torch.Tensor:
    """CDF of the chi distribution with ``d`` degrees of freedom (the norm of an N(0, I_d) draw), float64:
    P(d/2, x^2/2), the regularised lower incomplete gamma function."""
    x = x.double()
    return torch.special.gammainc(torch.full_like(x, d / 2.0), x.clamp(min=0).pow(2) / 2)


def ks_distance_from_chi(norms: torch.Tensor, d: int) -> float:
    """Kolmogorov-Smirnov distance sup_x |F_n(x) - F_chi_d(x)| of norms [N] from chi_d (0: the norms of
    plain Gaussian noise, up to ~1.36/sqrt(N) at 95%)."""
    x = norms.double().flatten().sort().values
    n = x.numel()
    if n == 0:
        return float("nan")
    f = chi_cdf(x, d)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum((i / n - f).max(), (f - (i - 1) / n).max()))


def max_norm_scale(d: int, k: int, points: int = 200_001) -> float:
    """E[max of k chi_d draws] / E[chi_d]: the factor by which ``max_norm`` at k candidates lengthens the
    noise on average in dimension ``d``, so ``train --noise-scale`` with it is max_norm's k=1 control
    (d=64, k=4: 1.0917). Quadrature of E[X] = int_0^inf (1 - F(x)) dx on a fine grid."""
    if d < 1 or k < 1:
        raise ValueError(f"max_norm_scale needs d >= 1 and k >= 1, got d={d}, k={k}")
    x = torch.linspace(0.0, d**0.5 + 40.0, points, dtype=torch.float64)
    f = chi_cdf(x, d)
    return float(torch.trapezoid(1 - f.pow(k), x) / torch.trapezoid(1 - f, x))


class NoiseNormStats:
    """The norms of the noises a run trains on, since the last :meth:`reset`: mean ||eps||^2 / d (1 for
    plain Gaussian noise) and the KS distance of the norms from chi_d. Saved in the checkpoint, so a
    resumed run logs what a straight run logs."""

    def __init__(self) -> None:
        self.norms: list[torch.Tensor] = []
        self.dim = 0

    def update(self, noise: torch.Tensor) -> None:
        """noise [B, C, H, W] (or [B, k, C, H, W]: every candidate counts)."""
        flat = noise.detach().reshape(-1, noise[0].numel() if noise.dim() == 4 else noise[0, 0].numel())
        self.dim = flat.shape[1]
        self.norms.append(flat.double().norm(dim=1).cpu())

    def summary(self) -> dict[str, float]:
        if not self.norms:
            return {}
        norms = torch.cat(self.norms)
        return {"noise_sq_norm_per_dim": float(norms.pow(2).mean() / self.dim),
                "noise_norm_ks": ks_distance_from_chi(norms, self.dim)}

    def reset(self) -> None:
        self.norms = []

    def state_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "norms": torch.cat(self.norms) if self.norms else torch.zeros(0, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dim = int(state.get("dim", 0))
        norms = state.get("norms")
        self.norms = [norms] if norms is not None and norms.numel() else []


# ---- the drop-in API ---------------------------------------------------------------------------------


class NoiseSelector:
    """Noise for any diffusion training loop: ``eps = selector(x0, t, y)`` replaces ``torch.randn_like(x0)``.

    The default, ``max_norm`` at k=4, is the one arm of the evidence study (docs/evidence.md) that beat its
    equal-cost control (vanilla) on both datasets and both metrics at about vanilla's cost; no rater did.
    ``NoiseSelector("vanilla", k=1)`` is plain Gaussian noise.

    Use the returned ``eps`` both to build ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` and as the
    regression target. ``y`` may be None (unconditional: the rater's null class is used). For
    ``rater_soft`` call :meth:`weighted` instead (all k candidates with their weights).
    """

    def __init__(self, policy: str = "max_norm", k: int | None = None, rater: NoiseRater | None = None,
                 temperature: float = 1.0, device: str | torch.device | None = None,
                 scorer: "AlignmentOracle | OnlineRater | None" = None):
        if rater is not None and device is not None:
            rater = rater.to(device)
        if k is None:  # vanilla draws one noise; every selection policy defaults to the study's k=4
            k = 1 if policy == "vanilla" else 4
        self.policy = SelectionPolicy(policy, k, rater, temperature, scorer)
        self.calls = 0  # training steps seen, for the state-dependent scorers' refresh cadence

    @classmethod
    def oracle(cls, model: torch.nn.Module, val_images: torch.Tensor, val_labels: torch.Tensor, k: int = 4,
               mode: str = "align", *, refresh_every: int = 1, val_batch: int = 256, seed: int = 0) -> "NoiseSelector":
        """The alignment oracle on ``model`` (the live model you are training) with your validation split:
        each call picks, per image, the candidate most aligned with the validation gradient."""
        name = {v: n for n, v in ORACLE_POLICIES.items()}[mode] if mode in ORACLE_MODES else mode
        scorer = AlignmentOracle(model, val_images, val_labels, mode=ORACLE_POLICIES.get(name, mode),
                                 val_batch=val_batch, refresh_every=refresh_every, seed=seed)
        return cls(name, k, scorer=scorer)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, k: int = 4, policy: str = "rater", *,
                        device: str | torch.device = "cpu", temperature: float = 1.0,
                        model: Any = None) -> "NoiseSelector":
        """A selector with the frozen rater saved at ``path`` (``noiserater metatrain`` or ``save_rater``).

        ``model`` (a DiT, a DiTSpec or anything with input_size / in_channels / num_classes) makes a rater
        trained for another image size, channel count or class count a clear error up front.
        """
        if policy not in RATER_POLICIES:
            raise ValueError(f"from_checkpoint is for the rater policies ({', '.join(RATER_POLICIES)}); "
                             f"for {policy!r} use NoiseSelector({policy!r}, k={k})")
        return cls(policy, k, load_rater(path, expect=model), temperature, device)

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def k(self) -> int:
        return self.policy.k

    @property
    def rater(self) -> NoiseRater | None:
        return self.policy.rater

    def _labels(self, x0: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is not None:
            return y
        null = self.rater.spec.num_classes if self.rater is not None else 0
        return torch.full((x0.shape[0],), null, dtype=torch.long, device=x0.device)

    @staticmethod
    def _timesteps(x0: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        if isinstance(t, int):
            return torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        return t

    def select(self, x0: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None,
               candidates: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose among given candidates [B,k,C,H,W]: (eps [B,C,H,W], index [B])."""
        return self.policy.select(x0, self._timesteps(x0, t), self._labels(x0, y), candidates, generator)

    def __call__(self, x0: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw k candidates per image and return the chosen noise [B,C,H,W]. Each call counts as one
        training step for the state-dependent policies' refresh cadence."""
        self.policy.before_step(self.calls)
        self.calls += 1
        if self.policy.soft:
            raise ValueError(f"policy {self.name!r} trains on all k candidates: call selector.weighted(x0, t, y) "
                             "for (candidates [B,k,C,H,W], weights [B,k]), or use policy 'rater' / 'rater_sample'")
        return self.select(x0, t, y, draw_candidates(x0, self.k, generator), generator)[0]

    def weighted(self, x0: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidates [B,k,C,H,W], weights [B,k]): the rater's group-softmax weights (uniform without a
        rater). The loss is mean_b sum_k w_bk ||eps_bk - eps_theta(x_t(eps_bk))||^2."""
        cand = draw_candidates(x0, self.k, generator)
        return cand, self.policy.weights(x0, self._timesteps(x0, t), self._labels(x0, y), cand)

    def __repr__(self) -> str:
        r = f", rater={self.rater.spec.name}" if self.rater is not None else ""
        return f"NoiseSelector(policy={self.name!r}, k={self.k}{r})"


# ---- run-folder provenance ---------------------------------------------------------------------------


def selection_info(policy: SelectionPolicy, rater_path: str | os.PathLike | None) -> dict[str, Any]:
    """What a run used for noise selection: policy, k, temperature, and the rater file, spec and sha256."""
    info: dict[str, Any] = {"policy": policy.name, "candidates": policy.k, "temperature": policy.temperature,
                            "rater": None}
    rater = policy.rater if policy.rater is not None else getattr(policy.scorer, "rater", None)
    if rater_path and rater is not None:
        info["rater"] = {
            "path": str(Path(rater_path).resolve()),
            "sha256": sha256_file(rater_path),
            "spec": rater.spec.to_dict(),
            "parameters": sum(p.numel() for p in rater.parameters()),
        }
    if policy.scorer is not None:  # the state-dependent scorer's cadence and sizes
        sc = policy.scorer
        info["scorer"] = {key: getattr(sc, key) for key in ("mode", "val_batch", "refresh_every", "every", "steps",
                                                            "batch", "target_temperature") if hasattr(sc, key)}
        if isinstance(sc, OnlineRater):
            info["scorer"]["rater_arch"] = sc.rater.spec.name
            info["scorer"]["oracle_val_batch"] = sc.oracle.val_batch
    return info


def record_selection(run_dir: str | os.PathLike, policy: SelectionPolicy, rater_path: str | os.PathLike | None,
                     resume: bool = False) -> dict[str, Any]:
    """Write ``selection`` into ``<run_dir>/run_info.json`` (other keys kept). On resume, a rater file
    whose sha256 differs from the one the run started with is refused."""
    path = Path(run_dir) / "run_info.json"
    info = selection_info(policy, rater_path)
    existing: dict[str, Any] = {}
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise RunDirError(f"{path} is damaged (not JSON); use another --run-dir") from None
        old = (existing.get("selection") or {}).get("rater") or {}
        new = info["rater"] or {}
        if resume and old.get("sha256") and old.get("sha256") != new.get("sha256"):
            raise RunDirError(
                f"the rater file {rater_path} has changed since this run started (sha256 {old['sha256'][:12]}... "
                f"then, {str(new.get('sha256'))[:12]}... now); restore it or start a new --run-dir"
            )
    existing["selection"] = info
    write_json(path, existing)
    return info
