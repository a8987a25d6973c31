"""Noise-selection policies used after meta-training (paper section 4.3) and a drop-in selector.

Every policy sees the same k candidate noises ``candidates [B,k,C,H,W]`` for a batch (x0, t, y) and
returns the chosen noise ``[B,C,H,W]`` (the exact tensor that builds x_t and is the loss target) and the
chosen index ``[B]``. Each policy is one class registered with :func:`register_policy`; :func:`get_policy`
builds one by name, and the class says what it needs and costs (:class:`SelectionPolicy`):

- ``vanilla``: k=1, plain N(0, I) noise;
- ``max_norm`` / ``min_norm``: the candidate of largest / smallest L2 norm (the paper's naive baselines);
- ``knn``: the candidate closest in L2 to its image (Improved Immiscible Diffusion's KNN noise; formerly
  ``nearest``, a name old configs may still use);
- ``batch_ot``: the batch's B*k noises assigned to its images by an exact linear assignment minimising the
  total squared distance (minibatch OT; at k=1 OT-CFM's permutation); ``class_ot``: the same within each
  class of the batch (C2OT);
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
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from scipy.optimize import linear_sum_assignment

from .checkpoint import RunDirError, load_checkpoint, sha256_file, write_json
from .config import require
from .meta.losses import Batch, weighted_loss
from .meta.oracle import (
    ORACLE_MODES,
    candidate_alignments,
    distillation_loss,
    oracle_scores,
    validation_gradient,
)
from .models.loading import load_rater
from .models.rater import RATER_CONFIGS, NoiseRater, RaterSpec, group_weights
from .objectives import Objective, default_objective, get_objective, objective_from_config
from .randomness import STEP_MIX


class NonFiniteError(FloatingPointError):
    """Rater scores (or another quantity a step depends on) are NaN/inf; the training loop skips the step."""


# the initial weights of a fresh rater_online rater, apart from the DiT's (seed + 0)
ONLINE_RATER_SEED_OFFSET = 1


def _norms(candidates: torch.Tensor) -> torch.Tensor:
    return candidates.flatten(2).norm(dim=-1)  # [B,k]


def _take(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), index]


@dataclass
class PolicyOptions:
    """The policies' own settings, declared here with the policies (a run's config inherits them: see
    :class:`noiserater.train.TrainConfig`); each is read only by the policies whose ``config_fields`` name it."""

    temperature: float = 1.0  # rater_sample / rater_soft: softmax(score / temperature)
    oracle_val_batch: int = 256  # oracle*, rater_online: meta-validation triples behind the validation gradient
    oracle_every: int = 1  # oracle*, rater_online: refresh that gradient every N steps (amortised oracle: N > 1)
    online_every: int = 50  # rater_online: re-distil the rater onto the oracle every N steps
    online_steps: int = 10  # rater_online: distillation steps per refresh
    online_batch: int = 32  # rater_online: images per distillation step (x k candidates)
    online_lr: float = 1e-3
    online_rater: str = "Rater-N/2"  # rater_online: architecture when --rater gives no initial rater
    distill_temperature: float = 0.5  # rater_online: sharpness of the oracle's ranking as a distillation target

    # options added after runs were first written, with the value that reproduces those runs (resume checks)
    LEGACY_VALUES: ClassVar[dict[str, Any]] = {
        "oracle_val_batch": 256, "oracle_every": 1, "online_every": 50, "online_steps": 10, "online_batch": 32,
        "online_lr": 1e-3, "online_rater": "Rater-N/2", "distill_temperature": 0.5}

    def validate_policy_options(self) -> None:
        for key in ("oracle_val_batch", "oracle_every", "online_every", "online_steps", "online_batch"):
            require(getattr(self, key) >= 1, key, "must be >= 1")
        require(math.isfinite(self.online_lr) and self.online_lr > 0, "online_lr", "must be a finite number > 0")
        require(self.online_rater in RATER_CONFIGS, "online_rater", f"choose one of {', '.join(RATER_CONFIGS)}")
        for key in ("distill_temperature", "temperature"):
            require(math.isfinite(getattr(self, key)) and getattr(self, key) > 0, key, "must be a finite number > 0")


def gumbel_argmax(scores: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row drawn with probability softmax(scores / temperature) [B,k] -> [B] (Gumbel-max;
    the Gumbel noise comes from ``generator`` on the CPU, so a run is repeatable on any device)."""
    u = torch.rand(scores.shape, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
    gumbel = (-(-u.log()).log()).to(scores.device)
    return (scores.double() / temperature + gumbel).argmax(dim=1)


# ---- the policy registry -----------------------------------------------------------------------------
# Every policy is a class registered here; TrainConfig.validate, train.build_policy, the evidence study,
# the benchmark and the CLI help ask the registry what a policy is instead of testing its name.

_REGISTRY: dict[str, type["SelectionPolicy"]] = {}
# old name -> new name: accepted only where an old config or run folder is read (TrainConfig, the resume
# check), never by get_policy and never listed
RENAMED_POLICIES = {"nearest": "knn"}


def register_policy(cls: type["SelectionPolicy"]) -> type["SelectionPolicy"]:
    """Class decorator: add a :class:`SelectionPolicy` subclass to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, SelectionPolicy)):
        raise TypeError(f"register_policy takes a SelectionPolicy subclass, got {cls!r}")
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"a selection policy needs a name that is a Python identifier, got {cls.name!r}")
    if cls.name in _REGISTRY or cls.name in RENAMED_POLICIES:
        raise ValueError(f"selection policy {cls.name!r} is already registered ({_REGISTRY.get(cls.name, cls).__name__})")
    if cls.uses_rater not in ("required", "optional", "refused") or cls.k_rule not in ("one", "choose", "any"):
        raise ValueError(f"policy {cls.name!r}: uses_rater must be required/optional/refused and k_rule one/choose/any")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_policy(name: str) -> None:
    """Remove a registered policy (tests that register a policy clean up with this)."""
    _REGISTRY.pop(name, None)


def policy_names() -> tuple[str, ...]:
    """Every registered policy, in registration order (the order of ``train --help``)."""
    return tuple(_REGISTRY)


def policy_class(name: str) -> type["SelectionPolicy"]:
    """The registered class of policy ``name``; an unknown name is a ValueError that lists the known ones."""
    cls = _REGISTRY.get(name)
    if cls is None:
        renamed = f" ({name!r} is now {RENAMED_POLICIES[name]!r})" if name in RENAMED_POLICIES else ""
        raise ValueError(f"unknown selection policy {name!r}{renamed}; choose one of {', '.join(_REGISTRY)}")
    return cls


def get_policy(name: str, k: int = 1, **options: Any) -> "SelectionPolicy":
    """Policy ``name`` over k candidates; ``options``: ``rater``, ``temperature``, ``scorer`` (see
    :class:`SelectionPolicy`)."""
    return policy_class(name)(k, **options)


def dit_passes(policy: str, k: int) -> float:
    """Cost class of a policy in DiT forward/backward passes per training image (selection overheads of a
    rater, of the oracle's jvp or of an assignment come on top and are measured by ``bench selection``)."""
    return policy_class(policy).dit_passes(k)


def equal_cost_control(policy: str, k: int) -> tuple[str, int]:
    """(policy, k) of the control each arm is judged against (see :meth:`SelectionPolicy.control`)."""
    return policy_class(policy).control(k)


def policy_help() -> str:
    """The ``train --policy`` help, one entry per registered policy."""
    return "Noise selection: " + "; ".join(f"{c.name}: {c.summary}" for c in _REGISTRY.values()) + "."


class SelectionPolicy:
    """A noise-selection policy. Each policy is a subclass registered with :func:`register_policy`; build
    one with :func:`get_policy`. The class attributes say what the policy is:

    - ``name``, ``summary`` (one line for ``train --help``);
    - ``uses_rater``: ``required`` (a frozen rater file, ``--rater``), ``optional`` or ``refused``;
    - ``state_dependent``: scores at the live model's current weights (needs ``scorer``, built by
      :meth:`from_config` from the live model and the meta-validation split);
    - ``soft``: trains on all k candidates with :meth:`weights` (k DiT passes per image);
    - ``batch_coupled``: the choice depends on the whole batch, and the index is a row of the batch's
      pool ``candidates.reshape(B*k, ...)`` (under DDP: of this process's share of the batch);
    - ``changes_norm``: the chosen noise's norm is not chi_d (judged against a noise-scale control too);
    - ``couples``: the choice depends on the image (a noise-data coupling): the model learns the target of
      that joint, not of independent noise;
    - ``k_rule``: ``one`` (k must be 1), ``choose`` (a choice among k >= 2; at k=1 it is vanilla noise) or
      ``any`` (k=1 is meaningful: the batch couplings permute the batch's noises);
    - ``config_fields``: the TrainConfig fields :meth:`from_config` reads besides policy and candidates.

    A subclass implements :meth:`choose` (the index per image) and, if it reads config fields or needs a
    scorer, :meth:`from_config`. Instances carry ``k``, ``rater`` (frozen, for ``required``),
    ``temperature``, ``scorer`` (an :class:`AlignmentOracle` or :class:`OnlineRater`) and ``objective`` (the
    training objective: the units of t; a rater sees ``objective.model_time(t)``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    uses_rater: ClassVar[str] = "refused"
    state_dependent: ClassVar[bool] = False
    soft: ClassVar[bool] = False
    batch_coupled: ClassVar[bool] = False
    changes_norm: ClassVar[bool] = False
    couples: ClassVar[bool] = False
    k_rule: ClassVar[str] = "choose"
    config_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, k: int = 1, rater: NoiseRater | None = None, temperature: float = 1.0,
                 scorer: "AlignmentOracle | OnlineRater | None" = None, objective: Objective | None = None):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"the number of candidates k must be an integer >= 1, got {k!r}")
        if self.k_rule == "one" and k != 1:
            raise ValueError(f"policy {self.name!r} uses one plain Gaussian noise: set k (--candidates) to 1")
        if self.uses_rater == "required" and rater is None:
            raise ValueError(f"policy {self.name!r} needs a rater checkpoint (--rater PATH)")
        if self.uses_rater != "required" and rater is not None:
            raise ValueError(f"policy {self.name!r} does not use a rater; drop --rater or choose --policy "
                             + " / ".join(c.name for c in _REGISTRY.values() if c.uses_rater == "required"))
        if self.state_dependent and scorer is None:
            raise ValueError(f"policy {self.name!r} scores candidates at the model's current weights: build it "
                             "with scorer=AlignmentOracle(...) / OnlineRater(...) (the train loop does this)")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.k, self.rater, self.temperature, self.scorer = k, rater, temperature, scorer
        self.objective = objective or default_objective()
        if self.rater is not None:
            self.rater.eval().requires_grad_(False)

    # ---- what the policy is, for a run's configuration ----

    @classmethod
    def dit_passes(cls, k: int) -> float:
        """DiT forward/backward passes per training image: k for the soft policies, else 1."""
        return float(k) if cls.soft else 1.0

    @classmethod
    def control(cls, k: int) -> tuple[str, int]:
        """The equal-cost control (policy, k) this policy is judged against: vanilla at k=1 for every
        one-pass policy (it trains on candidate 0 of the same draws)."""
        return "vanilla", 1

    @classmethod
    def check_run(cls, cfg: Any) -> None:
        """Admission checks of a training run ``cfg`` (a TrainConfig): k and the rater file. Raises
        ConfigError naming the field (``require``)."""
        require(cfg.candidates >= 1, "candidates", "k must be >= 1")
        require(cls.k_rule != "one" or cfg.candidates == 1, "candidates", f"{cls.name} uses k=1")
        require(cls.k_rule != "choose" or cfg.candidates >= 2, "candidates",
                f"policy {cls.name} chooses among k candidates: pass --candidates 2 or more (k=1 is vanilla)")
        require(cls.uses_rater != "required" or bool(cfg.rater), "rater", f"policy {cls.name} needs --rater PATH")
        require(cls.uses_rater != "refused" or not cfg.rater, "rater",
                f"policy {cls.name} does not use a rater; drop --rater")

    @classmethod
    def from_config(cls, cfg: Any, *, rater: NoiseRater | None = None, model: torch.nn.Module | None = None,
                    val: Any = None, train_data: Any = None, spec: Any = None,
                    objective: Objective | None = None) -> "SelectionPolicy":
        """The policy of a training run ``cfg``; ``rater`` is the loaded ``--rater`` file, ``model`` the live
        model, ``val`` / ``train_data`` the meta-validation and training splits (ImageData), ``spec`` the DiTSpec
        (the state-dependent policies use them), ``objective`` the run's training objective. Reads only
        ``config_fields`` (and policy, candidates)."""
        return cls(cfg.candidates, rater, objective=objective)

    # ---- selecting ----

    def choose(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor,
               generator: torch.Generator | None) -> torch.Tensor:
        """The chosen index per image [B] (a row of the pool [B*k] for ``batch_coupled`` policies)."""
        raise NotImplementedError(f"policy {self.name!r} does not implement choose()")

    def scores(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Rater scores [B,k] for all candidates in one batched forward, without autograd."""
        if self.scorer is not None:
            return _check_finite(self.scorer.scores(x0, t, y, candidates), "scorer")
        if self.rater is None:
            raise ValueError(f"policy {self.name!r} has no rater to score with")
        return rater_scores(self.rater, x0, self.objective.model_time(t), y, candidates)

    def select(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor,
               generator: torch.Generator | None = None):
        """candidates [B,k,C,H,W] -> (noise [B,C,H,W], index [B]); the noise is a row of ``candidates``
        (of the pool ``candidates.reshape(B*k, C, H, W)`` for a batch coupling, ``index`` into it).
        ``generator`` draws the sample of ``rater_sample`` (repeatable runs pass a seeded one)."""
        if candidates.dim() != 5 or candidates.shape[1] != self.k or candidates.shape[0] != x0.shape[0]:
            raise ValueError(
                f"expected candidates [B={x0.shape[0]},k={self.k},C,H,W], got {list(candidates.shape)}"
            )
        if candidates.shape[2:] != x0.shape[1:]:
            raise ValueError(f"candidates {list(candidates.shape)} do not match images {list(x0.shape)}")
        B = candidates.shape[0]
        if self.k == 1 and self.k_rule != "any":  # a choice among one is plain Gaussian noise (no rater run)
            index = torch.zeros(B, dtype=torch.long, device=candidates.device)
        else:
            index = self.choose(x0, t, y, candidates, generator)
        if self.batch_coupled:
            return candidates.reshape(B * self.k, *candidates.shape[2:])[index], index
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k})"


