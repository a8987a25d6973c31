"""Sample quality: FID, precision/recall and class accuracy, with pluggable feature extractors.

Pieces, each usable on its own:

- :func:`feature_stats` / :func:`frechet_distance` / :func:`fid_from_features`: the Frechet distance
  ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) on top of ``scipy.linalg.sqrtm`` (float64), tested
  against closed forms and against torchmetrics' ``FrechetInceptionDistance``.
- :func:`precision_recall`: the k-NN manifold precision and recall of Kynkaanniemi et al. (2019).
- Feature extractors (:class:`Extractor`): ``inception`` (InceptionV3 pool3, 2048-d, from a LOCAL weights
  file: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` or torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth``; nothing is downloaded) and ``classifier`` (the
  penultimate features of a small CNN the project trains once per dataset and caches, its test accuracy
  recorded beside it: "classifier FID").
- :func:`reference_features`: statistics of the dataset's reference split, cached on disk under
  ``CACHE/ref/`` keyed by dataset, split and extractor (the extractor key includes its weights' hash);
  :func:`folder_reference_features`: the same for an image folder of any size (the source images of a
  latent cache, read as ``cache-latents`` read them, streamed in batches, at most ``max_images``). Both
  share one implementation (:func:`_reference_stats`, exact batch-merged mean and covariance).
- :func:`evaluate_checkpoint`: samples from a diffusion checkpoint (the project's one sampler,
  :func:`noiserater.sampling.sample_from_checkpoint`; latent checkpoints are decoded with their
  VAE), then one record per extractor with FID, precision, recall and class accuracy, and everything that
  makes the number comparable (number of samples, sampler, steps, CFG scale, EMA, seed, extractor,
  reference). Records are appended to ``RUN_DIR/eval.jsonl``.

Images are quantised to 8 bits (as if saved to PNG) before any extractor sees them, real and generated
alike. The cache folder is ``$NOISERATER_CACHE`` or ``~/.cache/noiserater`` unless given.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint, sha256_file, write_json
from .config import require
from .data import ImageData, load_dataset
from .data.datasets import DatasetError, split_indices
from .config import ConfigError

# sha256 prefix of the standard FID Inception weights (pytorch-fid and torch-fidelity name their files by it)
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_FILE_NAMES = ("pt_inception-2015-12-05-6726825d.pth (pytorch-fid)",
                        "weights-inception-2015-12-05-6726825d.pth (torch-fidelity)")
EXTRACTORS = ("classifier", "inception")


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``path``, else ``$NOISERATER_CACHE``, else ``~/.cache/noiserater``."""
    return Path(path or os.environ.get("NOISERATER_CACHE") or Path.home() / ".cache" / "noiserater")


# ---- Frechet distance ---------------------------------------------------------------------------------


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D,D] with ddof=1) of features [N,D], in float64."""
    x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature statistics need features [N>=2, D], got shape {list(x.shape)}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64, scipy's sqrtm).

    When the product of the covariances is singular enough that its square root is not finite,
    ``eps`` is added to both diagonals (as pytorch-fid does). An imaginary part of the root's diagonal
    (the entries the trace sums) above 1e-3 of the trace is an error (the covariances are not positive
    semi-definite). Off-diagonal imaginary parts are rounding noise that rank-deficient covariances
    (fewer images than feature dimensions) produce and that the trace never sees; they are ignored, as
    pytorch-fid ignores them."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape} and {mu2.shape}, covariances {s1.shape} and {s2.shape}")
    diff = mu1 - mu2

    def sqrtm(a):  # scipy warns on singular input (common: dead ReLU features); we check the residual instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            root = linalg.sqrtm(a)
        ok = np.isfinite(root).all()
        if ok:
            ok = np.linalg.norm(root @ root - a) <= 1e-4 * max(np.linalg.norm(a), 1e-12)
        return root, ok

    covmean, ok = sqrtm(s1 @ s2)
    if not ok:
        offset = np.eye(s1.shape[0]) * eps
        covmean, _ = sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diag(covmean.imag)))
        scale = max(1.0, abs(np.trace(covmean.real)))
        if imag > 1e-3 * scale:
            raise ValueError(f"covariance product has a large imaginary square root component ({imag:.3g}); "
                             "are the covariances positive semi-definite?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(a, b) -> float:
    """FID between two feature sets [N,D] and [M,D]."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


