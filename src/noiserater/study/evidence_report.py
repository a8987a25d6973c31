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

import numpy as np
from scipy import stats

from ..checkpoint import atomic_write_text
from ..objectives import FLOW_TIME_SCALE
from ..plotting import axis_label, figure, label_axes, savefig
from ..run.folder import METRICS as METRICS_FILE
from ..run.folder import eval_records
from ..selection import dit_passes
from ..stats import paired_interval
from .arms import (
    ARMS,
    BAND_KEYS,
    BAND_LABELS,
    BANDS,
    BATCH_CONTROL,
    COUPLING,
    NORM_CHANGING,
    RANDOM_NULL,
    SCALE_CONTROL_OF,
    SCALE_CONTROLS,
    SOFT_ARMS,
)

METRICS = (("fid", "classifier-FID"), ("test_loss", "test-split loss"))
EXTRA = ("precision", "recall", "class_accuracy", *BAND_KEYS)


def load_rows(root: Path) -> list[dict]:
    """Every finished run of the study (from each run's stage.json, so a partial study reports too). A
    random-rater run is its own arm per initialisation: ``<arm>/init<i>``."""
    rows = []
    markers = [*root.glob("stage-*/runs/*/seed*/stage.json"), *root.glob("stage-*/runs/*/init*/seed*/stage.json"),
               *root.glob("scratch-*/runs/*/seed*/stage.json"), *root.glob("scratch-*/runs/*/init*/seed*/stage.json")]
    for marker in sorted(markers):
        r = json.loads(marker.read_text())["result"]
        if r.get("rater_init") is not None:
            r["arm"] = f"{r['arm']}/init{r['rater_init']}"
        rows.append(r)
    return rows


def base_arm(arm: str) -> str:
    """The registry name of a report arm (``rater_random/init2`` -> ``rater_random``)."""
    return arm.split("/init")[0]


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
    order = {a: i for i, a in enumerate(ARMS)}
    known = sorted((a for a in present if base_arm(a) in order), key=lambda a: (order[base_arm(a)], a))
    return known + sorted(a for a in present if base_arm(a) not in order)


def planned_seeds(settings: dict, arm: str) -> int | None:
    """How many seeds the preset planned for ``arm`` before the runs started (None: no plan recorded)."""
    if "seeds" not in settings:
        return None
    if ARMS.get(base_arm(arm), (None, None, None, None))[3] == "random":
        chosen = settings.get("random_rater_seeds") or settings["seeds"]
        return len([s for s in settings["seeds"] if s in chosen])
    return len(settings["seeds"])


def stage_table(rows: list[dict], stage: int, settings: dict | None = None) -> tuple[list[str], list[dict]]:
    """Markdown lines and the per-arm comparison records of one stage."""
    settings = settings or {}
    sub = [r for r in rows if r["stage"] == stage]
    arms = _ordered_arms(sub)
    van_rate = _mean(sub, "vanilla", "images_per_s")
    lines = [
        "| arm | DiT passes / image | control | seeds: planned, ran | FID vs control (95% CI) "
        "| test loss vs control (95% CI) | FID vs vanilla | wall-clock cost vs vanilla |",
        "|---|---|---|---|---|---|---|---|",
    ]
    recs = []
    for arm in arms:
        arm_rows = [r for r in sub if r["arm"] == arm]
        control = arm_rows[0]["control"]
        rate = _mean(sub, arm, "images_per_s")
        # per image of the study's batch: an arm at m times the batch trains m images for each of vanilla's
        batch_multiple = arm_rows[0]["dit_passes"] / dit_passes(arm_rows[0]["policy"], arm_rows[0]["k"])
        cost = batch_multiple * van_rate / rate if van_rate and rate else None
        rec = {"stage": stage, "arm": arm, "policy": arm_rows[0]["policy"], "k": arm_rows[0]["k"], "control": control,
               "dit_passes": arm_rows[0]["dit_passes"], "seeds": len(arm_rows), "cost_vs_vanilla": cost,
               "seeds_planned": planned_seeds(settings, arm)}
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
            f"| {arm} | {rec['dit_passes']:g} | {ctrl_txt} | "
            f"{'—' if rec['seeds_planned'] is None else rec['seeds_planned']}, {len(arm_rows)} | {fmt(rec['fid_vs_control'])} | "
            f"{fmt(rec['test_loss_vs_control'])} | {fmt(rec['fid_vs_vanilla'])} | "
            f"{'—' if cost is None else f'{cost:.2f}x'} |")
    return lines, recs