# ---- the policies -------------------------------------------------------------------------------------


@register_policy
class Vanilla(SelectionPolicy):
    name, summary, k_rule = "vanilla", "plain N(0, I) noise, k=1", "one"


@register_policy
class MaxNorm(SelectionPolicy):
    name, summary, changes_norm = "max_norm", "the candidate of largest L2 norm", True

    def choose(self, x0, t, y, candidates, generator):
        return _norms(candidates).argmax(dim=1)


@register_policy
class MinNorm(SelectionPolicy):
    name, summary, changes_norm = "min_norm", "the candidate of smallest L2 norm", True

    def choose(self, x0, t, y, candidates, generator):
        return _norms(candidates).argmin(dim=1)


# ---- noise-data couplings --------------------------------------------------------------------------------
# ||x0 - eps||^2 = ||x0||^2 - 2 <x0, eps> + ||eps||^2: pairing each image with a near noise also favours
# small-norm noise (the opposite of max_norm); NoiseNormStats measures it in every run.

# An exact assignment of B images to a pool of kB noises (scipy's shortest augmenting path) takes, on one
# CPU core, ~0.3 s at B=1024, k=1 and ~2 s at B=2048, k=1 (k > 1 is faster: ~0.4 s at B=2048, k=4), and its
# float64 cost matrix has B*kB entries (2**24: 128 MiB). Beyond these a training step waits on the CPU.
MAX_ASSIGNMENT_IMAGES = 2048
MAX_ASSIGNMENT_ENTRIES = 2**24


