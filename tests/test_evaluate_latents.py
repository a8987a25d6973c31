"""`noiserater evaluate` on a checkpoint trained on a latent cache: samples decoded with the cache's VAE,
Inception FID against the cache's SOURCE image folder (read as cache-latents read it, streamed in batches).
Everything is tiny and offline: a random AutoencoderKL, a random InceptionV3, six images, a 1-step DiT."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

pytest.importorskip("diffusers")

from noiserater.cli import main  # noqa: E402
from noiserater.data import load_dataset  # noqa: E402
from noiserater.data.latents import LatentCacheError, cache_latents  # noqa: E402
from noiserater.eval.extractors import Extractor
from noiserater.eval.frechet import feature_stats
from noiserater.eval.inception import InceptionV3, load_inception
from noiserater.eval.reference import (
    RunningStats,
    folder_reference_features,
    folder_reference_files,
    reference_features,
)
from noiserater.evaluate import EvalConfig, evaluate_checkpoint
from noiserater.train import TrainConfig, train

RES = 32  # pixels; the tiny VAE downsamples 4x -> 4x8x8 latents


def make_tiny_vae(path: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=RES, scaling_factor=0.18215)
    vae.save_pretrained(path)
    return path


def write_folder(root: Path) -> None:
    """Six images in two classes: square, wide, tall with an odd margin (a fractional crop offset), larger
    than RES (a real downscale), greyscale and RGBA; plus a file that is not an image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    shapes = {"a_cat/0.png": (RES, RES, 3), "a_cat/1.png": (40, 64, 3), "a_cat/2.jpg": (50, 33, 3),
              "b_dog/0.png": (48, 48), "b_dog/1.png": (RES, RES, 4), "b_dog/2.png": (45, 45, 3)}
    for rel, shape in shapes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        # smooth images (low-frequency noise, upsampled) so that cropping and resizing matter to the features
        small = rng.integers(0, 256, (4, 4, *shape[2:]), dtype=np.uint8)
        Image.fromarray(small).resize((shape[1], shape[0]), Image.Resampling.BILINEAR).save(root / rel)
    (root / "a_cat" / "notes.txt").write_text("not an image")


