"""Click options generated from a config dataclass, so the CLI and the config cannot drift apart."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
import warnings
from typing import Any, Callable

import click

from ..config import ConfigError, from_dict, load_yaml


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and +-inf (FloatRange lets NaN through every bound)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number", param, ctx)
        return rv


# Seeds: torch.manual_seed overflows above 2**64 and numpy's seeds are 32-bit.
SEED = click.IntRange(0, 2**32 - 1)


def _flag_of(name: str, flags: dict[str, str] | None = None) -> str:
    """The command-line flag of a config field (``--field-name`` unless ``flags`` renames it)."""
    return "--" + (flags or {}).get(name, name.replace("_", "-"))


def _name_the_flag(message: str, names: list[str], from_file: bool, flags: dict[str, str] | None = None) -> str:
    """A ConfigError message that names a config key, with the command-line flag of that key appended."""
    m = re.match(r"(?:invalid |unknown config key )'?([A-Za-z_][A-Za-z0-9_]*)'?", message)
    key = m.group(1) if m else next((n for n in names if re.search(rf"\b{n}\b", message)), None)
    if key in names and _flag_of(key, flags) not in message:
        flag = _flag_of(key, flags)
        return f"{message} (flag {flag}{' or the key ' + key + ' in --config' if from_file else ''})"
    return message


def config_options(cls: type, helps: dict[str, str], skip: tuple[str, ...] = (),
                   flags: dict[str, str] | None = None) -> Callable:
    """Decorate a click command with one ``--field-name`` option per field of ``cls`` (all documented)
    plus ``--config FILE.yaml``. The command receives ``cfg`` (an instance of ``cls``).

    ``flags`` maps a field to another flag name (``{"k": "candidates"}``: the field ``k``, its YAML key
    ``k``, the flag ``--candidates``), so the CLI follows docs/cli.md while config files keep loading."""
    flags = dict(flags or {})
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    missing = [f.name for f in fields if f.name not in helps]
    if missing:
        raise RuntimeError(f"undocumented options for {cls.__name__}: {missing}")
    order = {name: i for i, name in enumerate(helps)}  # --help lists options as their help texts are written,
    fields.sort(key=lambda f: order[f.name])  # not in dataclass order (inherited option groups come first)

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
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", FutureWarning)
                    cfg = load_yaml(cls, cfg_file, given) if cfg_file else from_dict(cls, given)
            except ConfigError as e:
                raise click.UsageError(_name_the_flag(str(e), [f.name for f in fields], bool(cfg_file), flags)) from None
            for w in caught:  # a renamed value (an old config): one line, like a deprecated flag
                if issubclass(w.category, FutureWarning):
                    click.echo(f"warning: {w.message}", err=True)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            return wrapper.__wrapped__(cfg=cfg, **kwargs)  # (looked up here so tests can stub the body)

        functools.update_wrapper(wrapper, fn)  # keeps options declared below this decorator
        wrapper.config_class = cls  # lets tests find every config-backed command (command.callback.config_class)
        cmd = wrapper
        for f in reversed(fields):
            hint = hints[f.name]
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            base = args[0] if args else hint
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            opt = _flag_of(f.name, flags)
            if base is bool:
                cmd = click.option(f"{opt}/--no-{opt[2:]}", f.name, default=default,
                                   show_default=True, help=helps[f.name])(cmd)
            else:
                cmd = click.option(opt, f.name, type=base if base in (int, float, str) else str, default=default,
                                   show_default=default is not None, help=helps[f.name])(cmd)
        cmd = click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
                           help="YAML file of options; options given on the command line win.")(cmd)
        return cmd

    return decorate


def deprecated_alias(old: str, new: str) -> Callable:
    """Keep the old spelling ``old`` of the option ``new`` working for one release (docs/cli.md).

    ``new`` is the primary flag of an option declared below this decorator (with ``click.option`` or
    :func:`config_options`); ``old`` is a flag (``--k``) or, for a boolean flag, a pair ``--use-ema/--no-use-ema``.
    The alias is hidden from ``--help``, takes the same type, and when given prints one line to stderr
    (``warning: --k is deprecated, use --candidates``) and counts as if ``new`` had been given. Giving both is
    a usage error."""

    def decorate(fn: Callable) -> Callable:
        params = fn.__dict__.get("__click_params__", [])
        target = next((p for p in params if isinstance(p, click.Option) and new in p.opts), None)
        if target is None:
            raise RuntimeError(f"deprecated_alias({old!r}, {new!r}): no option {new} declared below it")
        name = f"_deprecated_{target.name}_{old.split('/')[0].lstrip('-').replace('-', '_')}"
        if target.is_flag and target.secondary_opts:
            if "/" not in old:
                raise RuntimeError(f"deprecated_alias: {new} is an on/off flag; give the old pair '--a/--no-a'")
            opt = click.Option([old, name], default=None, hidden=True)
            new_spelling = f"{new}/{target.secondary_opts[0]}"
        elif target.is_flag:
            opt = click.Option([old, name], is_flag=True, default=None, hidden=True)
            new_spelling = new
        else:
            opt = click.Option([old, name], type=target.type, default=None, hidden=True, multiple=target.multiple,
                               metavar=target.metavar)
            new_spelling = new
        opt.help = f"Deprecated spelling of {new_spelling} (docs/cli.md); removed in the next release."
        opt.deprecated_for = new  # lets tests and docs/cli.md list every alias (hidden options with this attribute)

        def wrapper(*args: Any, **kwargs: Any):
            ctx = click.get_current_context()
            value = kwargs.pop(name)
            source = ctx.get_parameter_source(name)
            if source is not None and source != click.core.ParameterSource.DEFAULT:
                click.echo(f"warning: {old} is deprecated, use {new_spelling} (the old spelling goes in the next "
                           "release)", err=True)
                given = ctx.get_parameter_source(target.name)
                if given is not None and given != click.core.ParameterSource.DEFAULT:
                    raise click.UsageError(f"give {new} or its deprecated spelling {old}, not both")
                kwargs[target.name] = value
                ctx.set_parameter_source(target.name, source)
            return wrapper.__wrapped__(*args, **kwargs)  # (looked up here so tests can stub the body)

        functools.update_wrapper(wrapper, fn)  # copies __click_params__ (the same list) and config_class
        wrapper.__dict__.setdefault("__click_params__", []).append(opt)
        return wrapper

    return decorate
