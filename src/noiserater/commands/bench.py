"""`noiserater bench ...`: benchmarks that write JSON (ratios measured side by side, peak memory)."""

from __future__ import annotations

import importlib

import click

BENCHES = ["train", "selection", "metagrad", "loader", "implicit"]


@click.group("bench")
def command() -> None:
    """Benchmarks: each writes a JSON list of records (see README, Performance)."""


for _name in BENCHES:
    try:
        _mod = importlib.import_module(f"noiserater.commands.bench_{_name}")
    except ModuleNotFoundError as _e:  # a benchmark still being written in this checkout
        if _e.name != f"noiserater.commands.bench_{_name}":
            raise
        continue
    command.add_command(_mod.command)
