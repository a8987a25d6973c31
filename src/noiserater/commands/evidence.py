"""`noiserater evidence --preset NAME`: every arm against its equal-cost control, then the report."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import parse_overrides
from ..study.evidence import EVIDENCE_PRESETS, EvidencePreset, evidence, get_evidence_preset, publish_study
from ..study.evidence_report import write_evidence_report


@click.command("evidence")
@click.option("--preset", "preset", default="digits", show_default=True,
              help=f"Study: {', '.join(EVIDENCE_PRESETS)}.")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Study folder (default runs/evidence-<preset>). Rerunning skips finished runs.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a preset field, repeatable: --set 'seeds=[0, 1]' --set 'arms=[vanilla, oracle]'. "
                   "Fields: EvidencePreset in noiserater/study/evidence.py (also in the study's study.json).")
@click.option("--report-only", is_flag=True, help="Only (re)write report.md from the finished runs in --out.")
@click.option("--publish", "publish", default=None, type=click.Path(file_okay=False),
              help="After the report, copy the study's small artefacts (records, report, plots, trained raters; no "
                   "DiT checkpoints) to this folder, e.g. docs/results/evidence-digits; `--report-only` on the copy "
                   "rewrites the same report.")
@click.option("--jobs", "jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Arm runs in parallel worker processes, after each stage's shared work (pretraining, raters) in "
                   "this one; each worker gets this process's torch threads divided by N (at least 1). A run's "
                   "numbers depend on its thread count: extend a study with the threads per run it ran with.")
def command(preset: str, out: str | None, sets: tuple[str, ...], report_only: bool, publish: str | None,
            jobs: int) -> None:
    """Pretrain with train / meta-validation / test splits, meta-train the bilevel and distilled raters,
    continue every arm over paired seeds, evaluate on the test split, and compare each arm with the
    control of equal cost (rater_soft vs uniform_soft, one-pass policies vs vanilla)."""
    folder = Path(out or f"runs/evidence-{preset}")
    if report_only:
        if not (folder / "study.json").exists():
            raise click.UsageError(f"--out {folder} holds no evidence study (no study.json); run it first")
        click.echo(f"report: {write_evidence_report(folder)}")
    else:
        p = get_evidence_preset(preset, **parse_overrides(EvidencePreset, sets))
        click.echo(f"report: {evidence(p, folder, log=click.echo, jobs=jobs)}")
    if publish:
        click.echo(f"published {len(publish_study(folder, publish))} files to {publish}")
