"""Preference files and datasets → validated records, each problem named with its file and line.

Accepted sources (sources.py): JSON Lines, JSON (an array of objects), Parquet, CSV, a `datasets`
directory (`save_to_disk` or a folder of data files) and a hub dataset name. Rows of a known published
schema (`data.format`, formats.py) are first converted into dpokit's own layout. A row has `chosen` and
`rejected` and optionally `prompt`; each is a string (standard format) or a list of `{role, content}`
messages (conversational format). Without `prompt`, the prompt is the longest common prefix of chosen
and rejected (whole messages for conversations, whole words for strings). Messages may carry
`tool_calls` (an assistant's calls) and `tool` messages their results; a `tools` field lists the
functions the model may call (JSON schemas, or that list as a JSON string). Nothing a message holds is
dropped: every key reaches the chat template, which must render the tool calls (tokenize.py checks).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dpokit.data import formats
from dpokit.data.sources import UNPARSABLE, iter_rows
from dpokit.errors import DataError, type_name

ROLES = ("system", "user", "assistant", "tool")
FIELDS = ("prompt", "chosen", "rejected")

Text = str | list[dict[str, Any]]
Tools = list[dict[str, Any]]


# what a file's rows are read as (`data.use`): preference pairs; their chosen side alone; or single
# completions (`prompt` + `completion`, or a `messages` conversation whose last turn is the completion);
# `labelled`: unpaired completions with a desirable/undesirable label (data.format=kto), for KTO, whose
# labels `dataset.row_values` reads
USES = ("pairs", "chosen", "completion", "labelled")


@dataclass(frozen=True)
class PreferenceRecord:
    """A preference pair; with an empty `rejected` side ("" or []), a single completion to imitate (SFT)."""

    prompt: Text
    chosen: Text
    rejected: Text
    source: str  # "path:line", for every message about this row
    tools: Tools | None = None  # the functions the chat template is told the model may call
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # the row's fields a method asked for, as read

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass(frozen=True)
class RowProblem:
    source: str
    reason: str  # a short key, counted per run: unparsable, missing_field, wrong_type, ...
    detail: str

    def __str__(self) -> str:
        return f"{self.source}: {self.detail}"

    def to_json(self) -> dict[str, str]:
        return {"source": self.source, "reason": self.reason, "detail": self.detail}


@dataclass
class Problems:
    """Invalid rows: raised at once (`raise`) or collected and counted by reason (`collect`)."""

    mode: Literal["raise", "collect"] = "raise"
    rows: list[RowProblem] = field(default_factory=list)

    def add(self, source: str, reason: str, detail: str) -> None:
        problem = RowProblem(source, reason, detail)
        if self.mode == "raise":
            raise DataError(f"{problem} (set data.skip_invalid=true to skip such rows)")
        self.rows.append(problem)

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.reason for p in self.rows))


@dataclass
class ReadResult:
    records: list[PreferenceRecord]
    rows_read: int
    name: str
    format: str = "standard"  # the schema the rows were read as (data.format, or the one detected)


def read_preferences(source: str, *, split: str = "train", problems: Problems | None = None,
                     use: str = "pairs", format: str = "auto", fields: Sequence[str] = ()) -> ReadResult:
    """Read and validate every row of `source` (of schema `format`, see formats.FORMATS) as `use` says
    (see USES). Rows with problems go to `problems` (default: raise). Each record keeps the row's values of
    `fields` (a per-pair weight, a margin, KTO's label: what a method reads besides the text) in `extra`."""
    problems = problems if problems is not None else Problems()
    parse = parse_completion_row if use in ("completion", "labelled") else parse_row
    records: list[PreferenceRecord] = []
    n = 0
    rows = RowReader(source, split, problems, format=format, use=use)
    for where, row in rows:
        n += 1
        if use == "labelled" and rows.format != "kto":
            raise DataError(f"{where}: KTO reads unpaired rows (prompt, completion, label: data.format=kto) or "
                            "preference pairs, each pair two rows")
        if rows.format == "kto" and use != "labelled":
            # imitating them (sft) would train on the undesirable completions too
            raise DataError(f"{where}: an unpaired row (prompt, completion, label: data.format=kto) has no "
                            f"{'chosen/rejected pair' if use == 'pairs' else 'completion to imitate as it is'}; "
                            "unpaired rows train only with an objective that reads the label (KTO)")
        if rows.format in formats.PAIR_FORMATS and use == "completion":
            raise DataError(f"{where}: data.format={rows.format} rows are preference pairs, not single completions; "
                            "data.use=chosen trains on their chosen side")
        record = parse(row, where, problems)
        if record is None:
            continue
        if use == "chosen":
            record = dataclasses.replace(record, rejected=_empty_like(record.chosen))
        if fields and isinstance(row, dict):
            record = dataclasses.replace(record, extra={k: row[k] for k in fields if k in row})
        records.append(record)
    if n == 0:
        raise DataError(f"{source}: no rows (the file or split is empty)")
    return ReadResult(records, n, source, rows.format or "standard")


class RowReader:
    """The rows of `source` as `(where, row)`, each converted from its schema into dpokit's own layout
    (formats.py); a row that cannot be is reported to `problems` and yielded as unparsable. `format` is
    the schema the rows are read as: for `auto`, known once a table's columns or the first row are seen."""

    def __init__(self, source: str, split: str, problems: Problems, *, format: str = "auto", use: str = "pairs"):
        self.source, self.split, self.problems, self.use = source, split, problems, use
        self.format: str | None = None if format == "auto" else format

    def __iter__(self):
        for where, row in iter_rows(self.source, self.split, self.problems, self._check_columns):
            if isinstance(row, dict):
                if self.format is None:
                    self.format = formats.detect(row)
                row = formats.convert(self.format, row, where, self.problems)
                if row is None:
                    row = UNPARSABLE
            yield where, row

    def _check_columns(self, where: str, what: str, columns: list[str]) -> None:
        """Tabular sources name their columns once: a missing one is a problem of the file, not of each row."""
        if self.format is None:
            self.format = formats.detect(columns)
        if self.format == "standard":
            needed = ("chosen", "rejected") if self.use in ("pairs", "chosen") else ()
        else:
            needed = formats.COLUMNS[self.format]
        missing = [c for c in needed if c not in columns]
        if missing:
            schema = "" if self.format == "standard" else f" (data.format={self.format})"
            raise DataError(f"{where}: {what} has no '{missing[0]}' column{schema} (columns: "
                            f"{', '.join(map(str, columns))})")


# --------------------------------------------------------------------------------------------- rows


def parse_row(row: Any, where: str, problems: Problems) -> PreferenceRecord | None:
    """One raw row → a record, or None after reporting why it is invalid."""
    if not _is_object(row, where, problems, "chosen/rejected"):
        return None
    for key in ("chosen", "rejected"):
        if key not in row:
            if "completion" in row or "messages" in row:  # a single completion where a pair was expected
                problems.add(where, "missing_field", f"missing field '{key}': the row looks like a KTO row without "
                                                     "its 'label' (prompt, completion, label: objective.loss=kto) or "
                                                     "a completion to imitate (dpokit sft)")
                return None
            near = difflib.get_close_matches(key, [k for k in row if isinstance(k, str) and k not in FIELDS], n=1)
            problems.add(where, "missing_field", f"missing field '{key}'" + (f" (the row has '{near[0]}')" if near else ""))
            return None
    values = {}
    for key in FIELDS:
        if key not in row:
            continue
        values[key] = _text(row[key], key, where, problems)
        if values[key] is None:
            return None
    ok, tools = _tools(row, where, problems, conversational=isinstance(values["chosen"], list))
    if not ok:
        return None
    kinds = {k: isinstance(v, list) for k, v in values.items()}
    if len(set(kinds.values())) > 1:
        shown = ", ".join(f"{k} is {'a message list' if c else 'a string'}" for k, c in kinds.items())
        problems.add(where, "mixed_format", f"fields mix formats ({shown}); use all strings or all message lists")
        return None
    for key in ("chosen", "rejected"):
        if _is_empty(values[key]):
            problems.add(where, "empty_completion", f"'{key}' is empty")
            return None
    if values["chosen"] == values["rejected"]:
        problems.add(where, "identical", "chosen and rejected are identical")
        return None

    implicit = "prompt" not in values
    if implicit:
        prompt, chosen, rejected = split_implicit_prompt(values["chosen"], values["rejected"])
    else:
        prompt, chosen, rejected = values["prompt"], values["chosen"], values["rejected"]

    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if _is_empty(value):  # only with an implicit prompt: one conversation continues the other
            problems.add(where, "empty_completion", f"'{key}' is empty once the prompt it shares with "
                                                    f"'{'rejected' if key == 'chosen' else 'chosen'}' is removed")
            return None
        if isinstance(value, list) and value[0]["role"] != "assistant":
            problems.add(where, "wrong_role", f"'{key}' must start with an assistant message, got role "
                                              f"'{value[0]['role']}'")
            return None
    if implicit and isinstance(prompt, list) and not prompt:
        # a conversation needs a prompt: the chat template renders an empty one as a system turn
        problems.add(where, "empty_prompt", "no 'prompt' field, and chosen and rejected share no leading "
                                            "messages to take as the prompt")
        return None
    return PreferenceRecord(prompt, chosen, rejected, where, tools)


def parse_completion_row(row: Any, where: str, problems: Problems) -> PreferenceRecord | None:
    """A single-completion row → a record with an empty rejected side: `prompt` + `completion` (strings, or
    message lists), or `messages`, a conversation whose last turn (the assistant's) is the completion."""
    if not _is_object(row, where, problems, "prompt/completion or messages"):
        return None
    if "messages" in row:
        if not isinstance(row["messages"], list):
            problems.add(where, "wrong_type",
                         f"'messages' must be a list of messages, got {type_name(row['messages'], json=True)}")
            return None
        messages = _text(row["messages"], "messages", where, problems)
        if messages is None:
            return None
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            problems.add(where, "wrong_role", "'messages' must end with an assistant turn after at least one other "
                                              "message: that turn is the completion")
            return None
        values = {"prompt": messages[:-1], "completion": messages[-1:]}
    else:
        for key in ("prompt", "completion"):
            if key not in row:
                pair = "chosen" in row and "rejected" in row
                problems.add(where, "missing_field", f"missing field '{key}' " + (
                    "(the row is a preference pair: data.use=chosen trains on its chosen side)" if pair else
                    "(a completion row has prompt and completion, or messages)"))
                return None
        values = {}
        for key in ("prompt", "completion"):
            values[key] = _text(row[key], key, where, problems)
            if values[key] is None:
                return None
        if isinstance(values["prompt"], list) != isinstance(values["completion"], list):
            problems.add(where, "mixed_format", "prompt and completion mix formats; use strings or message lists")
            return None
    ok, tools = _tools(row, where, problems, conversational=isinstance(values["completion"], list))
    if not ok:
        return None
    completion = values["completion"]
    if _is_empty(completion):
        problems.add(where, "empty_completion", "'completion' is empty")
        return None
    if isinstance(completion, list) and completion[0]["role"] != "assistant":
        problems.add(where, "wrong_role", f"'completion' must start with an assistant message, got role "
                                          f"'{completion[0]['role']}'")
        return None
    return PreferenceRecord(values["prompt"], completion, _empty_like(completion), where, tools)


def _is_object(row: Any, where: str, problems: Problems, fields: str) -> bool:
    """Whether `row` is a JSON object; a row that did not parse was reported already."""
    if row is UNPARSABLE:
        return False
    if not isinstance(row, dict):
        problems.add(where, "not_an_object", f"expected an object with {fields}, got {type_name(row, json=True)}")
        return False
    return True


def _text(value: Any, key: str, where: str, problems: Problems) -> Text | None:
    """A field as a string or a list of {role, content} messages; None after reporting why it is neither."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        error = _check_messages(value, key)
        if error:
            problems.add(where, error[0], f"'{key}': {error[1]}")
            return None
        return [dict(m) for m in value]  # every key: tool calls, tool names and ids reach the chat template
    problems.add(where, "wrong_type", f"'{key}' must be a string or a list of messages, got {type_name(value, json=True)}")
    return None


def _empty_like(value: Text) -> Text:
    return [] if isinstance(value, list) else ""


def split_implicit_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Longest common prefix of chosen and rejected as the prompt: whole messages, or whole words.

    For strings the cut moves back to the last whitespace before the first difference, so both
    completions start on a word boundary, with that whitespace (BPE vocabularies mark word starts by a
    leading space), and keep at least one character each (when one text is a prefix of the other). At the
    first difference itself both texts must start a new word there (a space or punctuation on each side):
    "I can help" / "I cannot help" cut after "can" would start one side mid-word ("not help"), which the
    prompt and completion, tokenized apart, would split into tokens the model never saw together."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str) and chosen != rejected:
        last = min(n, len(chosen) - 1, len(rejected) - 1)

        def boundary(i: int) -> bool:
            if i < n:  # the texts agree here
                return chosen[i].isspace()
            return not chosen[i].isalnum() and not rejected[i].isalnum()

        n = next((i for i in range(last, -1, -1) if boundary(i)), 0)
    return chosen[:n], chosen[n:], rejected[n:]


def _check_messages(messages: list, key: str) -> tuple[str, str] | None:
    if not messages:
        return ("empty_prompt" if key == "prompt" else "empty_completion"), "empty message list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return "bad_message", f"message {i} must be an object with role and content, got {type_name(m, json=True)}"
        if "role" not in m:
            return "bad_message", f"message {i} has no 'role'"
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            return "unknown_role", f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}"
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant":
                return "bad_tool_call", f"message {i} has tool_calls but role {m['role']!r}; only the assistant calls tools"
            error = _check_tool_calls(calls)
            if error:
                return "bad_tool_call", f"message {i}: {error}"
        if "content" not in m and not calls:
            return "bad_message", f"message {i} has no 'content'"
        content = m.get("content")
        if not (isinstance(content, str) or (content is None and calls)):
            return "bad_message", f"message {i} content must be a string, got {type_name(content, json=True)}"
    return None


def _check_tool_calls(calls: Any) -> str | None:
    """OpenAI's and transformers' shape: [{"type": "function", "function": {"name", "arguments"}}, ...]."""
    if not isinstance(calls, list) or not calls:
        return f"tool_calls must be a non-empty list, got {type_name(calls, json=True)}"
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            return f"tool call {j} must be an object with function.name (and function.arguments)"
        if not isinstance(function.get("arguments", {}), (dict, str)):
            return (f"tool call {j}: function.arguments must be an object or a JSON string, "
                    f"got {type_name(function['arguments'], json=True)}")
    return None


def _tools(row: dict, where: str, problems: Problems, *, conversational: bool) -> tuple[bool, Tools | None]:
    """The row's `tools` (a list of function schemas, or that list as a JSON string, as TRL reads it):
    (True, tools or None), or (False, None) after reporting why they are not usable."""
    tools = row.get("tools")
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            problems.add(where, "bad_tools", f"'tools' is a string but not JSON: {e.msg}: column {e.colno}")
            return False, None
    if tools is None or tools == [] or tools == "":  # TRL's `tools or None`: an empty list renders no tool block
        return True, None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        problems.add(where, "bad_tools", f"'tools' must be a list of function schemas (objects), got "
                                         f"{type_name(tools, json=True)}")
        return False, None
    for j, tool in enumerate(tools):
        if not tool_name(tool):
            problems.add(where, "bad_tools", f"'tools' item {j} has no function name ({{\"type\": \"function\", "
                                             "\"function\": {\"name\": ...}} or {\"name\": ...})")
            return False, None
    if not conversational:
        problems.add(where, "bad_tools", "'tools' needs conversational rows (message lists): a string prompt has no "
                                         "chat template to render them with")
        return False, None
    return True, tools


def tool_name(tool: dict) -> str | None:
    """The function a tool schema describes: {"type": "function", "function": {"name"}} or {"name"}."""
    function = tool.get("function", tool)
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) and name else None


def _is_empty(value: Text) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not value or all(not (m.get("content") or "").strip() and not m.get("tool_calls") for m in value)
