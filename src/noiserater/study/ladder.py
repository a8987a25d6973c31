"""The dimension ladder: each arm's paired effect at several data dimensions d, fitted and extrapolated.

A rung is one published evidence study (its headline stage, the first of its preset's ``stages``); its d is
C*H*W of its data (:func:`noiserater.data.datasets.source_dimension`). At each rung an arm's effect is the
mean over paired seeds of 100*(arm - vanilla)/vanilla with its standard error; the random-rater null pools
its initialisations per seed first (so its seeds, not its inits, are the units).

The fit is weighted least squares of effect on d^(-1/2): ``effect(d) = a + b / sqrt(d)``. Why this form: a
policy that acts through the noise's norm (max_norm, min_norm, a noise scale, a nearest-noise coupling)
changes ||eps||/sqrt(d) by an amount that shrinks like 1/sqrt(d) (chi_d concentrates: its relative spread is
about 1/sqrt(2d)), so a radial effect predicts a -> 0 and b carrying everything; ``a`` is the effect that
would persist at any d (what the paper claims for the rater). The extrapolation to d = 4096 (DiT-S/2's
4x32x32 latents) carries the fit's standard error from the rungs' standard errors (normal, 95%); with three
rungs the fit has one degree of freedom, whose chi-square says whether the form fits at all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ..checkpoint import atomic_write_text
from ..data.datasets import parse_source, source_dimension
from ..stats import paired_interval
from .evidence_report import base_arm, compare, load_rows

PAPER_D = 4096  # DiT-S/2 on 256x256 images: 4x32x32 sd-vae latents
# the arms the ladder reports, in order, with what each is (the random null pools its initialisations)
LADDER_ROWS = ("max_norm", "noise_scale", "input_perturbation", "knn", "noise_scale_knn", "batch_ot", "rater",
               "rater_random")
METRICS = (("fid", "FID"), ("test_loss", "test loss"))
# what the paper says of each arm at d = 4096 (its Table 1 prose, section 5.2)
PAPER_SAYS = {"max_norm": "naive norm selection: \"little improvement or even harms\" (Table 1)",
              "rater": "FID -2.6% at k=4 (61.56 -> 59.95, Table 3)"}


def rung(root: str | Path) -> dict[str, Any]:
    """One study as a rung: {'study', 'data', 'd', 'stage', 'commit', 'arms': {arm: {metric: interval}}}."""
    root = Path(root)
    study = json.loads((root / "study.json").read_text())
    settings = study["settings"]
    rows = load_rows(root)
    stage = settings["stages"][0]
    rows = [r for r in rows if r["stage"] == stage]
    arms: dict[str, dict] = {}
    for arm in LADDER_ROWS:
        per = {}
        for metric, _ in METRICS:
            ci = _random_pooled(rows, arm, metric) if arm == "rater_random" else compare(rows, arm, "vanilla", metric)
            if ci is not None and ci["n"] >= 2:
                per[metric] = {**ci, "se": ci["sd"] / math.sqrt(ci["n"])}
        if per:
            arms[arm] = per
    # how mature the stage is: vanilla's FID and class accuracy beside the real-data floor at the same sample size
    van = [r for r in rows if r["arm"] == "vanilla" and r.get("fid") is not None]
    floor_path = root / "reference-floor" / "stage.json"
    floor = json.loads(floor_path.read_text())["result"] if floor_path.exists() else {}
    maturity = {"vanilla_fid": sum(r["fid"] for r in van) / len(van) if van else None,
                "vanilla_class_accuracy": sum(r.get("class_accuracy") or 0 for r in van) / len(van) if van else None,
                "real_floor_fid": floor.get(f"real_train_fid_{settings.get('eval_samples')}")}
    return {"study": root.name, "data": settings["data"], "d": source_dimension(settings["data"]),
            "model": settings["model"], "stage": stage, "commit": study.get("provenance", {}).get("git_commit"),
            "maturity": maturity, "arms": arms}


def merge_rungs(rungs: list[dict]) -> list[dict]:
    """One rung per (data, DiT, stage): studies of the same recipe that ran different arms (a later study adding
    arms an earlier one lacked) share a rung. Each arm keeps its own study's paired effect against that study's
    vanilla; an arm two studies both ran keeps the first study's. Maturity is the first study's."""
    merged: dict[tuple, dict] = {}
    for r in rungs:
        key = (r["data"], r.get("model"), r.get("stage"))
        if key not in merged:
            merged[key] = {**r, "arms": dict(r["arms"])}
            continue
        m = merged[key]
        m["study"] = f"{m['study']} + {r['study']}"
        m["commit"] = f"{m['commit']} + {r['commit']}"
        for arm, per in r["arms"].items():
            m["arms"].setdefault(arm, per)
    return list(merged.values())


def _random_pooled(rows: list[dict], arm: str, metric: str) -> dict[str, float] | None:
    """The random-rater null vs vanilla with its initialisations averaged per seed."""
    van = {r["seed"]: r[metric] for r in rows if r["arm"] == "vanilla" and r.get(metric) is not None}
    per_seed: dict[int, list[float]] = {}
    for r in rows:
        if base_arm(r["arm"]) == arm and r["seed"] in van and r.get(metric) is not None:
            per_seed.setdefault(r["seed"], []).append(100.0 * (r[metric] - van[r["seed"]]) / van[r["seed"]])
    if not per_seed:
        return None
    return paired_interval([sum(v) / len(v) for _, v in sorted(per_seed.items())])


def fit_inverse_sqrt(d: list[float], effect: list[float], se: list[float], at: float = PAPER_D) -> dict[str, float]:
    """Weighted least squares of ``effect = a + b / sqrt(d)`` (weights 1/se^2, the se taken as known) and its
    prediction at ``at`` with the propagated standard error and a normal 95% interval; ``chi2`` / ``dof``
    is the residual's goodness of fit (dof = rungs - 2; ``p_fit`` its upper tail). When chi2/dof > 1 the
    interval is widened by ``scale`` = sqrt(chi2/dof)."""
    x = 1.0 / np.sqrt(np.asarray(d, dtype=float))
    y, s = np.asarray(effect, dtype=float), np.asarray(se, dtype=float)
    if len(x) < 2 or len(set(x.tolist())) < 2:
        raise ValueError("the fit needs at least two rungs of different d")
    s = np.maximum(s, 1e-9)
    (b, a), cov = _weighted_line(x, y, s)
    x0 = np.array([1.0 / math.sqrt(at), 1.0])
    pred = float(b * x0[0] + a)
    pred_se = float(math.sqrt(max(x0 @ cov @ x0, 0.0)))
    resid = (y - (a + b * x)) / s
    dof = len(x) - 2
    chi2 = float(resid @ resid)
    # rungs that scatter more than their errors allow widen the interval by sqrt(chi2/dof) (the Particle Data
    # Group's scale factor); with two rungs nothing checks the form, and the interval is the errors' alone
    scale = max(1.0, math.sqrt(chi2 / dof)) if dof > 0 else 1.0
    return {"a": float(a), "b": float(b), "a_se": float(math.sqrt(cov[1, 1])), "b_se": float(math.sqrt(cov[0, 0])),
            "at": float(at), "pred": pred, "pred_se": pred_se, "scale": scale,
            "half": 1.959963984540054 * pred_se * scale,
            "chi2": chi2, "dof": dof, "p_fit": float(stats.chi2.sf(chi2, dof)) if dof > 0 else None}


def _weighted_line(x: np.ndarray, y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slope, intercept) of the weighted least-squares line (weights 1/s^2) and their covariance with s taken
    as the known standard errors (not rescaled by the residuals): (X^T W X)^-1 X^T W y and (X^T W X)^-1.
    Written out because np.polyfit's covariance needs more points than terms, and two rungs are a ladder."""
    X = np.stack([x, np.ones_like(x)], axis=1)
    W = np.diag(1.0 / s ** 2)
    cov = np.linalg.inv(X.T @ W @ X)
    return cov @ X.T @ W @ y, cov


