"""What a rater learned (paper section 5.3) and training-stage matching (paper eq. 10, appendix B.4).

Rater analysis: for N images and M candidate noises per image, score every (image, noise) pair at the
normalised timesteps t in {0.0, 0.1, ..., 1.0} (integer timestep round(t * (T - 1))). Per (image, t):

- the Spearman rank correlation between the M scores and the M noise L2 norms (ties get average ranks;
  a row of constant scores has no correlation and is NaN, counted in the JSON);
- the standard deviation of the M scores (population, ddof=0).

The same M noises are used at every t, so the statistics differ across t only through the rater.
Aggregates by t (paper Fig. 2) and, for a series of diffusion checkpoints with a short rater meta-trained
on each, by training stage (paper Fig. 3) are written as JSON and PNG (matplotlib, Agg canvas).

Stage matching: smooth each training-loss curve with a centred rolling mean (window in LOGGED steps) and
return the first logged step t of the target run such that its smoothed loss stays at or below the source
run's smoothed loss at the source step for every logged step in [t, t + W]:
``t* = min{t : L~_B(t') <= L~_S(s) for all t' in [t, t + W]}``.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, write_json
from ..config import ConfigError, MissingFileError, from_dict, load_yaml, require
from ..data import load_dataset
from ..metatrain import MetaTrainConfig, metatrain
from ..models import DiTSpec
from ..models.loading import load_rater
from ..plotting import figure, label_axes, legend, savefig
from ..run.folder import read_metrics
from ..selection import RENAMED_POLICIES, draw_candidates, get_policy

NUM_TIMESTEPS = 1000
# An odd prime that mixes (seed, image index) into one generator seed for the candidate noises an analysis
# scores: neighbouring seeds do not share a stream (for fewer than 1_000_003 images).
NOISE_SEED_MIX = 1_000_003


def normalized_timesteps(count: int = 11) -> list[float]:
    """``count`` evenly spaced normalised timesteps in [0, 1] (11 -> 0.0, 0.1, ..., 1.0)."""
    if count < 2:
        raise ConfigError(f"need at least 2 timesteps, got {count}")
    return [round(i / (count - 1), 10) for i in range(count)]


def integer_timesteps(normalized: list[float], num_timesteps: int = NUM_TIMESTEPS) -> list[int]:
    """Map t in [0, 1] to the integer timestep round(t * (T - 1))."""
    bad = [t for t in normalized if not 0.0 <= t <= 1.0]
    if bad:
        raise ConfigError(f"normalised timesteps must lie in [0, 1], got {bad}")
    return [int(round(t * (num_timesteps - 1))) for t in normalized]


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` ([..., M] -> [...]); average
    ranks for ties; NaN where either row is constant."""
    from scipy.stats import (
        rankdata,  # scipy.stats takes ~1 s to import: cli.py loads this module (via experiments) for every command
    )

    ra = rankdata(np.asarray(a, np.float64), axis=-1)
    rb = rankdata(np.asarray(b, np.float64), axis=-1)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    den = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


# ---- scoring ----------------------------------------------------------------------------------------------


