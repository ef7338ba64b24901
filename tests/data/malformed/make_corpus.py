"""Writes the malformed-input corpus beside this script: `python tests/data/malformed/make_corpus.py`.

Every file holds one kind of bad input, usually one valid row and one bad one, so a reader that
skips invalid rows keeps exactly one pair. The expected message for each file is in
tests/data/test_records.py. Text files are written from `text_files()` byte for byte (some need
invalid UTF-8, which is why they come from a script); Parquet files and `datasets` directories from
`binary_files()` (their bytes depend on the pyarrow/datasets versions, their content does not).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent

GOOD = {"prompt": "What is 2+2?", "chosen": "2+2 is 4.", "rejected": "It is 5."}
GOOD_CONV = {"prompt": [{"role": "user", "content": "What is 2+2?"}],
             "chosen": [{"role": "assistant", "content": "2+2 is 4."}],
             "rejected": [{"role": "assistant", "content": "It is 5."}]}


def _line(row) -> bytes:
    return json.dumps(row).encode() + b"\n"


def _good_then(bad: bytes, good: dict = GOOD) -> bytes:
    """A valid row on line 1, then `bad` (one line, with its newline) on line 2."""
    return _line(good) + bad


def _conv(**fields) -> dict:
    row = json.loads(json.dumps(GOOD_CONV))
    for key, value in fields.items():
        if value is None:
            row.pop(key)
        else:
            row[key] = value
    return row


def _msg(role, content) -> dict:
    return {"role": role, "content": content}


def text_files() -> dict[str, bytes]:
    user, asst = _msg("user", "What is 2+2?"), _msg("assistant", "2+2 is 4.")
    files = {
        # ---- JSON Lines: rows that are not JSON objects
        "jsonl/truncated_json.jsonl": _line(GOOD) + b'{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go aw',
        "jsonl/not_json.jsonl": _good_then(b"prompt: Hi, chosen: Hello, rejected: Go away\n"),
        "jsonl/single_quotes.jsonl": _good_then(b"{'prompt': 'Hi', 'chosen': 'Hello!', 'rejected': 'Go away'}\n"),
        "jsonl/trailing_comma.jsonl": _good_then(b'{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away",}\n'),
        "jsonl/invalid_utf8.jsonl": _good_then('{"prompt": "Caf\u00e9?", "chosen": "Yes", "rejected": "No"}\n'
                                               .encode("latin-1")),
        "jsonl/deeply_nested.jsonl": _good_then(b'{"prompt": ' + b"[" * 100_000 + b"\n"),
        "jsonl/array_row.jsonl": _good_then(_line(["What is 2+2?", "2+2 is 4.", "It is 5."])),
        "jsonl/null_row.jsonl": _good_then(b"null\n"),
        # ---- JSON Lines: objects with missing or mistyped fields
        "jsonl/missing_chosen.jsonl": _good_then(_line({"prompt": "Hi", "rejected": "Go away"})),
        "jsonl/missing_rejected.jsonl": _good_then(_line({"prompt": "Hi", "chosen": "Hello!"})),
        "jsonl/misspelled_field.jsonl": _good_then(_line({"prompt": "Hi", "choosen": "Hello!", "rejected": "Go away"})),
        "jsonl/number_chosen.jsonl": _good_then(_line({"prompt": "What is 2+2?", "chosen": 4, "rejected": 5})),
        "jsonl/bool_rejected.jsonl": _good_then(_line({"prompt": "Is it?", "chosen": "Yes.", "rejected": False})),
        "jsonl/null_rejected.jsonl": _good_then(_line({"prompt": "Hi", "chosen": "Hello!", "rejected": None})),
        "jsonl/object_prompt.jsonl": _good_then(_line({"prompt": {"text": "Hi"}, "chosen": "Hello!", "rejected": "No"})),
        "jsonl/empty_chosen.jsonl": _good_then(_line({"prompt": "Hi", "chosen": "", "rejected": "Go away"})),
        "jsonl/whitespace_rejected.jsonl": _good_then(_line({"prompt": "Hi", "chosen": "Hello!", "rejected": " \n\t"})),
        "jsonl/identical.jsonl": _good_then(_line({"prompt": "Hi", "chosen": "Hello!", "rejected": "Hello!"})),
        "jsonl/identical_no_prompt.jsonl": _good_then(_line({"chosen": "Hi. Hello!", "rejected": "Hi. Hello!"})),
        "jsonl/mixed_format.jsonl": _good_then(_line({"prompt": "Hi", "chosen": [_msg("assistant", "Hello!")],
                                                      "rejected": [_msg("assistant", "Go away")]})),
        # ---- JSON Lines: conversations with bad messages
        "jsonl/unknown_role.jsonl": _good_then(_line(_conv(chosen=[_msg("bot", "2+2 is 4.")])), GOOD_CONV),
        "jsonl/role_not_string.jsonl": _good_then(_line(_conv(rejected=[_msg(1, "It is 5.")])), GOOD_CONV),
        "jsonl/number_content.jsonl": _good_then(_line(_conv(chosen=[_msg("assistant", 4)])), GOOD_CONV),
        "jsonl/null_content.jsonl": _good_then(_line(_conv(rejected=[_msg("assistant", None)])), GOOD_CONV),
        "jsonl/content_parts.jsonl": _good_then(_line(_conv(prompt=[_msg("user", [{"type": "text",
                                                                                   "text": "What is 2+2?"}])])),
                                                GOOD_CONV),
        "jsonl/message_not_object.jsonl": _good_then(_line(_conv(chosen=["2+2 is 4."])), GOOD_CONV),
        "jsonl/message_missing_role.jsonl": _good_then(_line(_conv(prompt=[{"content": "What is 2+2?"}])), GOOD_CONV),
        "jsonl/message_missing_content.jsonl": _good_then(_line(_conv(chosen=[{"role": "assistant"}])), GOOD_CONV),
        "jsonl/empty_message_list.jsonl": _good_then(_line(_conv(rejected=[])), GOOD_CONV),
        "jsonl/empty_prompt_list.jsonl": _good_then(_line(_conv(prompt=[])), GOOD_CONV),
        "jsonl/empty_message_content.jsonl": _good_then(_line(_conv(chosen=[_msg("assistant", "  ")])), GOOD_CONV),
        "jsonl/completion_from_user.jsonl": _good_then(_line(_conv(chosen=[_msg("user", "2+2 is 4.")])), GOOD_CONV),
        "jsonl/no_shared_prompt.jsonl": _good_then(_line(_conv(prompt=None)), GOOD_CONV),
        "jsonl/completion_is_prefix.jsonl": _good_then(
            _line({"chosen": [user, asst], "rejected": [user, asst, _msg("user", "Sure?"), _msg("assistant", "Yes.")]}),
            GOOD_CONV),
        # ---- JSON Lines: the file as a whole
        "jsonl/empty.jsonl": b"",
        "jsonl/blank_lines.jsonl": b"\n  \n\t\n",
        "other/pairs.txt": _line(GOOD),
        "not_a_dataset/notes.txt": b"preference pairs go here\n",
        # ---- JSON arrays
        "json/truncated_array.json": b"[\n" + _line(GOOD)[:-1] + b",\n" + b'  {"prompt": "Hi", "chosen": "Hel',
        "json/object_not_array.json": json.dumps(GOOD, indent=2).encode() + b"\n",
        "json/trailing_bracket.json": b"[\n  " + json.dumps(GOOD).encode() + b"\n]\n]\n",
        "json/element_not_object.json": b"[\n  " + json.dumps(GOOD).encode() + b",\n  42\n]\n",
        "json/missing_field.json": json.dumps([GOOD, {"prompt": "Hi", "chosen": "Hello!"}], indent=2).encode(),
        "json/invalid_utf8.json": b"[\n  " + json.dumps(GOOD).encode() + b',\n  {"prompt": "Caf\xe9?", '
                                  b'"chosen": "Yes", "rejected": "No"}\n]\n',
        # ---- CSV
        "csv/missing_column.csv": b'prompt,chosen\n"What is 2+2?",2+2 is 4.\n',
        "csv/header_only.csv": b"prompt,chosen,rejected\n",
        "csv/too_few_cells.csv": b"prompt,chosen,rejected\nWhat is 2+2?,2+2 is 4.,It is 5.\nHi,Hello!\n",
        "csv/too_many_cells.csv": b"prompt,chosen,rejected\nWhat is 2+2?,2+2 is 4.,It is 5.\nHi,Hello!,Go,away\n",
        "csv/unterminated_quote.csv": b'prompt,chosen,rejected\nWhat is 2+2?,2+2 is 4.,It is 5.\n"Hi,Hello!,Go away\n',
        "csv/invalid_utf8.csv": b"prompt,chosen,rejected\nWhat is 2+2?,2+2 is 4.,It is 5.\nCaf\xe9?,Yes,No\n",
        "csv/empty_cell.csv": b"prompt,chosen,rejected\nWhat is 2+2?,2+2 is 4.,It is 5.\nHi,,Go away\n",
        "csv/multiline_then_identical.csv": b'prompt,chosen,rejected\n"Write two lines.","One.\nTwo.","One."\n'
                                            b"Hi,Same,Same\n",
    }
    return files


def binary_files(dest: Path) -> list[str]:
    """Parquet files and `datasets` directories; returns their paths relative to `dest`."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    written = []

    def parquet(rel: str, table: pa.Table) -> None:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, dest / rel)
        written.append(rel)

    def raw(rel: str, data: bytes) -> None:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
        written.append(rel)

    def saved(rel: str, ds) -> None:
        shutil.rmtree(dest / rel, ignore_errors=True)
        ds.save_to_disk(str(dest / rel))
        written.append(rel)

    good = GOOD
    parquet("parquet/null_rejected.parquet", pa.table({"prompt": [good["prompt"], "Hi"],
                                                       "chosen": [good["chosen"], "Hello!"],
                                                       "rejected": [good["rejected"], None]}))
    parquet("parquet/number_columns.parquet", pa.table({"prompt": ["What is 2+2?", "What is 3+3?"],
                                                        "chosen": [4, 6], "rejected": [5, 7]}))
    parquet("parquet/missing_column.parquet", pa.table({"prompt": [good["prompt"]], "chosen": [good["chosen"]]}))
    conv_bad = _conv(chosen=[_msg("bot", "2+2 is 4.")])
    parquet("parquet/unknown_role.parquet", pa.Table.from_pylist([GOOD_CONV, conv_bad]))
    raw("parquet/csv_renamed.parquet", b"prompt,chosen,rejected\nWhat is 2+2?,2+2 is 4.,It is 5.\n")
    whole = pa.BufferOutputStream()
    pq.write_table(pa.table({k: [v] for k, v in good.items()}), whole)
    data = whole.getvalue().to_pybytes()
    raw("parquet/truncated.parquet", data[: len(data) // 2])

    saved("datasets/identical_row", datasets.Dataset.from_list([good, {"prompt": "Hi", "chosen": "Same",
                                                                       "rejected": "Same"}]))
    saved("datasets/missing_column", datasets.Dataset.from_dict({"prompt": ["Hi"], "chosen": ["Hello!"]}))
    saved("datasets/no_train_split", datasets.DatasetDict({"test": datasets.Dataset.from_list([good])}))
    saved("datasets/dict_empty_chosen", datasets.DatasetDict({"train": datasets.Dataset.from_list(
        [{"prompt": "Hi", "chosen": "", "rejected": "Go away"}, good])}))
    return written


def build(dest: Path = HERE) -> None:
    for rel, data in text_files().items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
    binary_files(dest)


if __name__ == "__main__":
    build()
    print(f"wrote the malformed corpus under {HERE}")
