"""Figures: one style (noiserater.plotting) for report, analysis and benchmark plots: full titles, units,
"lower is better", captions that say what error bars are, readable legends, nothing clipped; benchmarks
write figures only where told."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from noiserater import plotting


@pytest.fixture
def captured(monkeypatch):
    """Every figure passed to plotting.savefig (the figure is still written)."""
    figs = []
    real = plotting.savefig

    def spy(fig, path, caption=None, dpi=plotting.DPI):
        out = real(fig, path, caption=caption, dpi=dpi)
        figs.append((fig, Path(path)))
        return out

    monkeypatch.setattr(plotting, "savefig", spy)
    for module in list(sys.modules.values()):  # the modules that imported it by name (from .plotting import savefig)
        if getattr(module, "__name__", "").startswith("noiserater.") and getattr(module, "savefig", None) is real:
            monkeypatch.setattr(module, "savefig", spy)
    return figs


def _texts(fig):
    """The texts that are drawn: titles, labels, caption, legends, and the tick labels inside the view limits
    (matplotlib keeps invisible labels of ticks beyond the limits)."""
    from matplotlib.text import Text

    ticks = set()
    for ax in fig.axes:
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = min(lim), max(lim)
            for t in axis.get_ticklabels() + axis.get_ticklabels(minor=True):
                pos = t.get_position()[0 if axis is ax.xaxis else 1]
                ticks.add(id(t)) if not lo - 1e-9 <= pos <= hi + 1e-9 else None
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in ticks]


def _assert_nothing_clipped(fig, path: Path):
    """Every visible text lies inside the saved image: the PNG's size is the figure's tight bounding box
    (plus padding), and that box contains every text's extent."""
    fig.canvas.draw()  # lay out again at the figure's own dpi (savefig drew it at plotting.DPI)
    renderer = fig.canvas.get_renderer()
    tight = fig.get_tightbbox(renderer)  # inches
    with Image.open(path) as im:
        w, h = im.size
    dpi = plotting.DPI
    ew, eh = (tight.width + 2 * 0.08) * dpi, (tight.height + 2 * 0.08) * dpi  # drawn again: layout may shift by ~1%
    assert abs(w - ew) <= max(3, 0.02 * ew) and abs(h - eh) <= max(3, 0.02 * eh), ((w, h), (ew, eh))
    box = tight.transformed(fig.dpi_scale_trans)
    for t in _texts(fig):
        e = t.get_window_extent(renderer)
        assert e.x0 >= box.x0 - 1 and e.x1 <= box.x1 + 1 and e.y0 >= box.y0 - 1 and e.y1 <= box.y1 + 1, t.get_text()


def _legend_ok(ax):
    leg = ax.get_legend()
    assert leg is not None
    assert all(t.get_fontsize() >= 9 for t in leg.get_texts())


def _png_text(path: Path) -> dict:
    with Image.open(path) as im:
        return dict(im.text)


# ---- the style helpers ---------------------------------------------------------------------------------------


def test_axis_label_and_wrap():
    assert plotting.axis_label("held-out loss", "MSE per element", lower_is_better=True) == \
        "held-out loss [MSE per element] (lower is better)"
    assert plotting.axis_label("accuracy", higher_is_better=True) == "accuracy (higher is better)"
    long = "word " * 80
    lines = plotting.wrap(long, 5.0, 10).split("\n")
    assert len(lines) > 1 and max(len(s) for s in lines) <= int(5.0 * 72 / (0.52 * 10))


def test_legend_never_below_9pt_and_goes_outside_when_crowded():
    fig, (ax,) = plotting.figure()
    for i in range(8):
        ax.plot([0, 1], [i, i], label=f"line {i}")
    leg = plotting.legend(ax, fontsize=6)
    assert all(t.get_fontsize() >= 9 for t in leg.get_texts())
    assert leg.get_bbox_to_anchor().transformed(ax.transAxes.inverted()).x0 > 1.0  # right of the axes
    fig2, (ax2,) = plotting.figure()
    assert plotting.legend(ax2) is None  # nothing labelled: no empty legend box


def test_savefig_tight_caption_metadata_and_atomic(tmp_path):
    title = "A very long figure title that would be clipped on both sides of a narrow figure without wrapping " * 2
    fig, (ax,) = plotting.figure(width=3.0, title=title)
    ax.plot([1, 2, 3], [3, 1, 2], label="data")
    plotting.label_axes(ax, xlabel="step", xunit="optimizer steps", ylabel="loss", yunit="MSE", lower_is_better=True)
    plotting.legend(ax)
    path = plotting.savefig(fig, tmp_path / "sub" / "f.png", caption="Error bars: 95% t-interval over seeds.")
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name != "f.png"]  # no temp file left
    meta = _png_text(path)
    assert meta["Description"] == "Error bars: 95% t-interval over seeds."
    assert meta["Title"] == " ".join(title.split()) and meta["Software"].startswith("noiserater ")
    assert ax.get_ylabel() == "loss [MSE] (lower is better)"
    _assert_nothing_clipped(fig, path)
    # the wrapped title is no wider than the figure's own width
    r = fig.canvas.get_renderer()
    assert fig._suptitle.get_window_extent(r).width <= fig.get_figwidth() * fig.dpi * 1.05


