"""Reading a config: a YAML file of sections, then `section.key=value` overrides.

Values are parsed with `yaml.safe_load` (plain data, never code) and coerced to the type their key
declares in `dpokit.config`; an unknown key gets a "did you mean" from the schema and from TRL's names
for the same settings. `load` then validates, so a bad value stops here, before a model or dataset loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dpokit.config import SECTIONS, Config, all_keys
from dpokit.config_checks import check_config
from dpokit.errors import ConfigError, first_line, type_name
from dpokit.fields import did_you_mean


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *, need_data: bool = True) -> Config:
    """Read a YAML file (optional) and apply `section.key=value` overrides, then validate: the config
    `dpokit train CONFIG key=value ...` runs (`dpokit.load_config`). `need_data=False`: data.train may be
    left out (`dpokit estimate` without --from-data)."""
    values = read_yaml(path) if path is not None else {}
    cfg = config_from_dict(values, source=str(path) if path else "config")
    for item in overrides:
        key, raw = split_assignment(item, "override", "section.key=value")
        value = yaml_value(raw, f"override: {key}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _takes_string(key):
            value = raw  # `model.revision=1234567`, `output.dir=2024`: the text, not the number YAML reads
        set_value(cfg, key, value, source="override")
    cfg.apply_preset()
    check_config(cfg, need_data=need_data)
    return cfg


def command_line_config(config: str | None, overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """A command's CONFIG and overrides: `dpokit train key=value` names no file, its first positional is an
    override."""
    if config and "=" in config:
        return None, [config, *overrides]
    return config, list(overrides)


def read_yaml(path: str | os.PathLike) -> Any:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw_bytes = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        line, line_start = raw_bytes.count(b"\n", 0, e.start) + 1, raw_bytes.rfind(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte {e.start - line_start + 1} of the line)") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(str(path), e)) from None


def config_from_dict(values: Any, *, source: str = "config") -> Config:
    """Sections as read from YAML, each value coerced to its key's type (not yet validated)."""
    cfg = Config()
    if values is None:
        return cfg
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type_name(values)}")
    for section, body in values.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}'{did_you_mean(section, SECTIONS)}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {type_name(body)}")
        for key, value in body.items():
            set_value(cfg, f"{section}.{key}", value, source=source)
    return cfg


def set_value(cfg: Config, dotted: str, value: Any, *, source: str = "override") -> None:
    """Set `section.key` to `value`, coerced to the key's type, and mark it as set by the user."""
    if dotted == "output.tensorboard":  # the key output.report_to replaced: true adds tensorboard, false removes it
        on = _coerce(value, bool, dotted, source)
        trackers = [t for t in cfg.output.report_to if t != "tensorboard"]
        cfg.output.report_to = ["tensorboard", *trackers] if on else trackers
        cfg.explicit.add("output.report_to")
        return
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or key not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        raise ConfigError(f"{source}: unknown key '{dotted}'{suggest_key(dotted)}")
    obj = getattr(cfg, section)
    hint = typing.get_type_hints(type(obj))[key]
    setattr(obj, key, _coerce(value, hint, dotted, source))
    cfg.explicit.add(dotted)


# ------------------------------------------------------------------------------------------ command-line values


def split_assignment(item: str, what: str, form: str) -> tuple[str, str]:
    """`key=value` → (key, the value's text); `what` and `form` word the error (`override`, `section.key=value`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{what} {item!r} must look like {form}")
    return key.strip(), raw


def yaml_value(raw: str, where: str) -> Any:
    """A value given on the command line, read as YAML data (`1e-5`, `[a, b]`, `true`, `null`); text that
    is not YAML (`@file`) stays text, and a tag (`!!python/...`) is refused: values are data, never code."""
    try:
        return yaml.safe_load(raw) if raw != "" else None
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(_yaml_error(where, e, lines=False)) from None
    except yaml.YAMLError:
        return raw


def _yaml_error(where: str, e: yaml.YAMLError, *, lines: bool = True) -> str:
    """One line for a YAML error: where it is and what is wrong, without PyYAML's multi-line excerpt."""
    mark = getattr(e, "problem_mark", None)
    place = f"{where}:{mark.line + 1}" if lines and mark is not None else where
    problem = getattr(e, "problem", None) or first_line(e)
    tag = re.search(r"constructor for the tag '([^']*)'", problem)
    if isinstance(e, yaml.constructor.ConstructorError) and tag:
        shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return f"{place}: the YAML tag '{shown}' is not allowed (config values are plain data, never code)"
    return f"{place}: not valid YAML: {problem}"


# ------------------------------------------------------------------------------------------ types


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `hint`; accept ints for floats and numeric strings like '1e-5'."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (item,) = args
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {type_name(value)} {value!r}")
        return [_coerce(v, item, key, source) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {type_name(value)} {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: {key} must be an integer, got {type_name(value)} {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)  # YAML reads 1e-5 (no dot) as a string
        if number is None:
            raise ConfigError(f"{source}: {key} must be a number, got {type_name(value)} {value!r}")
        if not math.isfinite(number):  # nan passes every range check; inf is never meant
            raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key} must be a string, got {type_name(value)} {value!r}")
    raise TypeError(f"unsupported config type {hint} for {key}")  # a bug in dpokit.config, not user input


def _takes_string(dotted: str) -> bool:
    """Whether the key `section.key` is declared as a string (optionally None)."""
    section, _, key = dotted.partition(".")
    cls = SECTIONS.get(section)
    hint = typing.get_type_hints(cls).get(key) if cls is not None else None
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint))


# ------------------------------------------------------------------------------------------ suggestions

# the names TRL's DPOConfig (and HF TrainingArguments) use for the same settings
OTHER_NAMES = {
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "per_device_train_batch_size":
    "train.micro_batch_size", "gradient_accumulation_steps": "train.batch_size", "lr_scheduler_type": "train.schedule",
    "bf16": "train.precision", "loss_type": "objective.loss",
    "rpo_alpha": "objective.nll_weight", "model_name_or_path": "model.name", "output_dir": "output.dir",
    "use_peft": "lora.enabled", "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules", "precompute_ref_log_probs": "reference.strategy",
    "save_steps": "checkpoint.every", "save_total_limit": "checkpoint.keep", "logging_steps": "train.log_every",
    "eval_steps": "train.eval_every",
}


def suggest_key(dotted: str) -> str:
    """' (did you mean ...?)' for an unknown `section.key`: the same key in another section, the TRL name's
    counterpart, a close spelling in the same section, or a close spelling anywhere."""
    section, _, key = dotted.partition(".")
    if not key:
        section, key = "", section
    keys = all_keys()
    same_name = [k for k in keys if k.split(".", 1)[1] == key]
    if same_name:
        return f" (did you mean '{same_name[0]}'?)"
    if key in OTHER_NAMES:
        return f" (did you mean '{OTHER_NAMES[key]}'?)"
    if section in SECTIONS:
        near = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(SECTIONS[section])], n=1, cutoff=0.6)
        if near:
            return f" (did you mean '{section}.{near[0]}'?)"
    return did_you_mean(dotted, keys)