def squared_distances(x0: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """||x0_i - pool_j||^2 [B,N] in float64 for images [B,...] and noises [N,...] (expanded as
    ||x||^2 - 2<x, p> + ||p||^2, so memory is B*N, not B*N*d)."""
    x, p = x0.reshape(x0.shape[0], -1).double(), pool.reshape(pool.shape[0], -1).double()
    return (x.pow(2).sum(1)[:, None] - 2 * x @ p.T + p.pow(2).sum(1)[None]).clamp_(min=0)


def min_cost_assignment(cost: torch.Tensor) -> torch.Tensor:
    """For a cost [B,N] with B <= N: the column of each row [B] (distinct columns) that minimises the total
    cost, exactly (``scipy.optimize.linear_sum_assignment``)."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    out = torch.empty(cost.shape[0], dtype=torch.long)
    out[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return out.to(cost.device)


def check_assignment_size(images: int, k: int) -> str | None:
    """Why an exact assignment of ``images`` images to ``images * k`` noises per step is too large, or None."""
    if images > MAX_ASSIGNMENT_IMAGES or images * images * k > MAX_ASSIGNMENT_ENTRIES:
        return (f"an exact assignment of {images} images to {images * k} noises per step is too large (limit: "
                f"{MAX_ASSIGNMENT_IMAGES} images and {MAX_ASSIGNMENT_ENTRIES} = 2**24 cost entries, ~2 s a step "
                "on one CPU core)")
    return None


class _Coupling(SelectionPolicy):
    """Pairs images with noises by L2 distance; refuses a batch too large for an exact assignment."""

    changes_norm = couples = True

    @classmethod
    def check_run(cls, cfg: Any) -> None:
        super().check_run(cfg)
        if cls.batch_coupled:  # the limit is checked on the global batch: each process's share is smaller
            why = check_assignment_size(cfg.batch_size, cfg.candidates)
            require(why is None, "batch_size", f"policy {cls.name}: {why}; lower --batch-size or --candidates "
                    "(or use --policy knn, which needs no assignment)")


@register_policy
class KNN(_Coupling):
    """The nearest of the k candidates to its image in L2 (Improved Immiscible Diffusion, arXiv 2505.18521)."""

    name = "knn"
    summary = "the candidate closest to its image in L2 (Improved Immiscible Diffusion's KNN noise)"

    def choose(self, x0, t, y, candidates, generator):
        return (candidates - x0[:, None].to(candidates.dtype)).flatten(2).norm(dim=-1).argmin(dim=1)


@register_policy
class BatchOT(_Coupling):
    """Minibatch optimal transport: the batch's B*k noises assigned to its B images, each image a distinct
    noise, minimising the total squared L2 distance exactly (a B x kB linear assignment). At k=1 it is the
    permutation of OT-CFM (arXiv 2302.00482) and Immiscible Diffusion (arXiv 2406.12303).

    The batch is what :meth:`select` receives: in ``train`` under DDP that is each process's share of the
    global batch (``batch_size / world`` images), so the coupling is within each process's share and a
    2-process run couples differently from a 1-process run of the same seed."""

    name, batch_coupled, k_rule = "batch_ot", True, "any"
    summary = "the batch's B*k noises assigned to its images by an exact minimum-L2 assignment (OT-CFM at k=1)"

    def choose(self, x0, t, y, candidates, generator):
        B, k = candidates.shape[:2]
        if check_assignment_size(B, k):
            raise ValueError(f"policy {self.name!r}: {check_assignment_size(B, k)}; use a smaller batch or k")
        return min_cost_assignment(squared_distances(x0, candidates.reshape(B * k, *candidates.shape[2:])))


@register_policy
class ClassOT(BatchOT):
    """``batch_ot`` within each class of the batch: the images of a label are assigned the k noises drawn for
    them (C2OT, arXiv 2503.10636: plain OT skews the noise each class sees). The label is the one the model
    is trained with, after label dropout: the null label (unconditional images) forms one group. Within each
    process's share of the batch under DDP, like ``batch_ot``."""

    name = "class_ot"
    summary = "batch_ot within each class of the batch (null-label images form one group)"

    def choose(self, x0, t, y, candidates, generator):
        B, k = candidates.shape[:2]
        if check_assignment_size(B, k):
            raise ValueError(f"policy {self.name!r}: {check_assignment_size(B, k)}; use a smaller batch or k")
        pool = candidates.reshape(B * k, *candidates.shape[2:])
        index = torch.empty(B, dtype=torch.long, device=candidates.device)
        for label in torch.unique(y):
            members = (y == label).nonzero().flatten()  # images of this label; their noises: rows b*k + j
            rows = (members[:, None] * k + torch.arange(k, device=members.device)).flatten()
            index[members] = rows[min_cost_assignment(squared_distances(x0[members], pool[rows]))]
        return index


class _RaterPolicy(SelectionPolicy):
    """A policy that scores with the frozen ``--rater`` file at ``--temperature``."""

    uses_rater = "required"
    config_fields = ("rater", "temperature")

    @classmethod
    def from_config(cls, cfg, *, rater=None, model=None, val=None, train_data=None, spec=None, objective=None):
        return cls(cfg.candidates, rater, cfg.temperature, objective=objective)

    def choose(self, x0, t, y, candidates, generator):
        return self.scores(x0, t, y, candidates).argmax(dim=1)


@register_policy
class Rater(_RaterPolicy):
    name, summary = "rater", "argmax of a frozen --rater's scores, the paper's eq. 7"


@register_policy
class RaterSoft(_RaterPolicy):
    """Trains on all k candidates with the rater's group-softmax weights (its hard pick: the argmax)."""

    name, summary, soft = "rater_soft", "all k candidates weighted by a frozen --rater's softmax", True

    @classmethod
    def control(cls, k: int) -> tuple[str, int]:
        return "uniform_soft", k  # the same k passes with weights 1/k


@register_policy
class RaterSample(_RaterPolicy):
    name = "rater_sample"
    summary = "one candidate drawn from softmax(score/T) of a frozen --rater: the meta-training objective's sample"

    def choose(self, x0, t, y, candidates, generator):
        return gumbel_argmax(self.scores(x0, t, y, candidates), self.temperature, generator)


@register_policy
class UniformSoft(SelectionPolicy):
    name, summary, soft = "uniform_soft", "all k candidates, weights 1/k: rater_soft's control", True

    def choose(self, x0, t, y, candidates, generator):  # a hard pick from uniform weights is vanilla noise
        return torch.zeros(candidates.shape[0], dtype=torch.long, device=candidates.device)


class _OraclePolicy(SelectionPolicy):
    """Argmax of Theorem 4.2's alignment at the live model's weights (:class:`AlignmentOracle`, ``mode``)."""

    mode: ClassVar[str] = "align"
    state_dependent = True
    config_fields = ("oracle_val_batch", "oracle_every", "seed")

    @classmethod
    def from_config(cls, cfg, *, rater=None, model=None, val=None, train_data=None, spec=None, objective=None):
        return cls(cfg.candidates, None, scorer=cls.oracle(cfg, model, val, cls.mode, objective), objective=objective)

    @staticmethod
    def oracle(cfg: Any, model: torch.nn.Module | None, val: Any, mode: str = "align",
               objective: Objective | None = None) -> "AlignmentOracle":
        if model is None or val is None:
            raise ValueError("a state-dependent policy needs the live model and the meta-validation split")
        return AlignmentOracle(model, val.images, val.labels, mode=mode, val_batch=cfg.oracle_val_batch,
                               refresh_every=cfg.oracle_every, seed=cfg.seed, objective=objective)

    def choose(self, x0, t, y, candidates, generator):
        return self.scores(x0, t, y, candidates).argmax(dim=1)


@register_policy
class OracleAlignment(_OraclePolicy):
    name, mode = "oracle_alignment", "align"
    summary = "the candidate most aligned with the validation gradient at the current weights (Theorem 4.2)"


@register_policy
class OracleAnti(OracleAlignment):
    name, mode, summary = "oracle_anti", "anti", "the least aligned candidate (the oracle's negative control)"


@register_policy
class OracleCosine(OracleAlignment):
    name, mode, summary = "oracle_cosine", "cosine", "the candidate most aligned in direction (alignment / gradient norm)"


@register_policy
class RaterOnline(_OraclePolicy):
    """A rater re-distilled onto the oracle at the current weights every ``online_every`` steps
    (:class:`OnlineRater`); ``--rater`` is its optional initial rater, else a fresh ``online_rater``."""

    name, uses_rater = "rater_online", "optional"
    summary = "argmax of a rater re-distilled onto the oracle every --online-every steps (optional initial --rater)"
    config_fields = ("rater", "oracle_val_batch", "oracle_every", "seed", "online_every", "online_steps",
                     "online_batch", "online_lr", "online_rater", "distill_temperature")

    @classmethod
    def from_config(cls, cfg, *, rater=None, model=None, val=None, train_data=None, spec=None, objective=None):
        oracle = cls.oracle(cfg, model, val, "align", objective)
        if rater is None:  # a fresh rater of the chosen architecture, seeded apart from the DiT's init
            device = next(model.parameters()).device
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed + ONLINE_RATER_SEED_OFFSET)
                rater = NoiseRater(RaterSpec(cfg.online_rater, spec.input_size, spec.in_channels,
                                             spec.num_classes)).to(device)
        rater.requires_grad_(True)
        scorer = OnlineRater(rater, oracle, train_data.images, train_data.labels, k=cfg.candidates,
                             every=cfg.online_every, steps=cfg.online_steps, batch=cfg.online_batch,
                             lr=cfg.online_lr, target_temperature=cfg.distill_temperature, seed=cfg.seed)
        return cls(cfg.candidates, None, scorer=scorer, objective=objective)


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


