"""The `data` config section → tokenized train and eval pairs, with a report of every row not used."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpokit.data.records import Problems, RowProblem, read_preferences
from dpokit.data.tokenize import TokenizedPair, TokenizeSettings, TruncationStats, tokenize_records
from dpokit.errors import DataError
from dpokit.storage import json_text


@dataclass
class PreparedData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    rows_read: int = 0
    problems: Problems = field(default_factory=Problems)
    truncation: TruncationStats = field(default_factory=TruncationStats)
    noun: str = "pairs"  # what a row became: "pairs", or "completions" for single completions

    def report(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "train_pairs": len(self.train),
            "eval_pairs": len(self.eval),
            "skipped": len(self.problems.rows),
            "skipped_by_reason": self.problems.counts(),
            "truncated": self.truncation.truncated,
            "truncated_prompt": self.truncation.truncated_prompt,
            "truncated_completion": self.truncation.truncated_completion,
        }

    def write_report(self, run_dir: Path) -> None:
        (run_dir / "data_report.json").write_text(json_text(self.report(), indent=2) + "\n")
        with (run_dir / "skipped_rows.jsonl").open("w", encoding="utf-8") as f:
            for p in self.problems.rows:
                f.write(json_text(p.to_json(), ensure_ascii=False) + "\n")

    def summary(self) -> str:
        r = self.report()
        text = f"data: {r['rows_read']} rows read, {r['train_pairs']} train / {r['eval_pairs']} eval {self.noun}"
        if r["skipped"]:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(r["skipped_by_reason"].items()))
            text += f", {r['skipped']} skipped ({reasons})"
        if r["truncated"]:
            text += f", {r['truncated']} truncated ({r['truncated_prompt']} prompts, {r['truncated_completion']} completions)"
        return text


def settings_of(data_cfg) -> TokenizeSettings:
    return TokenizeSettings(data_cfg.max_length, data_cfg.max_prompt_length, data_cfg.truncation_mode)


def prepare_data(data_cfg, tokenizer, *, seed: int = 0, use: str = "pairs", fields: Sequence[str] = ()) -> PreparedData:
    """`use`: what the rows are read as (records.USES): pairs, or single completions (a pair's chosen side,
    or completion rows) as pairs with an empty rejected side. `fields`: the row fields each item keeps in
    its `extra` (see `row_values`)."""
    problems = Problems("collect" if data_cfg.skip_invalid else "raise")
    settings = settings_of(data_cfg)
    fields = tuple(f for f in fields if f)
    read = read_preferences(data_cfg.train, split=data_cfg.train_split, problems=problems, use=use,
                            format=data_cfg.format, fields=fields)
    rows = read.rows_read
    train, stats = tokenize_records(read.records, tokenizer, settings, problems)
    evals: list[TokenizedPair] = []
    if data_cfg.eval is not None:
        read_eval = read_preferences(data_cfg.eval, split=data_cfg.eval_split, problems=problems, use=use,
                                     format=data_cfg.format, fields=fields)
        rows += read_eval.rows_read
        evals, eval_stats = tokenize_records(read_eval.records, tokenizer, settings, problems)
        stats.truncated_prompt += eval_stats.truncated_prompt
        stats.truncated_completion += eval_stats.truncated_completion
        stats.truncated_rows += eval_stats.truncated_rows
    elif data_cfg.eval_fraction:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(round(len(train) * data_cfg.eval_fraction)))
        held = set(order[:n_eval])
        evals = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]
    return PreparedData(train, evals, rows, problems, stats, "pairs" if use == "pairs" else "completions")


@dataclass(frozen=True)
class RowField:
    """A field a method reads from each row besides the text (a per-pair weight, a margin, KTO's label): its
    name in the rows, how its value is read (None: not a valid value), what it must be, and how to do
    without it. Training (`row_values`) and `dpokit validate` (`field_problems`) run the same checks."""

    key: str | None
    parse: Callable[[Any], Any]
    expected: str
    ignore: str


def weight_field(key: str | None) -> RowField:
    return RowField(key, lambda v: n if (n := finite_number(v)) is not None and n >= 0 else None,
                    "a finite number >= 0", "set objective.weight_field=null to ignore them")


def margin_field(key: str | None) -> RowField:
    return RowField(key, finite_number, "a finite number", "set reward.margin_field=null to ignore them")


LABEL = RowField("label", lambda v: v if isinstance(v, bool) else None, "true or false", "label them all")


def field_problems(items: list[TokenizedPair], f: RowField) -> list[RowProblem]:
    """Every item whose row lacks `f` while others have it, or holds a value `f` does not read."""
    if not f.key or not any(f.key in item.extra for item in items):
        return []
    problems = []
    for item in items:
        if f.key not in item.extra:
            problems.append(RowProblem(item.source, f"missing_{f.key}",
                                       f"no '{f.key}' field, which other rows have: give every row one, or {f.ignore}"))
        elif f.parse(item.extra[f.key]) is None:
            problems.append(RowProblem(item.source, f"bad_{f.key}",
                                       f"'{f.key}' must be {f.expected}; got {item.extra[f.key]!r}"))
    return problems


def row_values(splits: dict[str, list[TokenizedPair]], f: RowField) -> dict[str, list] | None:
    """Each item's value of the field `f.key` of its row, kept in its `extra` when the data were read
    (`prepare_data(fields=...)`), per split and in the items' order; None when the key is None or no item
    has it. An item without it when others have it, or with a value `f` does not read, stops here with the
    error naming its row (`field_problems`)."""
    items = [item for split in splits.values() for item in split]
    if not f.key or not any(f.key in item.extra for item in items):
        return None
    problems = field_problems(items, f)
    if problems:
        raise DataError(str(problems[0]))
    return {split: [f.parse(item.extra[f.key]) for item in split_items] for split, split_items in splits.items()}


def finite_number(value: Any) -> float | None:
    """A finite number, or its text (a CSV cell); None for anything else."""
    try:
        number = float(value) if not isinstance(value, bool) and isinstance(value, (int, float, str)) else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None
