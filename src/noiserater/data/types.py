"""What every data source yields (:class:`ImageData`), the error a source raises and the image file types.

The lowest module of :mod:`noiserater.data`. Imports go one way: ``types`` <- ``latents`` (the latent
cache) <- ``datasets`` (the sources and the split, which also read a latent cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset could not be found or read; the message says how to fix it."""


@dataclass
class ImageData:
    """Images [N,C,H,W] float32 in [-1,1] (or latents), labels [N] int64, and what they are."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    class_names: list[str] | None = None

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor, suffix: str) -> "ImageData":
        return ImageData(self.images[index], self.labels[index], self.num_classes, f"{self.name}:{suffix}",
                         self.class_names)
