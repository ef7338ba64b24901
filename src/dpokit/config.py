"""Typed run configuration: every key has a default and a one-line description.

A config is read from YAML, then `section.key=value` overrides are applied. Values are parsed with
`yaml.safe_load` (never evaluated as code) and checked against the declared type, range and choices
before anything heavy (a model, a dataset) is loaded.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpokit.errors import ConfigError


def opt(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, min_exclusive: bool = False) -> Any:
    """A config field: default value, one-line help and the checks `validate` applies."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    name: str = opt("smollm2-135m-instruct",
                    "policy to train: hub id, local HF directory, .gguf file, or the alias smollm2-135m-instruct")
    revision: str | None = opt(None, "hub revision (branch, tag or commit) when `name` is a hub id")
    trust_remote_code: bool = opt(False, "allow model code shipped with a hub model to run (off unless asked)")
    attn_implementation: str = opt("sdpa", "attention kernel for the padded layout",
                                   choices=("sdpa", "eager", "flash_attention_2"))


@dataclass
class LoraSection:
    enabled: bool = opt(False, "train LoRA adapters (peft) instead of all weights")
    r: int = opt(16, "LoRA rank", min=1)
    alpha: float = opt(32.0, "LoRA scaling numerator (scale = alpha / r)", min=0, min_exclusive=True)
    dropout: float = opt(0.0, "dropout on the LoRA branch", min=0.0, max=1.0)
    target_modules: list[str] = opt(["all-linear"], "modules that get adapters ('all-linear' = every linear but the LM head)")
    merge_on_export: bool = opt(False, "merge the adapters into the base weights in the exported model")


@dataclass
class DataSection:
    train: str | None = opt(None, "training pairs: .jsonl/.json/.parquet/.csv file, datasets directory, or hub dataset name")
    train_split: str = opt("train", "split to read when `train` is a datasets dataset")
    eval: str | None = opt(None, "held-out pairs, same formats as `train`")
    eval_split: str = opt("test", "split to read when `eval` is a datasets dataset")
    eval_fraction: float = opt(0.0, "share of `train` held out for evaluation when `eval` is not given", min=0.0, max=0.5)
    max_length: int = opt(1024, "most tokens in prompt + completion; longer pairs are truncated", min=2)
    max_prompt_length: int = opt(512, "prompt tokens kept when a pair is over `max_length`", min=1)
    truncation_mode: str = opt("keep_end", "which end of an over-long prompt to keep, or `error` to reject such rows",
                               choices=("keep_end", "keep_start", "error"))
    skip_invalid: bool = opt(False, "skip invalid rows (counted by reason and listed in the run directory) instead of stopping")


@dataclass
class ObjectiveSection:
    loss: str = opt("sigmoid", "preference objective", choices=("sigmoid", "ipo", "hinge", "robust", "simpo"))
    beta: float = opt(0.1, "β: strength of the KL constraint (τ for IPO, reward scale for SimPO)", min=0.0, min_exclusive=True)
    label_smoothing: float = opt(0.0, "ε: assumed rate of flipped labels (cDPO with sigmoid, rDPO with robust)", min=0.0, max=0.4999)
    ipo_form: str = opt("length_normalized", "IPO on per-token log-ratios (TRL) or on summed log-ratios (authors)",
                        choices=("length_normalized", "summed"))
    simpo_gamma: float = opt(0.5, "γ: target reward margin of SimPO", min=0.0)
    nll_weight: float = opt(0.0, "weight of the chosen completion's token-mean NLL added to the loss (RPO)", min=0.0)


@dataclass
class ReferenceSection:
    strategy: str = opt("auto", "reference model: auto | copy | adapters (LoRA) | precomputed | none (reference-free)",
                        choices=("auto", "copy", "adapters", "precomputed", "none"))
    dtype: str | None = opt(None, "dtype of the frozen copy (default: the policy's)", choices=(None, "float32", "bfloat16", "float16"))
    cache_dir: str = opt("~/.cache/dpokit/reference-logps", "where precomputed reference log-probs are cached")