def absolute_table(rows: list[dict], stage: int) -> list[str]:
    sub = [r for r in rows if r["stage"] == stage]
    arms = _ordered_arms(sub)
    lines = ["| arm | FID | precision | recall | class accuracy | test loss | " + " | ".join(BAND_LABELS) + " "
             "| noise scale | E‖ε‖²/d trained on | KS distance of ‖ε‖ from χ_d |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        keys = ("fid", "precision", "recall", "class_accuracy", "test_loss", *BAND_KEYS)
        vals = [_mean(sub, arm, k) for k in keys]
        cells = ["—" if v is None else (f"{v:.2f}" if i == 0 else f"{v:.4f}" if i >= 4 else f"{v:.3f}")
                 for i, v in enumerate(vals)]
        extra = [_mean(sub, arm, k) for k in ("noise_scale", "noise_sq_norm_per_dim", "noise_norm_ks")]
        cells += ["—" if v is None else f"{v:.4f}" if i < 2 else f"{v:.3f}" for i, v in enumerate(extra)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def matched_scale_control(sub: list[dict], arm: str) -> str | None:
    """The k=1 noise-scale control whose noise length matches ``arm``'s: of the controls present, the one
    whose recorded E||eps||^2/d is nearest the arm's, if within a fifth of the arm's own departure from 1
    (max_norm and its closed-form control differ by under 1% of it). Without recorded norms, the control the
    arm's scale was built for (``SCALE_CONTROL_OF``). None: no control of the arm's length ran."""
    present = [c for c in SCALE_CONTROLS if any(r["arm"] == c for r in sub)]
    m = _mean(sub, arm, "noise_sq_norm_per_dim")
    norms = {c: _mean(sub, c, "noise_sq_norm_per_dim") for c in present}
    if m is None or any(v is None for v in norms.values()):
        c = SCALE_CONTROL_OF.get(arm)
        return c if c in present else None
    best = min(present, key=lambda c: abs(norms[c] - m), default=None)
    return best if best is not None and abs(norms[best] - m) <= 0.2 * abs(m - 1) else None


def norm_control_lines(rows: list[dict], stage: int, extra_steps: list[int] = ()) -> list[str]:
    """Each norm-changing policy against the k=1 noise-scale control of the same mean norm: a gain the
    control also gets is a noise-scale effect, not the policy's. An arm no control matches says so. FID at
    each of ``extra_steps`` sampler steps too (``fid_steps<n>``), where the study measured it."""
    sub = [r for r in rows if r["stage"] == stage]
    present = {r["arm"] for r in sub}
    # at k=1 a batch coupling permutes i.i.d. noises: the lengths it trains on are plain chi_d
    arms = [a for a in NORM_CHANGING if a in present and next(r.get("k") for r in sub if r["arm"] == a) != 1]
    if not arms or not present & set(SCALE_CONTROLS):
        return []
    keys = ["fid"] + [f"fid_steps{n}" for n in extra_steps if any(f"fid_steps{n}" in r for r in sub)] + ["test_loss"]
    names = ["FID"] + [f"FID, {k.removeprefix('fid_steps')} steps" for k in keys[1:-1]] + ["test loss"]
    lines = ["| arm vs its k=1 noise-scale control | E‖ε‖²/d: arm, control | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(keys)]
    for arm in arms:
        ctrl = matched_scale_control(sub, arm)
        norms = [_mean(sub, a, "noise_sq_norm_per_dim") if a else None for a in (arm, ctrl)]
        norm_txt = ", ".join("—" if v is None else f"{v:.3f}" for v in norms)
        if ctrl is None:
            lines.append(f"| {arm} vs — (no control of its noise length ran) | {norm_txt} | " + " | ".join("—" * len(keys))
                         + " |")
            continue
        lines.append(f"| {arm} vs {ctrl} | {norm_txt} | " + " | ".join(fmt(compare(sub, arm, ctrl, k)) for k in keys)
                     + " |")
    return lines


def batch_control_lines(rows: list[dict], stage: int) -> list[str]:
    """The soft policies (k DiT passes per image) against vanilla at k times the batch (the same passes spent
    on more images): a gain this control also gets is the compute's, not the averaging's."""
    sub = [r for r in rows if r["stage"] == stage]
    present = {r["arm"] for r in sub}
    arms = [a for a in SOFT_ARMS if a in present]
    if BATCH_CONTROL not in present or not arms:
        return []
    lines = [f"| arm vs {BATCH_CONTROL} | DiT passes / image: arm, control | FID | test loss |", "|---|---|---|---|"]
    passes = {a: next(r["dit_passes"] for r in sub if r["arm"] == a) for a in (*arms, BATCH_CONTROL)}
    for arm in arms:
        lines.append(f"| {arm} | {passes[arm]:g}, {passes[BATCH_CONTROL]:g} | "
                     + " | ".join(fmt(compare(sub, arm, BATCH_CONTROL, k)) for k in ("fid", "test_loss")) + " |")
    return lines


def scale_arms(rows: list[dict], stage: int) -> list[tuple[float, str]]:
    """(C, arm) of the stage's k=1 noise-scale arms (vanilla's one pass with every noise times C != 1 and
    nothing else changed), sorted by C."""
    sub = [r for r in rows if r["stage"] == stage]
    out = []
    for arm in {r["arm"] for r in sub} - {"vanilla"}:
        recs = [r for r in sub if r["arm"] == arm]
        if all(r.get("policy") == "vanilla" and r.get("k") == 1 and not r.get("input_perturbation")
               and r.get("noise_scale") not in (None, 1.0) for r in recs):
            out.append((recs[0]["noise_scale"], arm))
    return sorted(out)


def parabola_minimum(points: list[tuple[float, float]]) -> float | None:
    """x at the minimum of the least-squares parabola through (x, y) points; None with fewer than 3
    distinct x or a parabola that opens downward (no minimum)."""
    if len({x for x, _ in points}) < 3:
        return None
    a, b, _ = np.polyfit([x for x, _ in points], [y for _, y in points], 2)
    return float(-b / (2 * a)) if a > 0 else None


def dose_response(rows: list[dict], stage: int) -> tuple[list[str], dict] | None:
    """The noise-scale sweep: each k=1 scale arm's paired change vs vanilla (C = 1) by C, and where a
    parabola through the mean changes has its minimum (the scale the data prefer). None with fewer than 3
    scale arms (no sweep ran)."""
    arms = scale_arms(rows, stage)
    if len(arms) < 3:
        return None
    sub = [r for r in rows if r["stage"] == stage]
    lines = ["| C | arm | E‖ε‖²/d trained on | FID vs vanilla | test loss vs vanilla |", "|---|---|---|---|---|"]
    changes = {key: [(1.0, 0.0)] for key, _ in METRICS}
    for c, arm in sorted(arms + [(1.0, "vanilla")]):
        if arm == "vanilla":
            norm = _mean(sub, arm, "noise_sq_norm_per_dim")
            lines.append(f"| 1 | vanilla (the control) | {'—' if norm is None else f'{norm:.3f}'} | — | — |")
            continue
        cis = {key: compare(sub, arm, "vanilla", key) for key, _ in METRICS}
        norm = _mean(sub, arm, "noise_sq_norm_per_dim")
        lines.append(f"| {c:.4g} | {arm} | {'—' if norm is None else f'{norm:.3f}'} | {fmt(cis['fid'])} | "
                     f"{fmt(cis['test_loss'])} |")
        for key, ci in cis.items():
            if ci is not None:
                changes[key].append((c, ci["mean"]))
    lo, hi = min(c for c, _ in arms + [(1.0, "")]), max(c for c, _ in arms + [(1.0, "")])
    best = {key: parabola_minimum(pts) for key, pts in changes.items()}
    words = []
    for key, name in METRICS:
        b = best[key]
        where = ("no minimum (the fitted parabola opens downward)" if b is None else
                 f"C = {b:.3f}" + ("" if lo <= b <= hi else f", outside the swept range [{lo:.3g}, {hi:.3g}]"))
        words.append(f"{name}: {where}")
    lines += ["", "A least-squares parabola through the mean changes (vanilla at C = 1, 0) has its minimum at: "
                  + "; ".join(words) + "."]
    return lines, {"changes": changes, "best": best}


def dose_response_plot(rows: list[dict], stage: int, path: Path, label: str) -> Path | None:
    """Each scale arm's paired change vs vanilla (95% interval) against C, with the fitted parabola."""
    arms = scale_arms(rows, stage)
    if len(arms) < 3:
        return None
    sub = [r for r in rows if r["stage"] == stage]
    fig, axes = figure(ncols=2, width=4.0, height=3.2, title=f"{label}: the noise's scale, k = 1")
    for ax, (key, name) in zip(axes, METRICS):
        pts = [(1.0, 0.0, 0.0)]
        for c, arm in arms:
            ci = compare(sub, arm, "vanilla", key)
            if ci is not None:
                pts.append((c, ci["mean"], ci["half"] if math.isfinite(ci["half"]) else 0.0))
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o", capsize=3,
                    color="black")
        if len(pts) >= 3:
            coef = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 2)
            xs = np.linspace(pts[0][0], pts[-1][0], 100)
            ax.plot(xs, np.polyval(coef, xs), color="#0072B2", lw=1)
        ax.axhline(0, color="black", lw=0.8)
        ax.axvline(1, color="grey", lw=0.6, ls=":")
        label_axes(ax, xlabel="noise scale C (vanilla: 1)",
                   ylabel=axis_label(f"{name} change vs vanilla", "%", lower_is_better=True))
    return savefig(fig, path, caption="Points: mean paired change vs vanilla over seeds, bars: 95% t-interval; "
                                      "line: the least-squares parabola through the means.")


def random_null(rows: list[dict], stage: int, trained: str, metric: str) -> dict | None:
    """The random-rater null of ``trained``: each never-trained initialisation's mean paired effect vs
    vanilla (%), their mean, SD and range, the trained arm's effect on the same seeds, and whether it beats
    the null (lower than the null mean by more than the null SD)."""
    sub = [r for r in rows if r["stage"] == stage]
    null_arm = RANDOM_NULL.get(trained)
    inits = sorted({r["arm"] for r in sub if base_arm(r["arm"]) == null_arm})
    # the trained rater on the seeds the random raters ran, so both sides see the same seeds
    null_seeds = {r["seed"] for r in sub if base_arm(r["arm"]) == null_arm}
    mine = compare([r for r in sub if r["seed"] in null_seeds], trained, "vanilla", metric)
    effects = [c["mean"] for c in (compare(sub, a, "vanilla", metric) for a in inits) if c is not None]
    if mine is None or len(effects) < 2:
        return None
    m = sum(effects) / len(effects)
    sd = math.sqrt(sum((e - m) ** 2 for e in effects) / (len(effects) - 1))
    return {"arm": trained, "null": null_arm, "metric": metric, "inits": len(effects), "null_mean": m, "null_sd": sd,
            "null_min": min(effects), "null_max": max(effects), "effect": mine["mean"],
            "beats_null": mine["mean"] < m - sd}


def random_null_lines(rows: list[dict], stage: int) -> list[str]:
    present = {r["arm"] for r in rows if r["stage"] == stage}
    lines = []
    for trained in RANDOM_NULL:
        if trained not in present:
            continue
        for metric, name in METRICS:
            nr = random_null(rows, stage, trained, metric)
            if nr is None:
                continue
            if not lines:
                lines = ["| trained arm | metric | its change vs vanilla | random-rater null: mean ± SD [min, max] "
                         "over initialisations | beats the null? |", "|---|---|---|---|---|"]
            lines.append(f"| {trained} | {name} | {nr['effect']:+.2f}% | {nr['null_mean']:+.2f}% ± "
                         f"{nr['null_sd']:.2f} [{nr['null_min']:+.2f}, {nr['null_max']:+.2f}] ({nr['inits']} "
                         f"{nr['null']}) | {'yes' if nr['beats_null'] else 'no'} |")
    return lines


def large_fid_lines(rows: list[dict], stage: int, n: int | None) -> list[str]:
    """FID at the eval sample count and at ``n`` samples, each arm vs vanilla: does the order survive the
    sample-size bias of FID?"""
    sub = [r for r in rows if r["stage"] == stage]
    key = f"fid_{n}"
    arms = [a for a in _ordered_arms(sub) if any(r.get(key) is not None for r in sub if r["arm"] == a)]
    if not n or "vanilla" not in arms:
        return []
    lines = [f"| arm | FID, eval samples | FID, {n} samples | vs vanilla, eval samples | vs vanilla, {n} samples |",
             "|---|---|---|---|---|"]
    for arm in arms:
        seeds = {r["seed"] for r in sub if r["arm"] == arm and r.get(key) is not None}
        both = [r for r in sub if r["seed"] in seeds]
        small, large = _mean(both, arm, "fid"), _mean(both, arm, key)
        vs = [compare(both, arm, "vanilla", k) if arm != "vanilla" else None for k in ("fid", key)]
        lines.append(f"| {arm} | {small:.2f} | {large:.2f} | {fmt(vs[0])} | {fmt(vs[1])} |")
    return lines


def extra_steps_lines(rows: list[dict], stage: int, steps: list[int], main_steps: int | None) -> list[str]:
    """Each arm's FID change vs vanilla at other sampler step counts (``fid_steps<n>``) beside the main one."""
    sub = [r for r in rows if r["stage"] == stage]
    arms = [a for a in _ordered_arms(sub) if a != "vanilla" and "/init" not in a]
    if not arms or not any(f"fid_steps{n}" in r for r in sub for n in steps):
        return []
    head = "| arm | " + " | ".join(f"FID vs vanilla, {n} steps" for n in steps) + f" | {main_steps} steps |"
    lines = [head, "|---|" + "---|" * (len(steps) + 1)]
    for arm in arms:
        cells = [fmt(compare(sub, arm, "vanilla", f"fid_steps{n}")) for n in steps]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {fmt(compare(sub, arm, 'vanilla', 'fid'))} |")
    return lines


def training_curve_keys(settings: dict) -> list[tuple[str, str]]:
    """(record key, name) of the metrics a from-scratch study follows along training."""
    main = f"FID, {settings.get('eval_ddim_steps')} steps"
    return ([("fid", main)] + [(f"fid_steps{n}", f"FID, {n} steps") for n in settings.get("eval_extra_steps") or []]
            + [("test_loss", "test loss")])


def training_curve_lines(rows: list[dict], settings: dict) -> list[str]:
    """From scratch: each arm's paired change vs vanilla at every evaluated step, one table per metric (the
    peers' claim is a faster convergence, so the trend along training is the result)."""
    steps = sorted({r["stage"] for r in rows})
    arms = [a for a in _ordered_arms(rows) if a != "vanilla" and "/init" not in a]
    if not arms or len(steps) < 2:
        return []
    out = []
    for key, name in training_curve_keys(settings):
        if not any(r.get(key) is not None for r in rows):
            continue
        head = f"| {name}: arm vs vanilla | " + " | ".join(f"step {s}" for s in steps) + " |"
        out += [head, "|---|" + "---|" * len(steps)]
        for arm in arms:
            cells = [fmt(compare([r for r in rows if r["stage"] == s], arm, "vanilla", key)) for s in steps]
            out.append(f"| {arm} | " + " | ".join(cells) + " |")
        van = [_mean([r for r in rows if r["stage"] == s], "vanilla", key) for s in steps]
        out += ["| *vanilla (absolute)* | " + " | ".join("—" if v is None else f"{v:.4g}" for v in van) + " |", ""]
    return out[:-1]


def training_curve_plot(rows: list[dict], settings: dict, path: Path) -> Path | None:
    """From scratch: each arm's mean metric (over its seeds) against the training step, one panel per metric."""
    steps = sorted({r["stage"] for r in rows})
    keys = [(k, n) for k, n in training_curve_keys(settings) if any(r.get(k) is not None for r in rows)]
    arms = [a for a in _ordered_arms(rows) if "/init" not in a]
    if len(steps) < 2 or not keys:
        return None
    fig, axes = figure(ncols=len(keys), width=3.6, height=3.2, title="From scratch: each arm along training")
    for ax, (key, name) in zip(axes, keys):
        for arm in arms:
            pts = [(s, _mean([r for r in rows if r["stage"] == s], arm, key)) for s in steps]
            pts = [(s, v) for s, v in pts if v is not None]
            style = dict(color="black", lw=2) if arm == "vanilla" else dict(lw=1)
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, label=arm, **style)
        if key.startswith("fid"):
            ax.set_yscale("log")
        label_axes(ax, xlabel="training step", ylabel=axis_label(name, lower_is_better=True))
    axes[0].legend(fontsize=7)
    return savefig(fig, path, caption="Each line: an arm's mean over its seeds at each evaluated step "
                                       "(vanilla in black); the tables give the paired intervals.")


