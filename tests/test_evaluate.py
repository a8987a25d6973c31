"""FID, precision/recall, extractors and `noiserater evaluate`, against closed forms and independent references
(numpy eigendecompositions, torchmetrics' FID, brute-force k-NN with scipy and scikit-learn)."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from scipy.spatial.distance import cdist

from noiserater.checkpoint import CheckpointError
from noiserater.cli import main
from noiserater.config import ConfigError
from noiserater.data import load_dataset
from noiserater.eval.classifier import classifier_path, get_classifier
from noiserater.eval.extractors import build_extractor
from noiserater.eval.frechet import feature_stats, fid_from_features, frechet_distance, knn_radii, precision_recall
from noiserater.eval.inception import InceptionV3, load_inception
from noiserater.eval.reference import reference_features
from noiserater.evaluate import EvalConfig, evaluate_checkpoint
from noiserater.train import TrainConfig, train


def _sqrt_psd(m):
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def closed_form_fid(mu1, s1, mu2, s2):
    """Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)) (similar matrices), with symmetric eigh roots."""
    r1 = _sqrt_psd(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrt_psd(r1 @ s2 @ r1)))


def random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (1e-3 * np.eye(d) if rank is None else 0)


# ---- Frechet distance ------------------------------------------------------------------------------------


def test_frechet_distance_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("d", [3, 16])
def test_frechet_distance_general_gaussians_closed_form(d):
    rng = np.random.default_rng(d)
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), random_cov(rng, d), random_cov(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed_form_fid(mu1, s1, mu2, s2), rel=1e-7)
    # symmetric, and zero between a distribution and itself
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-7)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_fid_of_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(1)
    d = 4
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d) + 1, random_cov(rng, d), random_cov(rng, d)
    a = rng.multivariate_normal(mu1, s1, size=40000)
    b = rng.multivariate_normal(mu2, s2, size=40000)
    expect = closed_form_fid(mu1, s1, mu2, s2)
    assert fid_from_features(a, b) == pytest.approx(expect, rel=0.03)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    assert abs(fid_from_features(x, x)) < 1e-6
    # rank-deficient covariance (fewer samples than dimensions) still gives ~0 and a finite number
    y = rng.normal(size=(20, 64))
    assert abs(fid_from_features(y, y)) < 1e-3
    assert math.isfinite(fid_from_features(y, rng.normal(size=(20, 64))))


def test_feature_stats_match_numpy_and_reject_bad_shapes():
    x = np.random.default_rng(3).normal(size=(50, 5))
    mu, sigma = feature_stats(torch.from_numpy(x))
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.T, ddof=1))
    with pytest.raises(ValueError, match="N>=2"):
        feature_stats(x[:1])
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


@pytest.mark.parametrize("d,n", [(8, 500), (64, 200)])
def test_fid_agrees_with_torchmetrics(d, n):
    tm = pytest.importorskip("torchmetrics.image.fid")

    class Identity(torch.nn.Module):
        num_features = d

        def forward(self, x):
            return x

    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.5
    metric = tm.FrechetInceptionDistance(feature=Identity())
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    assert fid_from_features(a, b) == pytest.approx(float(metric.compute()), rel=1e-6)


# ---- precision / recall ------------------------------------------------------------------------------------


def brute_force_pr(real, fake, k):
    def radii(x):
        d = cdist(x, x)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    rr, rf = radii(real), radii(fake)
    d = cdist(fake, real)  # [fake, real]
    precision = np.mean([any(d[j, i] <= rr[i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(d[j, i] <= rf[j] for j in range(len(fake))) for i in range(len(real))])
    return precision, recall


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(120, 5))
    fake = rng.normal(size=(90, 5)) * 0.8 + 0.8
    out = precision_recall(real, fake, k)
    p, r = brute_force_pr(real, fake, k)
    assert out["precision"] == pytest.approx(p) and out["recall"] == pytest.approx(r)
    assert 0 < out["precision"] < 1 and 0 < out["recall"] < 1


def test_knn_radii_match_scikit_learn():
    from sklearn.neighbors import NearestNeighbors

    x = np.random.default_rng(4).normal(size=(200, 7))
    dist, _ = NearestNeighbors(n_neighbors=4).fit(x).kneighbors(x)  # includes the point itself
    np.testing.assert_allclose(knn_radii(x, k=3, chunk=64).numpy(), dist[:, 3], rtol=1e-10)


def test_precision_recall_identical_sets_one_and_far_sets_zero():
    x = np.random.default_rng(5).normal(size=(150, 10))
    assert precision_recall(x, x, 3) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(x, x + 1000.0, 3) == {"precision": 0.0, "recall": 0.0}
    # a collapsed generator (every sample near one real point): high precision, low recall
    collapsed = x[:1] + 1e-3 * np.random.default_rng(6).normal(size=(150, 10))
    out = precision_recall(x, collapsed, 3)
    assert out["precision"] == 1.0 and out["recall"] < 0.1


# ---- the dataset classifier and classifier-FID on real digits -----------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache folder for the module: the digits classifier is trained once (a few seconds)."""
    return tmp_path_factory.mktemp("nr-cache")


