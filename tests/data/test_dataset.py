"""The `data` section → tokenized splits: the fields a method reads besides the text travel with each
item, read once with the record."""

from __future__ import annotations

import json

import pytest

from dpokit.config_loader import load_config
from dpokit.data.dataset import margin_field, prepare_data, row_values, weight_field
from dpokit.errors import DataError


def _rows(weights):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(len(weights))]
    for row, w in zip(rows, weights):
        if w is not None:
            row["weight"] = w
    return rows


def _prepare(tmp_path, tokenizer, weights, fields=("weight",)):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(weights)))
    cfg = load_config(None, [f"data.train={path}", "data.eval_fraction=0.25", f"output.dir={tmp_path / 'run'}"])
    data = prepare_data(cfg.data, tokenizer, seed=0, fields=fields)
    path.unlink()  # what follows reads nothing from the file again
    return data


def test_extra_fields_travel_with_their_items(tmp_path, tokenizer):
    data = _prepare(tmp_path, tokenizer, [0.5, 1, "2", 3.5])
    splits = {"train": data.train, "eval": data.eval}
    got = row_values(splits, weight_field("weight"))
    by_source = {item.source: w for s, items in splits.items() for item, w in zip(items, got[s])}
    assert sorted(by_source.items()) == [(f"{tmp_path / 'pairs.jsonl'}:{i + 1}", w)
                                         for i, w in enumerate([0.5, 1.0, 2.0, 3.5])]
    assert len(data.eval) == 1  # eval_fraction's held-out item kept its weight too
    assert row_values(splits, margin_field("margin")) is None


def test_a_missing_or_bad_value_names_its_row(tmp_path, tokenizer):
    data = _prepare(tmp_path, tokenizer, [1, None, 2, 3])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: no 'weight' field, which other rows have"):
        row_values({"train": data.train, "eval": data.eval}, weight_field("weight"))
    data = _prepare(tmp_path, tokenizer, [1, "x", 2, 3])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: 'weight' must be a finite number >= 0; got 'x'"):
        row_values({"train": data.train, "eval": data.eval}, weight_field("weight"))


def test_fields_not_asked_for_are_not_kept(tmp_path, tokenizer):
    data = _prepare(tmp_path, tokenizer, [1, 2, 3, 4], fields=())
    assert all(item.extra == {} for item in data.train + data.eval)