# ---- precision / recall (Kynkaanniemi et al. 2019) -------------------------------------------------------


def _as_f64(x) -> torch.Tensor:
    return (x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).double()


def knn_radii(features, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set [N] (float64)."""
    x = _as_f64(features)
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k-NN radii need 1 <= k < number of points, got k={k} with {x.shape[0]} points")
    out = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i:i + chunk], x)
        d[torch.arange(d.shape[0]), torch.arange(i, i + d.shape[0])] = float("inf")  # exclude the point itself
        out.append(d.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat(out)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of queries inside at least one ball B(support_i, radii_i)."""
    inside = []
    for i in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[i:i + chunk], support)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real, fake, k: int = 3) -> dict[str, float]:
    """Improved precision (share of fake samples on the real manifold) and recall (share of real samples
    on the fake manifold), manifolds being unions of k-NN balls (Kynkaanniemi et al. 2019; k=3 there)."""
    r, f = _as_f64(real), _as_f64(fake)
    if r.dim() != 2 or f.dim() != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"precision/recall need features [N,D] and [M,D], got {list(r.shape)} and {list(f.shape)}")
    return {"precision": _coverage(f, r, knn_radii(r, k)), "recall": _coverage(r, f, knn_radii(f, k))}


# ---- InceptionV3 (pool3, the TensorFlow FID graph's weights) ---------------------------------------------
# Module names follow torchvision / pytorch-fid / torch-fidelity so their weight files load as they are.


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):  # TensorFlow's average pool ignores the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Mixed(nn.Module):
    """An Inception block: named branches (lists of conv names applied in turn; a tuple fans out and
    concatenates) plus an optional pooled branch."""

    branches: list

    def _run(self, x, chain):
        for item in chain:
            if isinstance(item, tuple):
                return torch.cat([getattr(self, n)(x) for n in item], 1)
            x = getattr(self, item)(x)
        return x

    def forward(self, x):
        outs = [self._run(x, chain) for chain in self.branches]
        if self.pool is not None:
            pooled = self.pool(x)
            outs.append(self.branch_pool(pooled) if hasattr(self, "branch_pool") else pooled)
        return torch.cat(outs, 1)


def _convs(module: nn.Module, specs: dict[str, tuple]) -> None:
    for name, (cin, cout, kernel, kw) in specs.items():
        setattr(module, name, BasicConv2d(cin, cout, kernel_size=kernel, **kw))


class InceptionA(_Mixed):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        _convs(self, {"branch1x1": (cin, 64, 1, {}), "branch5x5_1": (cin, 48, 1, {}),
                      "branch5x5_2": (48, 64, 5, {"padding": 2}), "branch3x3dbl_1": (cin, 64, 1, {}),
                      "branch3x3dbl_2": (64, 96, 3, {"padding": 1}), "branch3x3dbl_3": (96, 96, 3, {"padding": 1}),
                      "branch_pool": (cin, pool_features, 1, {})})
        self.branches = [["branch1x1"], ["branch5x5_1", "branch5x5_2"],
                         ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]]
        self.pool = _tf_avg_pool


class InceptionB(_Mixed):
    def __init__(self, cin: int):
        super().__init__()
        _convs(self, {"branch3x3": (cin, 384, 3, {"stride": 2}), "branch3x3dbl_1": (cin, 64, 1, {}),
                      "branch3x3dbl_2": (64, 96, 3, {"padding": 1}), "branch3x3dbl_3": (96, 96, 3, {"stride": 2})})
        self.branches = [["branch3x3"], ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]]
        self.pool = lambda x: F.max_pool2d(x, 3, stride=2)