def ladder(rungs: list[dict]) -> dict[str, Any]:
    """Every arm's fit over the rungs it has (at least two), per metric; studies of one recipe share a rung
    (:func:`merge_rungs`)."""
    rungs = sorted(merge_rungs(rungs), key=lambda r: r["d"])
    fits: dict[str, dict] = {}
    for arm in LADDER_ROWS:
        for metric, _ in METRICS:
            pts = [(r["d"], r["arms"][arm][metric]) for r in rungs if metric in r["arms"].get(arm, {})]
            if len({d for d, _ in pts}) >= 2:
                fits.setdefault(arm, {})[metric] = fit_inverse_sqrt([d for d, _ in pts], [c["mean"] for _, c in pts],
                                                                    [c["se"] for _, c in pts])
    return {"rungs": rungs, "fits": fits, "form": "effect(d) = a + b / sqrt(d)", "at": PAPER_D}


def _cell(ci: dict | None) -> str:
    if not ci:
        return "—"
    mark = " (inside the noise)" if abs(ci["mean"]) <= ci["half"] else ""
    return f"{ci['mean']:+.2f}% ± {ci['half']:.2f}{mark}"


def trend_table(result: dict, metric: str = "fid") -> list[str]:
    """The markdown table: one line per arm, its effect vs vanilla at each d and the extrapolation to 4096."""
    rungs = result["rungs"]
    head = "| arm | " + " | ".join(f"d = {r['d']} ({r['data']})" for r in rungs) + f" | d = {result['at']} (fit) |"
    lines = [head, "|---|" + "---|" * (len(rungs) + 1)]
    for arm in LADDER_ROWS:
        cells = [_cell(r["arms"].get(arm, {}).get(metric)) for r in rungs]
        if all(c == "—" for c in cells):
            continue
        fit = result["fits"].get(arm, {}).get(metric)
        pred = _cell({"mean": fit["pred"], "half": fit["half"]}) if fit else "—"
        if fit and fit["p_fit"] is not None and fit["p_fit"] < 0.05:
            pred += " (form rejected)"
        elif fit and fit["dof"] == 0:
            pred += " (2 rungs)"
        name = "rater_random (null, inits pooled)" if arm == "rater_random" else arm
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {pred} |")
    return lines


