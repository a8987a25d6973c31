"""`noiserater report RUN_DIR`: tables with confidence intervals, paired tests, cost ratios and plots.

Reads every ``stage.json`` of the continuation runs of a study (see :mod:`noiserater.study.reproduce`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ..checkpoint import atomic_write_bytes, atomic_write_text, write_json
from ..config import ConfigError
from ..plotting import figure, label_axes, legend, policy_color, savefig
from ..run.folder import METRICS as METRICS_FILE
from ..run.folder import read_metrics
from ..run.provenance import version_info, version_line
from ..stats import paired_interval
from .presets import paper_table

METRICS = ("fid", "heldout_loss", "precision", "recall", "class_accuracy")


def run_metrics(checkpoint: str | Path) -> list[dict]:
    """The step records (no events) of the run that wrote ``checkpoint`` (RUN/checkpoints/latest.pt)."""
    return [r for r in read_metrics(Path(checkpoint).parent.parent / METRICS_FILE) if "event" not in r and "loss" in r]


def median_throughput(checkpoint: str | Path) -> float:
    """Median logged training throughput (images/s) of the run that wrote ``checkpoint``; the first log
    window (warm-up) is dropped; NaN when the run logged too little."""
    speeds = [r["images_per_s"] for r in run_metrics(checkpoint)[1:] if r.get("images_per_s")]
    return float(np.median(speeds)) if speeds else float("nan")


def load_results(root: str | Path) -> pd.DataFrame:
    """One row per continuation run: table, policy, k, seed, metrics, wall-clock, and the median training
    throughput of the run (``images_per_s``, from its metrics.jsonl: warm-up and evaluation excluded)."""
    rows = []
    for marker in sorted(Path(root).glob("runs/**/stage.json")):
        row = json.loads(marker.read_text())["result"]
        # stage records hold paths relative to the study root (a study folder can be moved or copied);
        # the run's checkpoint is always RUN/run/checkpoints/latest.pt beside its stage.json
        row["checkpoint"] = str(marker.parent / "run" / "checkpoints" / "latest.pt")
        row["images_per_s"] = median_throughput(row["checkpoint"])
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no finished continuation runs under {root}/runs; run `noiserater reproduce` first")
    return pd.DataFrame(rows)


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, std, half-width of the t-distribution confidence interval) over seeds."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    s = float(v.std(ddof=1))
    return m, s, float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * s / math.sqrt(len(v)))


def paired_test(a: pd.Series, b: pd.Series) -> dict:
    """Paired comparison of two policies over the seeds they share: mean relative difference of a vs b,
    its 95% CI and its two-sided p-value (:func:`noiserater.stats.paired_interval`)."""
    common = sorted(set(a.index) & set(b.index))
    if len(common) < 2:
        return {"n": len(common), "rel_diff_pct": float("nan"), "ci_pct": float("nan"), "p": float("nan"),
                "rel_sd_pct": float("nan")}
    x, y = a.loc[common].to_numpy(float), b.loc[common].to_numpy(float)
    ci = paired_interval((100.0 * (x - y) / y).tolist())  # the p-value of the interval shown (noiserater.stats)
    return {"n": len(common), "rel_diff_pct": ci["mean"], "ci_pct": ci["half"], "p": ci["p"], "rel_sd_pct": ci["sd"]}


def seeds_needed(rel_diffs: np.ndarray, effect_pct: float = 1.0, alpha: float = 0.05, power: float = 0.8) -> float:
    """Seeds a paired two-sided t-test needs to detect a relative change of ``effect_pct`` percent, given the
    seed-to-seed spread of the observed paired relative differences (exact: :func:`seeds_for_spread`)."""
    rel_diffs = np.asarray(rel_diffs, float)
    rel_diffs = rel_diffs[np.isfinite(rel_diffs)]
    if len(rel_diffs) < 2:
        return float("nan")
    return seeds_for_spread(float(rel_diffs.std(ddof=1)), effect_pct, alpha, power)


def paired_power(n: int, sd: float, effect_pct: float = 1.0, alpha: float = 0.05) -> float:
    """Exact power of the two-sided paired t-test at level ``alpha`` with ``n`` pairs whose differences have
    mean ``effect_pct`` and standard deviation ``sd``: the statistic is noncentral t with n - 1 degrees of
    freedom and noncentrality effect / sd * sqrt(n)."""
    if n < 2:
        return float("nan")
    df, nc = n - 1, abs(effect_pct) / sd * math.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    # P(T > crit) + P(T < -crit); the lower tail as P(-T > crit) with -T ~ nct(df, -nc), because scipy's
    # nct.cdf returns NaN far in its lower tail (e.g. df=1, nc=8) where sf of the mirror gives ~0
    lower = float(stats.nct.sf(crit, df, -nc))
    return float(stats.nct.sf(crit, df, nc)) + (lower if lower == lower else 0.0)


def seeds_for_spread(sd: float, effect_pct: float = 1.0, alpha: float = 0.05, power: float = 0.8) -> float:
    """The fewest seeds (at least 2, the fewest a paired t-test can use) whose exact power
    (:func:`paired_power`, noncentral t) to detect ``effect_pct`` reaches ``power`` when the paired relative
    differences have standard deviation ``sd`` percent; NaN when ``sd`` is unknown."""
    if sd != sd:
        return float("nan")
    if sd <= 0:
        return 2.0
    if effect_pct == 0:
        return float("inf")
    lo, hi = 1, 2  # power(lo) < target <= power(hi); power grows with n
    while paired_power(hi, sd, effect_pct, alpha) < power:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if paired_power(mid, sd, effect_pct, alpha) >= power else (mid, hi)
    return float(hi)


def summarize(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """Per policy/k of one table: mean, std, CI of each metric; relative change and paired test vs vanilla."""
    sub = df[df["table"] == table]
    out = []
    # A table without its own vanilla runs (the ablations) is compared with the main table's, which share the
    # initial checkpoint and seeds.
    base = sub if (sub["policy"] == "vanilla").any() else df[df["table"] == "main"]
    van = base[base["policy"] == "vanilla"].set_index("seed")
    # Cost = training throughput against vanilla's (median logged images/s, first log line dropped), so the
    # warm-up that the first run of a process pays is not charged to whichever policy ran first.
    speed_v = van["images_per_s"].median() if len(van) and "images_per_s" in van else float("nan")
    for label, g in sub.groupby("label", sort=False):
        row = {"label": label, "policy": g["policy"].iloc[0], "k": int(g["k"].iloc[0]), "seeds": len(g)}
        gi = g.set_index("seed")
        for m in METRICS:
            if m not in g:
                continue
            mean, sd, hw = mean_ci(g[m].to_numpy(float))
            row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_ci"] = mean, sd, hw
            if len(van) and m in van and label != "vanilla":
                pt = paired_test(gi[m], van[m])
                row[f"{m}_vs_vanilla_pct"], row[f"{m}_vs_vanilla_ci"], row[f"{m}_p"] = pt["rel_diff_pct"], pt["ci_pct"], pt["p"]
        row["cost_ratio"] = float(speed_v / g["images_per_s"].median()) if "images_per_s" in g else float("nan")
        out.append(row)
    return pd.DataFrame(out)


def format_mean_ci(m, ci, digits=3) -> str:
    """'m ± ci' (or 'm' without an interval, 'n/a' for NaN)."""
    if m != m:
        return "n/a"
    return f"{m:.{digits}f} ± {ci:.{digits}f}" if ci == ci else f"{m:.{digits}f}"


def format_vs_vanilla(pct, ci, p) -> str:
    """'+x.xx% ± ci (p=...)', marked 'inside the noise' when the interval contains 0."""
    if pct != pct:
        return "n/a"
    inside = (ci != ci) or abs(pct) <= ci
    return f"{pct:+.2f}% ± {ci:.2f} (p={p:.2f}){' — inside the noise' if inside else ''}"


def markdown_table(summary: pd.DataFrame, has_fid: bool) -> str:
    head = "| policy | seeds | classifier-FID (95% CI) | FID vs vanilla | held-out loss (95% CI) | loss vs vanilla | cost ratio |"
    lines = [head, "|" + "---|" * 7]
    for _, r in summary.iterrows():
        fid = format_mean_ci(r.get("fid_mean", float("nan")), r.get("fid_ci", float("nan")), 2) if has_fid else "n/a"
        lines.append(
            f"| {r['label']} | {r['seeds']} | {fid} | "
            f"{format_vs_vanilla(r.get('fid_vs_vanilla_pct', float('nan')), r.get('fid_vs_vanilla_ci', float('nan')), r.get('fid_p', float('nan'))) if has_fid else 'n/a'} | "
            f"{format_mean_ci(r['heldout_loss_mean'], r['heldout_loss_ci'], 5)} | "
            f"{format_vs_vanilla(r.get('heldout_loss_vs_vanilla_pct', float('nan')), r.get('heldout_loss_vs_vanilla_ci', float('nan')), r.get('heldout_loss_p', float('nan')))} | "
            f"{r['cost_ratio']:.2f}x |"
        )
    return "\n".join(lines)


METRIC_AXES = {  # metric -> (what it is, for the title; axis label; unit; lower is better)
    "fid": ("classifier-FID of EMA samples", "classifier-FID", None, True),
    "heldout_loss": ("held-out diffusion loss of the EMA weights", "held-out loss", "MSE per element", True),
}


def plot_summary(summary: pd.DataFrame, metric: str, path: Path, title: str, metric_name: str | None = None) -> None:
    """Mean and 95% t-interval over seeds of ``metric`` per policy/k (points with error bars: the axis need
    not start at 0, which bars would imply), vanilla's mean as a dashed line; the caption says what is shown."""
    if f"{metric}_mean" not in summary:
        return
    name, axis, unit, lower = METRIC_AXES.get(metric, (metric, metric, None, False))
    name, axis = (metric_name, metric_name) if metric_name else (name, axis)
    width = max(5.5, 0.45 * len(summary) + 2.0)
    fig, (ax,) = figure(width=width, height=3.8, title=f"{title}\n{name}")
    x = np.arange(len(summary))
    mean, ci = summary[f"{metric}_mean"].to_numpy(float), summary[f"{metric}_ci"].to_numpy(float)
    for i, (m, c, pol) in enumerate(zip(mean, ci, summary["policy"])):
        ax.errorbar([i], [m], yerr=[[c if c == c else 0.0]] * 2, fmt="o", ms=6, capsize=4, lw=1.4,
                    color=policy_color(pol, i))
    ticks = [f"{lab} (n={n})" for lab, n in zip(summary["label"], summary["seeds"])]
    slot_in = (width - 1.5) / max(1, len(ticks))  # horizontal room per label; ~0.075 in per 9 pt character
    if len(ticks) > 4 or max(len(t) for t in ticks) * 0.075 > slot_in:
        ax.set_xticks(x, ticks, rotation=30, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(x, ticks)
    van = summary[summary["policy"] == "vanilla"]
    if len(van):  # the reference every point is compared with (named in the caption, no legend over the data)
        ax.axhline(float(van[f"{metric}_mean"].iloc[0]), color=policy_color("vanilla"), lw=0.9, ls="--")
    ax.set_xlim(-0.6, len(summary) - 0.4)
    ax.margins(y=0.08)
    label_axes(ax, xlabel="selection policy and candidates k (n = seeds)", ylabel=axis, yunit=unit,
               lower_is_better=lower, width_in=width)
    one_seed = bool(np.any(~np.isfinite(ci)))
    what = (" The held-out loss is measured on a fixed set of (image, noise, timestep) triples of the validation "
            "split, the same for every run." if metric == "heldout_loss" else "")
    savefig(fig, path, caption=(
        "Points: mean over seeds; error bars: 95% t-interval of that mean over seeds"
        + (" (none where there is a single seed)" if one_seed else "") + ". "
        + ("Dashed line: vanilla's mean. " if len(van) else "This table has no vanilla runs of its own. ")
        + "These are unpaired intervals; the table's 'vs vanilla' column is the paired comparison over shared seeds, "
        "which is tighter. The y axis does not start at 0." + what))


def plot_loss_curves(df: pd.DataFrame, table: str, path: Path) -> None:
    """Training loss against continuation step, mean over seeds, one line per policy/k. The caption warns that
    the selection policies' training loss is on their selected noise and is not comparable to vanilla's."""
    runs = df[df["table"] == table]
    many = runs["label"].nunique() > 6  # legend to the right of the axes: make room for it
    fig, (ax,) = figure(width=9.5 if many else 6.5, height=3.8, title=(
        f"{table_title(table)}\ntraining loss on each policy's own (selected) noise: not comparable across policies"))
    styles = {2: ":", 4: "-", 8: "--"}
    plotted = 0
    for i, (label, g) in enumerate(runs.groupby("label", sort=False)):
        curves = []
        for ckpt in g["checkpoint"]:
            recs = run_metrics(ckpt)
            if recs:
                curves.append(pd.Series([r["loss"] for r in recs], index=[r["step"] for r in recs]))
        if curves:
            mean = pd.concat(curves, axis=1).mean(axis=1)
            policy = str(g["policy"].iloc[0])
            vanilla = policy == "vanilla"
            ax.plot(mean.index, mean.rolling(5, min_periods=1).mean(), label=f"{label} (n={len(curves)})",
                    lw=2.0 if vanilla else 1.2, color=policy_color(policy, i),
                    ls="-" if vanilla else styles.get(int(g["k"].iloc[0]), "-."), zorder=3 if vanilla else 2,
                    marker="o" if len(mean) <= 3 else None)  # a line through 1-3 log points is hard to see
            plotted += 1
    label_axes(ax, xlabel="continuation step", xunit="optimizer steps",
               ylabel="training loss", yunit="MSE per element", width_in=6.0)
    legend(ax, outside=many)
    savefig(fig, path, caption=(
        "Mean over n seeds of the logged training loss, smoothed with a rolling mean over 5 log points; "
        "line style = k (dotted 2, solid 4, dashed 8). Not comparable across policies: a selection policy's "
        "training loss is measured on the noise it selected (rater_soft: the score-weighted loss over its k "
        "candidates), not on fresh Gaussian noise like vanilla's, so a policy that picks easy noise shows a lower "
        "training loss without training a better model. Compare policies by the held-out loss and FID in the table."
        + ("" if plotted else " (No run of this table logged a training loss.)")))


def table_title(table: str) -> str:
    """The heading of one study table (the folder under ``runs/``), with the paper's table numbers."""
    if table == "main":
        return (f"{paper_table('policies')} (policies) and {paper_table('k')} (effect of k): continuation from the "
                "pretrained checkpoint")
    if table == "ablation":
        return f"{paper_table('ablations')}: rater ablations (vs {paper_table('policies')}'s vanilla runs)"
    if table.startswith("stage-"):
        return f"{paper_table('stages')}: rater meta-trained at pretraining step {table[6:]}, continued from there"
    if table == "transfer":
        return f"{paper_table('transfer')}: the frozen rater transferred to a larger backbone at the matched stage"
    return table


def _table_order(tables) -> list[str]:
    rank = {"main": 0, "ablation": 1, "transfer": 3}
    return sorted(set(tables), key=lambda t: (rank.get(t, 2), int(t[6:]) if t.startswith("stage-") else 0, t))


def _analysis_section(root: Path, out: Path) -> list[str]:
    """The rater analysis of the study (``root/analysis``, see experiments.analyze_raters): a table of the
    pooled statistics per stage and the figures, copied next to report.md as analysis_*.png."""
    marker = root / "analysis" / "stage.json"
    if not marker.exists():
        return []
    res = json.loads(marker.read_text())["result"]
    lines = ["## What the rater learned", "",
             "Per rater: the Spearman rank correlation between its scores of 16 candidate noises and their L2 norms "
             "(positive = it prefers larger-norm noises; near 0 = it is not a norm filter), and the spread of its "
             "scores across the 16 noises of one (image, timestep), pooled over images and 11 timesteps "
             "(paper Fig. 2-3).", "",
             "Agreement: how often the rater's top pick among k=4 fresh candidates (random image, timestep) is "
             "the one max_norm / min_norm / nearest would pick (chance: 25%).", "",
             "| rater meta-trained at step | mean Spearman(score, norm) | median | mean score std "
             "| agrees with max_norm / min_norm / nearest |", "|---|---|---|---|---|"]
    for st in res["stages"]:
        sp, sd, ag = st["pooled"]["spearman"], st["pooled"]["score_std"], st.get("agreement_k4") or {}
        agree = " / ".join(f"{100 * ag[p]:.0f}%" for p in ("max_norm", "min_norm", "nearest")) if ag else "-"
        lines.append(f"| {st['step']} | {sp.get('mean', float('nan')):+.3f} | {sp.get('median', float('nan')):+.3f} | "
                     f"{sd.get('mean', float('nan')):.4f} | {agree} |")
    lines.append("")
    last = max(st["step"] for st in res["stages"])
    figures = [(root / "analysis" / f, f"analysis_{f}") for f in res["figures"]]
    figures += [(p, f"analysis_step{last}_{p.name}") for p in sorted((root / "analysis" / f"stage_{last:07d}").glob("*.png"))]
    for src, name in figures:
        if src.exists():
            if src.resolve() != (out / name).resolve():
                atomic_write_bytes(out / name, src.read_bytes())
            lines.append(f"![{name}]({name})")
    return lines + [""]


def write_report(root: str | Path, out_dir: str | Path | None = None, headline_k: int | None = None) -> dict:
    """Write report.md, report.json and PNG plots for the study in ``root``; return the headline."""
    root = Path(root)
    out = Path(out_dir) if out_dir else root
    out.mkdir(parents=True, exist_ok=True)
    df = load_results(root)
    has_fid = "fid" in df and df["fid"].notna().any()
    info = json.loads((root / "study.json").read_text()) if (root / "study.json").exists() else {}
    if headline_k is None:  # the study's own headline k (ReproducePreset.headline_k), else the paper's k=4
        headline_k = int(info.get("settings", {}).get("headline_k", 4))
    else:  # an explicit k that the study never ran would silently drop the headline
        ran = sorted({int(k) for k in df.loc[(df["table"] == "main") & (df["policy"] == "rater"), "k"]})
        if ran and headline_k not in ran:
            raise ConfigError(f"invalid k (flag --candidates): the study has rater runs at k = {ran}, not {headline_k}")
    parts = [f"# NoiseRater reproduction report: {info.get('preset', root.name)}", "",
             f"Written by {version_line()}.", ""]
    if info:
        parts += ["Study settings: " + ", ".join(f"`{k}={v}`" for k, v in info.get("settings", {}).items()), ""]
    parts += [
        "Metrics: classifier-FID of EMA samples (lower is better; features of a classifier trained on the "
        "dataset), and the diffusion loss of the EMA weights on a fixed held-out set of (image, noise, timestep) "
        "triples from the validation split (lower is better). Intervals are 95% t-intervals over seeds; "
        "'vs vanilla' is the paired relative difference over shared seeds with its 95% interval and the paired "
        "t-test p-value. Cost ratio: vanilla's training throughput over the policy's (median logged images/s of "
        "each continuation, first log line dropped), same machine, same study.",
        "",
    ]
    tables, headline = {}, {}
    inception = info.get("settings", {}).get("eval_extractors") == "inception"
    fid_name = "FID (Inception features) of EMA samples" if inception else None
    for table in _table_order(df["table"]):
        title = table_title(table)
        s = summarize(df, table)
        tables[table] = s.to_dict(orient="records")
        parts += [f"## {title}", "", markdown_table(s, has_fid), ""]
        plot_summary(s, "fid" if has_fid else "heldout_loss", out / f"{table}_{'fid' if has_fid else 'loss'}.png", title,
                     metric_name=fid_name if has_fid else None)
        plot_loss_curves(df, table, out / f"{table}_loss_curves.png")
        parts += [f"![{table}]({table}_{'fid' if has_fid else 'loss'}.png) ![{table} curves]({table}_loss_curves.png)", ""]
    settings = info.get("settings", {})
    meta_stage = settings.get("meta_stage")
    if meta_stage in (settings.get("stage_steps") or []) and f"stage-{meta_stage}" not in set(df["table"]):
        parts += [f"{paper_table('stages')} at stage {meta_stage}: the continuations from that checkpoint are "
                  f"{paper_table('policies')}'s vanilla "
                  f"and rater runs (the main rater is meta-trained there), not repeated.", ""]
    if (root / "transfer.json").exists():
        tr = json.loads((root / "transfer.json").read_text())
        parts += [f"Stage matching (paper eq. 10) for {paper_table('transfer')}: {tr['source']} at step {tr['source_step']} ~ "
                  f"{tr['target']} at step {tr['matched_step']} ({tr['note']}); continued from its checkpoint at "
                  f"step {tr['used_step']}.", ""]
    main = df[df["table"] == "main"]
    van = main[main["policy"] == "vanilla"].set_index("seed")
    rat = main[(main["policy"] == "rater") & (main["k"] == headline_k)].set_index("seed")
    if len(van) and len(rat):
        parts += ["## Headline and power", ""]
        for m in ("fid", "heldout_loss"):
            if m not in main or not main[m].notna().any():
                continue
            h = headline[m] = paired_test(rat[m], van[m])
            h["seeds_for_1pct"] = seeds_for_spread(h["rel_sd_pct"])
            paper = " (paper: -2.6% FID-50K at k=4, DiT-S/2 on ImageNet)" if m == "fid" else ""
            parts.append(f"- rater k={headline_k} vs vanilla, {m}: {format_vs_vanilla(h['rel_diff_pct'], h['ci_pct'], h['p'])} "
                         f"over {h['n']} paired seeds{paper}.")
            parts.append(
                f"  Power: the paired relative differences have a seed-to-seed standard deviation of "
                f"{h['rel_sd_pct']:.3f}%; detecting a 1% change with a two-sided paired test (alpha 0.05, power 0.8) "
                f"needs about {h['seeds_for_1pct']:.0f} seed(s); this study used {h['n']}.")
        parts.append("")
    parts += ["## Reading this report", "",
              "Selection changes the distribution of the training noise, so a held-out loss measured with plain "
              "Gaussian noise can penalise every selection policy by construction; sample quality "
              "(classifier-FID) is the primary metric, as in the paper. A difference whose interval contains 0 "
              "is marked 'inside the noise'.", ""]
    parts += _analysis_section(root, out)
    atomic_write_text(out / "report.md", "\n".join(parts))
    write_json(out / "report.json", {"tables": tables, "headline": headline, "study": info, "written_by": version_info()})
    return {"headline": headline, "report": str(out / "report.md")}