class InceptionC(_Mixed):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        h, v = {"padding": (0, 3)}, {"padding": (3, 0)}
        _convs(self, {"branch1x1": (cin, 192, 1, {}), "branch7x7_1": (cin, c7, 1, {}),
                      "branch7x7_2": (c7, c7, (1, 7), h), "branch7x7_3": (c7, 192, (7, 1), v),
                      "branch7x7dbl_1": (cin, c7, 1, {}), "branch7x7dbl_2": (c7, c7, (7, 1), v),
                      "branch7x7dbl_3": (c7, c7, (1, 7), h), "branch7x7dbl_4": (c7, c7, (7, 1), v),
                      "branch7x7dbl_5": (c7, 192, (1, 7), h), "branch_pool": (cin, 192, 1, {})})
        self.branches = [["branch1x1"], ["branch7x7_1", "branch7x7_2", "branch7x7_3"],
                         [f"branch7x7dbl_{i}" for i in range(1, 6)]]
        self.pool = _tf_avg_pool


class InceptionD(_Mixed):
    def __init__(self, cin: int):
        super().__init__()
        _convs(self, {"branch3x3_1": (cin, 192, 1, {}), "branch3x3_2": (192, 320, 3, {"stride": 2}),
                      "branch7x7x3_1": (cin, 192, 1, {}), "branch7x7x3_2": (192, 192, (1, 7), {"padding": (0, 3)}),
                      "branch7x7x3_3": (192, 192, (7, 1), {"padding": (3, 0)}),
                      "branch7x7x3_4": (192, 192, 3, {"stride": 2})})
        self.branches = [["branch3x3_1", "branch3x3_2"], [f"branch7x7x3_{i}" for i in range(1, 5)]]
        self.pool = lambda x: F.max_pool2d(x, 3, stride=2)


class InceptionE(_Mixed):
    """``max_pool``: the last block of the TensorFlow FID graph max-pools its pool branch."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        _convs(self, {"branch1x1": (cin, 320, 1, {}), "branch3x3_1": (cin, 384, 1, {}),
                      "branch3x3_2a": (384, 384, (1, 3), {"padding": (0, 1)}),
                      "branch3x3_2b": (384, 384, (3, 1), {"padding": (1, 0)}),
                      "branch3x3dbl_1": (cin, 448, 1, {}), "branch3x3dbl_2": (448, 384, 3, {"padding": 1}),
                      "branch3x3dbl_3a": (384, 384, (1, 3), {"padding": (0, 1)}),
                      "branch3x3dbl_3b": (384, 384, (3, 1), {"padding": (1, 0)}), "branch_pool": (cin, 192, 1, {})})
        self.branches = [["branch1x1"], ["branch3x3_1", ("branch3x3_2a", "branch3x3_2b")],
                         ["branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3a", "branch3x3dbl_3b")]]
        self.pool = (lambda x: F.max_pool2d(x, 3, stride=1, padding=1)) if max_pool else _tf_avg_pool


class InceptionV3(nn.Module):
    """InceptionV3 as in the TensorFlow FID graph (2015-12-05): images [N,C,H,W] in [-1,1] (C = 1 or 3)
    -> pool3 features [N,2048]. Inputs are resized to 299x299 (bilinear, as pytorch-fid does)."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        _convs(self, {"Conv2d_1a_3x3": (3, 32, 3, {"stride": 2}), "Conv2d_2a_3x3": (32, 32, 3, {}),
                      "Conv2d_2b_3x3": (32, 64, 3, {"padding": 1}), "Conv2d_3b_1x1": (64, 80, 1, {}),
                      "Conv2d_4a_3x3": (80, 192, 3, {})})
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # unused for features; part of the weight file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ConfigError(f"InceptionV3 needs 1- or 3-channel images, got {x.shape[1]} channels "
                             "(decode latents to pixels before computing Inception FID)")
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def load_inception(path: str | os.PathLike | None) -> tuple[InceptionV3, str]:
    """(InceptionV3 in eval mode, sha256 of the file) from a local weights file. Every way the file can be
    wrong (missing, unreadable, not a state dict, another network) is a one-line CheckpointError."""
    hint = ("pass --inception-weights PATH (or set NOISERATER_INCEPTION_WEIGHTS) to the standard FID weights: "
            + " or ".join(INCEPTION_FILE_NAMES) + "; noiserater downloads nothing")
    if not path:
        raise CheckpointError(f"Inception FID needs a local weights file: {hint}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Inception weights not found at {path}: {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path} is not a readable PyTorch weights file ({msg}): {hint}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors: {hint}")
    model = InceptionV3()
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("AuxLogits.") for k in state) or ("fc.weight" in state and state["fc.weight"].shape[0] == 1000):
        raise CheckpointError(f"{path} is torchvision's ImageNet InceptionV3 (1000 classes, aux logits), not the FID "
                              f"network; its FIDs are not comparable to published ones: {hint}")
    for k, v in own.items():  # files written before BatchNorm counted its batches lack these buffers
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        detail = (f"{shapes[0]} is {tuple(state[shapes[0]].shape)} in the file, {tuple(own[shapes[0]].shape)} expected"
                  if shapes else f"{len(missing)} missing keys (first {missing[:2]}), {len(unexpected)} unexpected "
                  f"(first {unexpected[:2]})")
        raise CheckpointError(f"{path} is not an InceptionV3 FID weights file ({detail}): {hint}")
    model.load_state_dict(state)
    digest = sha256_file(path)
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        warnings.warn(f"{path} has sha256 {digest[:12]}..., not the standard FID Inception weights "
                      f"({INCEPTION_SHA256_PREFIX}...); its FIDs are not comparable to published ones", stacklevel=2)
    return model.eval().requires_grad_(False), digest


