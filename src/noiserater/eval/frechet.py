"""The Frechet distance and k-NN precision/recall between two feature sets.

This module owns the statistics: :func:`feature_stats` (float64 mean and covariance),
:func:`frechet_distance` ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) on top of ``scipy.linalg.sqrtm``
(tested against closed forms and against torchmetrics' ``FrechetInceptionDistance``),
:func:`fid_from_features`, and the k-NN manifold precision and recall of Kynkaanniemi et al. (2019)
(:func:`knn_radii`, :func:`precision_recall`). It knows nothing about images or networks.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg


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
