"""Click options generated from a config dataclass, so the CLI and the config cannot drift apart."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Callable

import click

from ..config import ConfigError, from_dict, load_yaml


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and +-inf (FloatRange lets NaN through every bound)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        import math

        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number", param, ctx)
        return rv


# Seeds: torch.manual_seed overflows above 2**64 and numpy's seeds are 32-bit.
SEED = click.IntRange(0, 2**32 - 1)


def _name_the_flag(message: str, names: list[str], from_file: bool) -> str:
    """A ConfigError message that names a config key, with the command-line flag of that key appended."""
    import re

    m = re.match(r"(?:invalid |unknown config key )'?([A-Za-z_][A-Za-z0-9_]*)'?", message)
    key = m.group(1) if m else next((n for n in names if re.search(rf"\b{n}\b", message)), None)
    if key in names and f"--{key.replace('_', '-')}" not in message:
        flag = f"--{key.replace('_', '-')}"
        return f"{message} (flag {flag}{' or the key ' + key + ' in --config' if from_file else ''})"
    return message


def config_options(cls: type, helps: dict[str, str], skip: tuple[str, ...] = ()) -> Callable:
    """Decorate a click command with one ``--field-name`` option per field of ``cls`` (all documented)
    plus ``--config FILE.yaml``. The command receives ``cfg`` (an instance of ``cls``)."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    missing = [f.name for f in fields if f.name not in helps]
    if missing:
        raise RuntimeError(f"undocumented options for {cls.__name__}: {missing}")

    def decorate(fn: Callable) -> Callable:
        def wrapper(**kwargs: Any):
            ctx = click.get_current_context()
            cfg_file = kwargs.pop("config", None)
            given = {}
            for f in fields:
                value = kwargs.pop(f.name)
                if ctx.get_parameter_source(f.name) != click.core.ParameterSource.DEFAULT:
                    given[f.name] = value
            try:
                cfg = load_yaml(cls, cfg_file, given) if cfg_file else from_dict(cls, given)
            except ConfigError as e:
                raise click.UsageError(_name_the_flag(str(e), [f.name for f in fields], bool(cfg_file))) from None
            return fn(cfg=cfg, **kwargs)

        functools.update_wrapper(wrapper, fn)  # keeps options declared below this decorator
        wrapper.config_class = cls  # lets tests find every config-backed command (command.callback.config_class)
        cmd = wrapper
        for f in reversed(fields):
            hint = hints[f.name]
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            base = args[0] if args else hint
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            opt = "--" + f.name.replace("_", "-")
            if base is bool:
                cmd = click.option(f"{opt}/--no-{f.name.replace('_', '-')}", f.name, default=default,
                                   show_default=True, help=helps[f.name])(cmd)
            else:
                cmd = click.option(opt, f.name, type=base if base in (int, float, str) else str, default=default,
                                   show_default=default is not None, help=helps[f.name])(cmd)
        cmd = click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
                           help="YAML file of options; options given on the command line win.")(cmd)
        return cmd

    return decorate
