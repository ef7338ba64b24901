"""`dpokit validate DATA`: check a preference dataset without training.

Reads DATA exactly as training does (`read_preferences`, `tokenize_records`' encoding and truncation)
but collects every problem instead of stopping at the first, and reports: rows read, valid and invalid
(by reason, with file and line), duplicate and contradictory pairs, identical chosen/rejected, rows over
the length limits with the model's tokenizer, and chosen/rejected length statistics (a chosen answer
that is usually longer lets DPO learn length instead of quality). The exit status is 0 only when the
data would train as is with the given `data.*` settings, 1 when it would not, and 2 when the check
itself cannot run (a bad option, a model that does not load, a source that cannot be read at all:
missing, an unsupported file type, unreadable, a directory that is not a dataset).
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from dataclasses import dataclass, field

from dpokit import models
from dpokit.config import Config, DataSection, ModelSection, ObjectiveSection, RewardSection
from dpokit.config_checks import check_config
from dpokit.config_loader import set_value
from dpokit.data.dataset import LABEL, field_problems, margin_field, settings_of, weight_field
from dpokit.data.records import PreferenceRecord, Problems, RowProblem, RowReader, read_preferences
from dpokit.data.tokenize import (
    TokenizedPair,
    TokenizeSettings,
    encode_records,
    truncate_pairs,
    use_chat_template,
)
from dpokit.errors import DataError, SourceError
from dpokit.fields import choices_of
from dpokit.storage import json_text

LENGTH_BIAS_SHARE = 0.6  # a note when one side is the longer one in at least this share of pairs ...
LENGTH_BIAS_MIN_PAIRS = 10  # ... of at least this many


@dataclass
class ValidationReport:
    source: str
    model: str
    settings: TokenizeSettings
    split: str = "train"
    skip_invalid: bool = False
    format: str = "auto"  # data.format as given; `detected` is what the rows were read as
    detected: str | None = None
    desirable: int | None = None  # unpaired rows (data.format=kto): valid completions labelled desirable ...
    undesirable: int | None = None  # ... and undesirable; None for pairs
    error: str | None = None  # a problem with the whole source: nothing could be checked past it
    unreadable: bool = False  # the error is that the source cannot be read at all: the check could not run
    rows_read: int = 0
    valid: int = 0  # pairs (or unpaired completions) training would use
    problems: list[RowProblem] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (row, the earlier row it repeats)
    contradictory: list[tuple[str, str]] = field(default_factory=list)  # (row, earlier row with the two swapped)
    over_max_length: list[str] = field(default_factory=list)
    over_max_prompt_length: list[str] = field(default_factory=list)  # of those over max_length
    truncated_prompt: int = 0
    truncated_completion: int = 0
    lengths: dict | None = None

    @property
    def unpaired(self) -> bool:
        return self.desirable is not None

    @property
    def invalid(self) -> int:
        return len(self.problems)

    @property
    def invalid_by_reason(self) -> dict[str, int]:
        counts = Counter(p.reason for p in self.problems)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def identical(self) -> int:
        return sum(p.reason == "identical" for p in self.problems)

    @property
    def ok(self) -> bool:
        """Whether training would run on this data as is."""
        return self.error is None and self.valid > 0 and (self.skip_invalid or not self.problems)

    def verdict(self) -> str:
        if self.error is not None:
            return f"NOT OK: {self.error}"
        if self.valid == 0:
            return f"NOT OK: no valid {'completions' if self.unpaired else 'pairs'}"
        if self.problems and not self.skip_invalid:
            first = self.problems[0]
            return (f"NOT OK: {_n(self.invalid, 'invalid row')}; training stops at the first "
                    f"({first.source}) unless data.skip_invalid=true (--skip-invalid here)")
        skipped = f", skipping {_n(self.invalid, 'invalid row')}" if self.problems else ""
        return f"OK: the data would train as is ({_n(self.valid, 'completion' if self.unpaired else 'pair')}{skipped})"

    def to_json(self) -> dict:
        s = self.settings
        return {
            "source": self.source,
            "split": self.split,
            "format": self.detected or self.format,
            "model": self.model,
            "settings": {"max_length": s.max_length, "max_prompt_length": s.max_prompt_length,
                         "truncation_mode": s.truncation_mode, "skip_invalid": self.skip_invalid},
            "ok": self.ok,
            "verdict": self.verdict(),
            "error": self.error,
            "rows_read": self.rows_read,
            "valid": self.valid,
            **({"desirable": self.desirable, "undesirable": self.undesirable} if self.unpaired else {}),
            "invalid": self.invalid,
            "invalid_by_reason": self.invalid_by_reason,
            "problems": [p.to_json() for p in self.problems],
            "identical": self.identical,
            "duplicates": [{"row": a, "repeats": b} for a, b in self.duplicates],
            "contradictory": [{"row": a, "swaps": b} for a, b in self.contradictory],
            "over_max_length": self.over_max_length,
            "over_max_prompt_length": self.over_max_prompt_length,
            "truncated": {"prompts": self.truncated_prompt, "completions": self.truncated_completion},
            "lengths": self.lengths,
        }

    def render(self, show: int = 10) -> str:
        s = self.settings
        shown = self.detected or self.format
        schema = "" if shown in ("standard", "auto") else f" (format {shown}" + (
            ", detected" if self.format == "auto" else "") + ")"
        out = [f"{self.source}" + (f" (split {self.split})" if self.split != "train" else "") + schema,
               f"tokenizer {self.model}; max_length={s.max_length}, max_prompt_length={s.max_prompt_length}, "
               f"truncation_mode={s.truncation_mode}"]
        if self.error is not None:
            out += [f"error: {self.error}", self.verdict()]
            return "\n".join(out)
        labels = f" ({self.desirable} desirable, {self.undesirable} undesirable)" if self.unpaired else ""
        out.append(f"rows read: {self.rows_read}   valid: {self.valid}{labels}   invalid: {self.invalid}")
        for reason, n in self.invalid_by_reason.items():
            out.append(f"  {reason}: {n}")
        for p in self.problems[:show]:
            out.append(f"    {p}")
        if len(self.problems) > show:
            out.append(f"    ... and {len(self.problems) - show} more (--show N, or --json for all)")
        if not self.unpaired:
            out.append(f"identical chosen/rejected: {self.identical}")
        out.append(f"duplicates: {len(self.duplicates)}" + _examples(self.duplicates, "repeats", show))
        what = ("the same completion labelled the other way" if self.unpaired else
                "chosen/rejected swapped")
        out.append(f"contradictory ({what} in another row): {len(self.contradictory)}"
                   + _examples(self.contradictory, "swaps", show))
        over = f"over max_length: {len(self.over_max_length)}"
        if self.over_max_length:
            over += f" (prompt over max_prompt_length: {len(self.over_max_prompt_length)})"
            over += (" - rejected with truncation_mode=error" if s.truncation_mode == "error" else
                     f" - truncated: {self.truncated_prompt} prompts, {self.truncated_completion} completions")
            over += "; e.g. " + ", ".join(self.over_max_length[:3])
        out.append(over)
        if self.lengths:
            out += _render_lengths(self.lengths)
        out.append(self.verdict())
        return "\n".join(out)


def validate_data(source: str, tokenizer, settings: TokenizeSettings | None = None, *, split: str = "train",
                  skip_invalid: bool = False, model: str = "", format: str = "auto") -> ValidationReport:
    """Check `source` (of schema `format`, data.format) as training would read it (default `data.*` settings),
    collecting every problem."""
    settings = settings if settings is not None else TokenizeSettings()
    report = ValidationReport(source, model, settings, split=split, skip_invalid=skip_invalid, format=format)
    problems = Problems("collect")
    labels: dict[str, bool] | None = None
    fields = [weight_field(ObjectiveSection().weight_field), margin_field(RewardSection().margin_field)]
    try:
        if _schema(source, split, format) == "kto":  # unpaired rows, read as KTO reads them
            fields.append(LABEL)
            read = read_preferences(source, split=split, problems=problems, format=format, use="labelled",
                                    fields=[f.key for f in fields])
            labels = {r.source: r.extra.get("label") for r in read.records}
        else:
            read = read_preferences(source, split=split, problems=problems, format=format,
                                    fields=[f.key for f in fields])
        report.detected = read.format
        pairs = encode_records(read.records, tokenizer, problems)
    except DataError as e:
        report.error = str(e)
        report.unreadable = isinstance(e, SourceError)
        report.problems = problems.rows
        return report
    report.rows_read = read.rows_read
    report.duplicates, report.contradictory = _repeats(read.records, labels)
    for p in pairs:
        if len(p.prompt) + max(len(p.chosen), len(p.rejected)) > settings.max_length:
            report.over_max_length.append(p.source)
            if len(p.prompt) > settings.max_prompt_length:
                report.over_max_prompt_length.append(p.source)
    kept, stats = truncate_pairs(pairs, settings, problems)
    bad_fields = [p for f in fields for p in field_problems(kept, f)]  # the checks training runs on these fields
    for problem in bad_fields:
        problems.add(problem.source, problem.reason, problem.detail)
    bad = {p.source for p in bad_fields}
    kept = [p for p in kept if p.source not in bad]
    report.valid = len(kept)
    report.truncated_prompt, report.truncated_completion = stats.truncated_prompt, stats.truncated_completion
    report.problems = problems.rows
    if labels is not None:
        report.desirable = sum(labels[p.source] for p in kept)
        report.undesirable = report.valid - report.desirable
        report.lengths = completion_length_stats(pairs)
    else:
        report.lengths = length_stats(pairs)
    return report


def _schema(source: str, split: str, format: str) -> str | None:
    """The schema of `source`: `format`, or for `auto` the one its first row (or a table's columns) names."""
    if format != "auto":
        return format
    rows = RowReader(source, split, Problems("collect"), format=format)
    next(iter(rows), None)
    return rows.format


def completion_length_stats(pairs: list[TokenizedPair]) -> dict | None:
    """Token counts of the prompts and the completions of unpaired rows (with EOS, before truncation)."""
    if not pairs:
        return None
    return {"completions": len(pairs), "prompt": _summary([len(p.prompt) for p in pairs]),
            "completion": _summary([len(p.chosen) for p in pairs])}


def _summary(values: list[int]) -> dict:
    return {"mean": round(statistics.fmean(values), 2), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


def length_stats(pairs: list[TokenizedPair]) -> dict | None:
    """Token counts of prompts and completions (with EOS, before truncation), and which side is longer."""
    if not pairs:
        return None
    summary = _summary
    chosen = [len(p.chosen) for p in pairs]
    rejected = [len(p.rejected) for p in pairs]
    n = len(pairs)
    return {
        "pairs": n,
        "prompt": summary([len(p.prompt) for p in pairs]),
        "chosen": summary(chosen),
        "rejected": summary(rejected),
        "chosen_longer": round(sum(c > r for c, r in zip(chosen, rejected)) / n, 4),
        "rejected_longer": round(sum(c < r for c, r in zip(chosen, rejected)) / n, 4),
        "same_length": round(sum(c == r for c, r in zip(chosen, rejected)) / n, 4),
        "mean_difference": round(statistics.fmean(c - r for c, r in zip(chosen, rejected)), 2),
    }


def _repeats(records: list[PreferenceRecord], labels: dict[str, bool] | None = None
             ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Rows that repeat an earlier one, and rows that contradict one: a pair with its sides swapped, or
    (unpaired rows, `labels` by source) the same completion with the other label."""
    seen: dict[str, str] = {}
    duplicates, contradictory = [], []
    for r in records:
        if labels is not None:
            key = json_text([r.prompt, r.chosen, labels[r.source]], sort_keys=True)
            swapped = json_text([r.prompt, r.chosen, not labels[r.source]], sort_keys=True)
        else:
            key = json_text([r.prompt, r.chosen, r.rejected], sort_keys=True)
            swapped = json_text([r.prompt, r.rejected, r.chosen], sort_keys=True)
        if key in seen:
            duplicates.append((r.source, seen[key]))
            continue
        if swapped in seen:
            contradictory.append((r.source, seen[swapped]))
        seen[key] = r.source
    return duplicates, contradictory


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def _examples(rows: list[tuple[str, str]], verb: str, show: int) -> str:
    if not rows:
        return ""
    shown = ", ".join(f"{a} {verb} {b}" for a, b in rows[:min(show, 3)])
    return f" ({shown}{', ...' if len(rows) > min(show, 3) else ''})"


def _render_lengths(lengths: dict) -> list[str]:
    rows = [["", "mean", "median", "min", "max"]]
    unpaired = "completions" in lengths
    for key in ("prompt", "completion") if unpaired else ("prompt", "chosen", "rejected"):
        s = lengths[key]
        rows.append([key, f"{s['mean']:.1f}", f"{s['median']:.10g}", str(s["min"]), str(s["max"])])
    # the usual widths, widened where a number needs it so a space always separates two columns
    # (.10g: plain digits up to 10 figures where :g turns 1234567 into 1.23457e+06)
    widths = [max(minimum, *(len(row[i]) + 1 for row in rows)) for i, minimum in enumerate((9, 9, 9, 7, 7))]
    count = _n(lengths["completions"], "completion") if unpaired else _n(lengths["pairs"], "pair")
    out = [f"tokens over {count} (completions with EOS, before truncation):"]
    for name, *numbers in rows:
        out.append("  " + name.ljust(widths[0]) + "".join(n.rjust(w) for n, w in zip(numbers, widths[1:])))
    if unpaired:
        return out
    out.append(f"  chosen longer in {lengths['chosen_longer']:.1%} of pairs, rejected longer in "
               f"{lengths['rejected_longer']:.1%}, same length in {lengths['same_length']:.1%} "
               f"(mean chosen - rejected: {lengths['mean_difference']:+.10g} tokens)")
    for side in ("chosen", "rejected"):
        if lengths[f"{side}_longer"] >= LENGTH_BIAS_SHARE and lengths["pairs"] >= LENGTH_BIAS_MIN_PAIRS:
            out.append(f"  note: {side} is the longer answer in {lengths[f'{side}_longer']:.0%} of pairs; DPO can "
                       f"learn to prefer {'longer' if side == 'chosen' else 'shorter'} answers instead of better ones")
    return out


# ------------------------------------------------------------------------------------------------ CLI


def add_validate(sub) -> argparse.ArgumentParser:
    data, model = DataSection(), ModelSection()
    p = sub.add_parser(
        "validate",
        help="check a preference dataset without training",
        description="Check a preference dataset as `dpokit train` would read it, without training, and "
                    "report invalid rows (by reason, with file and line), duplicates, rows over the length "
                    "limits with the model's tokenizer and chosen/rejected length statistics (for unpaired KTO "
                    "rows: desirable and undesirable counts, and completions labelled both ways). Exit status: 0 "
                    "when the data would train as is with these settings, 1 when it would not, 2 when the "
                    "check cannot run (a bad option or model, a source that cannot be read at all).",
    )
    p.add_argument("data", help="preference pairs, or unpaired KTO rows (prompt, completion, label): "
                                ".jsonl/.json/.parquet/.csv file, datasets directory or hub name")
    p.add_argument("--model", default=model.name, help=f"whose tokenizer counts tokens (default: {model.name})")
    p.add_argument("--split", default=data.train_split, help="split of a datasets dataset (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=data.max_length, help="data.max_length (default: %(default)s)")
    p.add_argument("--max-prompt-length", type=int, default=data.max_prompt_length,
                   help="data.max_prompt_length (default: %(default)s)")
    p.add_argument("--truncation-mode", default=data.truncation_mode, choices=choices_of(DataSection, "truncation_mode"),
                   help="data.truncation_mode (default: %(default)s)")
    p.add_argument("--skip-invalid", action="store_true", help="data.skip_invalid=true: invalid rows would be skipped")
    p.add_argument("--format", default=data.format, choices=choices_of(DataSection, "format"),
                   help="data.format: the rows' schema (default: %(default)s, detected from the fields)")
    p.add_argument("--chat-template", default=None,
                   help="data.chat_template: a Jinja chat template or a file holding one, instead of the tokenizer's")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--show", type=int, default=10, help="invalid rows listed one by one (default: %(default)s)")
    return p


def validate_command(args: argparse.Namespace) -> int:
    # the same keys, checks and messages as a training config: errors here exit 2 before anything loads
    cfg = Config()
    for key, value in (("model.name", args.model), ("data.train", args.data), ("data.train_split", args.split),
                       ("data.max_length", args.max_length), ("data.max_prompt_length", args.max_prompt_length),
                       ("data.truncation_mode", args.truncation_mode), ("data.skip_invalid", args.skip_invalid),
                       ("data.format", args.format), ("data.chat_template", args.chat_template)):
        set_value(cfg, key, value, source="validate")
    check_config(cfg)
    tokenizer = models.load_tokenizer(cfg.model.name, revision=cfg.model.revision,
                                      trust_remote_code=cfg.model.trust_remote_code)
    use_chat_template(tokenizer, cfg.data.chat_template)
    report = validate_data(cfg.data.train, tokenizer, settings_of(cfg.data), split=cfg.data.train_split,
                           skip_invalid=cfg.data.skip_invalid, model=cfg.model.name, format=cfg.data.format)
    if args.json:
        print(json_text(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print(report.render(show=max(args.show, 0)))
    if report.unreadable:
        return 2
    return 0 if report.ok else 1
