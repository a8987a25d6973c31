"""Reference statistics: which images a checkpoint is compared with, and their cached feature statistics.

This module owns the choice of reference (:func:`default_reference` for dataset sources,
:func:`latent_reference` for checkpoints trained on a latent cache: the image folder the cache was made
from) and the statistics themselves, cached on disk under ``CACHE/ref/`` keyed by source, split and
extractor key (which includes the weights' hash): :func:`reference_features` for a dataset source,
:func:`folder_reference_features` for an image folder of any size (read as ``cache-latents`` reads it,
streamed in batches, at most ``max_images``). Both share one implementation (:func:`_reference_stats`,
exact batch-merged mean and covariance, :class:`RunningStats`).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_write_bytes
from ..config import ConfigError
from ..data import load_dataset
from ..data.datasets import NAMED_SOURCES, DatasetError, parse_source
from ..data.latents import HEADER_NAME, ImageFolderFiles, LatentCacheError, list_images, read_header
from .cache import cache_dir, source_slug
from .classifier import dataset_family
from .extractors import Extractor

# the named dataset sources a latent checkpoint's --reference may be instead of an image folder


def default_reference(data_source: str) -> tuple[str, str]:
    """(source, split) of the reference images for a training source: Fashion-MNIST's test file;
    otherwise all images of the source (digits: all 1797; its 180-image validation split is too small
    for a stable FID)."""
    base, resolution = parse_source(dataset_family(data_source))
    if base == "fashion-mnist":
        return "fashion-mnist-test" + ("" if resolution is None else f"@{resolution}"), "all"
    return data_source, "all"


def latent_reference(checkpoint: str, latent: dict, reference: str | None = None,
                     reference_split: str | None = None) -> dict[str, Any]:
    """The reference images of a checkpoint trained on a latent cache (``latent``: the cache's record in the
    checkpoint): {'source', 'split', 'folder' (stream an image folder?), 'resolution'}. By default the image
    folder the cache was made from (its header's source), at the cache's resolution; ``reference`` (a folder
    or a named dataset) wins. Every way the folder can be unusable is a LatentCacheError that names it."""
    hint = ("pass --reference FOLDER: the image folder the latent cache was made from (or a copy of it), read "
            "at the cache's resolution")
    cache = latent.get("cache")
    header: dict = {}
    if cache:
        try:
            header = read_header(cache)
        except LatentCacheError as e:
            if not reference:
                raise LatentCacheError(f"{checkpoint} was trained on the latent cache {cache}, whose header (which "
                                       f"names the source images) cannot be read: {e}. {hint}") from None
    resolution = latent.get("resolution") or header.get("resolution")
    if reference and parse_source(reference)[0] in NAMED_SOURCES:
        return {"source": reference, "split": reference_split or "all", "folder": False, "resolution": None}
    if reference:
        folder = Path(reference)
        if not folder.is_dir():
            raise LatentCacheError(f"--reference {folder} does not exist or is not a folder; {hint}")
    else:
        source = header.get("source") or (header.get("settings") or {}).get("source")
        if not source:
            raise LatentCacheError(f"the latent cache {cache} of {checkpoint} does not record the image folder it "
                                   f"was made from; {hint}")
        folder = Path(source)
        if not folder.is_dir():
            raise LatentCacheError(f"the reference images of {checkpoint} are the source folder of its latent cache, "
                                   f"{folder}, which does not exist (moved or deleted?); {hint}")
    if (folder / HEADER_NAME).is_file():
        raise LatentCacheError(f"--reference {folder} is a latent cache; FID compares decoded samples with pixel "
                               f"images: {hint}")
    if reference_split not in (None, "all"):
        raise LatentCacheError(f"--reference-split {reference_split} applies to dataset sources; an image-folder "
                               "reference uses all its images (at most --reference-max-images); drop it")
    return {"source": str(folder.resolve()), "split": "all", "folder": True, "resolution": resolution}


class RunningStats:
    """Mean and covariance (ddof=1) of feature rows given in batches, in float64, without keeping the rows:
    batch means and centred scatter matrices are merged exactly (Chan, Golub and LeVeque's pairwise update),
    so the result equals ``feature_stats`` of all rows up to rounding."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(axis=0)
        xc = x - mb
        m2b = xc.T @ xc
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + np.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ConfigError(f"feature statistics need at least 2 images, got {self.n}")
        sigma = self.m2 / (self.n - 1)
        return self.mean, (sigma + sigma.T) / 2


def _reference_stats(path: Path, prepare, extractor: Extractor, batch_size: int, device: str | torch.device,
                     progress: bool, desc: str, max_pr: int) -> dict[str, Any]:
    """The one implementation behind every reference: the cached statistics at ``path`` if readable, else
    (``prepare()`` giving the number of images and an iterable of image batches [B,C,H,W] in [-1,1]) the
    batches' features reduced to mean, covariance and a seeded subset of at most ``max_pr`` rows for
    precision/recall, written to ``path``. Only one batch of images is in memory at a time."""
    if path.exists():
        try:
            with np.load(path) as z:
                return {"mu": z["mu"], "sigma": z["sigma"], "n": int(z["n"]), "pr_features": z["pr_features"],
                        "cached": True, "path": str(path)}
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache file is recomputed and replaced
    total, batches = prepare()
    # the same rows as picking from all features at once: rng(0).choice(total, max_pr) in that order
    pr_idx = np.random.default_rng(0).choice(total, max_pr, replace=False) if total > max_pr else np.arange(total)
    stats, pr, seen = RunningStats(), None, 0
    bar = None
    if progress:
        bar = tqdm(total=total, desc=f"{desc} ({extractor.name})", dynamic_ncols=True, leave=False)
    for x in batches:
        feats = extractor(x, batch_size, device)
        stats.update(feats)
        if pr is None:
            pr = np.empty((len(pr_idx), feats.shape[1]), dtype=np.float32)
        mask = (pr_idx >= seen) & (pr_idx < seen + feats.shape[0])
        pr[mask] = feats[pr_idx[mask] - seen]
        seen += feats.shape[0]
        if bar is not None:
            bar.update(feats.shape[0])
    if bar is not None:
        bar.close()
    if seen != total:
        raise DatasetError(f"the reference for {path.name} yielded {seen} images, {total} expected")
    mu, sigma = stats.stats()
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, n=np.int64(seen), pr_features=pr)
    atomic_write_bytes(path, buf.getvalue())
    return {"mu": mu, "sigma": sigma, "n": seen, "pr_features": pr, "cached": False, "path": str(path)}


def reference_features(source: str, split: str, extractor: Extractor, cache: str | os.PathLike | None = None,
                       batch_size: int = 250, device: str | torch.device = "cpu", progress: bool = True,
                       max_pr: int = 10000, split_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """{'mu', 'sigma', 'n', 'pr_features' (at most ``max_pr`` rows, seeded subset), 'cached'} of the
    reference images of a dataset source (loaded with ``load_dataset``; ``split_args``: its ``seed``,
    ``val_fraction``, ``test_fraction``, e.g. a run's own split so that 'test' is the split it never saw);
    cached under CACHE/ref/ keyed by (source, split, split_args, extractor key)."""
    split_args = dict(split_args or {})
    tag = "" if not split_args or split == "all" else "-" + "-".join(
        f"{k[0]}{split_args[k]:g}" if isinstance(split_args[k], float) else f"{k[0]}{split_args[k]}"
        for k in sorted(split_args))
    path = cache_dir(cache) / "ref" / f"{source_slug(source)}-{split}{tag}-{extractor.key}.npz"

    def prepare():
        data = load_dataset(source, split, **(split_args if split != "all" else {}))
        return len(data), (data.images[i:i + batch_size] for i in range(0, len(data), batch_size))

    return _reference_stats(path, prepare, extractor, batch_size, device, progress, f"reference {source}:{split}",
                            max_pr)


def folder_reference_files(root: str | os.PathLike, max_images: int | None = 50_000, seed: int = 0) -> tuple[list[str], int]:
    """(relative paths of the reference images, number of images in the folder): every image of an image
    folder (as ``cache-latents`` lists them), or a seeded subset of ``max_images`` in file order."""
    files = list_images(root)[0]
    if max_images is not None and len(files) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False))
        return [files[i] for i in keep], len(files)
    return files, len(files)


