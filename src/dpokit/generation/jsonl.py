"""JSON Lines files written row by row, so an interrupted command can resume where it stopped.

A sidecar `<file>.meta.json` records what produced the rows (model, settings); resuming with different
settings is refused instead of silently mixing two experiments in one file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dpokit.errors import DataError
from dpokit.storage import json_text, text_lines


def read_utf8(path: Path) -> str:
    """A text file's content; bytes that are not UTF-8 are a one-line error naming the file, not a traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start + 1})") from None


def read_jsonl(path: str | Path, *, allow_partial_tail: bool = False) -> list[dict]:
    """All rows of a JSONL file. With `allow_partial_tail`, an unparsable last line (a write cut short by a
    kill) is ignored; anywhere else a bad line is an error naming the file and line."""
    path = Path(path)
    lines = text_lines(read_utf8(path))
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if allow_partial_tail and i == len(lines):
                break
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write all rows at once (to a temporary name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json_text(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


class ResumableJsonl:
    """Rows appended and flushed one at a time; `done` holds the rows an earlier attempt finished."""

    def __init__(self, path: str | Path, meta: dict[str, Any], *, overwrite: bool = False):
        self.path = Path(path)
        self.done: list[dict] = []
        if overwrite or not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("", encoding="utf-8")
            write_meta(self.path, meta)
        else:
            saved = read_meta(self.path)
            if saved is None:
                raise DataError(f"{self.path} exists but has no {meta_path(self.path).name}: pass --overwrite to "
                                "replace it")
            changed = sorted(k for k in set(saved) | set(meta) if saved.get(k) != meta.get(k))
            if changed:
                raise DataError(f"{self.path} was written with different settings ({', '.join(changed)} changed): "
                                "pass --overwrite to start over, or choose another --out")
            self.done = read_jsonl(self.path, allow_partial_tail=True)
            # rewrite without a partial last line so appends start on a fresh line
            write_jsonl(self.path, self.done)
        self._file = self.path.open("a", encoding="utf-8")

    def append(self, row: dict) -> None:
        self._file.write(json_text(row, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResumableJsonl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def meta_path(path: str | Path) -> Path:
    """The sidecar `<file>.meta.json` that records what produced the file `path`."""
    return Path(path).with_name(Path(path).name + ".meta.json")


def write_meta(path: str | Path, meta: dict[str, Any]) -> None:
    meta_path(path).write_text(json_text(meta, indent=2) + "\n", encoding="utf-8")


def read_meta(path: str | Path) -> dict | None:
    meta = meta_path(path)
    return json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else None
