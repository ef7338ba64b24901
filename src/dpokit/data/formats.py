"""Known dataset schemas (`data.format`) → dpokit's own rows, one row at a time.

dpokit's own layout (`standard`) is TRL's: `prompt` / `chosen` / `rejected` (strings or message lists) for
pairs, `prompt` / `completion` or `messages` for single completions, and `prompt` / `completion` / `label`
for unpaired rows (KTO). Each published schema below is converted into that layout, so every later check
(empty completions, identical sides, roles, tool calls) and every error with its `file:line` is the same
whatever the source looked like:

- `hh_rlhf`: Anthropic HH-RLHF, `chosen` / `rejected` transcripts of "\\n\\nHuman:" / "\\n\\nAssistant:"
  turns → message lists; the messages both share become the prompt. Named only: the same rows read as
  `standard` strings train as plain text with the shared words as the prompt (the DPO paper's setting).
- `ultrafeedback`: UltraFeedback-binarized (HuggingFaceH4/ultrafeedback_binarized): `chosen` / `rejected`
  message lists that repeat the user turn, `score_chosen` / `score_rejected`.
- `summarize_from_feedback`: OpenAI's TL;DR comparisons: `info.post` (+ `title`, `subreddit`), two
  `summaries`, `choice`; the prompt is TRL's TL;DR format, each summary a completion after a space.
- `shp`: Stanford SHP: `history`, `human_ref_A` / `human_ref_B`, `labels` (1: A preferred) → a user turn
  and two assistant replies.
- `kto`: unpaired rows, `prompt`, `completion`, `label` (true: desirable); `label` is made a bool.

`auto` (the default) picks a schema from the fields of the first row (or a table's columns) where they
name it unambiguously, and `standard` otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from dpokit.errors import type_name

FORMATS = ("auto", "standard", "hh_rlhf", "ultrafeedback", "summarize_from_feedback", "shp", "kto")

# the fields that identify a schema, in the order auto-detection tries them; a table must have them all
SCHEMA_FIELDS = {
    "summarize_from_feedback": ("info", "summaries", "choice"),
    "shp": ("history", "human_ref_A", "human_ref_B", "labels"),
    "ultrafeedback": ("chosen", "rejected", "score_chosen", "score_rejected"),
    "kto": ("prompt", "completion", "label"),
}
COLUMNS = {**SCHEMA_FIELDS, "hh_rlhf": ("chosen", "rejected")}
PAIR_FORMATS = ("hh_rlhf", "ultrafeedback", "summarize_from_feedback", "shp")  # rows that become pairs

TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"  # TRL's tldr-preference
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def detect(fields: Iterable[str]) -> str:
    """The schema whose identifying fields all appear in `fields`, else `standard`."""
    present = set(fields)
    return next((name for name, needed in SCHEMA_FIELDS.items() if set(needed) <= present), "standard")


def convert(fmt: str, row: dict, where: str, problems) -> dict | None:
    """A row of schema `fmt` as a dpokit row, or None after reporting to `problems` why it cannot be."""
    if fmt == "standard":
        return row
    return CONVERTERS[fmt](row, where, problems)


def _hh_rlhf(row: dict, where: str, problems) -> dict | None:
    out = {}
    for key in ("chosen", "rejected"):
        if not _has(row, key, str, where, problems, "a transcript string"):
            return None
        messages = hh_messages(row[key])
        if messages is None:
            problems.add(where, "not_a_transcript", f"'{key}' is not an HH-RLHF transcript (it must start with "
                                                    "'\\n\\nHuman:' and alternate Human/Assistant turns)")
            return None
        out[key] = messages
    return out  # no prompt: the messages both transcripts share become it


def hh_messages(transcript: str) -> list[dict[str, str]] | None:
    """ "\\n\\nHuman: a\\n\\nAssistant: b" → [user a, assistant b]; None when the text is not such a transcript.
    A turn's text runs to the next "\\n\\nHuman:" or "\\n\\nAssistant:" (it may hold blank lines itself)."""
    parts = HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": HH_ROLES[speaker], "content": text.strip()} for speaker, text in zip(parts[1::2], parts[2::2])]