def my_load(path: Path, crop: str = "center") -> np.ndarray:
    """The test's own reading of a source image: RGB, the largest centred square, bicubic to RES x RES
    (PIL resamples the fractional box directly, as a center crop of an odd margin needs)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        left, top = ((w - s) / 2, (h - s) / 2) if crop == "center" else (0, 0)
        return np.asarray(im.resize((RES, RES), Image.Resampling.BICUBIC, box=(left, top, left + s, top + s)))


def my_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg"))


def to_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("evlat")
    folder = base / "images"
    write_folder(folder)
    vae = make_tiny_vae(base / "vae")
    cache = base / "cache"
    res = cache_latents(folder, vae, cache, resolution=RES, batch_size=4, device="cpu", progress=False)
    assert res.complete and res.done_images == 6
    run = base / "run"
    train(TrainConfig(data=str(cache), model="DiT-N/2", run_dir=str(run), steps=1, batch_size=4, log_every=1,
                      sample_every=1000, ckpt_every=1000, sample_steps=2, tensorboard=False, progress=False))
    torch.manual_seed(0)
    net = InceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial BatchNorm statistics, as in tests/test_evaluate.py
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, torch.nn.Conv2d):  # variance-preserving: the default init's pool3 features barely
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # vary (std 1e-8) between images
    weights = base / "pt_inception-random.pth"
    torch.save(net.state_dict(), weights)
    return {"base": base, "folder": folder, "vae": vae, "cache": cache, "weights": weights,
            "checkpoint": run / "checkpoints" / "latest.pt", "refcache": base / "nr-cache"}


def _evaluate(setup, **kw):
    cfg = dict(checkpoint=str(setup["checkpoint"]), num_samples=4, steps=2, extractors="inception",
               inception_weights=str(setup["weights"]), cache_dir=str(setup["refcache"]), progress=False,
               batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random weights are "not the standard FID Inception weights"
        return evaluate_checkpoint(EvalConfig(**{**cfg, **kw}))


def test_latent_checkpoint_inception_fid_against_the_source_folder(setup):
    rec = _evaluate(setup)[0]
    assert math.isfinite(rec["fid"]) and rec["fid"] > 0
    assert 0 <= rec["precision"] <= 1 and 0 <= rec["recall"] <= 1
    assert rec["class_accuracy"] is None  # no dataset classifier for latent checkpoints
    ref = rec["reference"]
    assert ref["source"] == str(setup["folder"].resolve()) and ref["resolution"] == RES and ref["split"] == "all"
    assert ref["num_images"] == ref["available_images"] == len(my_files(setup["folder"])) == 6
    assert rec["latent"]["decoded"] and rec["latent"]["image_size"] == RES
    assert Path(rec["latent"]["vae"]) == setup["vae"].resolve()
    assert rec["data"] == str(setup["cache"].resolve()) and rec["extractor"] == "inception"
    lines = (setup["checkpoint"].parent.parent / "eval.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["fid"] == rec["fid"]

    # Independent check of the reference statistics: read the folder with PIL here, run the same network
    # (not through the Extractor), np.mean / np.cov.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, _ = load_inception(setup["weights"])
    files = my_files(setup["folder"])
    with torch.no_grad():
        feats = net(to_batch([my_load(f) for f in files])).double().numpy()
        wrong = net(to_batch([my_load(f, crop="corner") for f in files])).double().numpy()
    with np.load(ref["stats_cache"]) as z:
        mu, sigma, n = z["mu"], z["sigma"], int(z["n"])
    assert n == 6
    scale_mu, scale_sigma = np.abs(feats.mean(0)).max(), np.abs(np.cov(feats, rowvar=False)).max()
    np.testing.assert_allclose(mu, feats.mean(0), rtol=0, atol=1e-4 * scale_mu)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=0, atol=1e-4 * scale_sigma)
    # the check can tell preprocessings apart: a top-left crop gives statistics far outside that tolerance
    assert np.abs(np.cov(wrong, rowvar=False) - sigma).max() > 100 * 1e-4 * scale_sigma


def test_reference_override_missing_source_and_missing_cache(setup, tmp_path, monkeypatch):
    import noiserater.evaluate as ev

    # scipy's sqrtm of a 2048x2048 matrix takes ~10 s on one thread; the FID itself is checked above
    monkeypatch.setattr(ev, "frechet_distance", lambda m1, s1, m2, s2: float(((m1 - m2) ** 2).sum()))
    # a second cache made from a copy of the folder, which is then deleted
    gone = tmp_path / "moved-away"
    shutil.copytree(setup["folder"], gone)
    cache = tmp_path / "cache2"
    cache_latents(gone, setup["vae"], cache, resolution=RES, batch_size=6, device="cpu", progress=False)
    train(TrainConfig(data=str(cache), model="DiT-N/2", run_dir=str(tmp_path / "run"), steps=1, batch_size=4,
                      log_every=1, sample_every=1000, ckpt_every=1000, sample_steps=2, tensorboard=False,
                      progress=False))
    ckpt = tmp_path / "run" / "checkpoints" / "latest.pt"
    shutil.rmtree(gone)
    s = {**setup, "checkpoint": ckpt}
    with pytest.raises(LatentCacheError, match=f"{gone}.*does not exist.*--reference FOLDER"):
        _evaluate(s, record=False)
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(ckpt), "--extractors", "inception",
                                  "--inception-weights", str(setup["weights"]), "--no-progress", "--no-record"])
    assert r.exit_code == 2 and str(gone) in r.stderr and "--reference FOLDER" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # --reference wins: the original folder (its statistics are already cached by the test above)
    rec = _evaluate(s, record=False, reference=str(setup["folder"]))[0]
    assert rec["reference"]["source"] == str(setup["folder"].resolve()) and rec["reference"]["num_images"] == 6
    assert math.isfinite(rec["fid"])
    with pytest.raises(LatentCacheError, match="is a latent cache"):
        _evaluate(s, record=False, reference=str(setup["cache"]))
    with pytest.raises(LatentCacheError, match="reference-split"):
        _evaluate(s, record=False, reference=str(setup["folder"]), reference_split="val")
    # the cache itself gone: its header named the source folder
    shutil.rmtree(cache)
    with pytest.raises(LatentCacheError, match=f"{cache}.*cannot be read.*--reference FOLDER"):
        _evaluate(s, record=False)


def test_classifier_extractor_on_a_latent_checkpoint_is_a_clear_error(setup):
    for names in ("classifier", "classifier,inception"):
        with pytest.raises(ValueError, match="classifier.*does not apply.*--extractors inception.*--inception-weights"):
            _evaluate(setup, extractors=names, record=False)
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(setup["checkpoint"]), "--no-progress"])
    assert r.exit_code == 2 and "--extractors inception" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- the streaming reference statistics with a cheap extractor ---------------------------------------------


def pooled_extractor(name: str = "pool") -> Extractor:
    """Average-pooled pixels (3 x 4 x 4 = 48 features): cheap, and sensitive to every preprocessing step."""
    fn = lambda x: F.adaptive_avg_pool2d(x, 4).flatten(1)  # noqa: E731
    return Extractor(name, f"{name}-key", torch.nn.Identity(), fn, {})


def test_running_stats_equal_numpy_over_any_batching():
    x = np.random.default_rng(0).normal(size=(103, 7)) * 50 + 1000  # a large offset: the merge must stay exact
    for bs in (1, 2, 10, 103):
        st = RunningStats()
        for i in range(0, len(x), bs):
            st.update(x[i:i + bs])
        mu, sigma = st.stats()
        np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9)


def test_folder_reference_streams_in_batches_and_caps_with_a_seeded_subset(setup, tmp_path):
    folder, ex = setup["folder"], pooled_extractor()
    files = my_files(folder)
    feats = ex.feature_fn(to_batch([my_load(f) for f in files])).double().numpy()
    full = folder_reference_features(folder, RES, ex, tmp_path, batch_size=4, progress=False, max_pr=3)
    assert (full["n"], full["available"], full["cached"]) == (6, 6, False)
    np.testing.assert_allclose(full["mu"], feats.mean(0), atol=1e-6)
    np.testing.assert_allclose(full["sigma"], np.cov(feats, rowvar=False), atol=1e-6)
    pick = np.random.default_rng(0).choice(6, 3, replace=False)  # the same rows as when all are in memory
    np.testing.assert_allclose(full["pr_features"], feats[pick], atol=1e-6)
    again = folder_reference_features(folder, RES, ex, tmp_path, batch_size=1, progress=False, max_pr=3)
    assert again["cached"] and again["path"] == full["path"]
    # a capped reference: a seeded subset, its own cache file, the same subset every time
    capped = folder_reference_features(folder, RES, ex, tmp_path, batch_size=2, progress=False, max_images=4)
    assert (capped["n"], capped["available"]) == (4, 6) and capped["path"] != full["path"]
    chosen, available = folder_reference_files(folder, 4)
    assert available == 6 and len(chosen) == 4 and chosen == folder_reference_files(folder, 4)[0]
    rows = [[str(f.relative_to(folder)) for f in files].index(c) for c in chosen]
    np.testing.assert_allclose(capped["mu"], feats[rows].mean(0), atol=1e-6)
    np.testing.assert_allclose(capped["sigma"], np.cov(feats[rows], rowvar=False), atol=1e-6)
    # another resolution is another reference
    other = folder_reference_features(folder, 16, ex, tmp_path, batch_size=4, progress=False)
    assert other["path"] != full["path"] and not np.allclose(other["sigma"], full["sigma"], atol=1e-3)


def test_dataset_reference_shares_the_implementation_and_matches_all_at_once(tmp_path):
    ex = pooled_extractor()
    data = load_dataset("digits", "val")
    feats = ex(data.images)
    ref = reference_features("digits", "val", ex, tmp_path, batch_size=64, progress=False, max_pr=50)
    mu, sigma = feature_stats(feats)
    np.testing.assert_allclose(ref["mu"], mu, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-9, atol=1e-12)
    pick = np.random.default_rng(0).choice(len(feats), 50, replace=False)
    np.testing.assert_array_equal(ref["pr_features"], feats[pick].astype(np.float32))
    assert ref["n"] == 180 and Path(ref["path"]).name == f"digits-val-{ex.key}.npz"