@torch.no_grad()
def rater_statistics(rater: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, num_noises: int = 16,
                     timesteps: list[float] | None = None, seed: int = 0, batch_size: int = 32,
                     num_timesteps: int = NUM_TIMESTEPS, device: str | torch.device = "cpu",
                     progress: bool = False) -> dict[str, np.ndarray]:
    """Per (image, t) statistics of a rater's scores over ``num_noises`` candidate noises.

    Returns ``spearman``, ``score_std``, ``score_mean`` (each [N, len(timesteps)]) and ``timesteps``.
    The noises of image i are drawn from a generator seeded with (seed, i), so a statistic of one image does
    not depend on the batch size or on N."""
    if num_noises < 2:
        raise ConfigError(f"num_noises must be >= 2 to correlate scores with norms, got {num_noises}")
    tn = timesteps if timesteps is not None else normalized_timesteps()
    ts = integer_timesteps(tn, num_timesteps)
    n = images.shape[0]
    rater = rater.to(device).eval()
    spearman = np.empty((n, len(ts)))
    score_std = np.empty((n, len(ts)))
    score_mean = np.empty((n, len(ts)))
    bar = None
    if progress:
        bar = tqdm(total=n * len(ts), desc="scoring", unit="img*t", dynamic_ncols=True, leave=False)
    for i in range(0, n, batch_size):
        x0 = images[i:i + batch_size].to(device)
        y = labels[i:i + batch_size].to(device)
        eps = torch.stack([torch.randn((num_noises, *x0.shape[1:]),
                                       generator=torch.Generator().manual_seed(seed * NOISE_SEED_MIX + i + j))
                           for j in range(x0.shape[0])]).to(device)
        norms = eps.flatten(2).double().norm(dim=-1).cpu().numpy()
        for ti, t in enumerate(ts):
            tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
            scores = rater.score_candidates(eps, tt, x0, y).double().cpu().numpy()
            spearman[i:i + x0.shape[0], ti] = rowwise_spearman(scores, norms)
            score_std[i:i + x0.shape[0], ti] = scores.std(axis=-1)
            score_mean[i:i + x0.shape[0], ti] = scores.mean(axis=-1)
            if bar is not None:
                bar.update(x0.shape[0])
    if bar is not None:
        bar.close()
    return {"spearman": spearman, "score_std": score_std, "score_mean": score_mean,
            "timesteps": np.asarray(tn), "timesteps_int": np.asarray(ts)}