# ---- the per-dataset classifier ("classifier FID") -------------------------------------------------------


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
    """The dataset a source belongs to: 'fashion-mnist-test' is Fashion-MNIST's test file."""
    return "fashion-mnist" if source == "fashion-mnist-test" else source


def _slug(source: str) -> str:
    if source in ("digits", "fashion-mnist", "fashion-mnist-test"):
        return source
    p = Path(source).resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", p.name)[:40] or "data"
    return f"{name}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"


def classifier_splits(source: str, seed: int = 0) -> tuple[ImageData, ImageData]:
    """(train, test) data of the classifier: Fashion-MNIST's train and test files; otherwise a seeded
    80/20 split of all images (digits: 1437 / 360)."""
    family = dataset_family(source)
    if family == "fashion-mnist":
        return load_dataset("fashion-mnist", "all"), load_dataset("fashion-mnist-test", "all")
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
    """Train the dataset classifier; returns (model in eval mode, info with its test accuracy).

    The network is tiny, so it trains on one CPU thread: on a shared machine several contending threads
    are up to 30x slower per step than one (measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_classifier(source, epochs, seed, batch_size, lr, progress)
    finally:
        torch.set_num_threads(threads)


def _train_classifier(source, epochs, seed, batch_size, lr, progress) -> tuple[DatasetClassifier, dict]:
    train_data, test_data = classifier_splits(source, seed)
    if epochs is None:
        epochs = 20 if len(train_data) < 5000 else 3
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DatasetClassifier(train_data.channels, train_data.image_size, train_data.num_classes)
    steps_per_epoch = math.ceil(len(train_data) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr * 3, total_steps=epochs * steps_per_epoch)
    shift = max(1, train_data.image_size // 16)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc=f"classifier {dataset_family(source)}", dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train_data), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            x = _shift_augment(train_data.images[idx], shift, g)
            loss = F.cross_entropy(model(x), train_data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    acc = classifier_accuracy(model, test_data)
    info = {"dataset": dataset_family(source), "test_accuracy": acc, "test_images": len(test_data),
            "train_images": len(train_data), "epochs": epochs, "seed": seed, "feature_dim": model.feature_dim,
            "train_seconds": round(time.perf_counter() - t0, 1), **model.config}
    return model, info


def classifier_path(source: str, cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / "classifiers" / f"{_slug(dataset_family(source))}.pt"


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


# ---- extractors and reference features ----------------------------------------------------------------


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
            from tqdm.auto import tqdm

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
        key = f"classifier-{_slug(dataset_family(source))}-{info['sha256'][:12]}"
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


def default_reference(data_source: str) -> tuple[str, str]:
    """(source, split) of the reference images for a training source: Fashion-MNIST's test file;
    otherwise all images of the source (digits: all 1797; its 180-image validation split is too small
    for a stable FID)."""
    if dataset_family(data_source) == "fashion-mnist":
        return "fashion-mnist-test", "all"
    return data_source, "all"


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
        from tqdm.auto import tqdm

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
                       max_pr: int = 10000) -> dict[str, Any]:
    """{'mu', 'sigma', 'n', 'pr_features' (at most ``max_pr`` rows, seeded subset), 'cached'} of the
    reference images of a dataset source (loaded with ``load_dataset``); cached under CACHE/ref/ keyed by
    (source, split, extractor key)."""
    path = cache_dir(cache) / "ref" / f"{_slug(source)}-{split}-{extractor.key}.npz"

    def prepare():
        data = load_dataset(source, split)
        return len(data), (data.images[i:i + batch_size] for i in range(0, len(data), batch_size))

    return _reference_stats(path, prepare, extractor, batch_size, device, progress, f"reference {source}:{split}",
                            max_pr)


def folder_reference_files(root: str | os.PathLike, max_images: int | None = 50_000, seed: int = 0) -> tuple[list[str], int]:
    """(relative paths of the reference images, number of images in the folder): every image of an image
    folder (as ``cache-latents`` lists them), or a seeded subset of ``max_images`` in file order."""
    from .data.latents import list_images

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
    from .data.latents import _Images

    root = Path(root)
    files, available = folder_reference_files(root, max_images)
    digest = hashlib.sha256("".join(f + "\n" for f in files).encode()).hexdigest()[:8]
    path = cache_dir(cache) / "ref" / f"{_slug(str(root))}-r{resolution}-n{len(files)}-{digest}-{extractor.key}.npz"

    def prepare():
        loader = torch.utils.data.DataLoader(_Images(root, files, resolution), batch_size=batch_size, shuffle=False,
                                             num_workers=workers)
        # uint8 [B,3,R,R] -> [-1, 1], as cache-latents feeds the VAE
        return len(files), (pixels.float().div_(127.5).sub_(1.0) for pixels in loader)

    out = _reference_stats(path, prepare, extractor, batch_size, device, progress,
                           f"reference {root.name} @{resolution}px", max_pr)
    return {**out, "available": available}


# ---- evaluating a checkpoint ------------------------------------------------------------------------------

# Samples generated (and, for latent checkpoints, decoded) and held at once: 50,000 decoded 256x256 images
# would be 39 GB of float32. Chunks are shards of the same N samples, so the chunking changes no sample.
SAMPLE_CHUNK = 5000
NAMED_SOURCES = ("digits", "fashion-mnist", "fashion-mnist-test")


@dataclass
class EvalConfig:
    checkpoint: str | None = None
    num_samples: int = 2000
    steps: int = 50
    cfg_scale: float = 1.0
    ema: bool = True
    seed: int = 0
    labels: str = "cycle"
    extractors: str = "classifier"
    inception_weights: str | None = None
    reference: str | None = None
    reference_split: str | None = None
    reference_max_images: int = 50_000
    reference_workers: int = 0
    vae: str | None = None
    pr_k: int = 3
    cache_dir: str | None = None
    run_dir: str | None = None
    record: bool = True
    batch_size: int = 250
    progress: bool = True
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N

    def validate(self) -> None:
        require(bool(self.checkpoint), "checkpoint", "pass --checkpoint RUN_DIR/checkpoints/latest.pt")
        require(self.num_samples >= 2, "num_samples", "FID needs at least 2 samples")
        require(1 <= self.steps <= 1000, "steps", "DDIM steps must be in [1, 1000]")
        require(self.cfg_scale >= 0, "cfg_scale", "must be >= 0 (1 = no guidance)")
        require(self.pr_k >= 1, "pr_k", "k must be >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")
        require(self.reference_max_images >= 2, "reference_max_images", "FID needs at least 2 reference images")
        require(self.reference_workers >= 0, "reference_workers", "must be >= 0 (0 = decode in this process)")
        names = self.extractor_list()
        require(bool(names) and all(n in EXTRACTORS for n in names), "extractors",
                f"comma-separated names from {', '.join(EXTRACTORS)}, got {self.extractors!r}")
        require(self.reference_split in (None, "all", "train", "val"), "reference_split", "use all, train or val")

    def extractor_list(self) -> list[str]:
        return [s.strip() for s in self.extractors.split(",") if s.strip()]


def _run_dir_of(checkpoint: str) -> Path:
    p = Path(checkpoint).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def latent_reference(checkpoint: str, latent: dict, reference: str | None = None,
                     reference_split: str | None = None) -> dict[str, Any]:
    """The reference images of a checkpoint trained on a latent cache (``latent``: the cache's record in the
    checkpoint): {'source', 'split', 'folder' (stream an image folder?), 'resolution'}. By default the image
    folder the cache was made from (its header's source), at the cache's resolution; ``reference`` (a folder
    or a named dataset) wins. Every way the folder can be unusable is a LatentCacheError that names it."""
    from .data.latents import HEADER_NAME, LatentCacheError, read_header

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
    if reference in NAMED_SOURCES:
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


def evaluate_checkpoint(cfg: EvalConfig, device: str | torch.device | None = None) -> list[dict]:
    """Sample from ``cfg.checkpoint`` and measure FID / precision / recall (one record per extractor) and
    class accuracy of the class-conditional samples; append the records to ``RUN_DIR/eval.jsonl``.

    A checkpoint trained on a latent cache is sampled, decoded with the cache's VAE (``cfg.vae``: another
    copy of it) and compared, in pixels, with the image folder the cache was made from (see
    :func:`latent_reference`, :func:`folder_reference_features`); only the ``inception`` extractor applies
    and class accuracy is None (there is no dataset classifier)."""
    from .sampling import sample_from_checkpoint

    cfg.validate()
    if device is None:
        from .run.distributed import resolve_device

        device = resolve_device(cfg.device)
    device = torch.device(device)
    state = load_checkpoint(cfg.checkpoint, kind="diffusion")
    config = state.get("config", {})
    data_source = config.get("data")
    if not data_source:
        raise CheckpointError(f"{cfg.checkpoint} does not record its training data; pass --reference SOURCE")
    spec = state["spec"]
    latent = (state.get("data") or {}).get("latent")
    names = cfg.extractor_list()
    if spec.get("in_channels") in (1, 3):
        ref_source, ref_split = default_reference(data_source)
        ref = {"source": cfg.reference or ref_source, "split": cfg.reference_split or ref_split, "folder": False,
               "resolution": None}
    elif not latent:
        raise ConfigError(f"{cfg.checkpoint} generates {spec.get('in_channels')}-channel data and records no latent "
                         "cache (no VAE to decode with); FID needs pixel images")
    else:
        if "classifier" in names:
            raise ConfigError(f"{cfg.checkpoint} was trained on a latent cache ({latent.get('cache')}): the 'classifier' "
                             "extractor (a small per-dataset classifier) does not apply to its decoded images; use "
                             "--extractors inception with --inception-weights PATH")
        ref = latent_reference(cfg.checkpoint, latent, cfg.reference, cfg.reference_split)
    unconditional = bool(config.get("unconditional", False))
    conditional = not unconditional and cfg.labels != "null"
    extractors = {name: build_extractor(name, ref["source"], cfg.cache_dir, cfg.inception_weights, cfg.progress)
                  for name in names}
    class_acc, clf, clf_info = None, None, None
    if conditional and not latent:
        clf = extractors["classifier"].network if "classifier" in extractors else \
            get_classifier(ref["source"], cfg.cache_dir, progress=cfg.progress)[0]
        clf_info = extractors["classifier"].info if "classifier" in extractors else None
        clf = clf.to(device).eval()
    chunks = max(1, math.ceil(cfg.num_samples / SAMPLE_CHUNK))
    feats: dict[str, list[np.ndarray]] = {name: [] for name in extractors}
    all_labels, preds, sample_s, image_size = [], [], 0.0, None
    for c in range(chunks):
        t0 = time.perf_counter()
        samples, labels = sample_from_checkpoint(cfg.checkpoint, cfg.num_samples, cfg.labels, cfg.cfg_scale,
                                                 cfg.steps, cfg.seed, cfg.ema, cfg.batch_size, device=device,
                                                 progress=cfg.progress, vae=cfg.vae, decode=True,
                                                 shard=(c, chunks) if chunks > 1 else None)
        sample_s += time.perf_counter() - t0
        image_size = samples.shape[-1]
        all_labels.append(labels)
        if clf is not None:
            with torch.no_grad():
                preds += [clf(quantize(samples[i:i + cfg.batch_size]).to(device)).argmax(1).cpu()
                          for i in range(0, samples.shape[0], cfg.batch_size)]
        for name, ex in extractors.items():
            feats[name].append(ex(samples, cfg.batch_size, device, cfg.progress, desc="samples"))
        del samples
    labels = torch.cat(all_labels)
    if clf is not None:
        class_acc = float((torch.cat(preds) == labels).double().mean())
    if ref["folder"] and ref["resolution"] is None:
        ref["resolution"] = int(image_size)  # a cache that does not record it: the decoded samples' size
    reference = {"source": ref["source"], "split": ref["split"]}
    if ref["folder"]:
        reference.update(resolution=ref["resolution"], max_images=cfg.reference_max_images)
    records = []
    common = {
        "checkpoint": str(cfg.checkpoint), "checkpoint_step": int(state.get("step", -1)), "model": spec.get("name"),
        "data": data_source, "reference": reference,
        "num_samples": cfg.num_samples, "sampler": "ddim", "eta": 0.0, "steps": cfg.steps,
        "cfg_scale": 1.0 if unconditional else cfg.cfg_scale, "ema": cfg.ema, "seed": cfg.seed,
        "labels": "null" if unconditional else cfg.labels, "class_accuracy": class_acc, "pr_k": cfg.pr_k,
    }
    if latent:
        common["latent"] = {"cache": latent.get("cache"), "decoded": True, "image_size": int(image_size),
                            "vae": str(cfg.vae) if cfg.vae else (latent.get("vae") or {}).get("path"),
                            "vae_sha256": (latent.get("vae") or {}).get("sha256")}
    for name, ex in extractors.items():
        if ref["folder"]:
            rf = folder_reference_features(ref["source"], ref["resolution"], ex, cfg.cache_dir, cfg.batch_size, device,
                                           cfg.progress, max_images=cfg.reference_max_images,
                                           workers=cfg.reference_workers)
        else:
            rf = reference_features(ref["source"], ref["split"], ex, cfg.cache_dir, cfg.batch_size, device,
                                    cfg.progress)
        fx = np.concatenate(feats[name])
        fid = frechet_distance(*feature_stats(fx), rf["mu"], rf["sigma"])
        pr = precision_recall(rf["pr_features"], fx, cfg.pr_k)
        rec_ref = {**reference, "num_images": rf["n"], "pr_images": int(rf["pr_features"].shape[0]),
                   "stats_cache": rf["path"]}
        if "available" in rf:
            rec_ref["available_images"] = rf["available"]
        rec = {**common, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "extractor": name, "extractor_key": ex.key,
               "extractor_info": ex.info, "fid": fid, **pr, "reference": rec_ref, "sample_seconds": round(sample_s, 2)}
        if name != "classifier" and clf_info is not None:
            rec["class_accuracy_classifier"] = {"test_accuracy": clf_info["test_accuracy"]}
        records.append(rec)
    if cfg.record:
        run_dir = Path(cfg.run_dir) if cfg.run_dir else _run_dir_of(cfg.checkpoint)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "eval.jsonl", "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return records


def summary_table(records: list[dict]) -> str:
    """A plain-text table of evaluation records."""
    head = ["extractor", "FID", "precision", "recall", "class acc", "N", "steps", "cfg", "EMA", "ref"]
    rows = [[r["extractor"], f"{r['fid']:.3f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
             "-" if r.get("class_accuracy") is None else f"{r['class_accuracy']:.3f}", str(r["num_samples"]),
             str(r["steps"]), f"{r['cfg_scale']:g}", "yes" if r["ema"] else "no",
             f"{r['reference']['source']}:{r['reference']['split']} ({r['reference']['num_images']})"] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


__all__ = ["EvalConfig", "Extractor", "DatasetClassifier", "InceptionV3", "evaluate_checkpoint", "feature_stats",
           "frechet_distance", "fid_from_features", "precision_recall", "knn_radii", "load_inception",
           "get_classifier", "train_classifier", "reference_features", "build_extractor", "summary_table",
           "default_reference", "quantize", "RunningStats", "folder_reference_features", "folder_reference_files",
           "latent_reference"]