def stage_label(stage: int, settings: dict) -> str:
    """A report section's name: the pretraining stage continued, or the training step of a from-scratch study."""
    return f"Step {stage} from scratch" if settings.get("scratch_steps") else f"Pretraining stage {stage}"


def forest_plot(recs: list[dict], stage: int, path: Path, label: str | None = None) -> Path:
    arms = [r for r in recs if r["fid_vs_control"] is not None]
    fig, axes = figure(ncols=2, width=4.6, height=0.45 * max(len(arms), 3) + 1.2,
                       title=f"{label or f'Pretraining stage {stage}'}: each arm against its equal-cost control")
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
    out.append(f"Data `{settings.get('data')}`, DiT `{settings.get('model')}`"
               + (f", objective `{settings['objective']}`" if settings.get("objective", "ddpm") != "ddpm" else "")
               + f", k = {settings.get('k')}, "
               + (f"every arm trained from initialisation at lr {settings.get('pretrain_lr')} (EMA "
                  f"{settings.get('scratch_ema')} with warmup), evaluated at steps {settings.get('scratch_steps')}; "
                  f"rater arms use the rater meta-trained at stage {(settings.get('stages') or [None])[0]}, "
                  if settings.get("scratch_steps") else
                  f"{settings.get('continue_steps')} continuation steps at lr {settings.get('continue_lr')} "
                  f"(EMA {settings.get('continue_ema')}{' with warmup' if settings.get('continue_ema_warmup') else ''}), ")
               + f"batch {settings.get('batch_size')}. Splits by seed "
               f"{settings.get('split_seed')}: train / meta-validation {settings.get('val_fraction')} / test "
               f"{settings.get('test_fraction')}; the test split is never trained, selected or meta-learned on. "
               f"FID: {settings.get('eval_samples')} samples, {settings.get('eval_ddim_steps')} "
               f"{'Euler' if settings.get('objective') == 'flow' else 'DDIM'} steps, CFG "
               f"{settings.get('cfg_scale')}, EMA weights, classifier features, reference: "
               f"{'the test split' if settings.get('eval_reference_split') == 'test' else 'all images of the reference source'}. noiserater "
               f"{prov.get('noiserater')} at commit {prov.get('git_commit')}.")
    out.append("")
    out.append("Each cell: mean over paired seeds of 100·(arm − control)/control, ± the 95% t half-width; "
               "negative is better for both metrics. Control: `uniform_soft` (the same k noises averaged) for "
               "`rater_soft`, vanilla for every one-pass arm. Wall-clock cost: vanilla's median training "
               "throughput over the arm's, measured on a shared 2-core CPU (indicative only).")
    coupled = [a for a in COUPLING if any(r["arm"] == a for r in rows)]
    if coupled:
        out += ["", f"The test loss draws its noise independently of the image (vanilla's objective). "
                    f"{', '.join(f'`{a}`' for a in coupled)} train{'s' if len(coupled) == 1 else ''} on noise coupled "
                    "to the image, so the model fits the target of that joint: part of a coupling's test-loss change "
                    "is by construction, and FID (the peers' measure) is the comparison that applies to it."]
    if settings.get("objective") == "flow":
        first = BANDS[0][1]
        out += ["", f"The test-loss columns {', '.join(BAND_LABELS)} are bands of the DiT's time units: flow's t in "
                    f"[0, 1] (t = 1 is pure noise) enters as {FLOW_TIME_SCALE:g}·t, so t<{first} means "
                    f"t < {first / FLOW_TIME_SCALE:g}."]
    records = []
    for stage in stages:
        lines, recs = stage_table(rows, stage, settings)
        records += recs
        out += ["", f"## {stage_label(stage, settings)}", ""] + lines + ["", "Absolute means:", ""] + absolute_table(rows, stage)
        norm = norm_control_lines(rows, stage, settings.get("eval_extra_steps") or [])
        if norm:
            out += ["", "Norm-changing policies against the k=1 noise-scale control of the same mean norm "
                        "(a gain the control also gets is a change of the noise's scale, not a selection):", ""] + norm
        batch = batch_control_lines(rows, stage)
        if batch:
            out += ["", f"The soft policies against vanilla trained at k = {settings.get('k')} times the batch for the "
                        "same steps (equal DiT passes, spent on more images instead of more noises per image):",
                    ""] + batch
        dose = dose_response(rows, stage)
        if dose:
            out += ["", "The noise's scale, k = 1 (every chosen noise times C; vanilla is C = 1): if the "
                        "norm-changing policies' effect is a scale effect, it follows this curve:", ""] + dose[0]
            fig = dose_response_plot(rows, stage, root / f"noise-scale-stage{stage}.png", stage_label(stage, settings))
            out += ["", f"![noise scale, stage {stage}]({fig.name})"]
        null = random_null_lines(rows, stage)
        if null:
            out += ["", "Trained raters against the null of never-trained raters of the same architecture (each "
                        "initialisation's mean paired change vs vanilla; lower is better; a trained rater beats the "
                        "null when its change is below the null mean by more than the null SD):", ""] + null
        few = extra_steps_lines(rows, stage, settings.get("eval_extra_steps") or [], settings.get("eval_ddim_steps"))
        if few:
            out += ["", "FID with fewer sampler steps (the regime straighter couplings are meant to help):", ""] + few
        big = large_fid_lines(rows, stage, settings.get("fid_large_samples"))
        if big:
            out += ["", "FID's sample-size bias: the same checkpoints at two sample counts (same seeds):", ""] + big
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
            fig = forest_plot(recs, stage, root / f"forest-stage{stage}.png", stage_label(stage, settings))
            out += ["", f"![stage {stage}]({fig.name})"]
    planned = {a for inv in study.get("invocations", []) for a in (inv.get("settings") or {}).get("arms", [])}
    not_run = sorted(planned - {base_arm(r["arm"]) for r in rows}, key=lambda a: list(ARMS).index(a) if a in ARMS else 0)
    if not_run:
        out += ["", f"Planned in the preset and not run (yet): {', '.join(not_run)}."]
    n_int = sum(1 for r in records for key, _ in METRICS if r.get(f"{key}_vs_control"))
    if n_int:
        out += ["", f"Multiplicity: this report shows {n_int} arm-vs-control intervals at 95% each; about "
                    f"{n_int / 20:.1f} of them would exclude 0 by chance alone if no arm had any effect, so a "
                    "single interval that barely excludes 0 is weak evidence."]
    floor = root / "reference-floor" / "stage.json"
    if floor.exists():
        f = json.loads(floor.read_text())["result"]
        vals = ", ".join(f"{v:.2f} at {k.rsplit('_', 1)[1]} images" for k, v in f.items() if k.startswith("real_train_fid_"))
        out += ["", f"FID reference: the `{f['reference_split']}` split, {f['reference_images']} images that no run "
                    f"trained on. Real training-split images score {vals} against it: the floor a perfect "
                    "generator would reach at that sample size."]
    if settings.get("scratch_steps"):
        curve = training_curve_lines(rows, settings)
        if curve:
            out += ["", "## Along training", "", "Each arm's paired change vs vanilla at every evaluated step "
                    "(from scratch, the peers' claim is faster convergence; a gain only early is a head start):",
                    ""] + curve
            fig = training_curve_plot(rows, settings, root / "training-curve.png")
            if fig is not None:
                out += ["", f"![along training]({fig.name})"]
    atomic_write_text(root / "summary.json", json.dumps(records, indent=1, default=str))
    atomic_write_text(root / "results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))
    path = root / "report.md"
    atomic_write_text(path, "\n".join(out) + "\n")
    return path