@dataclass
class TrainSection:
    epochs: int = opt(1, "passes over the training pairs", min=1)
    max_steps: int = opt(0, "stop after this many optimizer steps (0: run all epochs)", min=0)
    batch_size: int = opt(8, "pairs per optimizer step, over all processes", min=1)
    micro_batch_size: int = opt(4, "pairs per forward pass on one process (gradient accumulation makes up the rest)", min=1)
    optimizer: str = opt("adamw", "optimizer", choices=("adamw", "rmsprop"))
    lr: float = opt(1e-6, "peak learning rate", min=0.0, min_exclusive=True)
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW) or L2 (RMSprop)", min=0.0)
    adam_betas: list[float] = opt([0.9, 0.999], "AdamW β1, β2")
    eps: float = opt(1e-8, "optimizer ε", min=0.0, min_exclusive=True)
    schedule: str = opt("linear", "learning-rate decay after warm-up", choices=("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "linear warm-up steps (overrides warmup_ratio when > 0)", min=0)
    warmup_ratio: float = opt(0.0, "warm-up as a share of all steps", min=0.0, max=1.0)
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0: no clipping)", min=0.0)
    precision: str = opt("auto", "fp32, bf16-mixed (autocast), bf16 (weights in bf16), or auto (bf16-mixed where the "
                         "hardware has fast bf16 matmul, else fp32)", choices=("auto", "fp32", "bf16-mixed", "bf16"))
    layout: str = opt("prefix_shared", "batch layout: prefix_shared (packed, each prompt computed once per pair), "
                      "packed (no padding), or padded (TRL's)",
                      choices=("padded", "packed", "prefix_shared"))
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    compile: bool = opt(False, "torch.compile the decoder layers")
    lm_head: str = opt("selective", "selective: LM head only where a completion token is predicted, in chunks; "
                       "full: all logits (the plain path, for comparison)", choices=("selective", "full"))
    logps_chunk_tokens: int = opt(1024, "completion tokens per LM-head chunk (bounds the logits memory)", min=1)
    seed: int = opt(42, "seed for data order and initialisation")
    eval_every: int = opt(0, "evaluate on held-out pairs every N steps (0: before and after training only)", min=0)
    log_every: int = opt(1, "log metrics every N steps", min=1)
    max_nonfinite_steps: int = opt(3, "stop after this many steps with a non-finite loss or gradient (each is skipped)", min=1)


@dataclass
class CheckpointSection:
    every: int = opt(100, "write a checkpoint every N steps (0: only when the run stops)", min=0)
    keep: int = opt(2, "most recent checkpoints kept whole (resumable)", min=1)
    keep_models: int = opt(0, "older checkpoints whose model alone is kept, for evaluation along the run", min=0)


@dataclass
class OutputSection:
    dir: str = opt("runs/dpo", "run directory: metrics, checkpoints, final model")
    tensorboard: bool = opt(True, "write TensorBoard event files")
    overwrite: bool = opt(False, "start over in a run directory that already holds a run (else: error, or --resume)")


@dataclass
class DistributedSection:
    strategy: str = opt("ddp", "multi-process strategy under torchrun: ddp (replicated) or fsdp (FSDP2 sharded)",
                        choices=("ddp", "fsdp"))
    backend: str = opt("auto", "process-group backend (auto: nccl on GPU, gloo on CPU)", choices=("auto", "gloo", "nccl"))


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "lora": LoraSection,
    "data": DataSection,
    "objective": ObjectiveSection,
    "reference": ReferenceSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "output": OutputSection,
    "distributed": DistributedSection,
}


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    output: OutputSection = field(default_factory=OutputSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    # keys the user set (YAML or overrides), so checks like "a LoRA option without LoRA" can tell them from defaults
    explicit: set[str] = field(default_factory=set, repr=False, compare=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> Config:
        cfg = cls()
        if values is None:
            return cfg
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {_typename(values)}")
        for section, body in values.items():
            if section not in SECTIONS:
                raise ConfigError(f"{source}: unknown section '{section}'{_suggest(section, SECTIONS)}")
            if body is None:
                continue
            if not isinstance(body, dict):
                raise ConfigError(f"{source}: section '{section}' must be a mapping, got {_typename(body)}")
            for key, value in body.items():
                cfg.set(f"{section}.{key}", value, source=source)
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        """Read a YAML file (optional) and apply `section.key=value` overrides, then validate."""
        values: dict[str, Any] = {}
        if path is not None:
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
                values = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ConfigError(_yaml_error(str(path), e)) from None
        cfg = cls.from_dict(values, source=str(path) if path else "config")
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like section.key=value")
            key, raw = item.split("=", 1)
            key = key.strip()
            try:
                value = yaml.safe_load(raw) if raw != "" else None
            except yaml.constructor.ConstructorError as e:  # a tag such as !!python/object: data, never code
                raise ConfigError(_yaml_error(f"override: {key}", e, lines=False)) from None
            except yaml.YAMLError:
                value = raw  # not YAML (e.g. '@file'): the text itself
            if isinstance(value, (int, float)) and not isinstance(value, bool) and _takes_string(key):
                value = raw  # `model.revision=1234567`, `output.dir=2024`: the text, not the number YAML reads
            cfg.set(key, value, source="override")
        cfg.validate()
        return cfg

    def set(self, dotted: str, value: Any, *, source: str = "override") -> None:
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown key '{dotted}'{_suggest_key(dotted)}")
        obj = getattr(self, section)
        names = {f.name: f for f in dataclasses.fields(obj)}
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{dotted}'{_suggest_key(dotted)}")
        hint = typing.get_type_hints(type(obj))[key]
        setattr(obj, key, _coerce(value, hint, dotted, source))
        self.explicit.add(dotted)

    def validate(self) -> None:
        """Range, choice and cross-field checks; each failure is one clear line."""
        for section in SECTIONS:
            obj = getattr(self, section)
            for f in dataclasses.fields(obj):
                _check_field(f"{section}.{f.name}", getattr(obj, f.name), f.metadata)
        d, t = self.data, self.train
        if d.max_prompt_length >= d.max_length:
            raise ConfigError(f"data.max_prompt_length ({d.max_prompt_length}) must be less than data.max_length "
                              f"({d.max_length}) to leave room for the completion")
        if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {t.adam_betas}")
        if t.batch_size % t.micro_batch_size:
            raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
                              f"({t.micro_batch_size})")
        # a LoRA option set to something other than its default has no effect without LoRA: say so; the
        # same option at its default (e.g. in the full config.yaml a run writes) is harmless
        defaults = LoraSection()
        lora_keys = sorted(k for k in self.explicit if k.startswith("lora.") and k != "lora.enabled"
                           and getattr(self.lora, k[5:]) != getattr(defaults, k[5:]))
        if lora_keys and not self.lora.enabled:
            raise ConfigError(f"{lora_keys[0]} is set but LoRA is off: add lora.enabled=true or remove it")
        ref = self.reference.strategy
        if ref == "adapters" and not self.lora.enabled:
            raise ConfigError("reference.strategy=adapters needs LoRA (lora.enabled=true)")
        if self.objective.loss == "simpo" and ref not in ("auto", "none"):
            raise ConfigError(f"objective.loss=simpo is reference-free; reference.strategy={ref} does not apply")
        if self.objective.loss != "simpo" and ref == "none":
            raise ConfigError(f"objective.loss={self.objective.loss} needs a reference model; reference.strategy=none "
                              "only fits simpo")
        if self.objective.loss != "robust" and self.objective.loss != "sigmoid" and self.objective.label_smoothing:
            raise ConfigError(f"objective.label_smoothing applies to sigmoid (cDPO) and robust, not {self.objective.loss}")
        for key in ("train", "eval"):
            _check_data_source(f"data.{key}", getattr(d, key))
        if d.train is None:
            raise ConfigError("data.train is required: a preference file, datasets directory or hub dataset name")
        if d.eval is not None and d.eval_fraction:
            raise ConfigError("data.eval and data.eval_fraction are both set; use one")
        _check_model_source("model.name", self.model.name)


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def describe() -> str:
    """Every key with its default and description, for `dpokit train --help`."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            choices = f.metadata.get("choices")
            extra = f" [{' | '.join(str(c) for c in choices if c is not None)}]" if choices else ""
            lines.append(f"  {f.name} = {_fmt(default)}  # {f.metadata['help']}{extra}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


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


def _suggest_key(dotted: str) -> str:
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
    return _suggest(dotted, keys)


def _suggest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


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
            raise ConfigError(f"{source}: {key} must be a list, got {_typename(value)} {value!r}")
        return [_coerce(v, item, key, source) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {_typename(value)} {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: {key} must be an integer, got {_typename(value)} {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)  # YAML reads 1e-5 (no dot) as a string
        if number is None:
            raise ConfigError(f"{source}: {key} must be a number, got {_typename(value)} {value!r}")
        if not math.isfinite(number):  # nan passes every range check; inf is never meant
            raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key} must be a string, got {_typename(value)} {value!r}")
    raise TypeError(f"unsupported config type {hint} for {key}")  # a bug in this module, not user input


def _takes_string(dotted: str) -> bool:
    """Whether the key `section.key` is declared as a string (optionally None)."""
    section, _, key = dotted.partition(".")
    cls = SECTIONS.get(section)
    hint = typing.get_type_hints(cls).get(key) if cls is not None else None
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint))


def _yaml_error(where: str, e: yaml.YAMLError, *, lines: bool = True) -> str:
    """One line for a YAML error: where it is and what is wrong, without PyYAML's multi-line excerpt."""
    mark = getattr(e, "problem_mark", None)
    place = f"{where}:{mark.line + 1}" if lines and mark is not None else where
    problem = getattr(e, "problem", None) or _first_line(e)
    tag = re.search(r"constructor for the tag '([^']*)'", problem)
    if isinstance(e, yaml.constructor.ConstructorError) and tag:
        shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return f"{place}: the YAML tag '{shown}' is not allowed (config values are plain data, never code)"
    return f"{place}: not valid YAML: {problem}"


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _typename(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
            list: "list", dict: "mapping"}.get(type(value), type(value).__name__)


def _check_field(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join(str(c) for c in choices if c is not None)
        raise ConfigError(f"{key} must be one of {shown}; got {value!r}{_suggest(str(value), [str(c) for c in choices])}")
    if value is None or isinstance(value, (str, list, bool)):
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        raise ConfigError(f"{key} must be {'>' if meta.get('min_exclusive') else '>='} {_num(lo)}; got {_num(value)}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} must be <= {_num(hi)}; got {_num(value)}")


def _num(x: float) -> str:
    text = repr(x)
    return text.removesuffix(".0")


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.endswith(FILE_SUFFIXES + (".gguf",))


def _check_data_source(key: str, value: str | None) -> None:
    if value is None:
        return
    p = Path(value).expanduser()
    if looks_like_path(value) and not p.exists():
        raise ConfigError(f"{key}: file not found: {value}")


def _check_model_source(key: str, value: str) -> None:
    if looks_like_path(value) and not Path(value).expanduser().exists():
        raise ConfigError(f"{key}: not found: {value}")