def write_ladder(studies: list[str | Path], out: str | Path) -> tuple[Path, dict]:
    """Read the rungs, fit, and write ``out``/report.md, ladder.json (the inputs and fits) and ladder.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rungs = [rung(s) for s in studies]
    result = ladder(rungs)
    result["studies"] = [_relative(s, out) for s in studies]
    lines = ["# The dimension ladder: does an arm's effect grow or vanish with the data's dimension?", "",
             "Each rung is one published evidence study at its headline stage; each cell is the arm's mean paired "
             "change vs vanilla over seeds, ± the 95% t half-width (negative is better). The last column "
             f"extrapolates the fit {result['form']} (weighted by the rungs' standard errors) to d = {PAPER_D}, "
             "DiT-S/2's 4x32x32 latents, with a normal 95% interval from the fit's standard error. Why 1/sqrt(d): "
             "a policy that acts through the noise's norm changes ||eps||/sqrt(d) by an amount that shrinks like "
             "1/sqrt(d), so a purely radial effect has a = 0; a is what would persist at any d.", ""]
    lines += ["| rung | data | d | DiT | stage | commit | vanilla FID | real-data floor | vanilla class accuracy |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rungs"]:
        m = r.get("maturity") or {}
        num = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
        commit = " + ".join(c[:7] for c in str(r["commit"]).split(" + "))
        lines.append(f"| `{r['study']}` | {r['data']} | {r['d']} | {r['model']} | {r['stage']} | {commit} | "
                     f"{num(m.get('vanilla_fid'), '.1f')} | {num(m.get('real_floor_fid'), '.1f')} | "
                     f"{num(m.get('vanilla_class_accuracy'), '.2f')} |")
    lines += ["", "A rung whose vanilla FID is far above its floor (or whose class accuracy is near chance, 0.10) "
                  "has a DiT that has not learned the data: its FID changes say little, its test-loss changes "
                  "still measure the objective.", ""]
    for metric, label in METRICS:
        lines += [f"## {label}", ""] + trend_table(result, metric) + [""]
    lines += ["## Fits", "", "When the rungs scatter more than their errors allow (chi2/dof > 1), the interval at 4096 is "
              "widened by sqrt(chi2/dof), the Particle Data Group's scale factor. A fit with p < 0.05 says the "
              "form does not describe the rungs: its extrapolation is a summary, not a prediction. A fit of two "
              "rungs has nothing to check its form against.", "",
              "| arm | metric | a (d -> inf) | b | prediction at 4096 | fit chi2 (dof) | interval scale |",
              "|---|---|---|---|---|---|---|"]
    for arm, per in result["fits"].items():
        for metric, f in per.items():
            gof = f"{f['chi2']:.2f} ({f['dof']})" + (f", p = {f['p_fit']:.3f}" if f["dof"] > 0 else "")
            lines.append(f"| {arm} | {metric} | {f['a']:+.2f} ± {1.96 * f['a_se']:.2f} | {f['b']:+.1f} ± "
                         f"{1.96 * f['b_se']:.1f} | {f['pred']:+.2f}% ± {f['half']:.2f} | {gof} | {f['scale']:.2f} |")
    lines += ["", "What the paper reports at d = 4096, beside the prediction:", ""]
    for arm, says in PAPER_SAYS.items():
        f = result["fits"].get(arm, {}).get("fid")
        pred = f"{f['pred']:+.2f}% ± {f['half']:.2f}" if f else "no fit"
        lines.append(f"- {arm}: predicted FID change {pred}; the paper: {says}.")
    lines += ["", f"Caveats: {len(result['rungs'])} rungs, one seed set each; the intervals treat each rung's standard "
                  "error as known (few seeds make them optimistic); the rungs differ in data as well as d. "
                  + _same_images(result["rungs"]), "", "![ladder](ladder.png)"]
    _plot(result, out / "ladder.png")
    atomic_write_text(out / "ladder.json", json.dumps(result, indent=1, default=float, allow_nan=False))
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path, result


def _same_images(rungs: list[dict]) -> str:
    """Which rungs hold the images fixed and change only d (the same dataset at two resolutions)."""
    by_base: dict[str, list[dict]] = {}
    for r in rungs:
        by_base.setdefault(parse_source(r["data"])[0], []).append(r)
    pairs = [" and ".join(sorted({r["data"] for r in rs})) for rs in by_base.values() if len({r["d"] for r in rs}) > 1]
    if not pairs:
        return "No two rungs hold the same images at two d."
    return "The same images at two d: " + "; ".join(pairs) + "."


def _relative(study: str | Path, out: Path) -> str:
    try:
        return str(Path(study).resolve().relative_to(out.resolve().parent).as_posix())
    except ValueError:
        return str(Path(study).resolve())


def studies_of(out: str | Path) -> list[Path]:
    """The studies a written ladder was built from (its ladder.json), resolved against its parent folder."""
    out = Path(out)
    spec = json.loads((out / "ladder.json").read_text())["studies"]
    return [(out.parent / s) if not Path(s).is_absolute() else Path(s) for s in spec]


def _plot(result: dict, path: Path) -> None:
    import matplotlib  # lazy: plotting is optional for the fit itself
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.5 * len(METRICS), 4))
    grid = np.linspace(1.0 / math.sqrt(PAPER_D), 1.0 / math.sqrt(min(r["d"] for r in result["rungs"])), 50)
    for ax, (metric, label) in zip(axes, METRICS):
        for i, arm in enumerate(LADDER_ROWS):
            pts = [(r["d"], r["arms"][arm][metric]) for r in result["rungs"] if metric in r["arms"].get(arm, {})]
            if not pts:
                continue
            color = f"C{i}"
            ax.errorbar([d for d, _ in pts], [c["mean"] for _, c in pts], yerr=[c["half"] for _, c in pts],
                        fmt="o", color=color, capsize=3, label=arm)
            f = result["fits"].get(arm, {}).get(metric)
            if f:
                ax.plot(1.0 / grid ** 2, f["a"] + f["b"] * grid, color=color, lw=1, alpha=0.7)
                ax.errorbar([PAPER_D * (1.04 + 0.02 * i)], [f["pred"]], yerr=[f["half"]], fmt="s", color=color,
                            capsize=3, mfc="none")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.axvline(PAPER_D, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("data dimension d (log scale); open squares: fit at 4096")
        ax.set_ylabel(f"{label} change vs vanilla (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
