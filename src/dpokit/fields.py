"""The settings kit: a typed settings field with its default, one-line help and checks (`opt`), stated once
and used three ways: `check_fields` applies the declared ranges and choices, `add_arguments` turns the
fields into command-line options, `describe_fields` lists them for `--help`. The run configuration
(`dpokit.config`) and the commands' settings (`dpokit.generation.settings`) are dataclasses of these fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from collections.abc import Sequence
from dataclasses import field
from typing import Any

import yaml

from dpokit.errors import ConfigError


def opt(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, min_exclusive: bool = False) -> Any:
    """A settings field: default value, one-line help and the checks `check_fields` applies."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def fmt(value: Any) -> str:
    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default



# ------------------------------------------------------------------------------------------ checks


def check_fields(settings: Any, section: str | None = None) -> None:
    """The declared choices and ranges of every field of the dataclass `settings`; a failure names the
    key as `section.key`, or without a section as the command-line option (`--max-new-tokens`)."""
    for f in dataclasses.fields(settings):
        key = f"{section}.{f.name}" if section else option_name(f.name)
        value, meta = getattr(settings, f.name), f.metadata
        choices = meta.get("choices")
        if choices is not None and isinstance(value, list):  # a list of choices: each item must be one
            wrong = [v for v in value if v not in choices]
            if not wrong:
                continue
            value = wrong[0]
        if choices is not None and value not in choices:
            shown = ", ".join(str(c) for c in choices if c is not None)
            raise ConfigError(f"{key} must be one of {shown}; got {value!r}"
                              f"{did_you_mean(str(value), [str(c) for c in choices])}")
        if value is None or isinstance(value, (str, list, bool)):
            continue
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            relation = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"{key} must be {relation} {_num(lo)}; got {_num(value)}")
        if hi is not None and value > hi:
            raise ConfigError(f"{key} must be <= {_num(hi)}; got {_num(value)}")


def did_you_mean(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _num(x: float) -> str:
    text = repr(x)
    return text.removesuffix(".0")


# ------------------------------------------------------------------------------------------ command lines


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def choices_of(cls: type, name: str) -> tuple | None:
    return next(f.metadata["choices"] for f in dataclasses.fields(cls) if f.name == name)


def add_arguments(parser: argparse.ArgumentParser, cls: type, names: Sequence[str] | None = None, *,
                  defaults: dict[str, Any] | None = None) -> None:
    """A command-line option per field of the settings dataclass `cls` (those in `names`, in that order):
    its type, choices and default (or the one in `defaults`) and its help, followed by the default. argparse
    checks the type and the choices; `check_fields` on the settings built from them checks the rest."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in names or fields:
        f = fields[name]
        default = (defaults or {}).get(name, default_of(f))
        parser.add_argument(option_name(name), type=hints[name], choices=f.metadata["choices"], default=default,
                            help=f"{f.metadata['help']} (default {_shown(default)})")


def from_arguments(cls: type, args: argparse.Namespace) -> Any:
    """The settings `cls` from parsed options (`add_arguments`); fields without an option keep their default."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def as_arguments(settings: Any, names: Sequence[str] | None = None) -> list[str]:
    """The options that give the fields of `settings` (those in `names`) their values: `add_arguments` backwards."""
    names = names or [f.name for f in dataclasses.fields(settings)]
    return [item for name in names for item in (option_name(name), _shown(getattr(settings, name)))]


def _shown(value: Any) -> str:
    return _num(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def describe_fields(cls: type, indent: str = "  ") -> list[str]:
    """One line per field of the settings dataclass `cls`: `name = default  # help [choices]`."""
    lines = []
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        extra = f" [{' | '.join(str(c) for c in choices if c is not None)}]" if choices else ""
        lines.append(f"{indent}{f.name} = {fmt(default_of(f))}  # {f.metadata['help']}{extra}")
    return lines
