"""Where preference rows come from: a file by its format (JSON Lines, JSON, CSV, Parquet), a `datasets`
directory or a hub dataset, each row as read with where it is (`file:line`, `:row N`). Turning rows into
records, and checking them, is records.py's job.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Protocol

from dpokit.errors import DataError, SourceError, first_line, type_name

UNPARSABLE = object()  # a row that could not be read; its problem is already reported
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class ProblemLog(Protocol):
    """Where a reader reports a row it cannot read (records.Problems: raised at once or collected)."""

    def add(self, source: str, reason: str, detail: str) -> None: ...


def missing_file(source: str) -> bool:
    """Whether `source` names a file (by its suffix, or a leading `.`, `/` or `~`) that does not exist.
    Any other name that is not there is read as a hub dataset."""
    named_file = source.endswith(FILE_SUFFIXES) or source.startswith((".", "/", "~"))
    return named_file and not Path(source).expanduser().exists()


def iter_rows(source: str, split: str, problems: ProblemLog, check_columns):
    """The rows of `source` (a file, a datasets directory or a hub dataset name) as `(where, row)`; a row
    that cannot be read goes to `problems` and comes out as UNPARSABLE. A source that names its columns
    (CSV, Parquet, datasets) calls `check_columns(where, what, columns)` once, before its first row."""
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _iter_dataset_dir(path, split, check_columns)
        return
    if missing_file(source):
        raise SourceError(f"{source}: file not found")
    if not path.exists():
        yield from _iter_hub_dataset(source, split, check_columns)
        return
    suffix = path.suffix.lower()
    readers = {".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet, ".csv": _iter_csv}
    if suffix not in readers:
        raise SourceError(f"{source}: unsupported file type '{suffix}' (use .jsonl, .json, .parquet or .csv)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SourceError(f"{source}: cannot read: {e.strerror}") from None
    if suffix != ".parquet":
        data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark (Windows editors write one)
    if not data.strip():
        raise DataError(f"{source}: the file is empty")
    if suffix in (".csv", ".parquet"):
        yield from readers[suffix](source, data, problems, check_columns)
    else:
        yield from readers[suffix](source, data, problems)


def _iter_jsonl(name: str, data: bytes, problems: ProblemLog):
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.add(where, "invalid_utf8", f"not valid UTF-8 (byte {e.start + 1} of the line)")
            yield where, UNPARSABLE
            continue
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as e:
            problems.add(where, "unparsable", f"invalid JSON: {e.msg}: column {e.colno}")
            yield where, UNPARSABLE
        except RecursionError:
            problems.add(where, "unparsable", "invalid JSON: nested too deeply")
            yield where, UNPARSABLE


def _iter_json(name: str, data: bytes, problems: ProblemLog):
    text = _decode_whole(data)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines under a .json name
            yield from _iter_jsonl(name, data, problems)
            return
        raise DataError(f"{name}:{e.lineno}: invalid JSON: {e.msg}: column {e.colno}") from None
    except RecursionError:
        raise DataError(f"{name}: invalid JSON: nested too deeply") from None
    if not isinstance(value, list):
        raise DataError(f"{name}: expected a JSON array of objects (or one object per line), "
                        f"got {type_name(value, json=True)}")
    # walk the array again to learn the line each element starts on
    decoder = json.JSONDecoder()
    idx = text.index("[") + 1
    for _ in value:
        while text[idx] in " \t\r\n,":
            idx += 1
        start = idx
        element, idx = decoder.raw_decode(text, idx)
        where = f"{name}:{text.count(chr(10), 0, start) + 1}"
        if _has_bad_bytes(text[start:idx]):
            problems.add(where, "invalid_utf8", "not valid UTF-8")
            yield where, UNPARSABLE
            continue
        yield where, element


def _iter_csv(name: str, data: bytes, problems: ProblemLog, check_columns):
    text = _decode_whole(data)
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # default 128 KiB: long completions exist
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fieldnames = reader.fieldnames
    except csv.Error as e:
        raise DataError(f"{name}:1: not valid CSV: {e}") from None
    if fieldnames is None:
        raise DataError(f"{name}: the file is empty")
    check_columns(name + ":1", "header", fieldnames)
    while True:
        after = reader.line_num
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{name}:{after + 1}: not valid CSV: {e}") from None
        # the row ends on line_num; it starts as many lines earlier as its quoted cells hold line breaks (blank
        # lines before it, which the reader skips, do not count), and not before the line after the last row
        # (a quote left open at the end of the file holds the last line's break)
        cells = [c for v in row.values() for c in (v if isinstance(v, list) else [v]) if isinstance(c, str)]
        breaks = sum(c.count("\n") for c in cells)
        where = f"{name}:{max(after + 1, reader.line_num - breaks)}"
        if None in row or any(v is None for v in row.values()):
            problems.add(where, "unparsable", "row does not have as many cells as the header")
            yield where, UNPARSABLE
            continue
        if any(_has_bad_bytes(v) for v in row.values()):
            problems.add(where, "invalid_utf8", "not valid UTF-8")
            yield where, UNPARSABLE
            continue
        yield where, row


def _iter_parquet(name: str, data: bytes, problems: ProblemLog, check_columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not (data.startswith(b"PAR1") and data.endswith(b"PAR1")):
        raise DataError(f"{name}: not a Parquet file (it does not start and end with the bytes PAR1)")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{name}: not a readable Parquet file ({type(e).__name__}: {first_line(e)})") from None
    check_columns(name, "file", table.column_names)
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{name}:row {i}", row


def _iter_dataset_dir(path: Path, split: str, check_columns):
    import datasets

    name = str(path)
    label = name
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists() or (path / "dataset_info.json").exists():
        try:
            ds = datasets.load_from_disk(name)
        except Exception as e:
            raise SourceError(f"{name}: not a readable datasets directory ({first_line(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise SourceError(f"{name}: no split '{split}' (splits: {', '.join(ds)})")
            ds, label = ds[split], f"{name}[{split}]"
    elif any(p.suffix in FILE_SUFFIXES for p in path.iterdir()):
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:
            raise SourceError(f"{name}: cannot load as a dataset ({first_line(e)})") from None
        label = f"{name}[{split}]"
    else:
        raise SourceError(f"{name}: is a directory, not a preference file or a datasets dataset")
    check_columns(label, "dataset", ds.column_names)
    for i, row in enumerate(ds, start=1):
        yield f"{label}:row {i}", row


def _iter_hub_dataset(name: str, split: str, check_columns):
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise SourceError(f"{name}: not a file, directory or loadable hub dataset ({first_line(e)})") from None
    check_columns(f"{name}[{split}]", "dataset", ds.column_names)
    for i, row in enumerate(ds, start=1):
        yield f"{name}[{split}]:row {i}", row


def _decode_whole(data: bytes) -> str:
    # undecodable bytes become lone surrogates, so the row that holds them can be named and skipped
    return data.decode("utf-8", errors="surrogateescape")


def _has_bad_bytes(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)
