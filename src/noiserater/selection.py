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
  rater was meta-learned for (``weights``); its cost is k forward/backward passes.

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

from .checkpoint import sha256_file
from .models.rater import NoiseRater, group_weights

class NonFiniteError(FloatingPointError):
    """Rater scores (or another quantity a step depends on) are NaN/inf; the training loop skips the step."""


POLICIES = ("vanilla", "max_norm", "min_norm", "nearest", "rater", "rater_soft")
RATER_POLICIES = ("rater", "rater_soft")


def _norms(candidates: torch.Tensor) -> torch.Tensor:
    return candidates.flatten(2).norm(dim=-1)  # [B,k]


def _take(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), index]


@dataclass
class SelectionPolicy:
    """A named policy; ``rater`` is required for ``rater`` and ``rater_soft`` (and refused otherwise)."""

    name: str
    k: int = 1
    rater: NoiseRater | None = None
    temperature: float = 1.0

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
                f"policy {self.name!r} does not use a rater; drop --rater or choose --policy rater / rater_soft"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.rater is not None:
            self.rater.eval().requires_grad_(False)

    @property
    def soft(self) -> bool:
        return self.name == "rater_soft"

    def scores(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Rater scores [B,k] for all candidates in one batched forward, without autograd."""
        if self.rater is None:
            raise ValueError(f"policy {self.name!r} has no rater to score with")
        p = next(self.rater.parameters())
        if p.device != candidates.device:
            raise ValueError(
                f"the rater is on {p.device} but the batch is on {candidates.device}; "
                "move the rater (NoiseSelector(..., device=...)) or the batch"
            )
        with torch.inference_mode():
            scores = self.rater.score_candidates(candidates.to(p.dtype), t, x0.to(p.dtype), y).float()
        bad = ~torch.isfinite(scores)
        if bool(bad.any()):  # argmax/softmax would silently pick or weight a NaN: refuse instead
            raise NonFiniteError(f"the rater returned {int(bad.sum())} non-finite scores (NaN/inf) of {scores.numel()}")
        return scores

    def select(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor):
        """candidates [B,k,C,H,W] -> (noise [B,C,H,W], index [B]); the noise is a row of ``candidates``."""
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
        else:  # rater, rater_soft (hard top-1 of the rater's scores)
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
        return self.select(x0, t, y, draw_candidates(x0, self.k, generator))


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
    losses = per_sample(candidates.reshape(B * k, *candidates.shape[2:])).reshape(B, k)
    return (weights * losses).sum(dim=1).mean()


# ---- the drop-in API ---------------------------------------------------------------------------------


class NoiseSelector:
    """Noise for any diffusion training loop: ``eps = selector(x0, t, y)`` replaces ``torch.randn_like(x0)``.

    Use the returned ``eps`` both to build ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` and as the
    regression target. ``y`` may be None (unconditional: the rater's null class is used). For
    ``rater_soft`` call :meth:`weighted` instead (all k candidates with their weights).
    """

    def __init__(self, policy: str = "vanilla", k: int = 1, rater: NoiseRater | None = None,
                 temperature: float = 1.0, device: str | torch.device | None = None):
        if rater is not None and device is not None:
            rater = rater.to(device)
        self.policy = SelectionPolicy(policy, k, rater, temperature)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, k: int = 4, policy: str = "rater", *,
                        device: str | torch.device = "cpu", temperature: float = 1.0,
                        model: Any = None) -> "NoiseSelector":
        """A selector with the frozen rater saved at ``path`` (``noiserater metatrain`` or ``save_rater``).

        ``model`` (a DiT, a DiTSpec or anything with input_size / in_channels / num_classes) makes a rater
        trained for another image size, channel count or class count a clear error up front.
        """
        from .checkpoint import load_rater

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
               candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose among given candidates [B,k,C,H,W]: (eps [B,C,H,W], index [B])."""
        return self.policy.select(x0, self._timesteps(x0, t), self._labels(x0, y), candidates)

    def __call__(self, x0: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw k candidates per image and return the chosen noise [B,C,H,W]."""
        if self.policy.soft:
            raise ValueError("policy 'rater_soft' trains on all k candidates: call selector.weighted(x0, t, y) "
                             "for (candidates [B,k,C,H,W], weights [B,k]), or use policy 'rater'")
        return self.select(x0, t, y, draw_candidates(x0, self.k, generator))[0]

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
    if rater_path and policy.rater is not None:
        info["rater"] = {
            "path": str(Path(rater_path).resolve()),
            "sha256": sha256_file(rater_path),
            "spec": policy.rater.spec.to_dict(),
            "parameters": sum(p.numel() for p in policy.rater.parameters()),
        }
    return info


def record_selection(run_dir: str | os.PathLike, policy: SelectionPolicy, rater_path: str | os.PathLike | None,
                     resume: bool = False) -> dict[str, Any]:
    """Write ``selection`` into ``<run_dir>/run_info.json`` (other keys kept). On resume, a rater file
    whose sha256 differs from the one the run started with is refused."""
    from .checkpoint import RunDirError, write_json

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
