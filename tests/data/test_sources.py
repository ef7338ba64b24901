"""Where rows come from (`dpokit.data.sources`): every good format read alike, each row named by its file and
line or dataset row; byte-order marks, CRLF and long CSV cells accepted. (Malformed input: test_records.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.data.records import PreferenceRecord, read_preferences

ROWS = [
    {"prompt": "What is 2+2?", "chosen": "2+2 is 4.", "rejected": "It is 5."},
    {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Go away."},
]


def _triples(records: list[PreferenceRecord]):
    return [(r.prompt, r.chosen, r.rejected) for r in records]


def _write(tmp_path: Path, kind: str, rows: list[dict]) -> str:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "jsonl":
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(tmp_path / "d.jsonl")
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
        return str(tmp_path / "d.json")
    if kind == "jsonl-as-json":
        (tmp_path / "d.json").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(tmp_path / "d.json")
    if kind == "csv":
        import csv

        with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return str(tmp_path / "d.csv")
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    if kind == "save_to_disk":
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
        return str(tmp_path / "ds")
    if kind == "data-dir":
        (tmp_path / "dd").mkdir()
        (tmp_path / "dd" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(tmp_path / "dd")
    raise AssertionError(kind)


KINDS = ["jsonl", "json", "jsonl-as-json", "csv", "parquet", "save_to_disk", "data-dir"]


@pytest.mark.parametrize("kind", KINDS)
def test_standard_rows_read_alike_from_every_format(tmp_path, kind):
    result = read_preferences(_write(tmp_path, kind, ROWS))
    assert _triples(result.records) == [(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]
    assert result.rows_read == 2 and not result.records[0].conversational


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "save_to_disk"])
def test_conversational_rows_read_alike(tmp_path, kind):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
             "chosen": [{"role": "assistant", "content": "4."}],
             "rejected": [{"role": "assistant", "content": "5."}]}]
    (record,) = read_preferences(_write(tmp_path, kind, rows)).records
    assert record.conversational
    assert (record.prompt, record.chosen, record.rejected) == (rows[0]["prompt"], rows[0]["chosen"], rows[0]["rejected"])


def test_sources_name_file_and_line(tmp_path):
    path = _write(tmp_path, "json", ROWS)  # indent=2: the elements start on lines 2 and 7
    assert [r.source for r in read_preferences(path).records] == [f"{path}:2", f"{path}:7"]
    path = _write(tmp_path, "save_to_disk", ROWS)
    assert [r.source for r in read_preferences(path).records] == [f"{path}:row 1", f"{path}:row 2"]


def test_dataset_dict_split_is_chosen(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                          "test": datasets.Dataset.from_list(ROWS[1:])}).save_to_disk(str(tmp_path / "dd"))
    (record,) = read_preferences(str(tmp_path / "dd"), split="test").records
    assert record.chosen == "Blue." and record.source == f"{tmp_path / 'dd'}[test]:row 1"


def test_extra_columns_are_ignored_and_message_keys_kept(tmp_path):
    rows = [{"id": 7, "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "score_chosen": 9.5, "meta": {"a": 1}},
            {"prompt": [{"role": "user", "content": "Hi", "name": "bob"}],
             "chosen": [{"role": "assistant", "content": "Hello!", "weight": 1}],
             "rejected": [{"role": "assistant", "content": "Go away."}], "source": "x"}]
    a, b = read_preferences(_write(tmp_path, "jsonl", rows)).records
    assert (a.prompt, a.chosen, a.rejected) == ("Hi", "Hello!", "Go away.")
    # a message reaches the chat template whole, as transformers passes it (a template may render `name`)
    assert b.prompt == [{"role": "user", "content": "Hi", "name": "bob"}]
    assert b.chosen == [{"role": "assistant", "content": "Hello!", "weight": 1}]
    csv_path = tmp_path / "extra.csv"
    csv_path.write_text("id,prompt,chosen,rejected,notes\n1,Hi,Hello!,Go away.,whatever\n", encoding="utf-8")
    (c,) = read_preferences(str(csv_path)).records
    assert (c.prompt, c.chosen, c.rejected) == ("Hi", "Hello!", "Go away.")


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b"\r\n".join(json.dumps(r).encode() for r in ROWS) + b"\r\n")
    (tmp_path / "a.csv").write_bytes(bom + b"prompt,chosen,rejected\r\nWhat is 2+2?,2+2 is 4.,It is 5.\r\n"
                                           b"Name a color.,Blue.,Go away.\r\n")
    (tmp_path / "a.json").write_bytes(bom + json.dumps(ROWS).encode())
    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]
    for name in ("a.jsonl", "a.csv", "a.json"):  # the CSV's first column is still `prompt`, not '\ufeffprompt'
        assert _triples(read_preferences(str(tmp_path / name)).records) == expected, name


def test_long_csv_cells_are_read(tmp_path):
    long = "word " * 40_000  # 200 KB: over the csv module's default field limit
    (tmp_path / "long.csv").write_text(f"prompt,chosen,rejected\nHi,{long},No\n", encoding="utf-8")
    (record,) = read_preferences(str(tmp_path / "long.csv")).records
    assert record.chosen == long