def chi_mean(d: int) -> float:
    """E[chi_d] = sqrt(2) Gamma((d+1)/2) / Gamma(d/2): the mean norm of an N(0, I_d) draw."""
    half = torch.tensor(d / 2.0, dtype=torch.float64)
    return float(2**0.5 * torch.exp(torch.lgamma(half + 0.5) - torch.lgamma(half)))


def policy_norm_scale(policy: str, images: torch.Tensor, k: int, batch_size: int, draws: int = 4,
                      seed: int = 0) -> float:
    """E[||chosen eps||] / E[chi_d] of a data-dependent policy (``knn``, ``batch_ot``, ...) on ``images``
    [N,C,H,W]: the scale a k=1 control needs to copy the policy's noise length, measured (there is no closed
    form: it depends on the data). ``draws`` passes over the images in batches of ``batch_size`` (as training
    sees them), candidates from a generator seeded ``seed``; the standard error is about sd/sqrt(N*draws)."""
    pol = get_policy(policy, k)
    require(pol.uses_rater != "required" and not pol.state_dependent, "policy",
            f"{policy!r} scores with a rater or the live model; its noise scale is not a property of the data")
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(draws):
        order = torch.randperm(images.shape[0], generator=g)
        for i in range(0, images.shape[0], batch_size):
            x0 = images[order[i:i + batch_size]].float()
            cand = torch.randn(x0.shape[0], k, *x0.shape[1:], generator=g)
            noise, _ = pol.select(x0, torch.zeros(x0.shape[0]), torch.zeros(x0.shape[0], dtype=torch.long), cand, g)
            total += float(noise.flatten(1).norm(dim=1).double().sum())
            count += x0.shape[0]
    return total / count / chi_mean(images[0].numel())


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
        self.norms.append(flat.double().norm(dim=1))  # stays on the device: no host sync in the training step

    def summary(self) -> dict[str, float]:
        if not self.norms:
            return {}
        norms = self._cpu_norms()
        return {"noise_sq_norm_per_dim": float(norms.pow(2).mean() / self.dim),
                "noise_norm_ks": ks_distance_from_chi(norms, self.dim)}

    def reset(self) -> None:
        self.norms = []

    def state_dict(self) -> dict[str, Any]:
        return {"dim": self.dim,
                "norms": self._cpu_norms() if self.norms else torch.zeros(0, dtype=torch.float64)}

    def _cpu_norms(self) -> torch.Tensor:
        # one host copy per log record; a resumed run's restored norms are already on the CPU
        return torch.cat([n.cpu() for n in self.norms])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dim = int(state.get("dim", 0))
        norms = state.get("norms")
        self.norms = [norms] if norms is not None and norms.numel() else []


