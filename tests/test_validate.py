"""`dpokit validate`: the report on a preference dataset, and exit status 0 only when it would train as is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dpokit.data.tokenize import TokenizeSettings
from dpokit.validate import validate_data

CORPUS = Path(__file__).parent / "data" / "malformed"


def write(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


ROWS = [
    {"prompt": "What is 2+2?", "chosen": "2+2 is 4, because two and two make four.", "rejected": "5."},
    {"prompt": "What is 2+2?", "chosen": "2+2 is 4, because two and two make four.", "rejected": "5."},  # duplicate
    {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "I will not answer that question."},
    {"prompt": "Name a color.", "chosen": "I will not answer that question.", "rejected": "Blue."},  # swapped
    {"prompt": "Hi", "chosen": "Hello!"},  # line 5: no rejected
    {"prompt": "Hi", "chosen": "Same", "rejected": "Same"},  # line 6: identical
    '{"prompt": "Hi", "chosen": "Hel',  # line 7: truncated
]


def test_report_counts_every_kind_of_problem(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", ROWS)
    r = validate_data(path, tokenizer, model="smol")
    assert (r.rows_read, r.valid, r.invalid) == (7, 4, 3)
    assert r.invalid_by_reason == {"identical": 1, "missing_field": 1, "unparsable": 1}
    assert [str(p) for p in r.problems] == [f"{path}:5: missing field 'rejected'",
                                            f"{path}:6: chosen and rejected are identical",
                                            f"{path}:7: invalid JSON: Unterminated string starting at: column 28"]
    assert r.identical == 1
    assert r.duplicates == [(f"{path}:2", f"{path}:1")]
    assert r.contradictory == [(f"{path}:4", f"{path}:3")]
    assert r.over_max_length == [] and r.error is None
    assert not r.ok  # training would stop at line 5
    assert r.verdict() == (f"NOT OK: 3 invalid rows; training stops at the first ({path}:5) unless "
                           "data.skip_invalid=true (--skip-invalid here)")
    skipping = validate_data(path, tokenizer, skip_invalid=True)
    assert skipping.ok and skipping.verdict() == "OK: the data would train as is (4 pairs, skipping 3 invalid rows)"


def test_length_statistics(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", ROWS[:4])
    lengths = validate_data(path, tokenizer).lengths

    def n(text):  # completion tokens as trained: the text's tokens and EOS
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1

    long, short, refusal = n(ROWS[0]["chosen"]), n("5."), n("I will not answer that question.")
    chosen, rejected = [long, long, n("Blue."), refusal], [short, short, refusal, n("Blue.")]
    assert lengths["pairs"] == 4
    assert lengths["chosen"] == {"mean": round(sum(chosen) / 4, 2), "median": sorted(chosen)[1] / 2 + sorted(chosen)[2] / 2,
                                 "min": min(chosen), "max": max(chosen)}
    assert lengths["rejected"]["max"] == refusal and lengths["rejected"]["min"] == short
    assert (lengths["chosen_longer"], lengths["rejected_longer"], lengths["same_length"]) == (0.75, 0.25, 0.0)
    assert lengths["mean_difference"] == round((sum(chosen) - sum(rejected)) / 4, 2)
    assert lengths["prompt"]["max"] == len(tokenizer("What is 2+2?")["input_ids"])


def test_length_bias_note(tmp_path, tokenizer):
    rows = [{"prompt": f"Question {i}?", "chosen": f"A long and careful answer number {i}.", "rejected": "No."}
            for i in range(10)]
    note = "  note: chosen is the longer answer in 100% of pairs; DPO can learn to prefer longer answers instead of better ones"
    assert note in validate_data(write(tmp_path / "a.jsonl", rows), tokenizer).render().splitlines()
    few = validate_data(write(tmp_path / "b.jsonl", rows[:9]), tokenizer)
    assert few.lengths["chosen_longer"] == 1.0 and "note:" not in few.render()  # too few pairs to say


def test_rows_over_the_length_limits(tmp_path, tokenizer):
    rows = [{"prompt": "one two three four five six seven eight nine ten", "chosen": "a b c", "rejected": "d"},
            {"prompt": "Hi", "chosen": "one two three four five six seven eight nine ten eleven", "rejected": "No."},
            {"prompt": "Hi", "chosen": "Yes.", "rejected": "No."}]
    path = write(tmp_path / "d.jsonl", rows)
    keep = validate_data(path, tokenizer, TokenizeSettings(max_length=8, max_prompt_length=4))
    assert keep.over_max_length == [f"{path}:1", f"{path}:2"] and keep.over_max_prompt_length == [f"{path}:1"]
    assert (keep.truncated_prompt, keep.truncated_completion) == (1, 1)  # row 1's prompt, row 2's completion
    assert keep.ok and keep.valid == 3

    strict = validate_data(path, tokenizer, TokenizeSettings(max_length=8, max_prompt_length=4, truncation_mode="error"))
    assert strict.invalid_by_reason == {"prompt_too_long": 1, "too_long": 1}
    assert [p.source for p in strict.problems] == [f"{path}:1", f"{path}:2"]
    assert not strict.ok and strict.valid == 1
    # the statistics describe the data before truncation
    assert strict.lengths["prompt"]["max"] == keep.lengths["prompt"]["max"] == 10


def test_conversational_rows_use_the_chat_template(tmp_path, tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4."}],
             "rejected": [{"role": "assistant", "content": "5, I think."}]}]
    r = validate_data(write(tmp_path / "c.jsonl", rows), tokenizer)
    prompt = tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert r.ok and r.lengths["prompt"]["max"] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert r.lengths["chosen"]["max"] == len(tokenizer("4.<|im_end|>", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("name, error", [
    ("jsonl/empty.jsonl", "the file is empty"),
    ("json/truncated_array.json", "invalid JSON: Unterminated string starting at: column 30"),
    ("not_a_dataset", "is a directory, not a preference file or a datasets dataset"),
])
def test_a_source_that_cannot_be_read_is_an_error(tokenizer, name, error):
    path = str(CORPUS / name)
    r = validate_data(path, tokenizer)
    assert r.error is not None and r.error.endswith(error) and r.error.startswith(path)
    assert not r.ok and r.to_json()["ok"] is False
    assert r.render().splitlines()[-1] == f"NOT OK: {r.error}"


def test_all_rows_invalid_is_not_ok_even_when_skipping(tokenizer):
    r = validate_data(str(CORPUS / "parquet/number_columns.parquet"), tokenizer, skip_invalid=True)
    assert (r.rows_read, r.valid, r.invalid_by_reason) == (2, 0, {"wrong_type": 2})
    assert not r.ok and r.verdict() == "NOT OK: no valid pairs" and r.lengths is None


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def smol_tokenizer(monkeypatch, tokenizer):
    """`dpokit validate` loads the default model's tokenizer: hand it the session's copy, and check the name."""
    from dpokit import models

    asked = []

    def load_tokenizer(name, **kwargs):
        asked.append((name, kwargs.get("trust_remote_code")))
        return tokenizer

    monkeypatch.setattr(models, "load_tokenizer", load_tokenizer)
    return asked


def test_cli_exit_0_on_data_that_trains(tmp_path, smol_tokenizer, capsys):
    from dpokit.cli import main

    path = write(tmp_path / "d.jsonl", ROWS[:1] + ROWS[2:3])
    assert main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert smol_tokenizer == [("smollm2-135m-instruct", False)]
    lines = out.splitlines()
    assert lines[0] == path
    assert lines[1] == "tokenizer smollm2-135m-instruct; max_length=1024, max_prompt_length=512, truncation_mode=keep_end"
    assert lines[2] == "rows read: 2   valid: 2   invalid: 0"
    assert "duplicates: 0" in lines and "over max_length: 0" in lines
    assert any(line.startswith("  chosen longer in 50.0% of pairs") for line in lines)
    assert lines[-1] == "OK: the data would train as is (2 pairs)"


def test_cli_exit_1_with_problems_by_file_and_line(tmp_path, smol_tokenizer, capsys):
    from dpokit.cli import main

    path = write(tmp_path / "d.jsonl", ROWS)
    assert main(["validate", path, "--show", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "  identical: 1" in lines and "  missing_field: 1" in lines and "  unparsable: 1" in lines
    assert f"    {path}:5: missing field 'rejected'" in lines
    assert "    ... and 1 more (--show N, or --json for all)" in lines
    assert f"duplicates: 1 ({path}:2 repeats {path}:1)" in lines
    assert lines[-1].startswith("NOT OK: 3 invalid rows")
    assert main(["validate", path, "--skip-invalid"]) == 0
    capsys.readouterr()


def test_cli_json(tmp_path, smol_tokenizer, capsys):
    from dpokit.cli import main

    path = write(tmp_path / "d.jsonl", ROWS)
    # rows 1 and 2 are 7 + 15 tokens: over 12, with prompts within 8; rows 3 and 4 are 4 + 8 tokens
    assert main(["validate", path, "--json", "--max-length", "12", "--max-prompt-length", "8",
                 "--truncation-mode", "error"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["settings"] == {"max_length": 12, "max_prompt_length": 8, "truncation_mode": "error",
                                  "skip_invalid": False}
    assert (report["rows_read"], report["valid"], report["invalid"], report["identical"]) == (7, 2, 5, 1)
    assert report["invalid_by_reason"] == {"too_long": 2, "identical": 1, "missing_field": 1, "unparsable": 1}
    assert {"source": f"{path}:5", "reason": "missing_field", "detail": "missing field 'rejected'"} in report["problems"]
    assert report["duplicates"] == [{"row": f"{path}:2", "repeats": f"{path}:1"}]
    assert report["contradictory"] == [{"row": f"{path}:4", "swaps": f"{path}:3"}]
    assert report["ok"] is False and report["error"] is None
    assert set(report["lengths"]) == {"pairs", "prompt", "chosen", "rejected", "chosen_longer", "rejected_longer",
                                      "same_length", "mean_difference"}


def test_cli_on_the_malformed_corpus(smol_tokenizer, capsys):
    from dpokit.cli import main

    path = str(CORPUS / "jsonl/unknown_role.jsonl")
    assert main(["validate", path, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == [{"source": f"{path}:2", "reason": "unknown_role", "detail":
                                   "'chosen': message 0 has role 'bot'; expected one of system, user, assistant, tool"}]
    path = str(CORPUS / "jsonl/empty.jsonl")
    assert main(["validate", path]) == 1
    assert capsys.readouterr().out.splitlines()[-2:] == [f"error: {path}: the file is empty",
                                                         f"NOT OK: {path}: the file is empty"]


@pytest.mark.parametrize("args, line", [
    (["missing.jsonl"], "error: data.train: file not found: missing.jsonl"),
    (["d.jsonl", "--max-length", "100", "--max-prompt-length", "100"],
     "error: data.max_prompt_length (100) must be less than data.max_length (100) to leave room for the completion"),
    (["d.jsonl", "--max-length", "1"], "error: data.max_length must be >= 2; got 1"),
    (["d.jsonl", "--model", "./no-such-model"], "error: model.name: not found: ./no-such-model"),
])
def test_cli_exit_2_when_the_check_cannot_run(tmp_path, monkeypatch, capsys, args, line):
    from dpokit import models
    from dpokit.cli import main

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "d.jsonl", ROWS[:1])
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("loaded a tokenizer"))
    assert main(["validate", *args]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", line + "\n")


def test_cli_with_the_real_default_tokenizer(tmp_path, smol_dir, capsys):
    from dpokit.cli import main

    path = write(tmp_path / "d.jsonl", ROWS[:1])
    assert main(["validate", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "smollm2-135m-instruct" and report["valid"] == 1 and report["ok"] is True


@pytest.mark.parametrize("name, error", [
    ("other/pairs.txt", "unsupported file type '.txt' (use .jsonl, .json, .parquet or .csv)"),
    ("not_a_dataset", "is a directory, not a preference file or a datasets dataset"),
    ("datasets/no_train_split", "no split 'train' (splits: test)"),
])
def test_cli_exit_2_on_a_source_that_cannot_be_read(smol_tokenizer, capsys, name, error):
    from dpokit.cli import main

    path = str(CORPUS / name)
    assert main(["validate", path]) == 2  # the check could not run: not 1, which says the data is invalid
    out, err = capsys.readouterr()
    assert out.splitlines()[-2:] == [f"error: {path}: {error}", f"NOT OK: {path}: {error}"] and err == ""
    assert main(["validate", path, "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"] == f"{path}: {error}"


def test_cli_exit_2_on_an_unreadable_file(tmp_path, smol_tokenizer, capsys, monkeypatch):
    from dpokit.cli import main

    path = write(tmp_path / "d.jsonl", ROWS[:1])

    def unreadable(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", unreadable)  # chmod does not stop root, who runs some test machines
    assert main(["validate", path]) == 2
    assert capsys.readouterr().out.splitlines()[-1] == f"NOT OK: {path}: cannot read: Permission denied"


def test_a_missing_file_exits_2_but_invalid_rows_exit_1(tmp_path, smol_tokenizer, capsys):
    from dpokit.cli import main

    assert main(["validate", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: data.train: file not found: {tmp_path / 'missing.jsonl'}\n"
    assert main(["validate", write(tmp_path / "d.jsonl", ROWS)]) == 1
    assert main(["validate", str(CORPUS / "json/truncated_array.json")]) == 1  # reads, but is not valid JSON


def test_an_unreadable_source_is_still_a_data_error_for_training():
    from dpokit.data.records import read_preferences
    from dpokit.errors import DataError, SourceError

    with pytest.raises(SourceError, match="unsupported file type") as e:
        read_preferences(str(CORPUS / "other/pairs.txt"))
    assert isinstance(e.value, DataError)


def test_length_table_columns_widen_to_fit_large_numbers():
    from dpokit.validate import _render_lengths

    def side(mean, median, lo, hi):
        return {"mean": mean, "median": median, "min": lo, "max": hi}

    lengths = {"pairs": 3, "prompt": side(5.0, 5, 3, 7), "chosen": side(654321.5, 123456, 1234567, 7654321),
               "rejected": side(12.25, 12.5, 123456, 1234567), "chosen_longer": 1.0, "rejected_longer": 0.0,
               "same_length": 0.0, "mean_difference": 1234567.5}
    lines = _render_lengths(lengths)
    assert lines[1].split() == ["mean", "median", "min", "max"]
    assert lines[2].split() == ["prompt", "5.0", "5", "3", "7"]
    assert lines[3].split() == ["chosen", "654321.5", "123456", "1234567", "7654321"]
    assert lines[4].split() == ["rejected", "12.2", "12.5", "123456", "1234567"]
    assert len({len(line) for line in lines[1:5]}) == 1  # right-aligned columns: every row as long
    assert "(mean chosen - rejected: +1234567.5 tokens)" in lines[5]
    # small numbers keep the usual widths: 9, 9, 9, 7, 7
    small = {**lengths, "chosen": side(12.0, 11, 4, 20), "rejected": side(3.0, 3, 2, 4), "mean_difference": 9.0}
    assert _render_lengths(small)[1:5] == ["  " + " " * 9 + "     mean   median    min    max",
                                           "  prompt         5.0        5      3      7",
                                           "  chosen        12.0       11      4     20",
                                           "  rejected       3.0        3      2      4"]


# ------------------------------------------------------------------------------------- unpaired KTO rows

KTO_ROWS = [
    {"prompt": "Name a color.", "completion": "Blue.", "label": True},
    {"prompt": "Name a color.", "completion": "Potato.", "label": False},
    {"prompt": "Name a color.", "completion": "Blue.", "label": True},  # line 3: repeats line 1
    {"prompt": "Name a color.", "completion": "Potato.", "label": True},  # line 4: line 2 labelled the other way
    {"prompt": "What is 3 plus 4?", "completion": "7.", "label": "maybe"},  # line 5: not a label
    {"prompt": "Hi", "label": False},  # line 6: no completion
    {"prompt": "Hi", "completion": "", "label": False},  # line 7: empty completion
    '{"prompt": "Hi", "completion": "Hel',  # line 8: truncated
]


def test_unpaired_kto_rows_are_counted_by_label_with_problems_by_file_and_line(tmp_path, tokenizer):
    path = write(tmp_path / "kto.jsonl", KTO_ROWS)
    r = validate_data(path, tokenizer)
    assert r.detected == "kto" and r.unpaired
    assert (r.rows_read, r.valid, r.desirable, r.undesirable, r.invalid) == (8, 4, 3, 1, 4)
    assert r.invalid_by_reason == {"empty_completion": 1, "missing_field": 1, "unparsable": 1, "wrong_type": 1}
    assert [str(p) for p in r.problems] == [
        f"{path}:5: 'label' must be true (desirable) or false (undesirable), got 'maybe'",
        f"{path}:6: missing field 'completion' (a completion row has prompt and completion, or messages)",
        f"{path}:7: 'completion' is empty",
        f"{path}:8: invalid JSON: Unterminated string starting at: column 32"]
    assert r.duplicates == [(f"{path}:3", f"{path}:1")]
    assert r.contradictory == [(f"{path}:4", f"{path}:2")]  # the same completion, desirable and not
    assert set(r.lengths) == {"completions", "prompt", "completion"} and r.lengths["completions"] == 4
    assert r.verdict().startswith("NOT OK: 4 invalid rows; training stops at the first")
    lines = r.render().splitlines()
    assert "rows read: 8   valid: 4 (3 desirable, 1 undesirable)   invalid: 4" in lines
    assert "  wrong_type: 1" in lines and not any(line.startswith("identical") for line in lines)
    assert f"contradictory (the same completion labelled the other way in another row): 1 ({path}:4 swaps {path}:2)" \
        in lines
    assert any(line.startswith("tokens over 4 completions") for line in lines)
    skipping = validate_data(path, tokenizer, skip_invalid=True)
    assert skipping.ok and skipping.verdict() == "OK: the data would train as is (4 completions, skipping 4 invalid rows)"


def test_cli_on_unpaired_kto_rows(tmp_path, smol_tokenizer, capsys):
    from dpokit.cli import main

    path = write(tmp_path / "kto.jsonl", KTO_ROWS)
    assert main(["validate", path, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["format"], report["valid"], report["desirable"], report["undesirable"]) == ("kto", 4, 3, 1)
    assert report["invalid_by_reason"] == {"empty_completion": 1, "missing_field": 1, "unparsable": 1,
                                           "wrong_type": 1}
    assert {"source": f"{path}:5", "reason": "wrong_type",
            "detail": "'label' must be true (desirable) or false (undesirable), got 'maybe'"} in report["problems"]
    # named explicitly, and only the valid rows: exit 0
    assert main(["validate", write(tmp_path / "ok.jsonl", KTO_ROWS[:2]), "--format", "kto"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK: the data would train as is (2 completions)"
    # pair rows read as KTO rows name what is missing
    assert main(["validate", write(tmp_path / "pairs.jsonl", ROWS[:1]), "--format", "kto"]) == 1
    assert f"    {tmp_path / 'pairs.jsonl'}:1: missing field 'label' (true: desirable, false: undesirable)" \
        in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("weight", [-1, "x", float("nan")])
def test_validate_runs_the_row_checks_training_runs(tmp_path, tokenizer, tiny_config, weight):
    """What `dpokit train` refuses, `dpokit validate` reports: one set of row checks (dpokit.data.dataset)."""
    from dpokit.errors import DataError
    from dpokit.trainer import train

    path = tmp_path / "weighted.jsonl"
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c", "weight": weight},
            {"prompt": "d", "chosen": "e", "rejected": "f", "weight": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate_data(str(path), tokenizer)
    assert not report.ok and report.valid == 1
    message = f"{path}:1: 'weight' must be a finite number >= 0; got {weight!r}"
    assert [str(p) for p in report.problems] == [message]
    with pytest.raises(DataError, match=re.escape(message)):
        train(tiny_config(f"data.train={path}"))
