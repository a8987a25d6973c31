"""Loading and saving the models of a run: diffusion checkpoints (``noiserater train``) and raters
(``noiserater metatrain``), in the checkpoint format of :mod:`noiserater.checkpoint` (content-hashed,
``weights_only``), with the model spec checked before any weight is loaded."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..checkpoint import CheckpointError, get_rng_state, load_checkpoint, load_state_dict_checked, save_checkpoint
from ..config import to_dict
from .dit import DiTSpec, build_dit_from_spec
from .rater import NoiseRater, RaterSpec


def save_rater(path: str | os.PathLike, rater: torch.nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Save a rater (its spec + weights, plus e.g. optimiser/RNG/step for resumable meta-training)."""
    save_checkpoint(path, {"spec": rater.spec.to_dict(), "rater": rater.state_dict(), **(extra or {})}, kind="rater")


def load_rater(path: str | os.PathLike, expect: Any = None) -> torch.nn.Module:
    """Load a frozen-ready rater. ``expect`` (a DiTSpec) makes a mismatch in image size, channels or
    classes a clear error instead of a shape error deep inside a forward pass."""
    state = load_checkpoint(path, kind="rater")
    try:
        spec = RaterSpec(**state["spec"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path} has an invalid rater spec: {e}") from None
    if expect is not None:
        for field_name in ("input_size", "in_channels", "num_classes"):
            a, b = getattr(spec, field_name), getattr(expect, field_name)
            if a != b:
                raise CheckpointError(
                    f"rater {path} was trained for {field_name}={a}, but the diffusion model has {field_name}={b}; "
                    "meta-train a rater on this model's data (noiserater metatrain)"
                )
    rater = NoiseRater(spec)
    load_state_dict_checked(rater, state["rater"], f"rater checkpoint {path}")
    return rater


def load_diffusion(path: str | os.PathLike, use_ema: bool = True, device: str | torch.device = "cpu"):
    """(model, spec, state) from a noiserater diffusion checkpoint; EMA weights by default."""
    state = load_checkpoint(path, kind="diffusion")
    try:
        spec = DiTSpec(**state["spec"])
        model = build_dit_from_spec(spec)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid model spec: {e}") from None
    load_state_dict_checked(model, state["ema" if use_ema else "model"], f"checkpoint {path}")
    return model.to(device), spec, state


def diffusion_state(step: int, spec: DiTSpec, model, ema, opt, cfg, data) -> dict:
    """Everything a diffusion checkpoint holds (resume: weights, EMA, optimiser, RNG; reuse: spec, config, data):
    ``cfg`` is the run's config dataclass, ``data`` its :class:`noiserater.data.ImageData`."""
    return {
        "step": step,
        "spec": spec.to_dict(),
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict() if opt is not None else {},
        "rng": get_rng_state(),
        "config": to_dict(cfg),
        "data": {"name": data.name, "num_classes": data.num_classes, "class_names": data.class_names,
                 **({"latent": data.latent_info} if getattr(data, "latent_info", None) else {})},
    }