# ---- the drop-in API ---------------------------------------------------------------------------------


class NoiseSelector:
    """Noise for any diffusion training loop: ``eps = selector(x0, t, y)`` replaces ``torch.randn_like(x0)``.

    The default is plain Gaussian noise (``vanilla``, k=1): in the evidence study (docs/evidence.md) no
    selection policy beats all its controls. ``max_norm``'s gain on small images is a change of the noise's
    scale (the largest of k Gaussians is a random direction with a longer norm): the k=1 noise-scale control
    (``train --noise-scale``, ``max_norm_scale(d, k)``) gets the same gain at a quarter of the draws, and the
    norm spread it exploits shrinks as 1/sqrt(d). Choose a policy by name to use one anyway.

    Use the returned ``eps`` both to build x_t and in the target: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t)
    eps`` with target eps (ddpm), or ``x_t = (1 - t) x0 + t eps`` with target ``eps - x0`` (flow). ``y`` may be None (unconditional: the rater's null class is used). For
    ``rater_soft`` call :meth:`weighted` instead (all k candidates with their weights).
    """

    def __init__(self, policy: str = "vanilla", k: int | None = None, rater: NoiseRater | None = None,
                 temperature: float = 1.0, device: str | torch.device | None = None,
                 scorer: "AlignmentOracle | OnlineRater | None" = None, objective: "str | Objective | None" = None):
        if rater is not None and device is not None:
            rater = rater.to(device)
        if k is None:  # vanilla draws one noise; every selection policy defaults to the study's k=4
            k = 1 if policy_class(policy).k_rule == "one" else 4
        if isinstance(objective, str):
            objective = get_objective(objective)
        self.policy = get_policy(policy, k, rater=rater, temperature=temperature, scorer=scorer, objective=objective)
        self.calls = 0  # training steps seen, for the state-dependent scorers' refresh cadence

    @classmethod
    def oracle(cls, model: torch.nn.Module, val_images: torch.Tensor, val_labels: torch.Tensor, k: int = 4,
               mode: str = "align", *, refresh_every: int = 1, val_batch: int = 256, seed: int = 0) -> "NoiseSelector":
        """The alignment oracle on ``model`` (the live model you are training) with your validation split:
        each call picks, per image, the candidate most aligned with the validation gradient."""
        oracles = {c.mode: c.name for c in _REGISTRY.values() if issubclass(c, OracleAlignment)}  # mode -> policy
        name = oracles.get(mode, mode)  # ``mode`` may also be the policy's name
        scorer = AlignmentOracle(model, val_images, val_labels, mode={n: m for m, n in oracles.items()}.get(name, mode),
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
        if policy_class(policy).uses_rater != "required":
            raters = ", ".join(c.name for c in _REGISTRY.values() if c.uses_rater == "required")
            raise ValueError(f"from_checkpoint is for the rater policies ({raters}); "
                             f"for {policy!r} use NoiseSelector({policy!r}, k={k})")
        # the rater scores t in the units of the objective its checkpoint was trained with (ddpm: integer
        # steps; flow: t in [0, 1]); the rater file records it
        objective = objective_from_config(load_checkpoint(path, kind="rater").get("diffusion"))
        return cls(policy, k, load_rater(path, expect=model), temperature, device, objective=objective)

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
    def _timesteps(x0: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        """t [B] in the training objective's units (ddpm: integer steps; flow: floats in [0, 1])."""
        if isinstance(t, (int, float)):
            dtype = torch.long if isinstance(t, int) else torch.float32
            return torch.full((x0.shape[0],), t, dtype=dtype, device=x0.device)
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


def selection_info(policy: SelectionPolicy, rater_path: str | os.PathLike | None,
                   images_per_process: int | None = None) -> dict[str, Any]:
    """What a run used for noise selection: policy, k, temperature, and the rater file, spec and sha256; for a
    batch coupling, how many images each assignment couples (each process's share of the batch)."""
    info: dict[str, Any] = {"policy": policy.name, "candidates": policy.k, "temperature": policy.temperature,
                            "rater": None}
    if policy.batch_coupled:
        info["coupling"] = {"scope": "each process's share of the batch", "images": images_per_process}
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
                     resume: bool = False, images_per_process: int | None = None) -> dict[str, Any]:
    """Write ``selection`` into ``<run_dir>/run_info.json`` (other keys kept). On resume, a rater file
    whose sha256 differs from the one the run started with is refused."""
    path = Path(run_dir) / "run_info.json"
    info = selection_info(policy, rater_path, images_per_process)
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
