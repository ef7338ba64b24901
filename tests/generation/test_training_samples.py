"""train.sample_every: what the policy generates while it trains, scored through the judges' checked path."""

from __future__ import annotations

import pytest

from dpokit.errors import ConfigError, DpokitError
from dpokit.trainer import train


def test_a_non_finite_sample_score_stops_the_run_before_any_step(tiny_config, pairs_file, tmp_path):
    judge = tmp_path / "judges.py"
    judge.write_text("import math\n\ndef nan(prompt, completion):\n    return math.nan\n")
    cfg = tiny_config(f"data.eval={pairs_file}", "train.sample_every=1", "train.sample_count=2",
                      "train.sample_max_new_tokens=2", f"train.sample_judge={judge}:nan")
    with pytest.raises(DpokitError, match=f"judge {judge}:nan returned a non-finite score \\(nan\\) for row 1"):
        train(cfg)
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or "NaN" not in metrics.read_text()


def test_a_pairwise_judge_is_refused_before_anything_loads(tiny_config, pairs_file):
    cfg = tiny_config(f"data.eval={pairs_file}", "train.sample_every=1", "train.sample_judge=llm")
    with pytest.raises(ConfigError, match="train.sample_judge scores each completion: the llm judge compares pairs"):
        train(cfg)
