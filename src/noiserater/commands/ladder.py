"""`noiserater ladder STUDY... --out DIR`: each arm's effect against the data's dimension, fitted to d = 4096."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import MissingFileError
from ..study.ladder import METRICS, studies_of, trend_table, write_ladder


@click.command("ladder")
@click.argument("studies", nargs=-1, type=click.Path(file_okay=False))
@click.option("--out", "out", default="docs/results/evidence-ladder", show_default=True, type=click.Path(file_okay=False),
              help="Folder for report.md, ladder.json and ladder.png. Without STUDIES, the studies its ladder.json "
                   "lists are read again (the published ladder regenerates from its rungs).")
def command(studies: tuple[str, ...], out: str) -> None:
    """Read evidence studies (one per data dimension, e.g. docs/results/evidence-digits), fit each arm's change
    vs vanilla as a + b/sqrt(d), extrapolate to DiT-S/2's d = 4096, write the report and print the trend."""
    if studies:
        roots = [Path(s) for s in studies]
    elif (Path(out) / "ladder.json").exists():
        roots = studies_of(out)
    else:
        raise MissingFileError(f"no studies given and {out}/ladder.json does not exist: pass the evidence study "
                               "folders, e.g. `noiserater ladder docs/results/evidence-digits "
                               "docs/results/evidence-fashion-mnist-16 docs/results/evidence-fashion-mnist`")
    missing = [str(r) for r in roots if not (r / "study.json").exists()]
    if missing:
        raise MissingFileError(f"not an evidence study (no study.json): {', '.join(missing)}; pass folders written "
                               "by `noiserater evidence` (or published with --publish)")
    path, result = write_ladder(roots, out)
    for metric, label in METRICS:
        click.echo(f"\n{label} change vs vanilla (95% intervals; last column: the fit at d = {result['at']}):")
        click.echo("\n".join(trend_table(result, metric)))
    click.echo(f"\nwrote {path}")