def folder_reference_features(root: str | os.PathLike, resolution: int, extractor: Extractor,
                              cache: str | os.PathLike | None = None, batch_size: int = 250,
                              device: str | torch.device = "cpu", progress: bool = True,
                              max_images: int | None = 50_000, max_pr: int = 10000, workers: int = 0) -> dict[str, Any]:
    """Reference statistics of an image folder of any size (e.g. the ImageNet train set a latent cache was
    made from), as :func:`reference_features` returns them plus 'available' (images in the folder).

    Images are read as ``cache-latents`` read them (``list_images``, then ``load_image(path, resolution)``:
    RGB, center crop, bicubic resize) and streamed through the extractor ``batch_size`` at a time
    (``workers`` DataLoader processes decode them); at most ``max_images`` (a seeded subset, seed 0) are
    used. Cached under CACHE/ref/ keyed by (folder, resolution, count, the chosen files, extractor key)."""
    root = Path(root)
    files, available = folder_reference_files(root, max_images)
    digest = hashlib.sha256("".join(f + "\n" for f in files).encode()).hexdigest()[:8]
    path = cache_dir(cache) / "ref" / f"{source_slug(str(root))}-r{resolution}-n{len(files)}-{digest}-{extractor.key}.npz"

    def prepare():
        loader = torch.utils.data.DataLoader(ImageFolderFiles(root, files, resolution), batch_size=batch_size, shuffle=False,
                                             num_workers=workers)
        # uint8 [B,3,R,R] -> [-1, 1], as cache-latents feeds the VAE
        return len(files), (pixels.float().div_(127.5).sub_(1.0) for pixels in loader)

    out = _reference_stats(path, prepare, extractor, batch_size, device, progress,
                           f"reference {root.name} @{resolution}px", max_pr)
    return {**out, "available": available}