# ---- report figures ------------------------------------------------------------------------------------------


def _summary():
    rows = []
    for label, policy, k, fid, ci, n in [("max_norm k=4", "max_norm", 4, 21.0, 1.5, 3),
                                         ("rater k=4", "rater", 4, 26.0, 0.2, 60),
                                         ("rater_soft k=4", "rater_soft", 4, 21.8, float("nan"), 1),
                                         ("vanilla", "vanilla", 1, 22.5, 0.1, 60)]:
        rows.append({"label": label, "policy": policy, "k": k, "seeds": n, "fid_mean": fid, "fid_ci": ci,
                     "heldout_loss_mean": 0.08, "heldout_loss_ci": 0.001})
    return pd.DataFrame(rows)


def test_report_summary_plot(tmp_path, captured):
    from noiserater.study.reproduce_report import plot_summary, table_title

    plot_summary(_summary(), "fid", tmp_path / "main_fid.png", table_title("main"))
    (fig, path), = captured
    ax = fig.axes[0]
    assert " ".join(ax.get_ylabel().split()) == "classifier-FID (lower is better)"
    assert table_title("main") in " ".join(fig._suptitle.get_text().split())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["max_norm k=4 (n=3)", "rater k=4 (n=60)",
                                                            "rater_soft k=4 (n=1)", "vanilla (n=60)"]
    caption = _png_text(path)["Description"]
    assert "95% t-interval" in caption and "vanilla" in caption and "single seed" in caption
    # error bars: mean +- the CI half-width (the single-seed point has none)
    tops = sorted(float(np.max(seg[:, 1])) for coll in ax.collections for seg in coll.get_segments())
    assert tops == pytest.approx(sorted([22.5, 26.2, 22.6, 21.8]))
    lo, hi = ax.get_ylim()
    assert lo > 0  # points, not bars: the axis may (and here does) start above 0, and the caption says so
    assert "does not start at 0" in caption
    _assert_nothing_clipped(fig, path)


def test_report_summary_plot_without_vanilla_long_labels(tmp_path, captured):
    from noiserater.study.reproduce_report import plot_summary

    s = _summary().iloc[:2].copy()
    s["label"] = ["no_image_class: rater k=4", "noise_only: rater k=4"]
    plot_summary(s, "heldout_loss", tmp_path / "abl.png", "Table 2: rater ablations")
    (fig, path), = captured
    ax = fig.axes[0]
    caption = _png_text(path)["Description"]
    assert "Dashed line" not in caption and "no vanilla runs" in caption and "fixed set of" in caption
    assert " ".join(ax.get_ylabel().split()) == "held-out loss [MSE per element] (lower is better)"
    assert all(t.get_rotation() > 0 for t in ax.get_xticklabels())  # long labels do not overlap
    r = fig.canvas.get_renderer()
    a, b = (t.get_window_extent(r) for t in ax.get_xticklabels())
    assert not a.overlaps(b)


def test_report_loss_curves_say_not_comparable(tmp_path, captured):
    from noiserater.study.reproduce_report import plot_loss_curves

    rows = []
    for i, (label, policy, k) in enumerate([("vanilla", "vanilla", 1), ("rater k=4", "rater", 4),
                                            ("max_norm k=2", "max_norm", 2)]):
        for seed in range(2):
            run = tmp_path / label.replace(" ", "_") / f"seed{seed}" / "run"
            (run / "checkpoints").mkdir(parents=True)
            (run / "metrics.jsonl").write_text("\n".join(
                json.dumps({"step": 10 * j, "loss": 0.1 - 0.001 * j + 0.01 * i}) for j in range(1, 11)) + "\n")
            rows.append(dict(table="main", label=label, policy=policy, k=k, seed=seed,
                             checkpoint=str(run / "checkpoints" / "latest.pt")))
    plot_loss_curves(pd.DataFrame(rows), "main", tmp_path / "curves.png")
    (fig, path), = captured
    ax = fig.axes[0]
    caption = _png_text(path)["Description"]
    assert "not comparable" in caption.lower() and "noise it selected" in caption
    assert "not comparable" in fig._suptitle.get_text()
    assert ax.get_xlabel() == "continuation step [optimizer steps]"
    assert " ".join(ax.get_ylabel().split()) == "training loss [MSE per element]"
    _legend_ok(ax)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["vanilla (n=2)", "rater k=4 (n=2)",
                                                                   "max_norm k=2 (n=2)"]
    # mean over seeds, smoothed: the vanilla line's first point is the first logged loss
    assert ax.get_lines()[0].get_ydata()[0] == pytest.approx(0.099)
    _assert_nothing_clipped(fig, path)


