"""Subcommands of the ``noiserater`` CLI, one module each (see ``noiserater.cli``)."""
