"""Feature extractors: a feature network, the name its cache files carry, and the 8-bit quantisation.

This module owns :class:`Extractor` (images in [-1,1] -> float64 features, batch by batch),
:func:`build_extractor` (``classifier``: the dataset's cached classifier; ``inception``: InceptionV3 from
local weights) and :func:`quantize`: images are rounded to 8 bits (as if saved to PNG) before any
extractor sees them, real and generated alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import ConfigError
from .cache import source_slug
from .classifier import dataset_family, get_classifier
from .inception import INCEPTION_SHA256_PREFIX, load_inception

EXTRACTORS = ("classifier", "inception")


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round images in [-1,1] to the 256 levels of an 8-bit PNG (real and generated alike)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@dataclass
class Extractor:
    """A feature network and its identity. ``key`` names it in cache files (weights hash included)."""

    name: str
    key: str
    network: nn.Module
    feature_fn: Any
    info: dict
    max_batch: int = 1 << 30  # Inception at 299x299 needs ~10 MB of activations per image: keep batches small

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 250, device: str | torch.device = "cpu",
                 progress: bool = False, desc: str = "features") -> np.ndarray:
        self.network.to(device).eval()
        out = []
        bar = None
        if progress:
            bar = tqdm(total=images.shape[0], desc=f"{desc} ({self.name})", dynamic_ncols=True, leave=False)
        batch_size = min(batch_size, self.max_batch)
        for i in range(0, images.shape[0], batch_size):
            x = quantize(images[i:i + batch_size]).to(device)
            out.append(self.feature_fn(x).double().cpu())
            if bar is not None:
                bar.update(x.shape[0])
        if bar is not None:
            bar.close()
        return torch.cat(out).numpy()


def build_extractor(name: str, source: str, cache: str | os.PathLike | None = None,
                    inception_weights: str | os.PathLike | None = None, progress: bool = True) -> Extractor:
    """``classifier`` (the dataset's cached classifier) or ``inception`` (local InceptionV3 weights)."""
    if name == "classifier":
        model, info = get_classifier(source, cache, progress=progress)
        key = f"classifier-{source_slug(dataset_family(source))}-{info['sha256'][:12]}"
        return Extractor("classifier", key, model, model.features,
                         {"test_accuracy": info["test_accuracy"], "feature_dim": model.feature_dim,
                          "sha256": info["sha256"], "path": info["path"]})
    if name == "inception":
        weights = inception_weights or os.environ.get("NOISERATER_INCEPTION_WEIGHTS")
        model, digest = load_inception(weights)
        return Extractor("inception", f"inception-pool3-{digest[:12]}", model, model,
                         {"feature_dim": 2048, "sha256": digest, "path": str(weights),
                          "standard_weights": digest.startswith(INCEPTION_SHA256_PREFIX), "resize": "bilinear 299"},
                         max_batch=64)
    raise ConfigError(f"unknown feature extractor {name!r}; choose from {', '.join(EXTRACTORS)}")
