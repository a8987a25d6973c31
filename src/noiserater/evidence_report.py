"""The evidence study's report: every arm against its equal-cost control, 95% paired t-intervals.

For each stage and arm, per seed s: the relative difference 100 * (arm_s - control_s) / control_s of a
metric (classifier-FID, test-split loss, ...) against the control run of the same seed (same data order,
timesteps, label dropout and first candidate noise). Mean and 95% t-interval over seeds; "inside the
noise" when the interval contains 0. The power line says how many seeds a +-2% FID interval needs at the
measured paired spread (exact: the t quantile of the seed count, not the normal approximation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from scipy import stats

from .checkpoint import atomic_write_text
from .evidence_arms import ARMS, BAND_KEYS
from .plotting import axis_label, figure, label_axes, savefig
from .run.folder import METRICS as METRICS_FILE
from .run.folder import eval_records

METRICS = (("fid", "classifier-FID"), ("test_loss", "test-split loss"))
EXTRA = ("precision", "recall", "class_accuracy", *BAND_KEYS)


def load_rows(root: Path) -> list[dict]:
    """Every finished run of the study (from each run's stage.json, so a partial study reports too)."""
    rows = []
    for marker in sorted(root.glob("stage-*/runs/*/seed*/stage.json")):
        rows.append(json.loads(marker.read_text())["result"])
    return rows


def paired_interval(diffs: list[float], level: float = 0.95) -> dict[str, float]:
    """Mean, sample SD, t-interval half-width and two-sided p-value of paired differences."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "half": math.nan, "p": math.nan}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if sd > 0 else (0.0 if mean else 1.0)
    return {"n": n, "mean": mean, "sd": sd, "half": float(half), "p": p}


def seeds_for_half_width(sd: float, half: float = 2.0, level: float = 0.95, max_n: int = 10_000) -> int | None:
    """Smallest n with t_{n-1} * sd / sqrt(n) <= half (the interval the study promises), or None."""
    if not math.isfinite(sd) or sd <= 0:
        return 2
    for n in range(2, max_n):
        if stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) <= half:
            return n
    return None


def compare(rows: list[dict], arm: str, control: str, metric: str) -> dict[str, float] | None:
    """Relative paired differences (%) of ``metric`` between ``arm`` and ``control`` over common seeds."""
    a = {r["seed"]: r.get(metric) for r in rows if r["arm"] == arm}
    c = {r["seed"]: r.get(metric) for r in rows if r["arm"] == control}
    seeds = sorted(s for s in a if s in c and a[s] is not None and c[s] is not None)
    if not seeds:
        return None
    return paired_interval([100.0 * (a[s] - c[s]) / c[s] for s in seeds])


def fmt(ci: dict[str, float] | None) -> str:
    if ci is None:
        return "—"
    if ci["n"] < 2:
        return f"{ci['mean']:+.1f}% (1 seed)"
    mark = " (inside the noise)" if abs(ci["mean"]) <= ci["half"] else ""
    digits = 2 if ci["half"] >= 0.01 else 3  # an interval narrower than 0.01% keeps a significant digit
    return f"{ci['mean']:+.{digits}f}% ± {ci['half']:.{digits}f}{mark}"


def _mean(rows: list[dict], arm: str, key: str) -> float | None:
    vals = [r[key] for r in rows if r["arm"] == arm and r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _ordered_arms(rows: list[dict]) -> list[str]:
    """Arms in the registry's order (controls first), unknown names last."""
    present = set(r["arm"] for r in rows)
    return [a for a in ARMS if a in present] + sorted(present - set(ARMS))


def stage_table(rows: list[dict], stage: int) -> tuple[list[str], list[dict]]:
    """Markdown lines and the per-arm comparison records of one stage."""
    sub = [r for r in rows if r["stage"] == stage]
    arms = _ordered_arms(sub)
    van_rate = _mean(sub, "vanilla", "images_per_s")
    lines = [
        "| arm | DiT passes / image | control | seeds | FID vs control (95% CI) | test loss vs control (95% CI) "
        "| FID vs vanilla | wall-clock cost vs vanilla |",
        "|---|---|---|---|---|---|---|---|",
    ]
    recs = []
    for arm in arms:
        arm_rows = [r for r in sub if r["arm"] == arm]
        control = arm_rows[0]["control"]
        rate = _mean(sub, arm, "images_per_s")
        cost = van_rate / rate if van_rate and rate else None
        rec = {"stage": stage, "arm": arm, "policy": arm_rows[0]["policy"], "k": arm_rows[0]["k"], "control": control,
               "dit_passes": arm_rows[0]["dit_passes"], "seeds": len(arm_rows), "cost_vs_vanilla": cost}
        for key, _ in METRICS:
            rec[f"{key}_vs_control"] = compare(sub, arm, control, key) if arm != control else None
            rec[f"{key}_vs_vanilla"] = compare(sub, arm, "vanilla", key) if arm != "vanilla" else None
            rec[f"{key}_mean"] = _mean(sub, arm, key)
        for key in EXTRA:
            rec[f"{key}_mean"] = _mean(sub, arm, key)
        recs.append(rec)
        if arm == control:
            ctrl_txt = "(is a control)"
        else:
            ctrl_txt = control
        lines.append(
            f"| {arm} | {rec['dit_passes']:g} | {ctrl_txt} | {len(arm_rows)} | {fmt(rec['fid_vs_control'])} | "
            f"{fmt(rec['test_loss_vs_control'])} | {fmt(rec['fid_vs_vanilla'])} | "
            f"{'—' if cost is None else f'{cost:.2f}x'} |")
    return lines, recs


def absolute_table(rows: list[dict], stage: int) -> list[str]:
    sub = [r for r in rows if r["stage"] == stage]
    arms = _ordered_arms(sub)
    lines = ["| arm | FID | precision | recall | class accuracy | test loss | t<100 | 100≤t<400 | t≥400 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        vals = [_mean(sub, arm, k) for k in ("fid", "precision", "recall", "class_accuracy", "test_loss", *BAND_KEYS)]
        cells = ["—" if v is None else (f"{v:.2f}" if i == 0 else f"{v:.4f}" if i >= 4 else f"{v:.3f}")
                 for i, v in enumerate(vals)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def forest_plot(recs: list[dict], stage: int, path: Path) -> Path:
    arms = [r for r in recs if r["fid_vs_control"] is not None]
    fig, axes = figure(ncols=2, width=4.6, height=0.45 * max(len(arms), 3) + 1.2,
                       title=f"Pretraining stage {stage}: each arm against its equal-cost control")
    for ax, (key, name) in zip(axes, METRICS):
        ys = list(range(len(arms)))[::-1]
        for y, r in zip(ys, arms):
            ci = r[f"{key}_vs_control"]
            half = ci["half"] if math.isfinite(ci["half"]) else 0.0
            color = "#D55E00" if ci["mean"] + half < 0 else "#0072B2" if ci["mean"] - half > 0 else "#555555"
            ax.errorbar([ci["mean"]], [y], xerr=[[half], [half]], fmt="o", color=color, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{r['arm']} vs {r['control']}" for r in arms])
        label_axes(ax, xlabel=axis_label(f"{name} change vs control", "%", lower_is_better=True))
    return savefig(fig, path, caption="Points: mean over paired seeds of 100·(arm − control)/control; "
                                      "error bars: 95% t-interval. Left of 0 = better than the control; orange: "
                                      "better, blue: worse, grey: the interval contains 0 (inside the noise).")


def write_evidence_report(root: str | Path) -> Path:
    root = Path(root)
    rows = load_rows(root)
    study = json.loads((root / "study.json").read_text()) if (root / "study.json").exists() else {}
    settings = study.get("settings", {})
    prov = study.get("provenance", {})
    stages = sorted({r["stage"] for r in rows}, key=lambda s: -s)
    out = [f"# Evidence study: {study.get('preset', root.name)} — does any rater beat its equal-cost control?", ""]
    out.append(f"Data `{settings.get('data')}`, DiT `{settings.get('model')}`, k = {settings.get('k')}, "
               f"{settings.get('continue_steps')} continuation steps at lr {settings.get('continue_lr')} "
               f"(EMA {settings.get('continue_ema')}), batch {settings.get('batch_size')}. Splits by seed "
               f"{settings.get('split_seed')}: train / meta-validation {settings.get('val_fraction')} / test "
               f"{settings.get('test_fraction')}; the test split is never trained, selected or meta-learned on. "
               f"FID: {settings.get('eval_samples')} samples, {settings.get('eval_ddim_steps')} DDIM steps, CFG "
               f"{settings.get('cfg_scale')}, EMA weights, classifier features. noiserater "
               f"{prov.get('noiserater')} at commit {prov.get('git_commit')}.")
    out.append("")
    out.append("Each cell: mean over paired seeds of 100·(arm − control)/control, ± the 95% t half-width; "
               "negative is better for both metrics. Control: `uniform_soft` (the same k noises averaged) for "
               "`rater_soft`, vanilla for every one-pass arm. Wall-clock cost: vanilla's median training "
               "throughput over the arm's, measured on a shared 2-core CPU (indicative only).")
    records = []
    for stage in stages:
        lines, recs = stage_table(rows, stage)
        records += recs
        out += ["", f"## Pretraining stage {stage}", ""] + lines + ["", "Absolute means:", ""] + absolute_table(rows, stage)
        van = next((r for r in recs if r["arm"] != "vanilla" and r["control"] == "vanilla" and r["fid_vs_control"]), None)
        sds = [r["fid_vs_control"]["sd"] for r in recs if r["fid_vs_control"] and math.isfinite(r["fid_vs_control"]["sd"])]
        if van is not None and sds:
            med = sorted(sds)[len(sds) // 2]
            need = seeds_for_half_width(med)
            out += ["", f"Power: median paired FID spread {med:.2f}% per seed; a ±2% interval needs {need} seeds "
                        f"(t quantile, exact); this stage has {van['seeds']}."]
        for kind in ("bilevel", "distill"):
            folder = root / f"stage-{stage}" / f"rater-{kind}"
            if (folder / "stage.json").exists():
                res = json.loads((folder / "stage.json").read_text())["result"]["summary"]
                best = res.get("best_eval") or {}
                line = f"{kind} rater: {res.get('step')} outer steps"
                if best:
                    line += (f", best held-out {best.get('metric')} {best.get('value'):.3g} ± {best.get('se'):.2g} "
                             f"at step {best.get('step')}")
                    if best.get("metric") == "rater_advantage":  # its scale: what uniform inner steps gain
                        evals = [r["eval"] for r in eval_records(folder / "run" / METRICS_FILE)]
                        gain = next((e.get("uniform_gain") for e in evals if e.get("uniform_gain")), None)
                        if gain:
                            line += f" (the uniform inner gain is {gain:.3g}: {100 * best['value'] / gain:+.1f}% of it)"
                ana = folder / "analysis" / "analysis.json"
                if ana.exists():
                    a = json.loads(ana.read_text())
                    sp, sd = a["pooled"]["spearman"]["mean"], a["pooled"]["score_std"]["mean"]
                    agree = a.get("agreement_k4", {}).get("max_norm")
                    line += (f"; score spread in a group {sd:.2f}, Spearman with the noise norm {sp:+.2f}"
                             + (f", top pick = max_norm's {100 * agree:.0f}% of the time (chance 25%)" if agree else ""))
                out += ["", line + "."]
        if recs:
            fig = forest_plot(recs, stage, root / f"forest-stage{stage}.png")
            out += ["", f"![stage {stage}]({fig.name})"]
    atomic_write_text(root / "summary.json", json.dumps(records, indent=1, default=str))
    atomic_write_text(root / "results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))
    path = root / "report.md"
    atomic_write_text(path, "\n".join(out) + "\n")
    return path