def _ultrafeedback(row: dict, where: str, problems) -> dict | None:
    for key in ("score_chosen", "score_rejected"):
        if not _has(row, key, (int, float), where, problems, "a number"):
            return None
    if row["score_chosen"] == row["score_rejected"]:
        problems.add(where, "tied_scores", f"score_chosen equals score_rejected ({row['score_chosen']}): no preference")
        return None
    if row["score_chosen"] < row["score_rejected"]:
        problems.add(where, "scores_disagree", f"score_chosen {row['score_chosen']} is below score_rejected "
                                               f"{row['score_rejected']}")
        return None
    # UltraFeedback's chosen and rejected repeat the user turn: the messages they share become the prompt.
    # Rows whose replies do not repeat it (`dpokit label` writes its scores under the same names) keep theirs.
    out = {"chosen": row.get("chosen"), "rejected": row.get("rejected")}
    chosen = out["chosen"]
    repeats_prompt = isinstance(chosen, list) and bool(chosen) and isinstance(chosen[0], dict) \
        and chosen[0].get("role") != "assistant"
    if "prompt" in row and not repeats_prompt:
        out["prompt"] = row["prompt"]
    return out


def _summarize_from_feedback(row: dict, where: str, problems) -> dict | None:
    info, summaries, choice = row.get("info"), row.get("summaries"), row.get("choice")
    if not isinstance(info, dict):
        problems.add(where, "wrong_type", "'info' must be an object with post, title and subreddit")
        return None
    if not isinstance(info.get("post"), str):
        problems.add(where, "no_post", "info.post is missing or null (a CNN/DM article comparison?); dpokit reads "
                                       "the Reddit TL;DR comparisons")
        return None
    if not (isinstance(summaries, list) and len(summaries) == 2
            and all(isinstance(s, dict) and isinstance(s.get("text"), str) for s in summaries)):
        problems.add(where, "wrong_type", "'summaries' must be a list of two objects with a 'text' string")
        return None
    if choice not in (0, 1) or isinstance(choice, bool):
        problems.add(where, "wrong_type", f"'choice' must be 0 or 1, got {choice!r}")
        return None
    prompt = TLDR_PROMPT.format(subreddit=info.get("subreddit") or "", title=info.get("title") or "",
                                post=info["post"])
    return {"prompt": prompt, "chosen": " " + summaries[choice]["text"].strip(),
            "rejected": " " + summaries[1 - choice]["text"].strip()}


def _shp(row: dict, where: str, problems) -> dict | None:
    for key in ("history", "human_ref_A", "human_ref_B"):
        if not _has(row, key, str, where, problems, "a string"):
            return None
    label = row.get("labels")
    if label not in (0, 1) or isinstance(label, bool):
        problems.add(where, "wrong_type", f"'labels' must be 1 (A preferred) or 0 (B preferred), got {label!r}")
        return None
    a, b = row["human_ref_A"], row["human_ref_B"]
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return {"prompt": [{"role": "user", "content": row["history"]}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


LABELS = {True: True, False: False, "true": True, "false": False}  # 1 and 0 equal True and False


def _kto(row: dict, where: str, problems) -> dict | None:
    if "label" not in row:
        problems.add(where, "missing_field", "missing field 'label' (true: desirable, false: undesirable)")
        return None
    label = row["label"]
    key = label.strip().lower() if isinstance(label, str) else label  # CSV cells are strings
    if not isinstance(key, (bool, int, str)) or key not in LABELS:  # a list or object cannot even be looked up
        problems.add(where, "wrong_type", f"'label' must be true (desirable) or false (undesirable), got {label!r}")
        return None
    return {**row, "label": LABELS[key]}


def _has(row: dict, key: str, kind, where: str, problems, what: str) -> bool:
    if key not in row:
        problems.add(where, "missing_field", f"missing field '{key}'")
        return False
    if not isinstance(row[key], kind) or isinstance(row[key], bool):
        problems.add(where, "wrong_type", f"'{key}' must be {what}, got {type_name(row[key], json=True)}")
        return False
    return True


CONVERTERS = {"hh_rlhf": _hh_rlhf, "ultrafeedback": _ultrafeedback, "summarize_from_feedback": _summarize_from_feedback,
              "shp": _shp, "kto": _kto}
