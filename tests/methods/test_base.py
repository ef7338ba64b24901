"""The method protocol and registry: every method the CLI runs is a `Method` in the registry, runs from
Python by name, and states its config rules before anything loads."""

from __future__ import annotations

import pytest

import dpokit
from dpokit.cli import build_parser
from dpokit.errors import ConfigError
from dpokit.methods.base import Method
from dpokit.methods.registry import METHODS, method_class


def test_every_registered_method_is_a_method_with_a_command():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for name, info in METHODS.items():
        cls = method_class(name)
        assert issubclass(cls, Method) and cls.name == name
        assert info.command in commands and method_class(info.command) is cls
    with pytest.raises(ConfigError, match="unknown method 'dop' \\(did you mean 'dpo'\\?\\)"):
        method_class("dop")


def test_dpokit_train_runs_other_methods_by_name(tiny_config):
    result = dpokit.train(tiny_config("train.max_steps=1", "data.use=chosen"), method="sft")
    assert (result.run_dir / "run.json").read_text().count('"sft"') == 1
    assert "fine-tuned with dpokit" in (result.model_dir / "README.md").read_text()


@pytest.mark.parametrize("method, overrides, message", [
    ("sft", ["data.use=pairs"], "dpokit sft trains on single completions"),
    ("dpo", ["data.use=completion"], "preference objectives need data.use=pairs"),
    ("reward", ["train.sample_every=1"], "a reward model scores text"),
    ("ppo", ["ppo.judge=length", "ppo.minibatch_size=3"], r"ppo.minibatch_size \(3\) must divide train.batch_size \(4\)"),
])
def test_method_checks_run_before_anything_is_written(tiny_config, method, overrides, message):
    cfg = tiny_config(*overrides)
    with pytest.raises(ConfigError, match=message):
        dpokit.train(cfg, method=method)
    assert not (cfg.output.dir and __import__("pathlib").Path(cfg.output.dir).exists())
