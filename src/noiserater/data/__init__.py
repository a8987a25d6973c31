"""Datasets (digits, Fashion-MNIST, ImageFolder, latent cache) with a deterministic 90/10 split."""

from .datasets import (
    DatasetError,
    ImageData,
    load_dataset,
    load_digits_data,
    load_fashion_mnist,
    load_image_folder,
    load_source,
    split_indices,
    split_three,
)

__all__ = [
    "DatasetError",
    "ImageData",
    "load_dataset",
    "load_digits_data",
    "load_fashion_mnist",
    "load_image_folder",
    "load_source",
    "split_indices",
    "split_three",
]
