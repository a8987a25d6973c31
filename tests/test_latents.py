"""Latent cache end to end with a tiny randomly initialised AutoencoderKL: cache, resume, train, decode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from noiserater.data import load_dataset  # noqa: E402
from noiserater.data.latents import (  # noqa: E402
    DATA_NAME,
    HEADER_NAME,
    LatentCacheError,
    LatentData,
    LatentDecoder,
    MemmapRows,
    cache_latents,
    load_latent_cache,
    load_vae,
)

RES = 32  # pixels; the tiny VAE downsamples 4x -> 4x8x8 latents


def make_tiny_vae(path: Path, seed: int = 0, scaling_factor: float = 0.18215) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=RES, scaling_factor=scaling_factor)
    with torch.no_grad():  # a visible posterior spread, so 'sample' and 'mean' differ clearly
        vae.quant_conv.bias[4:] += 1.0
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def _write_images(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Two classes; square RES images, wide/tall ones (center crop), a grey one and one with alpha.
    Returns, per relative path, the RES x RES RGB pixels the cache must see (crop needs no resize)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    expect = {}
    for cname in ("b_dog", "a_cat"):
        (root / cname).mkdir(parents=True)
        for i in range(5):
            if i == 1:  # wide: keep the central RES columns
                arr = rng.integers(0, 256, (RES, 2 * RES, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / cname / f"{i}.png")
                expect[f"{cname}/{i}.png"] = arr[:, RES // 2: RES // 2 + RES]
            elif i == 2:  # tall
                arr = rng.integers(0, 256, (RES + 8, RES, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / cname / f"{i}.png")
                expect[f"{cname}/{i}.png"] = arr[4:4 + RES]
            elif i == 3:  # greyscale
                arr = rng.integers(0, 256, (RES, RES), dtype=np.uint8)
                Image.fromarray(arr).save(root / cname / f"{i}.png")
                expect[f"{cname}/{i}.png"] = np.repeat(arr[..., None], 3, axis=2)
            else:
                arr = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / cname / f"{i}.png")
                expect[f"{cname}/{i}.png"] = arr
    (root / "a_cat" / "notes.txt").write_text("not an image")
    return expect


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "folder"
    expect = _write_images(root)
    return root, expect


@pytest.fixture(scope="module")
def flip_cache(tmp_path_factory, image_folder, vae_dir) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    res = cache_latents(image_folder[0], vae_dir, out, resolution=RES, flip=True, batch_size=3, device="cpu",
                        progress=False)
    assert res.complete and res.done_images == 10 and res.num_rows == 20
    return out


def _records(cache: Path) -> np.ndarray:
    return np.load(cache / DATA_NAME)


def _encode(vae_dir: Path, pixels: np.ndarray, mode: str = "mean") -> torch.Tensor:
    vae, _ = load_vae(vae_dir)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        d = vae.encode(x).latent_dist
    return (d.mean if mode == "mean" else d.std)[0] * (0.18215 if mode == "mean" else 1.0)


def test_cache_header_and_latents_match_direct_encoding(tmp_path, image_folder, vae_dir):
    root, expect = image_folder
    out = tmp_path / "cache"
    cache_latents(root, vae_dir, out, resolution=RES, flip=True, latent="mean", batch_size=4, device="cpu",
                  progress=False)
    header = json.loads((out / HEADER_NAME).read_text())
    assert header["complete"] and header["done_images"] == 10 and header["num_rows"] == 20
    assert header["scaling_factor"] == pytest.approx(0.18215) and header["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert header["latent_shape"] == [4, RES // 4, RES // 4] and header["resolution"] == RES
    assert header["class_names"] == ["a_cat", "b_dog"] and header["num_classes"] == 2
    assert len(header["vae"]["sha256"]) == 64
    files = (out / "files.txt").read_text().split()
    assert files == sorted(expect)  # class folders in name order, files sorted, notes.txt skipped
    rec = _records(out)
    assert rec.shape == (20,)
    for i, f in enumerate(files):
        want = _encode(vae_dir, expect[f])
        mirror = _encode(vae_dir, np.ascontiguousarray(expect[f][:, ::-1]))
        np.testing.assert_allclose(rec["latent"][2 * i], want.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rec["latent"][2 * i + 1], mirror.numpy(), rtol=1e-4, atol=1e-5)
        assert rec["label"][2 * i] == rec["label"][2 * i + 1] == (0 if f.startswith("a_cat") else 1)


def test_sampled_latents_are_posterior_samples_independent_of_batching(tmp_path, image_folder, vae_dir, flip_cache):
    root, expect = image_folder
    other = tmp_path / "b5"
    cache_latents(root, vae_dir, other, resolution=RES, flip=True, batch_size=5, device="cpu", progress=False)
    a, b = _records(flip_cache), _records(other)
    np.testing.assert_allclose(a["latent"], b["latent"], rtol=1e-5, atol=1e-6)  # batch 3 vs 5
    f0 = sorted(expect)[0]
    mean, std = _encode(vae_dir, expect[f0]), _encode(vae_dir, expect[f0], "std")
    z = torch.from_numpy(a["latent"][0])
    assert not torch.allclose(z, mean, atol=1e-3)  # a sample, not the mean
    noise = (z / 0.18215 - mean / 0.18215) / std  # the standardised sample is a normal draw
    assert abs(float(noise.mean())) < 0.5 and 0.6 < float(noise.std()) < 1.4
    seeded = tmp_path / "seed1"
    cache_latents(root, vae_dir, seeded, resolution=RES, flip=True, batch_size=3, seed=1, device="cpu", progress=False)
    assert not np.allclose(_records(seeded)["latent"], a["latent"])


def test_resume_after_interruption_gives_identical_cache(tmp_path, image_folder, vae_dir, flip_cache):
    root = tmp_path / "imgs"
    shutil.copytree(image_folder[0], root)
    bad = root / "b_dog" / "2.png"
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"not a png")  # the run stops with an error at the 8th image
    out = tmp_path / "cache"
    with pytest.raises(LatentCacheError, match="2.png is not a readable image"):
        cache_latents(root, vae_dir, out, resolution=RES, flip=True, batch_size=3, device="cpu", progress=False,
                      header_every_s=3600)
    header = json.loads((out / HEADER_NAME).read_text())
    assert header["done_images"] == 6 and not header["complete"]  # the two full batches before the bad one
    with pytest.raises(LatentCacheError, match="incomplete .6/10 images.*rerun"):
        load_latent_cache(out)
    # A crash can also leave rows written after the last header: scribble on them, the rerun redoes them.
    mm = np.lib.format.open_memmap(out / DATA_NAME, mode="r+")
    mm["latent"][12:] = np.nan
    mm["label"][12:] = -7
    mm.flush()
    del mm
    bad.write_bytes(good_bytes)
    res = cache_latents(root, vae_dir, out, resolution=RES, flip=True, batch_size=3, device="cpu", progress=False)
    assert res.complete and res.encoded_now == 4
    whole = _records(flip_cache)
    assert np.array_equal(_records(out), whole)  # bit-identical to the uninterrupted cache
    again = cache_latents(root, vae_dir, out, resolution=RES, flip=True, batch_size=3, device="cpu", progress=False)
    assert again.encoded_now == 0 and again.complete


def test_max_images_then_continue(tmp_path, image_folder, vae_dir, flip_cache):
    out = tmp_path / "cache"
    r1 = cache_latents(image_folder[0], vae_dir, out, resolution=RES, flip=True, batch_size=3, device="cpu",
                       max_images=4, progress=False)
    assert (r1.done_images, r1.complete) == (4, False)
    r2 = cache_latents(image_folder[0], vae_dir, out, resolution=RES, flip=True, batch_size=3, device="cpu",
                       progress=False)
    assert r2.complete and r2.encoded_now == 6
    # batches were [0..2],[3] then [4..6],...: different batch boundaries, same per-record latents
    np.testing.assert_allclose(_records(out)["latent"], _records(flip_cache)["latent"], rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_settings(tmp_path, image_folder, vae_dir):
    out = tmp_path / "cache"
    cache_latents(image_folder[0], vae_dir, out, resolution=RES, batch_size=4, device="cpu", max_images=2,
                  progress=False)
    with pytest.raises(LatentCacheError, match="flip=False.*flip=True"):
        cache_latents(image_folder[0], vae_dir, out, resolution=RES, flip=True, device="cpu", progress=False)
    other_vae = make_tiny_vae(tmp_path / "other-vae", seed=1)
    with pytest.raises(LatentCacheError, match="vae_sha256"):
        cache_latents(image_folder[0], other_vae, out, resolution=RES, device="cpu", progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(LatentCacheError, match="not a latent cache"):
        cache_latents(image_folder[0], vae_dir, tmp_path / "junk", resolution=RES, device="cpu", progress=False)


def test_vae_folder_errors(tmp_path, image_folder, vae_dir):
    with pytest.raises(LatentCacheError, match="does not exist"):
        load_vae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentCacheError, match="no config.json"):
        load_vae(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    shutil.copy(vae_dir / "config.json", tmp_path / "noweights" / "config.json")
    with pytest.raises(LatentCacheError, match="no weights"):
        load_vae(tmp_path / "noweights")
    with pytest.raises(LatentCacheError, match="is a file"):
        load_vae(vae_dir / "config.json")
    pipe = tmp_path / "pipeline"
    shutil.copytree(vae_dir, pipe / "vae")  # a pipeline folder with a vae/ subfolder works too
    assert load_vae(pipe)[1]["sha256"] == load_vae(vae_dir)[1]["sha256"]
    with pytest.raises(LatentCacheError, match="not divisible"):
        cache_latents(image_folder[0], vae_dir, tmp_path / "c", resolution=30, device="cpu", progress=False)


def test_cli_cache_latents_one_line_errors(tmp_path, image_folder, vae_dir):
    from click.testing import CliRunner

    from noiserater.cli import main

    runner = CliRunner()
    out = tmp_path / "cache"
    r = runner.invoke(main, ["cache-latents", "--data", str(image_folder[0]), "--vae", str(vae_dir), "--out", str(out),
                             "--resolution", str(RES), "--max-images", "3", "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "3/10 images" in r.output and "incomplete" in r.output
    r = runner.invoke(main, ["cache-latents", "--data", str(image_folder[0]), "--vae", str(vae_dir), "--out", str(out),
                             "--resolution", str(RES), "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0 and "10/10 images" in r.output and "complete" in r.output, r.output
    r = runner.invoke(main, ["cache-latents", "--data", str(image_folder[0]), "--vae", str(tmp_path / "missing"),
                             "--out", str(tmp_path / "c2"), "--no-progress"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "error: VAE folder" in r.output


def test_memmap_rows_index_like_a_tensor(flip_cache):
    lazy = load_latent_cache(flip_cache, in_memory=False)
    full = load_latent_cache(flip_cache, in_memory=True)
    assert isinstance(lazy.images, MemmapRows) and isinstance(full.images, torch.Tensor)
    x = full.images
    rows = lazy.images
    assert rows.shape == x.shape and len(rows) == 20 and rows.dtype == torch.float32
    assert (lazy.channels, lazy.image_size, len(lazy)) == (4, RES // 4, 20)
    keys = [3, -1, slice(2, 9, 3), [5, 1, 5, 19], torch.tensor([7, 0, 7, 2]), np.array([4, 4]),
            torch.arange(20) % 3 == 0, (slice(None, 4), 1)]
    for key in keys:
        assert torch.equal(rows[key], x[key]), key
    with pytest.raises(IndexError):
        rows[20]
    sub = lazy.subset(torch.tensor([9, 2, 17, 4]), "s")
    assert isinstance(sub, LatentData) and isinstance(sub.images, MemmapRows) and sub.latent_info == full.latent_info
    assert torch.equal(sub.images[[3, 0]], x[[4, 9]]) and torch.equal(sub.labels, full.labels[[9, 2, 17, 4]])
    assert torch.equal(torch.cat([sub.images, sub.images]), torch.cat([x[[9, 2, 17, 4]]] * 2))  # other ops: whole view
    assert torch.equal(sub.images.mean(0), x[[9, 2, 17, 4]].mean(0))


def test_dataset_splits_from_cache_lazy_equals_in_memory(flip_cache, monkeypatch):
    eager = load_dataset(str(flip_cache), "train", seed=3)
    monkeypatch.setenv("NOISERATER_CACHE_IN_MEMORY_MB", "0")
    lazy = load_dataset(str(flip_cache), "train", seed=3)
    assert isinstance(lazy.images, MemmapRows) and isinstance(eager.images, torch.Tensor)
    assert torch.equal(lazy.images[:], eager.images) and torch.equal(lazy.labels, eager.labels)
    assert lazy.name.startswith("latents:") and lazy.num_classes == 2


def test_train_on_cache_then_sample_decodes_with_the_same_vae(tmp_path, flip_cache, vae_dir, monkeypatch):
    from noiserater.models.loading import load_diffusion
    from noiserater.sampling import sample_from_checkpoint
    from noiserater.train import TrainConfig, train

    def run(name: str, in_memory_mb: str):
        monkeypatch.setenv("NOISERATER_CACHE_IN_MEMORY_MB", in_memory_mb)
        cfg = TrainConfig(data=str(flip_cache), model="DiT-N/2", run_dir=str(tmp_path / name), steps=3, batch_size=6,
                          lr=1e-3, log_every=1, sample_every=1000, ckpt_every=1000, sample_steps=2, tensorboard=False,
                          progress=False)
        return train(cfg)

    s_mem = run("mem", "2048")
    s_lazy = run("lazy", "0")
    assert s_mem["step"] == 3 and np.isfinite(s_mem["final_loss"])
    m1, spec, state = load_diffusion(s_mem["checkpoint"], use_ema=False)
    m2, _, _ = load_diffusion(s_lazy["checkpoint"], use_ema=False)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k  # reading rows per batch from the memmap changes nothing
    assert (spec.in_channels, spec.input_size, spec.num_classes) == (4, RES // 4, 2)
    info = state["data"]["latent"]
    assert info["scaling_factor"] == pytest.approx(0.18215) and Path(info["vae"]["path"]) == vae_dir.resolve()

    ckpt = s_mem["checkpoint"]
    imgs, y = sample_from_checkpoint(ckpt, 4, "cycle", 1.25, 2, seed=0, device="cpu")
    lat, _ = sample_from_checkpoint(ckpt, 4, "cycle", 1.25, 2, seed=0, device="cpu", decode=False)
    assert imgs.shape == (4, 3, RES, RES) and lat.shape == (4, 4, RES // 4, RES // 4)
    assert float(imgs.min()) >= -1 and float(imgs.max()) <= 1 and torch.equal(y, torch.tensor([0, 1, 0, 1]))
    vae, _ = load_vae(vae_dir)
    with torch.no_grad():
        manual = vae.decode(lat / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(imgs, manual, rtol=1e-4, atol=1e-5)
    # A VAE with another scaling factor is refused; the same one passed explicitly is accepted.
    wrong = make_tiny_vae(tmp_path / "wrong-scale", seed=0, scaling_factor=0.13025)
    with pytest.raises(LatentCacheError, match="scaling factor 0.18215.*0.13025"):
        sample_from_checkpoint(ckpt, 2, "cycle", 1.0, 2, device="cpu", vae=str(wrong))
    again, _ = sample_from_checkpoint(ckpt, 4, "cycle", 1.25, 2, seed=0, device="cpu", vae=str(vae_dir))
    assert torch.equal(again, imgs)
    # multi-GPU sampling: rank shards of the same N samples concatenate to the 1-process result
    parts = [sample_from_checkpoint(ckpt, 5, "random", 1.25, 2, seed=3, device="cpu", decode=False, shard=(r, 2))
             for r in range(2)]
    full, yfull = sample_from_checkpoint(ckpt, 5, "random", 1.25, 2, seed=3, device="cpu", decode=False)
    assert [p[0].shape[0] for p in parts] == [2, 3]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), full, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.cat([p[1] for p in parts]), yfull)


def test_decoder_refuses_mismatched_scale_and_warns_on_other_weights(tmp_path, flip_cache, vae_dir):
    data = load_latent_cache(flip_cache)
    dec = data.decoder()
    out = dec.decode(data.images[:3])
    assert out.shape == (3, 3, RES, RES)
    other = make_tiny_vae(tmp_path / "other", seed=5)  # same scale, other weights
    with pytest.warns(UserWarning, match="different weights"):
        LatentDecoder.from_recorded(data.latent_info["vae"], other)
    moved = dict(data.latent_info["vae"], path=str(tmp_path / "gone"))
    with pytest.raises(LatentCacheError, match="not on this machine.*--vae"):
        LatentDecoder.from_recorded(moved)


def test_synthetic_cache_and_loader_benchmark(tmp_path):
    from noiserater.bench.loader import run_loader_benchmark
    from noiserater.data.latents import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "syn", 300, (4, 8, 8), num_classes=7, seed=1)
    data = load_latent_cache(cache, in_memory=False)
    x = data.images[:]
    assert x.shape == (300, 4, 8, 8) and abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
    assert int(data.labels.min()) >= 0 and int(data.labels.max()) < 7 and data.num_classes == 7
    rec = run_loader_benchmark(str(cache), model="DiT-N/2", batch_size=4, repeats=1, loader_batches=3, device="cpu",
                               log=lambda s: None)
    assert rec["cache_records"] == 300 and rec["latent_shape"] == [4, 8, 8] and rec["losses_finite"]
    assert rec["train_images_per_s"] > 0 and rec["loader_memmap_images_per_s"] > 0
    assert rec["loader_over_train"] == pytest.approx(rec["loader_memmap_images_per_s"] / rec["train_images_per_s"])


def test_two_process_training_on_a_memmapped_cache_matches_one_process(tmp_path, flip_cache):
    """torchrun, 2 gloo processes, each reading only its half of every batch from the memory-mapped cache,
    with gradient checkpointing: the same weights as one process."""
    import os
    import subprocess
    import sys

    from noiserater.models.loading import load_diffusion
    from noiserater.train import TrainConfig, train

    opts = dict(data=str(flip_cache), model="DiT-N/2", steps=3, batch_size=8, lr=1e-3, log_every=1,
                sample_every=1000, ckpt_every=1000, sample_steps=2)
    one = train(TrainConfig(run_dir=str(tmp_path / "one"), tensorboard=False, progress=False, **opts))
    args = ["train", "--run-dir", str(tmp_path / "two"), "--no-tensorboard", "--no-progress", "--grad-checkpointing"]
    for k, v in opts.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NOISERATER_CACHE_IN_MEMORY_MB": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "noiserater",
           *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, _, sa = load_diffusion(one["checkpoint"], use_ema=False)
    b, _, sb = load_diffusion(tmp_path / "two" / "checkpoints" / "latest.pt", use_ema=False)
    assert sb["step"] == 3 and sb["data"]["latent"]["scaling_factor"] == pytest.approx(0.18215)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=k)


def test_flat_folder_is_one_class_and_empty_folder_is_an_error(tmp_path):
    from PIL import Image

    from noiserater.data.latents import list_images

    flat = tmp_path / "ffhq"
    flat.mkdir()
    for i in (2, 0, 1):
        Image.new("RGB", (8, 8)).save(flat / f"{i:05d}.png")
    files, labels, classes = list_images(flat)
    assert files == ["00000.png", "00001.png", "00002.png"] and labels == [0, 0, 0] and classes == ["ffhq"]
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(LatentCacheError, match="has no images"):
        list_images(tmp_path / "empty")
