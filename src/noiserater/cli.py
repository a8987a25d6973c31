"""The ``noiserater`` command. Each subcommand lives in ``noiserater.commands.<name>`` as ``command``."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from . import __version__

# Subcommands, in the order ``--help`` lists them. Bench subcommands are gathered the same way.
COMMANDS = ["demo", "train", "sample", "metatrain", "signal", "evaluate", "analyze", "reproduce", "evidence", "ladder", "report",
            "cache_latents", "bench"]


class _Group(click.Group):
    """Loads each subcommand's module only when it is used (``noiserater --version`` and ``train`` do not
    pay for importing every command), and prints the library's own error types (:mod:`noiserater.errors`)
    and click's usage errors as one line ``error: ...`` with exit code 2. Any other exception is a bug and
    keeps its traceback (exit code 1)."""

    def list_commands(self, ctx):
        return [n.replace("_", "-") for n in COMMANDS if _module_exists(n)]

    def get_command(self, ctx, name):
        module = name.replace("-", "_")
        if module not in COMMANDS or not _module_exists(module):
            return None
        return importlib.import_module(f"noiserater.commands.{module}").command

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as e:  # a bad option of the group itself (``noiserater --bogus``)
            _exit_one_line(e.format_message(), e.exit_code)

    def invoke(self, ctx):
        # torch and the pipelines load here, not at the top: `noiserater --version` and `--help` stay fast
        from .errors import USER_ERRORS
        from .study.reproduce import StudyInterrupted

        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            _exit_one_line(e, 2)
        except StudyInterrupted as e:  # a signal stopped a study's stage: its checkpoint is saved, resume later
            click.echo(str(e), err=True)
            sys.exit(128 + e.signum)
        except click.ClickException as e:  # usage errors of a subcommand: one line, not click's usage block
            _exit_one_line(e.format_message(), e.exit_code)


def _exit_one_line(message: object, code: int) -> None:
    from .errors import one_line  # imports torch (via checkpoint): kept off `noiserater --version`'s path

    click.echo(f"error: {one_line(message)}", err=True)
    sys.exit(code)


def _module_exists(module: str) -> bool:
    """Whether ``noiserater.commands.<module>`` exists in this checkout (found without importing it)."""
    return importlib.util.find_spec(f"noiserater.commands.{module}") is not None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="noiserater")
def main() -> None:
    """NoiseRater: meta-learned noise valuation for diffusion transformer training.

    Start with `noiserater demo` (a few minutes on a laptop CPU).
    """
