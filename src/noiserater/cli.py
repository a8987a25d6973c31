"""The ``noiserater`` command. Each subcommand lives in ``noiserater.commands.<name>`` as ``command``."""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__

# Subcommands, in the order ``--help`` lists them. Bench subcommands are gathered the same way.
COMMANDS = ["demo", "train", "sample", "metatrain", "evaluate", "analyze", "reproduce", "report",
            "cache_latents", "bench"]


class _Group(click.Group):
    """Turns the library's own error types into one-line messages and a non-zero exit."""

    def invoke(self, ctx):
        from .errors import USER_ERRORS

        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="noiserater")
def main() -> None:
    """NoiseRater: meta-learned noise valuation for diffusion transformer training.

    Start with `noiserater demo` (a few minutes on a laptop CPU).
    """


for _name in COMMANDS:
    try:
        _mod = importlib.import_module(f"noiserater.commands.{_name}")
    except ModuleNotFoundError as _e:  # a command still being written in this checkout
        if _e.name != f"noiserater.commands.{_name}":
            raise
        continue
    main.add_command(_mod.command)
