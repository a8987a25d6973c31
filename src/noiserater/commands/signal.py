"""`noiserater signal ...`: checks of the per-candidate signal a rater could learn (see `signal check`)."""

from __future__ import annotations

import click

from .signal_check import command as _check


@click.group("signal")
def command() -> None:
    """Checks of the per-candidate signal (the alignment oracle) at a diffusion checkpoint."""


command.add_command(_check)
