"""Reading preference data: every malformed input named by file and line (every good format read alike:
test_sources.py).

The malformed corpus lives in tests/data/malformed/ (written by make_corpus.py beside it). Each file
holds one kind of bad input; with the default `Problems()` reading stops at it with the exact message
below, and with `Problems("collect")` the bad row is counted by reason and the valid rows are kept.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from dpokit.data.records import (
    Problems,
    RowProblem,
    read_preferences,
    split_implicit_prompt,
)
from dpokit.errors import DataError
from tests.helpers import write_jsonl

CORPUS = Path(__file__).parent / "malformed"
HINT = " (set data.skip_invalid=true to skip such rows)"
ROLES = "expected one of system, user, assistant, tool"

# file, where the bad row is (appended to the path), reason, detail; the row-level cases keep `kept` rows
ROW_CASES = [
    # JSON Lines: rows that are not JSON objects
    ("jsonl/truncated_json.jsonl", ":2", "unparsable", "invalid JSON: Unterminated string starting at: column 50"),
    ("jsonl/not_json.jsonl", ":2", "unparsable", "invalid JSON: Expecting value: column 1"),
    ("jsonl/single_quotes.jsonl", ":2", "unparsable",
     "invalid JSON: Expecting property name enclosed in double quotes: column 2"),
    ("jsonl/trailing_comma.jsonl", ":2", "unparsable",
     "invalid JSON: Expecting property name enclosed in double quotes: column 60"),
    ("jsonl/invalid_utf8.jsonl", ":2", "invalid_utf8", "not valid UTF-8 (byte 16 of the line)"),
    ("jsonl/deeply_nested.jsonl", ":2", "unparsable", "invalid JSON: nested too deeply"),
    ("jsonl/array_row.jsonl", ":2", "not_an_object", "expected an object with chosen/rejected, got a list"),
    ("jsonl/null_row.jsonl", ":2", "not_an_object", "expected an object with chosen/rejected, got null"),
    # JSON Lines: missing or mistyped fields
    ("jsonl/missing_chosen.jsonl", ":2", "missing_field", "missing field 'chosen'"),
    ("jsonl/missing_rejected.jsonl", ":2", "missing_field", "missing field 'rejected'"),
    ("jsonl/misspelled_field.jsonl", ":2", "missing_field", "missing field 'chosen' (the row has 'choosen')"),
    ("jsonl/number_chosen.jsonl", ":2", "wrong_type", "'chosen' must be a string or a list of messages, got a number"),
    ("jsonl/bool_rejected.jsonl", ":2", "wrong_type",
     "'rejected' must be a string or a list of messages, got a boolean"),
    ("jsonl/null_rejected.jsonl", ":2", "wrong_type", "'rejected' must be a string or a list of messages, got null"),
    ("jsonl/object_prompt.jsonl", ":2", "wrong_type", "'prompt' must be a string or a list of messages, got an object"),
    ("jsonl/empty_chosen.jsonl", ":2", "empty_completion", "'chosen' is empty"),
    ("jsonl/whitespace_rejected.jsonl", ":2", "empty_completion", "'rejected' is empty"),
    ("jsonl/identical.jsonl", ":2", "identical", "chosen and rejected are identical"),
    ("jsonl/identical_no_prompt.jsonl", ":2", "identical", "chosen and rejected are identical"),
    ("jsonl/mixed_format.jsonl", ":2", "mixed_format", "fields mix formats (prompt is a string, chosen is a message "
     "list, rejected is a message list); use all strings or all message lists"),
    # JSON Lines: conversations with bad messages
    ("jsonl/unknown_role.jsonl", ":2", "unknown_role", f"'chosen': message 0 has role 'bot'; {ROLES}"),
    ("jsonl/role_not_string.jsonl", ":2", "unknown_role", f"'rejected': message 0 has role 1; {ROLES}"),
    ("jsonl/number_content.jsonl", ":2", "bad_message", "'chosen': message 0 content must be a string, got a number"),
    ("jsonl/null_content.jsonl", ":2", "bad_message", "'rejected': message 0 content must be a string, got null"),
    ("jsonl/content_parts.jsonl", ":2", "bad_message", "'prompt': message 0 content must be a string, got a list"),
    ("jsonl/message_not_object.jsonl", ":2", "bad_message",
     "'chosen': message 0 must be an object with role and content, got a string"),
    ("jsonl/message_missing_role.jsonl", ":2", "bad_message", "'prompt': message 0 has no 'role'"),
    ("jsonl/message_missing_content.jsonl", ":2", "bad_message", "'chosen': message 0 has no 'content'"),
    ("jsonl/empty_message_list.jsonl", ":2", "empty_completion", "'rejected': empty message list"),
    ("jsonl/empty_prompt_list.jsonl", ":2", "empty_prompt", "'prompt': empty message list"),
    ("jsonl/empty_message_content.jsonl", ":2", "empty_completion", "'chosen' is empty"),
    ("jsonl/completion_from_user.jsonl", ":2", "wrong_role",
     "'chosen' must start with an assistant message, got role 'user'"),
    ("jsonl/no_shared_prompt.jsonl", ":2", "empty_prompt",
     "no 'prompt' field, and chosen and rejected share no leading messages to take as the prompt"),
    ("jsonl/completion_is_prefix.jsonl", ":2", "empty_completion",
     "'chosen' is empty once the prompt it shares with 'rejected' is removed"),
    # JSON arrays: the line is where the element starts
    ("json/element_not_object.json", ":3", "not_an_object", "expected an object with chosen/rejected, got a number"),
    ("json/missing_field.json", ":7", "missing_field", "missing field 'rejected'"),
    ("json/invalid_utf8.json", ":3", "invalid_utf8", "not valid UTF-8"),
    # CSV: the line is where the record starts (a quoted cell may span lines)
    ("csv/too_few_cells.csv", ":3", "unparsable", "row does not have as many cells as the header"),
    ("csv/too_many_cells.csv", ":3", "unparsable", "row does not have as many cells as the header"),
    ("csv/unterminated_quote.csv", ":3", "unparsable", "row does not have as many cells as the header"),
    ("csv/invalid_utf8.csv", ":3", "invalid_utf8", "not valid UTF-8"),
    ("csv/empty_cell.csv", ":3", "empty_completion", "'chosen' is empty"),
    ("csv/multiline_then_identical.csv", ":4", "identical", "chosen and rejected are identical"),
    ("csv/blank_line_then_identical.csv", ":4", "identical", "chosen and rejected are identical"),
    # Parquet and datasets directories: rows are numbered from 1
    ("parquet/null_rejected.parquet", ":row 2", "wrong_type",
     "'rejected' must be a string or a list of messages, got null"),
    ("parquet/unknown_role.parquet", ":row 2", "unknown_role", f"'chosen': message 0 has role 'bot'; {ROLES}"),
    ("datasets/identical_row", ":row 2", "identical", "chosen and rejected are identical"),
    ("datasets/dict_empty_chosen", "[train]:row 1", "empty_completion", "'chosen' is empty"),
]

# file, message after "<path>: " or "<path>:<line>: "; raised in both modes (nothing after them can be read)
FILE_CASES = [
    ("jsonl/empty.jsonl", ": the file is empty"),
    ("jsonl/blank_lines.jsonl", ": the file is empty"),
    ("other/pairs.txt", ": unsupported file type '.txt' (use .jsonl, .json, .parquet or .csv)"),
    ("not_a_dataset", ": is a directory, not a preference file or a datasets dataset"),
    ("json/truncated_array.json", ":3: invalid JSON: Unterminated string starting at: column 30"),
    ("json/trailing_bracket.json", ":4: invalid JSON: Extra data: column 1"),
    ("json/object_not_array.json", ": expected a JSON array of objects (or one object per line), got an object"),
    ("csv/missing_column.csv", ":1: header has no 'rejected' column (columns: prompt, chosen)"),
    ("csv/header_only.csv", ": no rows (the file or split is empty)"),
    ("parquet/csv_renamed.parquet", ": not a Parquet file (it does not start and end with the bytes PAR1)"),
    ("parquet/truncated.parquet", ": not a Parquet file (it does not start and end with the bytes PAR1)"),
    ("parquet/missing_column.parquet", ": file has no 'rejected' column (columns: prompt, chosen)"),
    ("datasets/missing_column", ": dataset has no 'rejected' column (columns: prompt, chosen)"),
    ("datasets/no_train_split", ": no split 'train' (splits: test)"),
]


def _id(case) -> str:
    return case[0].replace("/", "-")


@pytest.mark.parametrize("case", ROW_CASES, ids=_id)
def test_bad_row_stops_with_file_line_and_detail(case):
    name, where, _, detail = case
    path = str(CORPUS / name)
    with pytest.raises(DataError) as e:
        read_preferences(path)
    assert str(e.value) == f"{path}{where}: {detail}{HINT}"


@pytest.mark.parametrize("case", ROW_CASES, ids=_id)
def test_bad_row_is_counted_and_skipped_when_collecting(case):
    name, where, reason, detail = case
    path = str(CORPUS / name)
    problems = Problems("collect")
    result = read_preferences(path, problems=problems)
    assert problems.counts() == {reason: 1}
    assert problems.rows == [RowProblem(f"{path}{where}", reason, detail)]
    assert result.rows_read == 2 and len(result.records) == 1  # each file holds one valid row beside the bad one
    assert result.records[0].chosen in ("2+2 is 4.", [{"role": "assistant", "content": "2+2 is 4."}], "One.\nTwo.")


def test_every_row_of_a_bad_column_is_counted():
    path = str(CORPUS / "parquet/number_columns.parquet")
    with pytest.raises(DataError) as e:
        read_preferences(path)
    assert str(e.value) == f"{path}:row 1: 'chosen' must be a string or a list of messages, got a number{HINT}"
    problems = Problems("collect")
    result = read_preferences(path, problems=problems)
    assert (result.rows_read, result.records, problems.counts()) == (2, [], {"wrong_type": 2})
    assert [p.source for p in problems.rows] == [f"{path}:row 1", f"{path}:row 2"]


@pytest.mark.parametrize("case", FILE_CASES, ids=_id)
@pytest.mark.parametrize("mode", ["raise", "collect"])
def test_bad_file_stops_in_both_modes(case, mode):
    name, message = case
    path = str(CORPUS / name)
    problems = Problems(mode)
    with pytest.raises(DataError) as e:
        read_preferences(path, problems=problems)
    assert str(e.value) == f"{path}{message}"
    assert problems.rows == []


def test_missing_file(tmp_path):
    path = str(tmp_path / "nowhere" / "pairs.jsonl")
    with pytest.raises(DataError) as e:
        read_preferences(path)
    assert str(e.value) == f"{path}: file not found"


def test_corpus_covers_the_kinds():
    kinds = {name for name, *_ in ROW_CASES} | {name for name, _ in FILE_CASES}
    assert len(kinds) >= 20
    suffixes = {Path(k).suffix or "dir" for k in kinds}
    assert {".jsonl", ".json", ".csv", ".parquet", "dir"} <= suffixes
    assert len({reason for _, _, reason, _ in ROW_CASES}) >= 10


def test_one_file_with_every_kind_of_bad_jsonl_row(tmp_path):
    """Collecting goes on past every bad row: each reason counted, every valid row kept."""
    cases = [c for c in ROW_CASES if c[0].endswith(".jsonl")]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"\n".join((CORPUS / name).read_bytes().rstrip(b"\n") for name, *_ in cases) + b"\n")
    problems = Problems("collect")
    result = read_preferences(str(mixed), problems=problems)
    expected: dict[str, int] = {}
    for _, _, reason, _ in cases:
        expected[reason] = expected.get(reason, 0) + 1
    assert problems.counts() == expected
    assert result.rows_read == 2 * len(cases) and len(result.records) == len(cases)
    assert [p.source for p in problems.rows] == [f"{mixed}:{2 * i + 2}" for i in range(len(cases))]


def test_corpus_files_match_their_generator(tmp_path):
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for rel, data in module.text_files().items():
        assert (CORPUS / rel).read_bytes() == data, f"{rel} differs: rerun tests/data/malformed/make_corpus.py"
    for rel in ("parquet/null_rejected.parquet", "datasets/identical_row/state.json",
                "datasets/no_train_split/dataset_dict.json"):
        assert (CORPUS / rel).is_file()


# ---- implicit prompts


def test_implicit_prompt_is_the_longest_common_message_prefix(tmp_path):
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}
    a1, a2 = {"role": "assistant", "content": "4."}, {"role": "assistant", "content": "5."}
    u2 = {"role": "user", "content": "Sure?"}
    rows = [{"chosen": [system, user, a1], "rejected": [system, user, a2]},
            {"chosen": [user, a1, u2, a1], "rejected": [user, a1, u2, a2]}]
    first, second = read_preferences(str(write_jsonl(tmp_path / "d.jsonl", rows))).records
    assert (first.prompt, first.chosen, first.rejected) == ([system, user], [a1], [a2])
    assert (second.prompt, second.chosen, second.rejected) == ([user, a1, u2], [a1], [a2])


@pytest.mark.parametrize("chosen, rejected, expected", [
    ("Q: capital of France? A: Paris", "Q: capital of France? A: Rome", ("Q: capital of France? A:", " Paris", " Rome")),
    ("I like cats", "I like cars", ("I like", " cats", " cars")),  # differ inside a word: cut before it
    ("Hello world", "Hello, world", ("Hello", " world", ", world")),
    ("A: I can help", "A: I cannot help", ("A: I", " can help", " cannot help")),  # not " help" / "not help"
    ("It is 4 apples", "It is 42 apples", ("It is", " 4 apples", " 42 apples")),
    ("A: I cannot help", "A: I can help", ("A: I", " cannot help", " can help")),  # the other way round
    ("Line one\nLine two", "Line one\nLine 2", ("Line one\nLine", " two", " 2")),
    ("Yes", "No", ("", "Yes", "No")),
    ("Sure", "Surely", ("", "Sure", "Surely")),  # one is a prefix, no whitespace: no prompt
    ("The answer is 5", "The answer is 5.", ("The answer is", " 5", " 5.")),
    ("Yes it is", "Yes", ("", "Yes it is", "Yes")),  # never an empty completion
])
def test_implicit_string_prompt_is_cut_at_a_word_boundary(chosen, rejected, expected):
    assert split_implicit_prompt(chosen, rejected) == expected
    prompt, c, r = expected
    assert prompt + c == chosen and prompt + r == rejected


def test_implicit_string_prompt_through_a_file(tmp_path):
    rows = [{"chosen": "Human: 2+2? Assistant: 4.", "rejected": "Human: 2+2? Assistant: 5, I think."}]
    (record,) = read_preferences(str(write_jsonl(tmp_path / "d.jsonl", rows))).records
    assert (record.prompt, record.chosen, record.rejected) == ("Human: 2+2? Assistant:", " 4.", " 5, I think.")


def test_an_empty_prompt_string_is_allowed(tmp_path):
    (record,) = read_preferences(str(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "", "chosen": "a", "rejected": "b"}]))).records
    assert (record.prompt, record.chosen, record.rejected) == ("", "a", "b")


def test_completion_rows_read_as_records_with_an_empty_rejected_side(tmp_path):
    rows = [{"prompt": "Say hi.", "completion": " Hi!"},
            {"prompt": [{"role": "user", "content": "Name a color."}],
             "completion": [{"role": "assistant", "content": "Blue."}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4."}]}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_preferences(str(path), use="completion").records
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [
        ("Say hi.", " Hi!", ""),
        ([{"role": "user", "content": "Name a color."}], [{"role": "assistant", "content": "Blue."}], []),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
         [{"role": "assistant", "content": "4."}], []),
    ]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:2", f"{path}:3"]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p"}, "missing field 'completion'"),
    ({"prompt": "p", "completion": "  "}, "'completion' is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant turn"),
    ({"prompt": "p", "completion": [{"role": "assistant", "content": "x"}]}, "mix formats"),
])
def test_bad_completion_rows_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "completion": " fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: .*{re.escape(message)}"):
        read_preferences(str(path), use="completion")


def test_chosen_use_keeps_the_chosen_side_of_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": " good", "rejected": " bad"}) + "\n")
    (record,) = read_preferences(str(path), use="chosen").records
    assert (record.prompt, record.chosen, record.rejected) == ("Q", " good", "")


def test_a_row_of_the_other_kind_says_what_it_looks_like(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:1: missing field 'completion' \(the row is a preference pair: "
                                        r"data.use=chosen trains on its chosen side\)"):
        read_preferences(str(pairs), use="completion")
    single = tmp_path / "single.jsonl"
    single.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"single.jsonl:1: missing field 'chosen': the row looks like a KTO row without "
                                        r"its 'label' .* or a completion to imitate \(dpokit sft\)"):
        read_preferences(str(single), format="standard")
