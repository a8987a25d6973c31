"""Datasets: ranges, shapes, the deterministic split, ImageFolder and every missing/bad-data error."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from noiserater.data import DatasetError, load_dataset, load_digits_data, load_image_folder, load_source, split_indices
from noiserater.data import datasets as ds


def test_digits_shape_range_and_labels():
    d = load_digits_data()
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.float32
    assert d.images.min().item() == -1.0 and d.images.max().item() == 1.0
    assert d.labels.dtype == torch.int64 and set(d.labels.tolist()) == set(range(10))
    assert d.num_classes == 10 and d.channels == 1 and d.image_size == 8
    from sklearn.datasets import load_digits  # the CSV is read directly; scikit-learn's loader is the oracle

    ref = load_digits()
    torch.testing.assert_close(d.images[:, 0], torch.from_numpy(ref.images / 8.0 - 1.0).float())
    assert d.labels.tolist() == ref.target.tolist()


def test_split_is_deterministic_disjoint_and_covers_everything():
    tr, va = split_indices(1797, seed=0)
    tr2, va2 = split_indices(1797, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(va) == 180 and len(tr) == 1617
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(1797))
    _, va3 = split_indices(1797, seed=1)
    assert not torch.equal(va, va3)
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 0, 1.0)
    with pytest.raises(DatasetError, match="too few"):
        split_indices(1, 0)


def test_load_dataset_train_and_val_are_the_split_of_all():
    full = load_dataset("digits", "all")
    train, val = load_dataset("digits", "train", seed=3), load_dataset("digits", "val", seed=3)
    tr, va = split_indices(len(full), 3)
    assert torch.equal(train.images, full.images[tr]) and torch.equal(val.labels, full.labels[va])
    assert len(train) + len(val) == len(full)
    with pytest.raises(ValueError, match="split must be"):
        load_dataset("digits", "dev")
    with pytest.raises(ValueError, match="test_fraction > 0"):
        load_dataset("digits", "test")


def test_three_way_split_keeps_the_old_val_split_and_is_disjoint():
    from noiserater.data import split_three

    full = load_dataset("digits", "all")
    tr, va, te = split_three(len(full), 3, 0.1, 0.1)
    _, va_old = split_indices(len(full), 3)
    assert torch.equal(va, va_old)  # adding a test split leaves the meta-validation images as they were
    assert len(te) == 180 and len(va) == 180 and len(tr) == 1797 - 360
    assert len(set(tr.tolist()) | set(va.tolist()) | set(te.tolist())) == 1797  # disjoint and covering
    test = load_dataset("digits", "test", seed=3, test_fraction=0.1)
    assert torch.equal(test.images, full.images[te])
    train = load_dataset("digits", "train", seed=3, test_fraction=0.1)
    assert not set(map(tuple, train.images.flatten(1)[:50].tolist())) & set(map(tuple, test.images.flatten(1).tolist()))


def _write_idx(path, arr: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", n) for n in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fake_fashion(root, n=5):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, 28, 28))
    imgs[0, 0, 0], imgs[0, 0, 1] = 0, 255
    labels = np.arange(n) % 10
    _write_idx(root / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    return imgs, labels


def test_fashion_mnist_idx_reader_pads_to_32_and_scales(tmp_path, monkeypatch):
    imgs, labels = _fake_fashion(tmp_path)
    monkeypatch.setenv("NOISERATER_FASHION_MNIST_DIR", str(tmp_path))
    d = load_source("fashion-mnist")
    assert d.images.shape == (5, 1, 32, 32)
    assert torch.equal(d.labels, torch.from_numpy(labels.astype(np.int64)))
    inner = d.images[:, 0, 2:30, 2:30]
    torch.testing.assert_close(inner, torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1.0))
    assert (d.images[:, :, :2] == -1).all() and (d.images[:, :, :, 30:] == -1).all()
    assert d.images.min().item() == -1.0 and d.images.max().item() == 1.0


def test_resized_source_is_the_block_mean_of_the_full_images(tmp_path, monkeypatch):
    """fashion-mnist@16: each pixel is the mean of a 2x2 block of the 32x32 image (numpy reference)."""
    _fake_fashion(tmp_path)
    monkeypatch.setenv("NOISERATER_FASHION_MNIST_DIR", str(tmp_path))
    full, half = load_source("fashion-mnist"), load_source("fashion-mnist@16")
    ref = full.images.numpy().reshape(5, 1, 16, 2, 16, 2).mean(axis=(3, 5))
    assert half.images.shape == (5, 1, 16, 16) and half.name == "fashion-mnist@16"
    np.testing.assert_allclose(half.images.numpy(), ref, rtol=0, atol=1e-6)
    assert torch.equal(half.labels, full.labels)
    odd = load_source("fashion-mnist@12")  # not a divisor: antialiased bilinear, still in [-1, 1]
    assert odd.images.shape == (5, 1, 12, 12) and odd.images.abs().max() <= 1.0
    assert load_source("digits@4").images.shape == (1797, 1, 4, 4)


@pytest.mark.parametrize("bad", ["fashion-mnist@x", "fashion-mnist@2", "digits@0"])
def test_bad_resolution_suffix_names_the_fix(bad):
    with pytest.raises(DatasetError, match=r"resolution after '@'.*--data"):
        load_source(bad)


def test_resized_sources_have_their_own_family_and_reference():
    from noiserater.eval.cache import source_slug
    from noiserater.eval.classifier import dataset_family
    from noiserater.eval.reference import default_reference
    assert dataset_family("fashion-mnist-test@16") == "fashion-mnist@16"
    assert default_reference("fashion-mnist@16") == ("fashion-mnist-test@16", "all")
    assert default_reference("fashion-mnist") == ("fashion-mnist-test", "all")
    assert source_slug("fashion-mnist@16") == "fashion-mnist@16"


def test_fashion_mnist_truncated_file_is_a_clear_error(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    monkeypatch.setenv("NOISERATER_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match="truncated"):
        load_source("fashion-mnist")


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv("NOISERATER_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(ds, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


@pytest.mark.skipif(not os.path.exists(os.path.join(ds.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_debian_package():
    d = load_dataset("fashion-mnist", "all")
    assert d.images.shape == (60000, 1, 32, 32) and d.num_classes == 10
    assert d.images.min().item() == -1.0 and d.images.max().item() == 1.0
    assert torch.bincount(d.labels).tolist() == [6000] * 10


def _png(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode=mode).save(path)


def test_image_folder_classes_labels_and_range(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for cls, n in (("cat", 2), ("ant", 3)):
        for i in range(n):
            a = rng.integers(0, 256, size=(6, 6, 3))
            a[0, 0] = [0, 0, 0]
            a[0, 1] = [255, 255, 255]
            arrays[(cls, i)] = a
            _png(tmp_path / cls / f"{i}.png", a, "RGB")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    d = load_image_folder(tmp_path)
    assert d.class_names == ["ant", "cat"] and d.num_classes == 2
    assert d.images.shape == (5, 3, 6, 6)
    assert d.labels.tolist() == [0, 0, 0, 1, 1]
    expected = torch.from_numpy(arrays[("cat", 1)].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)
    torch.testing.assert_close(d.images[4], expected)
    assert d.images.min().item() == -1.0 and d.images.max().item() == 1.0
    # the same folder through the generic loader, and its split
    assert len(load_dataset(str(tmp_path), "val", seed=0)) == 1


def test_image_folder_greyscale_is_one_channel(tmp_path):
    _png(tmp_path / "a" / "x.png", np.full((4, 4), 255), "L")
    _png(tmp_path / "b" / "y.png", np.zeros((4, 4)), "L")
    d = load_image_folder(tmp_path)
    assert d.images.shape == (2, 1, 4, 4) and d.images[0].eq(1).all() and d.images[1].eq(-1).all()


def test_image_folder_mixed_sizes_is_an_error(tmp_path):
    _png(tmp_path / "a" / "x.png", np.zeros((8, 8, 3)), "RGB")
    _png(tmp_path / "b" / "y.png", np.zeros((16, 16, 3)), "RGB")
    with pytest.raises(DatasetError, match="mixed sizes.*16x16.*8x8"):
        load_image_folder(tmp_path)


def test_image_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="has no images"):
        load_image_folder(tmp_path)
    with pytest.raises(DatasetError, match="no class subfolders"):
        load_image_folder(tmp_path / "a")


def test_image_folder_unreadable_image_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="not a readable image"):
        load_image_folder(tmp_path)


def test_missing_paths_and_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_source(str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        load_source("mnist")
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(DatasetError, match="is a file"):
        load_source(str(f))
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
