"""`noiserater report RUN_DIR`: report.md + plots for a reproduction study."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import MissingFileError
from ..study.reproduce_report import write_report
from ._options import deprecated_alias


@click.command("report")
@deprecated_alias("--k", "--candidates")
@click.argument("run_dir", metavar="STUDY_DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Folder for report.md and the PNGs (default: STUDY_DIR).")
@click.option("--candidates", "k", default=None, type=click.IntRange(min=2),
              help="k (candidate noises per image) of the headline comparison, rater vs vanilla; default: the "
                   "study's headline_k (4).")
def command(run_dir: str, out: str | None, k: int | None) -> None:
    """Tables with mean, std and 95% intervals over seeds, paired tests vs vanilla, cost ratios, plots."""
    if not any(Path(run_dir).glob("runs/**/stage.json")):
        raise MissingFileError(f"no finished continuation runs under {run_dir}/runs; run `noiserater reproduce` "
                               "first (or pass the folder it wrote)")
    result = write_report(run_dir, out, headline_k=k)
    click.echo(f"wrote {result['report']}")