@pytest.fixture(scope="module")
def digits_extractor(cache):
    return build_extractor("classifier", "digits", cache, progress=False)


def test_digits_classifier_accuracy_is_recorded_and_cached(cache, digits_extractor):
    info_file = classifier_path("digits", cache).with_suffix(".json")
    info = json.loads(info_file.read_text())
    assert info["test_accuracy"] > 0.95 and info["test_images"] >= 300
    assert digits_extractor.info["test_accuracy"] == info["test_accuracy"]
    again, info2 = get_classifier("digits", cache, progress=False)  # loaded from the cache, not retrained
    assert info2["sha256"] == info["sha256"]
    x = load_dataset("digits", "val").images[:16]
    np.testing.assert_array_equal(digits_extractor(x), build_extractor("classifier", "digits", cache)(x))


def _blur(x, sigma):
    r = 2
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = (k / k.sum())
    k2 = (k[:, None] * k[None, :])[None, None]
    return F.conv2d(F.pad(x, (r,) * 4, mode="replicate"), k2)


def test_classifier_fid_grows_as_real_digits_are_degraded(digits_extractor):
    data = load_dataset("digits", "all")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    ref, held = data.images[perm[:900]], data.images[perm[900:]]
    ref_feats = digits_extractor(ref)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(held.shape, generator=g)

    def fid(x):
        return fid_from_features(ref_feats, digits_extractor(x.clamp(-1, 1)))

    clean = fid(held)
    noisy = [fid(held + s * noise) for s in (0.2, 0.5, 1.0)]
    blurred = [fid(_blur(held, s)) for s in (0.5, 1.0, 2.0)]
    assert clean < noisy[0] < noisy[1] < noisy[2], (clean, noisy)
    assert clean < blurred[0] < blurred[1] < blurred[2], (clean, blurred)
    assert noisy[2] > 10 * max(clean, 1e-3)
    # precision of heavily noised digits drops
    pr_clean = precision_recall(ref_feats, digits_extractor(held))
    pr_noisy = precision_recall(ref_feats, digits_extractor((held + noise).clamp(-1, 1)))
    assert pr_noisy["precision"] < pr_clean["precision"]


def test_reference_features_are_cached_by_dataset_split_and_extractor(cache, digits_extractor):
    first = reference_features("digits", "val", digits_extractor, cache, progress=False)
    again = reference_features("digits", "val", digits_extractor, cache, progress=False)
    assert not first["cached"] and again["cached"] and first["path"] == again["path"]
    name = Path(first["path"]).name
    assert name.startswith("digits-val-") and digits_extractor.key in name
    assert first["n"] == 180
    np.testing.assert_allclose(again["mu"], first["mu"])
    np.testing.assert_allclose(again["sigma"], first["sigma"])
    other = reference_features("digits", "train", digits_extractor, cache, progress=False)
    assert other["path"] != first["path"] and other["n"] == 1617


