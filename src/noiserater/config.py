"""Typed dataclass configs: validated construction from dicts/YAML, and YAML out (saved with every run)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or file is invalid, or an option asks for something that cannot be done (an unknown
    model name, an image size the patch size does not divide); the message names the key and the fix. The
    CLI prints it as one line with exit code 2."""


class MissingFileError(ConfigError, FileNotFoundError):
    """A file named by an option does not exist (also a FileNotFoundError, for library callers)."""


def _check_type(cls_name: str, key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(cls_name, key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{cls_name}.{key}: invalid value {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an int too large for a float (YAML 1e400 is inf, 10**400 is an int)
                raise ConfigError(f"config key '{key}' of {cls_name} is out of range: {value!r}") from None
            if value != value or value in (float("inf"), float("-inf")):  # no key means anything by NaN/inf
                raise ConfigError(f"config key '{key}' of {cls_name} must be a finite number, got {value}")
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            inner = args[0] if args else Any
            out = [v if inner is Any else _check_type(cls_name, key, v, inner) for v in value]
            return tuple(out) if origin is tuple else out
    else:
        return value
    raise ConfigError(f"config key '{key}' of {cls_name} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from ``data``, naming any unknown key or badly typed value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} config must be a mapping of keys to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            close = [k for k in fields if isinstance(key, str) and (key.replace("-", "_") == k)]
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {key!r} for {cls.__name__}{hint}")
        kwargs[key] = _check_type(cls.__name__, key, value, hints[key])
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def load_yaml(cls: type[T], path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> T:
    """Read a YAML config file into ``cls``; ``overrides`` (e.g. from the command line) win."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a config of keys and values") from None
    if data is None:  # an empty file (or only comments): all defaults
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    data.update(overrides or {})
    return from_dict(cls, data)


def parse_overrides(cls: type, items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["key=value", ...]`` (command-line ``--set``) -> {key: value} for dataclass ``cls``. Values are
    read as YAML (``300``, ``1e-3``, ``[0, 1, 2]``, ``null``, ``DiT-T/2``); keys are checked against
    ``cls`` here and the types when the config is built (:func:`from_dict`)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set meta_outer_steps=300")
        if key not in fields:
            raise ConfigError(f"--set {item!r}: unknown key {key!r} for {cls.__name__}; known keys: {', '.join(sorted(fields))}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML (quote strings, lists as [1, 2])") from None
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                value = float(value) if any(c in value for c in "eE.") else value
            except ValueError:
                pass
        out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=False)


def require(cond: bool, key: str, message: str) -> None:
    """Raise ConfigError naming ``key`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"invalid {key}: {message}")
