"""The per-dataset classifier of "classifier FID": a small CNN the project trains once per dataset and caches.

This module owns the network (:class:`DatasetClassifier`, whose 128-d penultimate layer is the feature),
its data (:func:`dataset_family`, :func:`classifier_splits`), its training loop (:func:`train_classifier`)
and its cache file under ``CACHE/classifiers/`` (:func:`classifier_path`, :func:`get_classifier`, with
its test accuracy recorded beside it).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file, write_json
from ..config import ConfigError
from ..data import ImageData, load_dataset
from ..data.datasets import DatasetError, parse_source, split_indices
from .cache import cache_dir, source_slug


class DatasetClassifier(nn.Module):
    """A small CNN for small datasets; ``features`` is the 128-d penultimate layer (after its ReLU)."""

    feature_dim = 128

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        if image_size < 4:
            raise ConfigError(f"the dataset classifier needs images of at least 4x4 pixels, got {image_size}")
        self.config = {"in_channels": in_channels, "image_size": image_size, "num_classes": num_classes}
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        if image_size >= 16:
            layers += [nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        layers += [nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                   nn.Linear(64 * 16, self.feature_dim), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def dataset_family(source: str) -> str:
    """The dataset a source belongs to: 'fashion-mnist-test' is Fashion-MNIST's test file (and
    'fashion-mnist-test@16' belongs to 'fashion-mnist@16': a resolution is its own dataset)."""
    base, resolution = parse_source(source)
    family = "fashion-mnist" if base == "fashion-mnist-test" else base
    return family if resolution is None else f"{family}@{resolution}"



def classifier_splits(source: str, seed: int = 0) -> tuple[ImageData, ImageData]:
    """(train, test) data of the classifier: Fashion-MNIST's train and test files; otherwise a seeded
    80/20 split of all images (digits: 1437 / 360)."""
    family = dataset_family(source)
    base, resolution = parse_source(family)
    if base == "fashion-mnist":
        at = "" if resolution is None else f"@{resolution}"
        return load_dataset(f"fashion-mnist{at}", "all"), load_dataset(f"fashion-mnist-test{at}", "all")
    data = load_dataset(family, "all")
    if data.channels not in (1, 3):
        raise DatasetError(f"{source} holds {data.channels}-channel latents; the classifier needs pixel images")
    tr, te = split_indices(len(data), seed, val_fraction=0.2)
    return data.subset(tr, "clf-train"), data.subset(te, "clf-test")


def _shift_augment(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels, filling with the background value -1."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    out = torch.empty_like(x)
    for i in range(n):  # small images: a loop over the batch is cheap and obviously right
        out[i] = padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w]
    return out


@torch.no_grad()
def classifier_accuracy(model: DatasetClassifier, data: ImageData, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        correct += int((model(data.images[i:i + batch_size]).argmax(1) == data.labels[i:i + batch_size]).sum())
    return correct / len(data)


def train_classifier(source: str, epochs: int | None = None, seed: int = 0, batch_size: int = 128,
                     lr: float = 1e-3, progress: bool = True) -> tuple[DatasetClassifier, dict]:
    """Train the dataset classifier; returns (model in eval mode, on the CPU, info with its test accuracy).

    On a GPU when there is one (large images, e.g. digits@64, take minutes on a CPU). Otherwise the network is
    tiny, so it trains on one CPU thread: on a shared machine several contending threads are up to 30x slower
    per step than one (measured here)."""
    if torch.cuda.is_available():
        return _train_classifier(source, epochs, seed, batch_size, lr, progress, torch.device("cuda"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_classifier(source, epochs, seed, batch_size, lr, progress, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


def _train_classifier(source, epochs, seed, batch_size, lr, progress, device) -> tuple[DatasetClassifier, dict]:
    train_data, test_data = classifier_splits(source, seed)
    if epochs is None:
        epochs = 20 if len(train_data) < 5000 else 3
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DatasetClassifier(train_data.channels, train_data.image_size, train_data.num_classes).to(device)
    steps_per_epoch = math.ceil(len(train_data) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr * 3, total_steps=epochs * steps_per_epoch)
    shift = max(1, train_data.image_size // 16)
    bar = None
    if progress:
        bar = tqdm(total=epochs * steps_per_epoch, desc=f"classifier {dataset_family(source)}", dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train_data), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            x = _shift_augment(train_data.images[idx], shift, g)
            loss = F.cross_entropy(model(x.to(device)), train_data.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}")
    if bar is not None:
        bar.close()
    model.eval().cpu()
    acc = classifier_accuracy(model, test_data)
    info = {"dataset": dataset_family(source), "test_accuracy": acc, "test_images": len(test_data),
            "train_images": len(train_data), "epochs": epochs, "seed": seed, "feature_dim": model.feature_dim,
            "train_seconds": round(time.perf_counter() - t0, 1), **model.config}
    return model, info


def classifier_path(source: str, cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / "classifiers" / f"{source_slug(dataset_family(source))}.pt"


def get_classifier(source: str, cache: str | os.PathLike | None = None, progress: bool = True,
                   retrain: bool = False, epochs: int | None = None) -> tuple[DatasetClassifier, dict]:
    """The cached classifier of ``source``'s dataset, trained (once) when missing. Its info (test
    accuracy, sha256 of the file) is written beside it as ``<name>.json``."""
    path = classifier_path(source, cache)
    if retrain or not path.exists():
        model, info = train_classifier(source, epochs=epochs, progress=progress)
        save_checkpoint(path, {"config": model.config, "model": model.state_dict(), "info": info}, kind="classifier")
        info = {**info, "sha256": sha256_file(path), "path": str(path)}
        write_json(path.with_suffix(".json"), info)
        return model, info
    state = load_checkpoint(path, kind="classifier")
    try:
        model = DatasetClassifier(**state["config"])
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"cached classifier {path} does not load ({str(e)[:120]}); delete it to retrain") from None
    return model.eval().requires_grad_(False), {**state["info"], "sha256": sha256_file(path), "path": str(path)}
