"""The data of meta-training: the diffusion checkpoint's own splits, the held-out half of its validation
split, and the batches of one outer step as a pure function of (seed, outer step, seed stream).

Seed streams: the training batches use offset 0, the inner-lr sweep :data:`SWEEP_SEED_OFFSET`, the
held-out evaluation :data:`EVAL_SEED_OFFSET`, so no evaluation batch or noise is ever a training one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..data import ImageData, load_dataset
from ..diffusion import GaussianDiffusion
from ..objectives import DDPMObjective, Objective
from ..randomness import EPOCH_MIX, batch_indices, condition_labels, step_generator

SWEEP_SEED_OFFSET = 100_003  # the inner-lr sweep's draws
EVAL_SEED_OFFSET = 200_003  # the held-out evaluation's draws
HELDOUT_SALT = 17  # the held-out cut's permutation is seeded apart from the batch-order permutations
STREAMS = 64  # generator streams per outer step: 0 validation, 1..S inner steps (S < 64)


def checkpoint_splits(dcfg: dict, source: str) -> tuple[ImageData, ImageData, dict]:
    """(train, meta-validation) splits of the data a diffusion checkpoint was trained with, split exactly as
    its training did (``split_seed``, falling back to its ``seed``; ``val_fraction``; ``test_fraction``), and
    the split's description. The test split is never loaded here."""
    split_seed = dcfg.get("split_seed")
    split_seed = int(dcfg.get("seed", 0) if split_seed is None else split_seed)
    val_fraction, test_fraction = float(dcfg.get("val_fraction", 0.1)), float(dcfg.get("test_fraction", 0.0) or 0.0)
    kw = dict(seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction)
    info = {"source": source, "split_seed": split_seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    return load_dataset(source, "train", **kw), load_dataset(source, "val", **kw), info


def split_heldout(val: ImageData, fraction: float, seed: int) -> tuple[ImageData, ImageData | None]:
    """(meta half, held-out half) of the validation split: a permutation by the data seed, its first
    ``fraction`` held out (at least one image each); ``fraction == 0`` keeps everything in the meta half."""
    if fraction <= 0:
        return val, None
    n = len(val)
    if n < 2:
        raise ConfigError(f"the validation split has {n} image(s): too few to hold part of it out; "
                          "pass --heldout-fraction 0")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * EPOCH_MIX + HELDOUT_SALT))
    n_ho = min(max(1, int(round(n * fraction))), n - 1)
    return val.subset(perm[n_ho:].sort().values, "meta"), val.subset(perm[:n_ho].sort().values, "heldout")


@dataclass
class MetaBatches:
    """Draws the batches of outer step ``n``: S inner group batches of B images x K candidate noises from
    ``train``, and a validation batch of Bv (image, label, timestep, noise) draws from ``val``. Each call
    returns rank ``rank``'s slice of the global batch, so N processes draw what one process draws."""

    train: ImageData
    val: ImageData
    num_classes: int
    seed: int
    S: int
    K: int
    B: int
    Bv: int
    label_dropout: float
    unconditional: bool
    num_timesteps: int = 1000  # DDPM steps of the default objective (unused when ``objective`` is given)
    planted_scale: float = 1.0
    objective: Objective | None = None  # draws t (default: DDPM with ``num_timesteps`` steps)

    def __post_init__(self) -> None:
        if self.objective is None:
            self.objective = DDPMObjective(GaussianDiffusion(self.num_timesteps))

    def _labels(self, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return condition_labels(y, self.num_classes, self.label_dropout, self.unconditional, g, draw_at_zero=True)

    def train_batch(self, n: int, s: int, rank: int, world: int, device, dtype=torch.float32, seed_offset: int = 0):
        """Inner (group) batch ``s`` of outer step ``n``: (x0, y, t, eps [B,K,...]), rank ``rank``'s slice.
        With ``planted_scale`` != 1 candidate 0 of every group is that multiple of a standard normal (a
        planted, off-distribution candidate; a sanity check of meta-training)."""
        seed = self.seed + seed_offset
        b = self.B // world
        sl = slice(rank * b, (rank + 1) * b)
        shape = tuple(self.train.images.shape[1:])
        g = step_generator(seed, n, 1 + s, streams=STREAMS)
        idx = batch_indices(len(self.train), self.B, n * self.S + s, seed)
        t = self.objective.sample_t(self.B, g)
        y = self._labels(self.train.labels[idx], g)
        eps = torch.randn((self.B, self.K, *shape), generator=g)
        if self.planted_scale != 1.0:
            eps[:, 0] *= self.planted_scale
        return tuple(x[sl].to(device) for x in (self.train.images[idx].to(dtype), y, t, eps.to(dtype)))

    def val_batch(self, n: int, size: int, rank: int, world: int, device, dtype=torch.float32, seed_offset: int = 0):
        """Validation batch of outer step ``n``: ``size`` (image, label, timestep, noise) draws from the
        validation split (images repeat, with fresh noise and timestep, when ``size`` exceeds it)."""
        seed = self.seed + seed_offset
        bv = size // world
        slv = slice(rank * bv, (rank + 1) * bv)
        shape = tuple(self.val.images.shape[1:])
        g = step_generator(seed, n, 0, streams=STREAMS)
        idx = batch_indices(len(self.val), size, n, seed + 1)
        t = self.objective.sample_t(size, g)
        y = self._labels(self.val.labels[idx], g)
        eps = torch.randn((size, *shape), generator=g)
        return tuple(x[slv].to(device) for x in (self.val.images[idx].to(dtype), y, t, eps.to(dtype)))

    def outer(self, n: int, rank: int, world: int, device, dtype=torch.float32, seed_offset: int = 0):
        """(S train batches, val batch) of outer step ``n``: rank ``rank``'s slice of the global batches."""
        batches = [self.train_batch(n, s, rank, world, device, dtype, seed_offset) for s in range(self.S)]
        return batches, self.val_batch(n, self.Bv, rank, world, device, dtype, seed_offset)