# ---- InceptionV3 from a local weights file ------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A randomly initialised InceptionV3's state dict, saved like the real weight files (the real file cannot
    be fetched here); the BatchNorm batch counters are dropped as in the original converted weights."""
    torch.manual_seed(0)
    net = InceptionV3()
    for m in net.modules():  # non-trivial BatchNorm statistics, so a load that ignored them would be caught
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("inc") / "pt_inception-random.pth"
    torch.save(state, path)
    return path, state


def test_inception_loads_weights_from_a_path(inception_file):
    path, state = inception_file
    with pytest.warns(UserWarning, match="not the standard FID Inception"):
        model, digest = load_inception(path)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
    assert len(digest) == 64 and not model.training
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    with torch.no_grad():
        f = model(torch.rand(1, 1, 8, 8) * 2 - 1)
    assert f.shape == (1, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # pool3 of ReLU outputs


def test_inception_missing_or_wrong_files_fail_clearly(tmp_path, inception_file):
    with pytest.raises(CheckpointError, match="needs a local weights file.*pt_inception-2015-12-05"):
        load_inception(None)
    with pytest.raises(CheckpointError, match="not found at .*nope.pth.*downloads nothing"):
        load_inception(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch weights file"):
        load_inception(junk)
    listed = tmp_path / "list.pth"
    torch.save([1, 2, 3], listed)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_inception(listed)
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), other)
    with pytest.raises(CheckpointError, match="not an InceptionV3 FID weights file.*missing keys"):
        load_inception(other)
    _, state = inception_file
    bad = dict(state)
    bad["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(192, 2048, 3, 3)
    shaped = tmp_path / "shaped.pth"
    torch.save(bad, shaped)
    with pytest.raises(CheckpointError, match=r"Mixed_7c.branch_pool.conv.weight is \(192, 2048, 3, 3\)"):
        load_inception(shaped)
    tv = dict(state)
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    tv["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    tv_path = tmp_path / "inception_v3_google.pth"
    torch.save(tv, tv_path)
    with pytest.raises(CheckpointError, match="torchvision's ImageNet InceptionV3"):
        load_inception(tv_path)


def test_inception_rejects_latent_channels(inception_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = load_inception(inception_file[0])
    with pytest.raises(ValueError, match="1- or 3-channel"):
        model(torch.zeros(1, 4, 8, 8))


# ---- `noiserater evaluate` end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(TrainConfig(data="digits", model="DiT-N/2", run_dir=str(run), steps=1, batch_size=8, log_every=1,
                      sample_every=1000, ckpt_every=1000, tensorboard=False, progress=False))
    return run / "checkpoints" / "latest.pt"


def test_evaluate_is_repeatable_and_records_everything(untrained_checkpoint, cache):
    args = ["evaluate", "--checkpoint", str(untrained_checkpoint), "--num-samples", "40", "--sample-steps", "3",
            "--cache-dir", str(cache), "--no-progress", "--batch-size", "32"]
    r1 = CliRunner().invoke(main, args)
    assert r1.exit_code == 0, r1.output
    assert "FID" in r1.output and "classifier test accuracy" in r1.output
    r2 = CliRunner().invoke(main, args + ["--as-json"])
    assert r2.exit_code == 0, r2.output
    lines = (untrained_checkpoint.parent.parent / "eval.jsonl").read_text().splitlines()
    assert len(lines) == 2
    a, b = (json.loads(s) for s in lines)
    assert a["fid"] == b["fid"] and a["precision"] == b["precision"] and a["class_accuracy"] == b["class_accuracy"]
    for key, value in {"num_samples": 40, "sampler": "ddim", "steps": 3, "cfg_scale": 1.0, "ema": True,
                       "extractor": "classifier", "seed": 0, "labels": "cycle", "checkpoint_step": 1}.items():
        assert a[key] == value, key
    assert a["reference"]["source"] == "digits" and a["reference"]["split"] == "all"
    assert a["reference"]["num_images"] == 1797
    assert a["extractor_info"]["test_accuracy"] > 0.95
    assert a["fid"] > 0 and 0 <= a["class_accuracy"] <= 1
    # a different seed gives different samples
    rec = evaluate_checkpoint(EvalConfig(checkpoint=str(untrained_checkpoint), num_samples=40, steps=3, seed=1,
                                         cache_dir=str(cache), record=False, progress=False))[0]
    assert rec["fid"] != a["fid"]


def test_evaluate_bad_inputs_are_one_line_errors(untrained_checkpoint, cache, tmp_path):
    def run(*extra):
        return CliRunner().invoke(main, ["evaluate", "--cache-dir", str(cache), "--no-progress", *extra])

    r = run("--checkpoint", str(untrained_checkpoint), "--extractors", "vgg")
    assert r.exit_code != 0 and "extractors" in r.output
    r = run("--checkpoint", str(untrained_checkpoint), "--extractors", "inception", "--num-samples", "4",
            "--sample-steps", "1", "--no-record")
    assert r.exit_code == 2 and "inception-weights" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("--checkpoint", str(tmp_path / "missing.pt"))
    assert r.exit_code == 2 and "checkpoint not found" in r.stderr
    with pytest.raises(ConfigError, match="num_samples"):
        EvalConfig(checkpoint="x", num_samples=1).validate()


def test_inception_extractor_identity_and_features(inception_file):
    path, _ = inception_file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = build_extractor("inception", "digits", inception_weights=path, progress=False)
    assert ex.key.startswith("inception-pool3-") and ex.info["sha256"].startswith(ex.key.split("-")[-1])
    assert ex.info["standard_weights"] is False and ex.max_batch == 64
    feats = ex(load_dataset("digits", "val").images[:2], batch_size=1)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()


@pytest.mark.slow
def test_evaluate_with_inception_end_to_end(untrained_checkpoint, inception_file, cache, monkeypatch):
    monkeypatch.setenv("NOISERATER_INCEPTION_WEIGHTS", str(inception_file[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = evaluate_checkpoint(EvalConfig(checkpoint=str(untrained_checkpoint), num_samples=8, steps=2,
                                              extractors="classifier,inception", reference_split="val",
                                              cache_dir=str(cache), record=False, progress=False))
    assert [r["extractor"] for r in recs] == ["classifier", "inception"]
    inc = recs[1]
    assert inc["reference"]["num_images"] == 180 and inc["extractor_info"]["standard_weights"] is False
    assert math.isfinite(inc["fid"]) and inc["class_accuracy"] == recs[0]["class_accuracy"]


# ---- the module layout: noiserater.eval underneath, noiserater.evaluate on top ----------------------------------


def test_the_eval_modules_import_downward_only():
    """No module of ``noiserater.eval`` imports ``noiserater.evaluate`` (or the CLI), anywhere in the file."""
    import ast

    import noiserater.eval

    for path in sorted(Path(noiserater.eval.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                assert mod not in ("..evaluate", "noiserater.evaluate"), path.name
                assert not mod.startswith(("..commands", "noiserater.commands", "..cli")), path.name
                if node.module is None:  # from .. import evaluate
                    assert not {a.name for a in node.names} & {"evaluate", "commands", "cli"}, path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith(("noiserater.evaluate", "noiserater.commands")) for a in node.names)
