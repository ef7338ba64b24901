"""The settings kit: a field's declared checks, its command-line option and back."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from dpokit.errors import ConfigError
from dpokit.fields import add_arguments, as_arguments, check_fields, describe_fields, from_arguments, opt


@dataclass(frozen=True)
class Knobs:
    steps: int = opt(4, "how many steps", min=1)
    rate: float = opt(0.5, "a rate in (0, 1]", min=0.0, min_exclusive=True, max=1.0)
    mode: str = opt("fast", "how to run", choices=("fast", "slow"))


def test_check_fields_names_the_option_and_suggests_a_choice():
    check_fields(Knobs())
    with pytest.raises(ConfigError, match=r"^--steps must be >= 1; got 0$"):
        check_fields(Knobs(steps=0))
    with pytest.raises(ConfigError, match=r"^knobs.rate must be > 0; got 0$"):
        check_fields(Knobs(rate=0.0), "knobs")
    with pytest.raises(ConfigError, match=r"^--mode must be one of fast, slow; got 'fsat' \(did you mean 'fast'\?\)$"):
        check_fields(Knobs(mode="fsat"))


def test_options_round_trip():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Knobs, defaults={"steps": 8})
    assert from_arguments(Knobs, parser.parse_args([])) == Knobs(steps=8)
    knobs = Knobs(steps=3, rate=0.25, mode="slow")
    assert from_arguments(Knobs, parser.parse_args(as_arguments(knobs))) == knobs
    assert describe_fields(Knobs)[2] == "  mode = fast  # how to run [fast | slow]"
