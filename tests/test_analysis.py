"""Rater analysis (paper 5.3) against scipy's Spearman and direct per-noise scoring; stage matching (eq. 10)
on synthetic loss curves with known answers and against a brute-force reading of the equation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy import stats

from noiserater.analysis.rater_stats import (
    AnalyzeConfig,
    StagesConfig,
    analyze_rater,
    analyze_stages,
    first_stable_index,
    integer_timesteps,
    match_stage,
    normalized_timesteps,
    rater_statistics,
    read_loss_log,
    rowwise_spearman,
    smooth_loss,
)
from noiserater.checkpoint import CheckpointError
from noiserater.cli import main
from noiserater.models.loading import save_rater
from noiserater.models.rater import build_rater
from noiserater.train import TrainConfig, train

# ---- building blocks -------------------------------------------------------------------------------------


def test_timesteps_are_the_papers_eleven_mapped_to_integers():
    tn = normalized_timesteps()
    assert tn == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert integer_timesteps(tn, 1000) == [0, 100, 200, 300, 400, 500, 599, 699, 799, 899, 999]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        integer_timesteps([1.5])


def test_rowwise_spearman_matches_scipy_including_ties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 16))
    b = rng.normal(size=(40, 16))
    a[:10] = np.round(a[:10])  # ties
    b[5:15] = np.round(b[5:15] * 2)
    got = rowwise_spearman(a, b)
    want = [stats.spearmanr(a[i], b[i]).statistic for i in range(40)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # monotone transforms give +-1; a constant row has no correlation
    assert rowwise_spearman(np.exp(b[:1]), b[:1])[0] == pytest.approx(1.0)
    assert rowwise_spearman(-b[:1] ** 3, b[:1])[0] == pytest.approx(-1.0)
    assert np.isnan(rowwise_spearman(np.ones((1, 16)), b[:1])[0])


class NormRater(torch.nn.Module):
    """A hand-written rater: score = sign * ||eps|| (+ a timestep-dependent offset), so the answers are known."""

    def __init__(self, sign=1.0, constant=False):
        super().__init__()
        self.sign, self.constant = sign, constant

    def score_candidates(self, eps, t, x0, y):
        s = self.sign * eps.flatten(2).norm(dim=-1) + t[:, None].float() / 1000
        return torch.zeros_like(s) + t[:, None].float() if self.constant else s


def test_statistics_of_raters_with_known_answers():
    x0 = torch.zeros(5, 1, 8, 8)
    y = torch.zeros(5, dtype=torch.long)
    up = rater_statistics(NormRater(1.0), x0, y, num_noises=8)
    down = rater_statistics(NormRater(-1.0), x0, y, num_noises=8)
    flat = rater_statistics(NormRater(constant=True), x0, y, num_noises=8)
    assert up["spearman"].shape == (5, 11)
    np.testing.assert_allclose(up["spearman"], 1.0)
    np.testing.assert_allclose(down["spearman"], -1.0)
    assert np.isnan(flat["spearman"]).all() and (flat["score_std"] == 0).all()
    # score std = population std of the noise norms (the offset does not change it), identical at every t
    g = torch.Generator().manual_seed(0 * 1_000_003 + 0 + 0)
    norms = torch.randn((8, 1, 8, 8), generator=g).flatten(1).double().norm(dim=-1).numpy()
    np.testing.assert_allclose(up["score_std"][0], norms.std(), rtol=1e-6)


def test_statistics_of_a_real_rater_match_direct_per_noise_scoring():
    torch.manual_seed(0)
    rater = build_rater("Rater-N/2", input_size=8, in_channels=1, num_classes=10).eval()
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    y = torch.tensor([1, 4, 10])  # 10 = null class
    tn = [0.0, 0.5, 1.0]
    s = rater_statistics(rater, x0, y, num_noises=6, timesteps=tn, seed=3, batch_size=2)
    s1 = rater_statistics(rater, x0, y, num_noises=6, timesteps=tn, seed=3, batch_size=3)
    np.testing.assert_allclose(s["spearman"], s1["spearman"], atol=1e-6)  # batch size does not matter
    np.testing.assert_allclose(s["score_std"], s1["score_std"], rtol=1e-5)
    i = 2  # image 2 of the first call sits in the second batch (start 2, offset 0)
    eps = torch.randn((6, 1, 8, 8), generator=torch.Generator().manual_seed(3 * 1_000_003 + 2 + 0))
    for k, t in enumerate(integer_timesteps(tn)):
        with torch.no_grad():
            scores = torch.stack([rater(eps[m:m + 1], torch.tensor([t]), x0[i:i + 1], y[i:i + 1])[0]
                                  for m in range(6)]).double().numpy()
        norms = eps.flatten(1).double().norm(dim=-1).numpy()
        assert s["spearman"][i, k] == pytest.approx(stats.spearmanr(scores, norms).statistic, abs=1e-6)
        assert s["score_std"][i, k] == pytest.approx(scores.std(), rel=1e-4)


# ---- end to end on tiny checkpoints -----------------------------------------------------------------------


def _tiny_run(folder: Path, steps: int) -> str:
    train(TrainConfig(data="digits", model="DiT-N/2", run_dir=str(folder), steps=steps, batch_size=8, log_every=1,
                      sample_every=1000, ckpt_every=1000, tensorboard=False, progress=False))
    return str(folder / "checkpoints" / "latest.pt")


@pytest.fixture(scope="module")
def stage_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    return [_tiny_run(root / "a", 1), _tiny_run(root / "b", 2)]


def _rater_file(path: Path, seed: int, name="Rater-N/2", size=8) -> str:
    torch.manual_seed(seed)
    save_rater(path, build_rater(name, input_size=size, in_channels=1, num_classes=10))
    return str(path)


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 100


def test_analyze_rater_writes_statistics_and_figures(tmp_path, stage_checkpoints):
    rater = _rater_file(tmp_path / "rater.pt", 0)
    out = tmp_path / "an"
    r = CliRunner().invoke(main, ["analyze", "rater", "--rater", rater, "--checkpoint", stage_checkpoints[0],
                                  "--num-images", "6", "--num-noises", "5", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "analysis.json").read_text())
    assert len(s["by_t"]) == 11 and s["timesteps_int"][-1] == 999 and s["num_noises"] == 5
    assert s["by_t"][3]["spearman"]["n"] + s["by_t"][3]["spearman"]["nan"] == 6
    z = np.load(out / "stats.npz")
    assert z["spearman"].shape == (6, 11) and np.isfinite(z["score_std"]).all()
    assert s["by_t"][0]["score_std"]["mean"] == pytest.approx(z["score_std"][:, 0].mean())
    for name in ("spearman_vs_t.png", "score_std_vs_t.png", "violins_t.png"):
        assert _is_png(out / name)


def test_analyze_rater_errors(tmp_path, stage_checkpoints):
    big = _rater_file(tmp_path / "r32.pt", 0, size=32)
    with pytest.raises(CheckpointError, match="input_size=32"):
        analyze_rater(AnalyzeConfig(rater=big, checkpoint=stage_checkpoints[0], num_images=2, num_noises=2,
                                    progress=False), write=False)
    with pytest.raises(ValueError, match="--data"):
        analyze_rater(AnalyzeConfig(rater=big, num_images=2, progress=False), write=False)
    r = CliRunner().invoke(main, ["analyze", "rater", "--rater", str(tmp_path / "none.pt"), "--data", "digits"])
    assert r.exit_code == 2 and "checkpoint not found" in r.stderr


def test_stage_series_with_given_raters(tmp_path, stage_checkpoints):
    calls = []

    def factory(ckpt, folder):
        calls.append(ckpt)
        return _rater_file(folder / "rater.pt", seed=len(calls))

    cfg = StagesConfig(checkpoints=",".join(reversed(stage_checkpoints)), out=str(tmp_path / "st"), num_images=4,
                       num_noises=4, timesteps=3, progress=False)
    s = analyze_stages(cfg, rater_factory=factory, log=lambda m: None)
    assert [row["step"] for row in s["stages"]] == [1, 2]  # sorted by training step
    assert calls == list(stage_checkpoints)
    for name in ("stages.png", "stages_by_t.png", "violins_t.png"):
        assert _is_png(tmp_path / "st" / name)
    assert len(s["by_t_pooled_over_stages"]) == 3
    assert s["by_t_pooled_over_stages"][0]["spearman"]["n"] + s["by_t_pooled_over_stages"][0]["spearman"]["nan"] == 8
    again = analyze_stages(cfg, rater_factory=factory, log=lambda m: None)  # finished stages are reused
    assert len(calls) == 2 and again["stages"] == json.loads(json.dumps(s["stages"]))
    with pytest.raises(ValueError, match="same training step"):
        analyze_stages(StagesConfig(checkpoints=f"{stage_checkpoints[0]},{stage_checkpoints[0]}",
                                    out=str(tmp_path / "dup"), progress=False), rater_factory=factory)


def test_stage_series_meta_trains_a_short_rater_per_stage(tmp_path, stage_checkpoints):
    pytest.importorskip("noiserater.metatrain")
    cfg = StagesConfig(checkpoints=stage_checkpoints[1], out=str(tmp_path / "mt"), rater="Rater-N/2",
                       meta_outer_steps=1, num_images=3, num_noises=3, timesteps=2, progress=False)
    from noiserater.analysis.rater_stats import metatrain_rater_factory

    factory = metatrain_rater_factory(1, "Rater-N/2", progress=False, inner_lr=0.1, batch_size=2, val_batch_size=4,
                                      candidates=2, inner_steps=1)
    s = analyze_stages(cfg, rater_factory=factory, log=lambda m: None)
    rater = Path(s["stages"][0]["rater"])
    assert rater.exists() and rater.parent.name == "metatrain"
    assert (rater.parent / "metrics.jsonl").exists()


# ---- stage matching (paper eq. 10) ---------------------------------------------------------------------------


def brute_force_eq10(smoothed, threshold, W):
    n = len(smoothed)
    for t in range(n - W):
        if all(smoothed[u] <= threshold for u in range(t, t + W + 1)):
            return t
    return None


def test_first_stable_index_matches_a_literal_reading_of_eq10():
    rng = np.random.default_rng(0)
    for trial in range(200):
        v = np.cumsum(rng.normal(size=rng.integers(5, 60)))
        thr = float(rng.choice(v))
        W = int(rng.integers(0, 8))
        assert first_stable_index(v, thr, W) == brute_force_eq10(v, thr, W), trial


def _write_log(path: Path, steps, losses, extra_lines=()) -> Path:
    lines = [json.dumps({"step": int(s), "loss": float(l)}) for s, l in zip(steps, losses)]
    path.write_text("\n".join([*extra_lines, *lines]) + "\n")
    return path


def test_spurious_dip_is_ignored_thanks_to_the_stability_window(tmp_path):
    steps = np.arange(0, 100) * 10
    source = _write_log(tmp_path / "s.jsonl", steps, np.linspace(1.0, 0.2, 100))  # at step 500: ~0.596
    loss = np.full(100, 0.9)
    loss[20] = 0.1  # a single-step dip at step 200
    loss[60:] = 0.5  # the real crossing at step 600
    target = _write_log(tmp_path / "t.jsonl", steps, loss)
    assert match_stage(source, 500, target, smooth_window=1, stability_window=5)["target_step"] == 600
    assert match_stage(source, 500, target, smooth_window=1, stability_window=0)["target_step"] == 200


def test_larger_backbone_reaches_the_source_loss_at_half_the_steps(tmp_path):
    """L_B(t) = L_S(2t) (the target learns twice as fast) with noise: the match of source step s is ~s/2."""
    rng = np.random.default_rng(1)
    steps = np.arange(1, 4001) * 10

    def curve(t, speed):
        return 0.1 + 0.5 / (1 + speed * t / 2000) ** 0.7

    s_log = _write_log(tmp_path / "s.jsonl", steps, curve(steps, 1) + rng.normal(0, 0.01, steps.size))
    t_log = _write_log(tmp_path / "t.jsonl", steps, curve(steps, 2) + rng.normal(0, 0.01, steps.size))
    for s in (8000, 20000, 32000):
        out = match_stage(s_log, s, t_log, smooth_window=100, stability_window=200)
        assert out["target_step"] == pytest.approx(s / 2, rel=0.06), (s, out)
        assert out["source_step"] == s
    # the paper's windows on a log too short for them are a clear error
    with pytest.raises(ValueError, match="stability window W=5000"):
        match_stage(s_log, 8000, t_log, smooth_window=100, stability_window=5000)


def test_stage_matching_errors_and_log_parsing(tmp_path):
    steps = np.arange(1, 51) * 10
    s_log = _write_log(tmp_path / "s.jsonl", steps, np.linspace(1, 0.5, 50),
                       extra_lines=['{"step": 5, "event": "nonfinite_skipped", "loss": NaN}', '{"step": 7, "lo'])
    got_steps, got_loss = read_loss_log(s_log)
    assert got_steps[0] == 10 and got_steps.size == 50 and np.isfinite(got_loss).all()
    flat = _write_log(tmp_path / "flat.jsonl", steps, np.full(50, 0.9))
    with pytest.raises(ValueError, match="never stays at or below"):
        match_stage(s_log, 400, flat, smooth_window=3, stability_window=5)
    with pytest.raises(ValueError, match="not in the source log"):
        match_stage(s_log, 99999, flat, smooth_window=3, stability_window=5)
    with pytest.raises(ValueError, match="smoothing window 500"):
        match_stage(s_log, 400, flat)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_loss_log(tmp_path / "nope.jsonl")
    # smoothing is pandas' centred rolling mean
    v = np.arange(10, dtype=float) ** 2
    np.testing.assert_allclose(smooth_loss(v, 3)[1:-1], [(v[i - 1] + v[i] + v[i + 1]) / 3 for i in range(1, 9)])
    r = CliRunner().invoke(main, ["analyze", "match-stage", "--source-log", str(s_log), "--source-step", "300",
                                  "--target-log", str(s_log), "--smooth-window", "3", "--stability-window", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["target_step"] == 300  # a run matched against itself


def test_policy_agreement_against_known_scorers():
    from noiserater.analysis.rater_stats import policy_agreement

    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (40,), generator=g)
    by_norm = policy_agreement(lambda x, t, y, c: c.flatten(2).norm(dim=-1), images, labels, k=4, draws=5)
    assert by_norm["max_norm"] == 1.0 and by_norm["min_norm"] == 0.0 and by_norm["n"] == 200
    closest = policy_agreement(lambda x, t, y, c: -(c - x[:, None]).flatten(2).norm(dim=-1), images, labels, k=4, draws=5)
    assert closest["nearest"] == 1.0
    # scores unrelated to the candidates: each heuristic is matched at chance (1/4), binomial 4-sigma band
    rnd = torch.Generator().manual_seed(1)
    chance = policy_agreement(lambda x, t, y, c: torch.rand(c.shape[:2], generator=rnd), images, labels, k=4, draws=50)
    sigma = (0.25 * 0.75 / chance["n"]) ** 0.5
    assert all(abs(chance[p] - 0.25) < 4 * sigma for p in ("max_norm", "min_norm", "nearest"))
