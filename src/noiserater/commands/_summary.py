"""How the long-running commands (train, metatrain) end: the summary as JSON, and after SIGINT/SIGTERM a
line saying where the checkpoint is, with exit code 128 + signal (130/143), as a shell reports it."""

from __future__ import annotations

import json
import sys

import click


def echo_run_summary(summary: dict, unit: str) -> None:
    """Print ``summary``; exit 128 + signal if the run was interrupted (``unit``: "step" / "outer step")."""
    click.echo(json.dumps(summary, indent=2))
    if summary.get("interrupted"):
        signum = int(summary.get("signal") or 2)
        click.echo(f"interrupted by signal {signum} after {unit} {summary['step']}; checkpoint saved to "
                   f"{summary['checkpoint']}; continue with --resume", err=True)
        sys.exit(128 + signum)
