"""Reading a config: YAML files and `section.key=value` overrides, each value coerced to its key's type;
a file that cannot be read or parsed is one exact line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dpokit.config_loader import load_config
from tests.helpers import config_error as error_of
from tests.helpers import load_with_pairs as load

FILE_ERRORS = [
    ("trian:\n  lr: 1.0e-5\n", "cfg.yaml: unknown section 'trian' (did you mean 'train'?)"),
    ("train:\n  learning_rate: 1.0e-5\n", "cfg.yaml: unknown key 'train.learning_rate' (did you mean 'train.lr'?)"),
    ("train: 5\n", "cfg.yaml: section 'train' must be a mapping, got integer"),
    ("- train\n- data\n", "cfg.yaml: expected a mapping of sections, got list"),
    ("model:\n  name: 123\n", "cfg.yaml: model.name must be a string, got integer 123"),
    ("train:\n  epochs: two\n", "cfg.yaml: train.epochs must be an integer, got string 'two'"),
    ("objective:\n  beta: 0\n", "objective.beta must be > 0; got 0"),
    ("lora:\n  enabled: false\n  alpha: 8\n", "lora.alpha is set but LoRA is off: add lora.enabled=true or remove it"),
    ("train:\n  lr: [1, 2\n", "cfg.yaml:3: not valid YAML: expected ',' or ']', but got '<stream end>'"),
    ("train:\n  lr: 1\n   epochs: 2\n", "cfg.yaml:3: not valid YAML: mapping values are not allowed here"),
    ("model:\n  name: !!python/object/apply:os.system ['touch pwned']\n",
     "cfg.yaml:2: the YAML tag '!!python/object/apply:os.system' is not allowed (config values are plain data, "
     "never code)"),
    ("model:\n  name: !!python/name:os.system\n",
     "cfg.yaml:2: the YAML tag '!!python/name:os.system' is not allowed (config values are plain data, never code)"),
]


@pytest.mark.parametrize("text, message", FILE_ERRORS, ids=[m.split(": ", 1)[-1][:40] for _, m in FILE_ERRORS])
def test_config_file_errors(data_file, text, message):
    Path("cfg.yaml").write_text(text, encoding="utf-8")
    assert error_of(path="cfg.yaml") == message
    assert not Path("pwned").exists()


def test_unreadable_config_files(data_file):
    assert error_of(path="missing.yaml") == "config file not found: missing.yaml"
    Path("configs").mkdir()
    assert error_of(path="configs") == "configs: is a directory, not a config file"
    Path("latin1.yaml").write_bytes(b"model:\n  name: caf\xe9\n")
    assert error_of(path="latin1.yaml") == "latin1.yaml:2: not valid UTF-8 (byte 12 of the line)"


def test_valid_values_are_coerced(data_file):
    cfg = load("train.lr=1e-5", "train.epochs=2.0", "objective.beta=1", "model.revision=1234567", "output.dir=2024",
               "lora.enabled=true", "lora.target_modules=q_proj", "reference.dtype=null")
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2 and isinstance(cfg.train.epochs, int)
    assert cfg.objective.beta == 1.0
    assert cfg.model.revision == "1234567" and cfg.output.dir == "2024"  # the text, not the number YAML reads
    assert cfg.lora.target_modules == ["q_proj"] and cfg.reference.dtype is None


def test_defaults_and_file_then_overrides(data_file):
    Path("cfg.yaml").write_text("train:\n  lr: 1.0e-4\n  epochs: 3\nobjective:\n  beta: 0.2\n", encoding="utf-8")
    cfg = load_config("cfg.yaml", ["data.train=pairs.jsonl", "train.epochs=1"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.objective.beta) == (1e-4, 1, 0.2)
    assert cfg.model.trust_remote_code is False and cfg.lora.enabled is False
    assert {"train.lr", "train.epochs", "objective.beta", "data.train"} <= cfg.explicit


def test_a_saved_full_config_loads_again(data_file):
    """A run writes every key to config.yaml, LoRA options at their defaults included: that file is valid input."""
    Path("saved.yaml").write_text(yaml.safe_dump(load().to_dict(), sort_keys=False), encoding="utf-8")
    assert load_config("saved.yaml").to_dict() == load().to_dict()
