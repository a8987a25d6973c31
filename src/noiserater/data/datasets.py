"""Image datasets scaled to [-1, 1] with a deterministic train/validation split.

Sources (the ``--data`` option):
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes, 1 channel). Always available.
- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` package (28x28 padded to 32x32, 10 classes).
- ``NAME@RES`` for a named source above (``fashion-mnist@16``): its images resized to RES x RES (area
  averaging when RES divides the size, which is exact 2x2 pooling for 32 -> 16; antialiased bilinear
  otherwise): the same images at another dimension d, for the dimension ladder.
- a directory of class subfolders of images (ImageFolder; all images must share one size).
- a latent cache written by ``noiserater cache-latents`` (a directory with ``header.json``).

Small datasets live in memory as tensors: a training step indexes them directly, no worker processes.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .latents import load_latent_cache
from .types import IMAGE_EXTENSIONS, DatasetError, ImageData

# Debian's dataset-fashion-mnist package installs here; NOISERATER_FASHION_MNIST_DIR overrides it.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797,8,8] in 0..16, labels [1797]) from the CSV that scikit-learn ships.

    The file is read directly: importing scikit-learn itself takes seconds, which every training process
    (and every torchrun worker) would pay.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        raw = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        return raw[:, :-1].reshape(-1, 8, 8), raw[:, -1].astype(np.int64)
    try:
        from sklearn.datasets import load_digits  # seconds to import: only when the CSV is not found
    except ImportError:
        raise DatasetError("the digits dataset comes with scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    return d.images, d.target


def load_digits_data() -> ImageData:
    images, labels = _digits_arrays()
    x = torch.from_numpy(images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    return ImageData(x, torch.from_numpy(labels.astype(np.int64)), 10, "digits", [str(i) for i in range(10)])


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip, or a cut/damaged stream
        raise DatasetError(f"{path} is not a readable gzip file ({e}); reinstall the dataset") from None
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if len(data) < 4 or magic >> 8 != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x}); reinstall the dataset")
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path} is truncated (its header announces {ndim} dimensions); reinstall the dataset")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != math.prod(dims):  # math.prod: exact, where np.prod would overflow on a damaged header
        raise DatasetError(f"{path} is truncated or damaged ({arr.size} values, the header announces "
                           f"{math.prod(dims)}); reinstall the dataset")
    return arr.reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | None = None) -> ImageData:
    """Fashion-MNIST from Debian's package, 28x28 padded with -1 to 32x32."""
    root_path = Path(root or os.environ.get("NOISERATER_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    img, lab = root_path / f"{prefix}-images-idx3-ubyte.gz", root_path / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.exists() or not lab.exists():
        raise DatasetError(
            f"Fashion-MNIST not found under {root_path}: install it with "
            "'apt-get install dataset-fashion-mnist' or set NOISERATER_FASHION_MNIST_DIR"
        )
    images, labels = _read_idx(img), _read_idx(lab)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or len(images) == 0 \
            or images.shape[1] != images.shape[2] or int(labels.max()) >= 10:
        raise DatasetError(
            f"Fashion-MNIST files under {root_path} do not fit together (images {list(images.shape)}, labels "
            f"{list(labels.shape)}, largest label {int(labels.max()) if labels.size else None}); reinstall the dataset"
        )
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return ImageData(x, torch.from_numpy(labels.astype(np.int64)), 10, "fashion-mnist", names)


def load_image_folder(root: str | os.PathLike) -> ImageData:
    """ImageFolder: ``root/<class>/<image>``; classes sorted by name. All images must share one size."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a directory; pass --data PATH to a folder of class subfolders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"image folder {root} has no class subfolders; put images in {root}/<class_name>/")
    arrays, labels, size, mode = [], [], None, None
    for ci, cname in enumerate(classes):
        for f in sorted((root / cname).rglob("*")):
            if f.suffix.lower() not in IMAGE_EXTENSIONS or not f.is_file():
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB") if im.mode not in ("L", "RGB") else im
                    if size is None:
                        size, mode = im.size, im.mode
                    if im.size != size:
                        raise DatasetError(
                            f"image folder {root} has mixed sizes: {f} is {im.size[0]}x{im.size[1]}, "
                            f"earlier images are {size[0]}x{size[1]}; resize them to one size "
                            "(or use 'noiserater cache-latents', which center-crops and resizes)"
                        )
                    if im.size[0] != im.size[1]:
                        raise DatasetError(f"{f} is not square ({im.size[0]}x{im.size[1]}); crop images to squares")
                    arrays.append(np.asarray(im.convert(mode), dtype=np.uint8))
            except DatasetError:
                raise
            except UnidentifiedImageError:
                raise DatasetError(f"{f} is not a readable image; remove it or fix it") from None
            except Exception as e:  # truncated/damaged files: PIL raises OSError, SyntaxError, ValueError, ...
                reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
                raise DatasetError(f"{f} is not a readable image ({reason}); remove it or fix it") from None
            labels.append(ci)
    if not arrays:
        raise DatasetError(f"image folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)}) in its class subfolders")
    x = np.stack(arrays)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    images = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0)
    return ImageData(images, torch.tensor(labels, dtype=torch.long), len(classes), f"folder:{root}", classes)


NAMED_SOURCES = ("digits", "fashion-mnist", "fashion-mnist-test")


def parse_source(source: str) -> tuple[str, int | None]:
    """(named source, resolution or None) of ``NAME@RES``; any other source is returned as it is."""
    base, sep, res = source.rpartition("@")
    if not sep or base not in NAMED_SOURCES:
        return source, None
    if not res.isdigit() or not 4 <= int(res) <= 1024:
        raise DatasetError(f"dataset {source!r}: the resolution after '@' must be a whole number of pixels in "
                           f"[4, 1024] (e.g. --data {base}@16)")
    return base, int(res)


def resize_images(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """[N, C, H, H] images in [-1, 1] resized to [N, C, resolution, resolution]: area averaging when the
    size is a multiple of ``resolution`` (an exact mean of each block), antialiased bilinear otherwise."""
    size = x.shape[-1]
    if size == resolution:
        return x
    if size % resolution == 0:
        return torch.nn.functional.avg_pool2d(x, size // resolution)
    y = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                                        align_corners=False)
    return y.clamp(-1.0, 1.0)


# C, H, W of the named sources' images (as loaded): their dimension without reading them
NAMED_SHAPES = {"digits": (1, 8, 8), "fashion-mnist": (1, 32, 32), "fashion-mnist-test": (1, 32, 32)}


def source_dimension(source: str) -> int:
    """d = C*H*W of one image of ``source``: from :data:`NAMED_SHAPES` for a named source (and NAME@RES),
    otherwise read from the data."""
    base, resolution = parse_source(source)
    if base in NAMED_SHAPES:
        c, h, w = NAMED_SHAPES[base]
        return c * (h * w if resolution is None else resolution * resolution)
    return int(load_source(source).images[0].numel())


def load_source(source: str) -> ImageData:
    """Load all images of a source (see module docstring) before the train/validation split."""
    base, resolution = parse_source(source)
    if resolution is not None:
        data = load_source(base)
        return ImageData(resize_images(data.images, resolution), data.labels, data.num_classes, source,
                         data.class_names)
    if source == "digits":
        return load_digits_data()
    if source == "fashion-mnist":
        return load_fashion_mnist("train")
    if source == "fashion-mnist-test":
        return load_fashion_mnist("test")
    path = Path(source)
    if path.is_dir() and (path / "header.json").exists():
        return load_latent_cache(path)
    if path.is_dir():
        return load_image_folder(path)
    if path.exists():
        raise DatasetError(f"dataset {source!r} is a file; pass a folder of class subfolders of images")
    if os.sep in source or source.startswith("."):
        raise DatasetError(f"dataset folder {source} does not exist; check the path given to --data")
    raise DatasetError(
        f"unknown dataset {source!r}: use 'digits', 'fashion-mnist' (NAME@RES resizes, e.g. fashion-mnist@16), "
        "a folder of class subfolders, or a latent cache directory"
    )


def split_three(n: int, seed: int, val_fraction: float = 0.1, test_fraction: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic train / (meta-)validation / test split of range(n) by ``seed``: sorted index tensors.

    One permutation by ``seed``: its first ``val_fraction`` is the validation split (what raters, the
    oracle and learning-rate sweeps may look at), the next ``test_fraction`` the test split (held-out
    evaluation only: nothing selects with it), the rest trains. With ``test_fraction=0`` the train and
    validation splits are exactly those of earlier releases."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1) with val_fraction + test_fraction < 1, got {test_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    n_test = max(1, int(round(n * test_fraction))) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise DatasetError(f"dataset has only {n} images: too few for a train/validation split")
    return perm[n_val + n_test:].sort().values, perm[:n_val].sort().values, perm[n_val:n_val + n_test].sort().values


def split_indices(n: int, seed: int, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic train/validation split of range(n) by seed: (train_idx, val_idx)."""
    train, val, _ = split_three(n, seed, val_fraction)
    return train, val


SPLITS = ("train", "val", "test", "all")


def load_dataset(source: str, split: str = "train", seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.0) -> ImageData:
    """The ``split`` ('train', 'val', 'test' or 'all') of a source, split by ``seed`` (see
    :func:`split_three`); 'test' needs ``test_fraction > 0``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "test" and test_fraction <= 0:
        raise ValueError("the 'test' split needs test_fraction > 0 (the data was split without a test part)")
    data = load_source(source)
    if split == "all":
        return data
    parts = dict(zip(("train", "val", "test"), split_three(len(data), seed, val_fraction, test_fraction)))
    return data.subset(parts[split], split)