@torch.no_grad()
def policy_agreement(score_fn: Callable[..., torch.Tensor], images: torch.Tensor, labels: torch.Tensor, k: int = 4,
                     draws: int = 8, seed: int = 0, batch_size: int = 256,
                     policies: tuple[str, ...] = ("max_norm", "min_norm", "nearest")) -> dict[str, Any]:
    """How often the top-scored of k fresh Gaussian candidates is the one each heuristic policy picks.

    ``score_fn(x0 [B,C,H,W], t [B], y [B], candidates [B,k,C,H,W]) -> scores [B,k]``. Every image is drawn
    ``draws`` times with new candidates and a uniform integer timestep. Chance agreement is 1/k; a rater
    that agrees with ``max_norm`` far above chance acts as a norm filter, one near chance with every
    heuristic selects by something else. Returns {policy: fraction, 'chance': 1/k, 'n': picks} (``nearest``,
    the key of earlier records, is the policy now called ``knn``)."""
    g = torch.Generator().manual_seed(seed)
    x0, y = images.repeat(draws, 1, 1, 1), labels.repeat(draws)
    t = torch.randint(0, NUM_TIMESTEPS, (x0.shape[0],), generator=g)
    cand = draw_candidates(x0, k, g)
    hits = {p: 0 for p in policies}
    for i in range(0, x0.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        pick = score_fn(x0[sl], t[sl], y[sl], cand[sl]).argmax(dim=1).cpu()
        for p in policies:
            hits[p] += int((get_policy(RENAMED_POLICIES.get(p, p), k).select(x0[sl], t[sl], y[sl], cand[sl])[1].cpu()
                            == pick).sum())
    return {**{p: hits[p] / x0.shape[0] for p in policies}, "chance": 1.0 / k, "k": k, "n": int(x0.shape[0])}


def summarize(values: np.ndarray) -> dict[str, float]:
    """NaN-aware summary of a 1-D array (NaNs are counted, not used)."""
    v = np.asarray(values, np.float64).ravel()
    ok = v[np.isfinite(v)]
    if ok.size == 0:
        return {"n": 0, "nan": int(v.size)}
    q = np.quantile(ok, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n": int(ok.size), "nan": int(v.size - ok.size), "mean": float(ok.mean()), "std": float(ok.std()),
            "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "q95": float(q[4]),
            "frac_abs_below_0.1": float((np.abs(ok) < 0.1).mean())}


def aggregate_by_t(stats: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    return [{"t": float(t), "t_int": int(ti), "spearman": summarize(stats["spearman"][:, k]),
             "score_std": summarize(stats["score_std"][:, k])}
            for k, (t, ti) in enumerate(zip(stats["timesteps"], stats["timesteps_int"]))]


# ---- plots (noiserater.plotting: one style, Agg canvas, no pyplot state) --------------------------------------


_LABELS = {"spearman": "Spearman(score, noise norm)", "score_std": "score std over noises"}
_UNITS = {"spearman": None, "score_std": "rater score (softmax logit)"}
_T_AXIS = ("normalised timestep t", "0 = clean image, 1 = pure noise")
_SPEARMAN_NOTE = ("Spearman > 0: the rater prefers larger-norm noises; near 0: it does not rank noises by their norm. ")


def _finite_columns(values: np.ndarray) -> list[np.ndarray]:
    cols = []
    for k in range(values.shape[1]):
        c = values[:, k]
        c = c[np.isfinite(c)]
        cols.append(c if c.size else np.array([np.nan]))
    return cols


def _what(key: str, n_images: int, num_noises: int | None) -> str:
    m = f"{num_noises}" if num_noises else "M"
    if key == "spearman":
        return (f"Per (image, t): the Spearman rank correlation between the rater's scores of {m} candidate noises "
                f"and their L2 norms, over {n_images} images. " + _SPEARMAN_NOTE)
    return (f"Per (image, t): the standard deviation of the rater's scores over {m} candidate noises, over "
            f"{n_images} images; 0 = equal scores, i.e. uniform selection weights. ")


def _style_stat_axis(ax, key: str) -> None:
    if key == "spearman":
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_ylim(-1.05, 1.05)  # a correlation: the full range, so a small value looks small


def plot_by_t(stats: dict[str, np.ndarray], out: Path, title: str = "", num_noises: int | None = None) -> list[Path]:
    """mean Spearman vs t, score std vs t (mean and inter-quartile band) and violins per t (paper Fig. 2)."""
    t = stats["timesteps"]
    paths = []
    context = f" ({title})" if title else ""
    for key, name in (("spearman", "spearman_vs_t.png"), ("score_std", "score_std_vs_t.png")):
        v = stats[key]
        fig, (ax,) = figure(title=f"Rater {_LABELS[key]} by timestep{context}")
        ax.plot(t, np.nanmean(v, axis=0), "o-", label="mean over images")
        ax.fill_between(t, np.nanquantile(v, 0.25, axis=0), np.nanquantile(v, 0.75, axis=0), alpha=0.3,
                        label="25th-75th percentile")
        _style_stat_axis(ax, key)
        label_axes(ax, xlabel=_T_AXIS[0], xunit=_T_AXIS[1], ylabel=_LABELS[key], yunit=_UNITS[key])
        legend(ax)
        savefig(fig, out / name, caption=_what(key, v.shape[0], num_noises)
                + "Line: mean over images; band: 25th-75th percentile over images.")
        paths.append(out / name)
    fig, axes = figure(2, width=6.0, title=f"Rater score statistics by timestep: distribution over images{context}")
    for ax, key, tag in zip(axes, ("spearman", "score_std"), ("(a)", "(b)")):
        ax.violinplot(_finite_columns(stats[key]), positions=t, widths=0.07, showmedians=True)
        _style_stat_axis(ax, key)
        label_axes(ax, xlabel=_T_AXIS[0], xunit=_T_AXIS[1], ylabel=_LABELS[key], yunit=_UNITS[key],
                   title=f"{tag} {_LABELS[key]}")
    n = stats["spearman"].shape[0]
    savefig(fig, out / "violins_t.png", caption=(
        "(a) " + _what("spearman", n, num_noises) + "(b) " + _what("score_std", n, num_noises)
        + "Violins: distribution over images at each t (kernel density); middle bar: median; end bars: extremes."))
    paths.append(out / "violins_t.png")
    return paths


def plot_by_stage(stage_steps: list[int], per_stage: list[dict[str, np.ndarray]], out: Path,
                  num_noises: int | None = None) -> list[Path]:
    """Violins of the per-(image, t) statistics pooled over t, one per training stage (paper Fig. 3), and
    mean-by-t curves, one line per stage."""
    n = per_stage[0]["spearman"].shape[0] if per_stage else 0
    stage_note = ("Stage: the diffusion training step of the checkpoint the rater was meta-trained on (and scored "
                  "with). ")
    fig, axes = figure(2, width=6.0, title="Rater score statistics by training stage (pooled over timesteps)")
    pos = np.arange(len(stage_steps))
    for ax, key, tag in zip(axes, ("spearman", "score_std"), ("(a)", "(b)")):
        cols = [s[key].ravel()[np.isfinite(s[key].ravel())] for s in per_stage]
        ax.violinplot([c if c.size else np.array([np.nan]) for c in cols], positions=pos, showmedians=True)
        ax.set_xticks(pos, [str(s) for s in stage_steps], rotation=45 if len(pos) > 8 else 0)
        _style_stat_axis(ax, key)
        label_axes(ax, xlabel="stage", xunit="diffusion training steps", ylabel=_LABELS[key], yunit=_UNITS[key],
                   title=f"{tag} {_LABELS[key]}")
    savefig(fig, out / "stages.png", caption=(
        stage_note + "(a) " + _what("spearman", n, num_noises) + "(b) " + _what("score_std", n, num_noises)
        + "Violins: distribution over all (image, t) pairs of a stage; middle bar: median; end bars: extremes."))
    fig, axes = figure(2, width=6.0, title="Rater score statistics by timestep, one line per training stage")
    for ax, key, tag in zip(axes, ("spearman", "score_std"), ("(a)", "(b)")):
        for step, s in zip(stage_steps, per_stage):
            ax.plot(s["timesteps"], np.nanmean(s[key], axis=0), "o-", ms=3, label=f"step {step}")
        _style_stat_axis(ax, key)
        label_axes(ax, xlabel=_T_AXIS[0], xunit=_T_AXIS[1], ylabel=f"mean {_LABELS[key]}", yunit=_UNITS[key],
                   title=f"{tag} mean {_LABELS[key]}")
        legend(ax, title="stage")
    savefig(fig, out / "stages_by_t.png", caption=(
        stage_note + "(a) " + _what("spearman", n, num_noises) + "(b) " + _what("score_std", n, num_noises)
        + "Lines: mean over images at each t."))
    return [out / "stages.png", out / "stages_by_t.png"]


# ---- `noiserater analyze rater` ------------------------------------------------------------------------------


@dataclass
class AnalyzeConfig:
    rater: str | None = None
    checkpoint: str | None = None
    data: str | None = None
    split: str = "train"
    num_images: int = 256
    num_noises: int = 16
    timesteps: int = 11
    seed: int = 0
    batch_size: int = 16
    out: str = "analysis"
    progress: bool = True

    def validate(self) -> None:
        require(bool(self.rater), "rater", "pass --rater PATH to a rater checkpoint (noiserater metatrain)")
        require(self.num_images >= 1, "num_images", "must be >= 1")
        require(self.num_noises >= 2, "num_noises", "must be >= 2 (a correlation needs two noises)")
        require(self.timesteps >= 2, "timesteps", "must be >= 2")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")
        require(self.split in ("train", "val", "all"), "split", "use train, val or all")


def _analysis_images(data_source: str, split: str, num: int, seed: int, split_seed: int, val_fraction: float,
                     unconditional: bool, num_classes: int):
    data = load_dataset(data_source, split, seed=split_seed, val_fraction=val_fraction)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:num] if num <= len(data) else torch.randint(0, len(data), (num,), generator=g)
    labels = data.labels[idx]
    if unconditional:
        labels = torch.full_like(labels, num_classes)
    return data, data.images[idx], labels


def analyze_rater(cfg: AnalyzeConfig, device: str | torch.device | None = None, write: bool = True,
                  title: str = "") -> dict[str, Any]:
    """Statistics of one rater (see module docstring); writes analysis.json, stats.npz and the figures to
    ``cfg.out`` when ``write``. Returns {'summary': ..., 'stats': arrays}."""
    cfg.validate()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rstate = load_checkpoint(cfg.rater, kind="rater")
    dcfg, expect, ckpt_step = {}, None, None
    if cfg.checkpoint:
        dstate = load_checkpoint(cfg.checkpoint, kind="diffusion")
        dcfg = dstate.get("config", {}) or {}
        expect = DiTSpec(**dstate["spec"])
        ckpt_step = int(dstate.get("step", -1))
    source = cfg.data or dcfg.get("data")
    if not source:
        raise ConfigError("pass --checkpoint (the rater's diffusion checkpoint) or --data SOURCE so the analysis "
                         "knows which images to score")
    rater = load_rater(cfg.rater, expect=expect)
    spec = rater.spec
    data, images, labels = _analysis_images(source, cfg.split, cfg.num_images, cfg.seed, int(dcfg.get("seed", 0)),
                                            float(dcfg.get("val_fraction", 0.1)), bool(dcfg.get("unconditional", False)),
                                            spec.num_classes)
    if (data.channels, data.image_size) != (spec.in_channels, spec.input_size):
        raise CheckpointError(f"rater {cfg.rater} scores {spec.in_channels}x{spec.input_size}px inputs, but {source!r} "
                              f"has {data.channels}x{data.image_size}px images; pass the rater's dataset (--data)")
    t0 = time.perf_counter()
    stats = rater_statistics(rater, images, labels, cfg.num_noises, normalized_timesteps(cfg.timesteps), cfg.seed,
                             cfg.batch_size, device=device, progress=cfg.progress)
    summary = {
        "rater": str(cfg.rater), "rater_spec": spec.to_dict(), "rater_step": rstate.get("step"),
        "checkpoint": cfg.checkpoint, "checkpoint_step": ckpt_step, "data": source, "split": cfg.split,
        "num_images": int(images.shape[0]), "num_noises": cfg.num_noises, "seed": cfg.seed,
        "timesteps": [float(t) for t in stats["timesteps"]], "timesteps_int": [int(t) for t in stats["timesteps_int"]],
        "num_diffusion_timesteps": NUM_TIMESTEPS, "score_std_ddof": 0, "spearman_ties": "average ranks",
        "by_t": aggregate_by_t(stats),
        "pooled": {"spearman": summarize(stats["spearman"]), "score_std": summarize(stats["score_std"])},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    scorer = get_policy("rater", 4, rater=rater.to(device))
    summary["agreement_k4"] = policy_agreement(
        lambda x, t, y, c: scorer.scores(x.to(device), t.to(device), y.to(device), c.to(device)),
        images, labels, k=4, draws=8, seed=cfg.seed)
    if write:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        _save_stats(out / "stats.npz", stats)
        summary["figures"] = [p.name for p in plot_by_t(stats, out, title, num_noises=cfg.num_noises)]
        write_json(out / "analysis.json", summary)
    return {"summary": summary, "stats": stats}


def _save_stats(path: Path, stats: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **stats)
    atomic_write_bytes(path, buf.getvalue())


def _load_stats(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# ---- across training stages ------------------------------------------------------------------------------------


RaterFactory = Callable[[str, Path], str]


def metatrain_rater_factory(outer_steps: int = 50, rater: str = "Rater-T/2", meta_config: str | None = None,
                            progress: bool = True, **overrides: Any) -> RaterFactory:
    """A factory that meta-trains the same short rater recipe on every checkpoint (``noiserater.meta``):
    ``factory(checkpoint, folder) -> rater path``. ``meta_config`` is a MetaTrainConfig YAML file; the
    checkpoint, run folder, rater and outer steps given here win. The run resumes if interrupted."""

    def factory(checkpoint: str, folder: Path) -> str:
        given = {"checkpoint": str(checkpoint), "run_dir": str(folder / "metatrain"), "rater": rater,
                 "outer_steps": outer_steps, "progress": progress, **overrides}
        cfg = load_yaml(MetaTrainConfig, meta_config, given) if meta_config else from_dict(MetaTrainConfig, given)
        summary = metatrain(cfg, resume=True)
        return summary["rater"]

    return factory


@dataclass
class StagesConfig:
    checkpoints: str | None = None  # comma-separated diffusion checkpoints, one per stage
    out: str = "analysis_stages"
    rater: str = "Rater-T/2"
    meta_outer_steps: int = 50
    meta_config: str | None = None
    num_images: int = 64
    num_noises: int = 16
    timesteps: int = 11
    seed: int = 0
    batch_size: int = 16
    progress: bool = True

    def checkpoint_list(self) -> list[str]:
        return [c.strip() for c in (self.checkpoints or "").split(",") if c.strip()]

    def validate(self) -> None:
        require(len(self.checkpoint_list()) >= 1, "checkpoints",
                "pass --checkpoints A.pt,B.pt,... (diffusion checkpoints at different training steps)")
        require(self.meta_outer_steps >= 1, "meta_outer_steps", "must be >= 1")
        require(self.num_images >= 1 and self.num_noises >= 2 and self.timesteps >= 2, "num_images",
                "need num_images >= 1, num_noises >= 2 and timesteps >= 2")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")


def analyze_stages(cfg: StagesConfig, rater_factory: RaterFactory | None = None,
                   device: str | torch.device | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """For each checkpoint (a training stage): obtain a rater (default: a short meta-training run of the same
    recipe, see :func:`metatrain_rater_factory`), analyse it, and plot the statistics against the stage.

    Stages already analysed with the same settings (``stage_<step>/analysis.json``) are reused, so an
    interrupted series continues where it stopped."""
    cfg.validate()
    factory = rater_factory or metatrain_rater_factory(cfg.meta_outer_steps, cfg.rater, cfg.meta_config,
                                                       progress=cfg.progress)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = []
    for ckpt in cfg.checkpoint_list():
        step = int(load_checkpoint(ckpt, kind="diffusion").get("step", -1))
        stages.append((step, ckpt))
    steps = [s for s, _ in stages]
    if len(set(steps)) != len(steps):
        raise ConfigError(f"two checkpoints are at the same training step ({sorted(steps)}); pass one per stage")
    stages.sort()
    per_stage, rows = [], []
    for step, ckpt in stages:
        folder = out / f"stage_{step:07d}"
        acfg = AnalyzeConfig(rater=None, checkpoint=ckpt, num_images=cfg.num_images, num_noises=cfg.num_noises,
                             timesteps=cfg.timesteps, seed=cfg.seed, batch_size=cfg.batch_size, out=str(folder),
                             progress=cfg.progress)
        done = folder / "analysis.json"
        if done.exists() and (folder / "stats.npz").exists():
            prev = json.loads(done.read_text())
            same = (prev.get("checkpoint") == ckpt and prev.get("num_images") == cfg.num_images
                    and prev.get("num_noises") == cfg.num_noises and len(prev.get("timesteps", [])) == cfg.timesteps
                    and prev.get("seed") == cfg.seed and prev.get("agreement_k4") is not None)
            if same:
                log(f"stage {step}: reusing {done}")
                per_stage.append(_load_stats(folder / "stats.npz"))
                rows.append({"step": step, **{k: prev[k] for k in ("checkpoint", "rater", "pooled", "by_t")},
                             "agreement_k4": prev.get("agreement_k4")})
                continue
        log(f"stage {step}: rater for {ckpt}")
        acfg.rater = factory(ckpt, folder)
        res = analyze_rater(acfg, device=device, title=f"stage {step}")
        per_stage.append(res["stats"])
        s = res["summary"]
        rows.append({"step": step, "checkpoint": ckpt, "rater": s["rater"], "pooled": s["pooled"], "by_t": s["by_t"],
                     "agreement_k4": s["agreement_k4"]})
    figures = plot_by_stage([r["step"] for r in rows], per_stage, out, num_noises=cfg.num_noises)
    pooled_t = {k: np.concatenate([s[k] for s in per_stage]) for k in ("spearman", "score_std", "score_mean")}
    pooled_t.update(timesteps=per_stage[0]["timesteps"], timesteps_int=per_stage[0]["timesteps_int"])
    figures += plot_by_t(pooled_t, out, title="pooled over stages", num_noises=cfg.num_noises)
    summary = {"stages": rows, "by_t_pooled_over_stages": aggregate_by_t(pooled_t),
               "settings": {"rater": cfg.rater, "meta_outer_steps": cfg.meta_outer_steps,
                            "meta_config": cfg.meta_config, "num_images": cfg.num_images,
                            "num_noises": cfg.num_noises, "timesteps": cfg.timesteps, "seed": cfg.seed,
                            "custom_rater_factory": rater_factory is not None},
               "figures": [p.name for p in figures]}
    write_json(out / "stages.json", summary)
    return summary


# ---- stage matching (paper eq. 10) -----------------------------------------------------------------------------


def read_loss_log(path: str | os.PathLike, key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) from a metrics.jsonl: lines with a 'step' and a finite ``key``; event lines, lines cut by
    a crash and non-finite values are skipped; a step logged twice keeps its last value."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"training log {path} not found; pass a run's metrics.jsonl")
    rows: dict[int, float] = {}
    for rec in read_metrics(path):
        if "event" in rec or "step" not in rec or key not in rec:
            continue
        try:
            value = float(rec[key])
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            rows[int(rec["step"])] = value
    if not rows:
        raise ConfigError(f"training log {path} has no lines with 'step' and a finite {key!r}")
    steps = np.array(sorted(rows), dtype=np.int64)
    return steps, np.array([rows[s] for s in steps], dtype=np.float64)


def smooth_loss(losses: np.ndarray, window: int) -> np.ndarray:
    """Centred rolling mean over ``window`` logged steps (shorter windows at the ends)."""
    import pandas as pd  # ~0.4 s to import: cli.py loads this module (via experiments) for every command

    if window < 1:
        raise ConfigError(f"smoothing window must be >= 1, got {window}")
    return pd.Series(np.asarray(losses, np.float64)).rolling(window, center=True, min_periods=1).mean().to_numpy()


def first_stable_index(values: np.ndarray, threshold: float, window: int) -> int | None:
    """Smallest i with values[j] <= threshold for every j in [i, i + window] (the whole window inside the
    curve); None if there is none."""
    below = np.asarray(values) <= threshold
    n = below.size
    if window < 0:
        raise ConfigError(f"stability window must be >= 0, got {window}")
    run = 0  # length of the run of True values ending at j
    for j in range(n):
        run = run + 1 if below[j] else 0
        if run >= window + 1:
            return j - window
    return None


def match_stage(source_log: str | os.PathLike, source_step: int, target_log: str | os.PathLike,
                smooth_window: int = 500, stability_window: int = 1000, key: str = "loss") -> dict[str, Any]:
    """The target run's step whose (smoothed) training loss matches the source run's at ``source_step``
    (paper eq. 10; the paper uses smooth_window=500 and stability_window=1000 logged steps)."""
    s_steps, s_loss = read_loss_log(source_log, key)
    t_steps, t_loss = read_loss_log(target_log, key)
    for name, steps in (("source", s_steps), ("target", t_steps)):
        if smooth_window > steps.size:
            raise ConfigError(f"the {name} log has {steps.size} logged steps, fewer than the smoothing window "
                             f"{smooth_window}; pass a smaller --smooth-window (it counts logged steps)")
    if stability_window + 1 > t_steps.size:
        raise ConfigError(f"the target log has {t_steps.size} logged steps, too few for the stability window "
                         f"W={stability_window}; pass a smaller --stability-window (it counts logged steps)")
    i = int(np.argmin(np.abs(s_steps - source_step)))
    spacing = int(np.median(np.diff(s_steps))) if s_steps.size > 1 else 0
    if abs(int(s_steps[i]) - source_step) > spacing:
        raise ConfigError(f"source step {source_step} is not in the source log (logged steps {s_steps[0]}..{s_steps[-1]} "
                         f"every ~{spacing})")
    s_smooth, t_smooth = smooth_loss(s_loss, smooth_window), smooth_loss(t_loss, smooth_window)
    target = float(s_smooth[i])
    j = first_stable_index(t_smooth, target, stability_window)
    if j is None:
        raise ConfigError(f"the target run's smoothed loss never stays at or below {target:.5g} (source step "
                         f"{int(s_steps[i])}) for {stability_window} logged steps; train the target longer or "
                         "lower --stability-window")
    return {"target_step": int(t_steps[j]), "source_step": int(s_steps[i]), "source_loss_smoothed": target,
            "target_loss_smoothed": float(t_smooth[j]), "target_index": j, "smooth_window": smooth_window,
            "stability_window": stability_window, "source_log": str(source_log), "target_log": str(target_log)}