# ---- analysis figures ----------------------------------------------------------------------------------------


def _stats(n=12, shift=0.5, seed=0):
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, 5)
    return {"spearman": np.clip(rng.normal(shift * (1 - t), 0.2, (n, t.size)), -1, 1),
            "score_std": np.abs(rng.normal(0.1, 0.03, (n, t.size))), "score_mean": np.zeros((n, t.size)),
            "timesteps": t, "timesteps_int": (t * 999).round().astype(int)}


def test_analysis_figures_have_captions_units_and_legends(tmp_path, captured):
    from noiserater.analysis.rater_stats import plot_by_stage, plot_by_t

    plot_by_t(_stats(), tmp_path, title="stage 300", num_noises=16)
    plot_by_stage([300, 2000], [_stats(), _stats(shift=0.1, seed=1)], tmp_path, num_noises=16)
    names = [p.name for _, p in captured]
    assert names == ["spearman_vs_t.png", "score_std_vs_t.png", "violins_t.png", "stages.png", "stages_by_t.png"]
    for fig, path in captured:
        meta = _png_text(path)
        assert "16 candidate noises" in meta["Description"] and "over 12 images" in meta["Description"]
        assert meta["Title"]
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel()
            if ax.get_legend() is not None:
                _legend_ok(ax)
        _assert_nothing_clipped(fig, path)
    fig, _ = captured[0]
    assert "0 = clean image, 1 = pure noise" in fig.axes[0].get_xlabel()
    assert fig.axes[0].get_ylim() == pytest.approx((-1.05, 1.05))  # a correlation on its full range
    assert "25th-75th percentile" in _png_text(captured[0][1])["Description"]
    assert "diffusion training steps" in captured[3][0].axes[0].get_xlabel()


# ---- benchmarks write only where told ------------------------------------------------------------------------


def test_bench_metagrad_figure(tmp_path, captured):
    from noiserater.bench.metagrad import plot

    recs = [{"method": m, "inner_steps": s, "time_s": 0.1 * s, "time_per_inner_step_s": 0.1,
             "peak_mem_bytes": (s if m == "unrolled" else 1) * 2**20, "model": "DiT-N/2", "rater": "Rater-N/2",
             "image": "1x8x8", "batch": 4, "candidates": 8, "inner_optimizer": "sgd", "device": "cpu",
             "clock": "process CPU time, 1 thread(s)"} for m in ("unrolled", "reverse") for s in (1, 2, 5)]
    plot(recs, str(tmp_path / "deep" / "m.png"))
    (fig, path), = captured
    assert path.exists()
    a, b = fig.axes
    assert " ".join(a.get_ylabel().split()) == "peak live memory growth [MiB] (lower is better)"
    assert " ".join(b.get_ylabel().split()) == "time per inner step [s] (lower is better)"
    assert [t.get_text() for t in a.get_xticklabels()] == ["1", "2", "5"]
    assert "median of the timed calls" in _png_text(path)["Description"]
    _legend_ok(a)
    _assert_nothing_clipped(fig, path)


def test_bench_metagrad_writes_nothing_unless_told(tmp_path, monkeypatch):
    from noiserater.cli import main

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["bench", "metagrad", "--methods", "reverse", "--inner-steps-list", "1", "--image-size", "8",
                                  "--repeats", "1"])
    assert r.exit_code == 0, r.output
    assert "| reverse | 1 |" in r.stdout
    assert list(tmp_path.iterdir()) == []  # no benchmarks/metagrad.json, no docs/img/metagrad.png
    help_text = CliRunner().invoke(main, ["bench", "metagrad", "--help"]).output
    assert "--figure" in help_text and "--plot" not in help_text  # --plot: hidden deprecated alias


@pytest.mark.parametrize("command", ["train", "loader", "metagrad"])
def test_bench_output_options_default_to_none(command):
    import click

    from noiserater.cli import main

    ctx = click.Context(main)
    cmd = main.get_command(ctx, "bench").get_command(ctx, command)
    defaults = {p.name: p.default for p in cmd.params if isinstance(p, click.Option)}
    for name in ("out", "json_path", "figure_path", "plot_path"):
        if name in defaults:
            assert defaults[name] is None, (command, name)
