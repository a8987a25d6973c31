"""One figure style for every plot of noiserater (reports, analysis, benchmarks).

A figure a paper reader accepts: a full title (wrapped, never clipped), labelled axes with units and
"lower is better" where it applies, a caption under the axes that says what the error bars / bands are,
legends and tick labels of at least 9 pt, and a tight bounding box. Object-oriented matplotlib on an Agg
canvas: no pyplot state, no global backend switch, safe in threads and in library code.

    fig, (ax,) = figure(title="Table 1: ...")
    ax.errorbar(...)
    label_axes(ax, xlabel="policy", ylabel="classifier-FID", lower_is_better=True)
    legend(ax)
    savefig(fig, "main_fid.png", caption="Points: mean over seeds; error bars: 95% t-interval.")
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .checkpoint import atomic_write_bytes

__all__ = ["FONT", "LEGEND_FONT", "TITLE_FONT", "CAPTION_FONT", "DPI", "POLICY_COLORS", "axis_label", "figure",
           "label_axes", "legend", "policy_color", "savefig", "wrap"]

FONT = 10  # axis labels
TICK_FONT = 9
LEGEND_FONT = 9  # never smaller: a 6 pt legend is unreadable in print
TITLE_FONT = 11
CAPTION_FONT = 9
DPI = 150

# One colour per selection policy, the same in every figure (colour-blind-safe Okabe-Ito palette).
POLICY_COLORS = {"vanilla": "#000000", "max_norm": "#0072B2", "min_norm": "#56B4E9", "nearest": "#E69F00",
                 "rater": "#009E73", "rater_soft": "#CC79A7", "uniform": "#999999", "oracle": "#D55E00"}
_FALLBACK = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999"]


def policy_color(policy: str, index: int = 0) -> str:
    """The colour of a policy (``"rater k=4"`` and ``"ablation: rater k=4"`` use the policy's colour)."""
    name = policy.split(":")[-1].strip().split(" ")[0]
    return POLICY_COLORS.get(name, _FALLBACK[index % len(_FALLBACK)])


def wrap(text: str, width_in: float, fontsize: float) -> str:
    """Wrap ``text`` to lines that fit ``width_in`` inches at ``fontsize`` points (keeps explicit newlines)."""
    chars = max(20, int(width_in * 72 / (0.52 * fontsize)))
    return "\n".join(textwrap.fill(p, chars) if p else "" for p in text.split("\n"))


def figure(ncols: int = 1, nrows: int = 1, width: float = 5.5, height: float = 3.6, title: str | None = None,
           sharey: bool = False) -> tuple[Any, list]:
    """A Figure on an Agg canvas and its axes (a flat list); ``width``/``height`` are per panel, in inches.
    ``title`` is the figure's full title, wrapped to the figure width."""
    # matplotlib (~0.5 s) only when a figure is drawn: training processes import this module
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes: list = []
    for i in range(nrows * ncols):
        ax = fig.add_subplot(nrows, ncols, i + 1, sharey=axes[0] if sharey and axes else None)
        ax.tick_params(labelsize=TICK_FONT)
        ax.grid(alpha=0.25, lw=0.6)
        ax.set_axisbelow(True)
        axes.append(ax)
    if title:
        fig.suptitle(wrap(title, width * ncols, TITLE_FONT), fontsize=TITLE_FONT)
    return fig, axes


def axis_label(name: str, unit: str | None = None, lower_is_better: bool = False, higher_is_better: bool = False) -> str:
    """``"name [unit]"`` plus ``"(lower is better)"`` / ``"(higher is better)"``."""
    text = name + (f" [{unit}]" if unit else "")
    if lower_is_better:
        text += " (lower is better)"
    elif higher_is_better:
        text += " (higher is better)"
    return text


def label_axes(ax, xlabel: str | None = None, ylabel: str | None = None, title: str | None = None, *,
               xunit: str | None = None, yunit: str | None = None, lower_is_better: bool = False,
               higher_is_better: bool = False, width_in: float | None = None) -> None:
    """Axis labels (with units; the better direction goes on the y label) and a panel title, wrapped to the
    panel width."""
    w = width_in or ax.figure.get_figwidth() / max(1, _grid(ax)[1])
    if xlabel is not None:
        ax.set_xlabel(wrap(axis_label(xlabel, xunit), w, FONT), fontsize=FONT)
    if ylabel is not None:
        # the axes are about 60% of the figure's height: wrap the y label to that, not to the figure
        h = 0.6 * ax.figure.get_figheight() / max(1, _grid(ax)[0])
        text = axis_label(ylabel, yunit, lower_is_better, higher_is_better)
        if wrap(text, h, FONT) != text:  # too long for one line: the better direction gets a line of its own
            head = axis_label(ylabel, yunit)
            text = wrap(head, h, FONT) + text[len(head):].replace(" (", "\n(", 1)
        ax.set_ylabel(text, fontsize=FONT)
    if title is not None:
        ax.set_title(wrap(title, w, FONT), fontsize=FONT)


def _grid(ax) -> tuple[int, int]:
    """(rows, columns) of the subplot grid ``ax`` is in."""
    spec = ax.get_subplotspec()
    return spec.get_gridspec().get_geometry() if spec is not None else (1, 1)


def legend(ax, *, outside: bool | None = None, title: str | None = None, **kw):
    """A legend of at least 9 pt; with many entries (> 6) it goes to the right of the axes, in as many columns
    as needed, instead of covering the data. Returns the Legend (None when nothing is labelled)."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    if outside is None:
        outside = len(handles) > 6
    kw.setdefault("fontsize", LEGEND_FONT)
    kw["fontsize"] = max(LEGEND_FONT, kw["fontsize"]) if isinstance(kw["fontsize"], (int, float)) else LEGEND_FONT
    kw.setdefault("title_fontsize", LEGEND_FONT)
    kw.setdefault("frameon", False if outside else True)
    if outside:
        kw.setdefault("loc", "upper left")
        kw.setdefault("bbox_to_anchor", (1.01, 1.0))
        kw.setdefault("ncols", 1 if len(handles) <= 14 else 2)
    else:
        kw.setdefault("loc", "best")
    return ax.legend(handles, labels, title=title, **kw)


def savefig(fig, path: str | Path, caption: str | Sequence[str] | None = None, dpi: int = DPI) -> Path:
    """Write ``fig`` as PNG to ``path`` (parent folders created, written atomically: temp file + rename) with a
    tight bounding box, and an optional caption under the axes (what the points, bars, bands are)."""
    path = Path(path)
    text = "" if not caption else caption if isinstance(caption, str) else " ".join(caption)
    if text:
        fig.supxlabel(wrap(text, fig.get_figwidth(), CAPTION_FONT), fontsize=CAPTION_FONT, ha="left", x=0.0,
                      multialignment="left", color="#333333")
    sup = getattr(fig, "_suptitle", None)  # Figure.get_suptitle() needs matplotlib 3.8
    title = (sup.get_text() if sup is not None else "") or " / ".join(ax.get_title() for ax in fig.axes if ax.get_title())
    # The title and caption also go into the PNG's text chunks, so a figure found alone still says what it is.
    meta = {"Title": " ".join(title.split()), "Description": " ".join(text.split()),
            "Software": f"noiserater {__version__}"}
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.08, metadata=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
