"""Prompt files → prompts, and a prompt → the token ids a model continues from.

A prompt is a string (text the model continues) or a list of `{role, content}` messages (a conversation
the model answers). Prompt files are JSON Lines or JSON with a `prompt` field per row (so a preference
file works too), or plain text with one prompt per line.

Token ids follow `dpokit.data.tokenize.tokenize_records` exactly, so pairs built from samples train on
the very prompt the samples were drawn from: a conversation is rendered with the chat template and the
generation prompt and tokenized without extra special tokens; a string gets the tokenizer's own special
tokens (e.g. BOS).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dpokit.data.records import ROLES
from dpokit.errors import DataError
from dpokit.generation.jsonl import read_utf8
from dpokit.storage import text_lines

Prompt = str | list[dict[str, str]]
TEMPLATES = ("auto", "chat", "none")


def read_prompts(path: str | Path) -> list[Prompt]:
    """Every prompt of a .jsonl / .json (rows with `prompt`) or .txt (one per line) file, in order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    text = read_utf8(path)
    if path.suffix == ".txt":
        prompts: list[Prompt] = [line for line in text_lines(text) if line.strip()]
    elif path.suffix in (".jsonl", ".json"):
        if path.suffix == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON array of objects with a 'prompt' field")
            where = [f"{path}[{i}]" for i in range(len(rows))]
        else:
            rows, where = [], []
            for i, line in enumerate(text_lines(text), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                    where.append(f"{path}:{i}")
        prompts = [_check_prompt(row, w) for row, w in zip(rows, where)]
    else:
        raise DataError(f"{path}: unsupported prompt file type '{path.suffix}' (use .jsonl, .json or .txt)")
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def _check_prompt(row, where: str) -> Prompt:
    if not isinstance(row, dict) or "prompt" not in row:
        raise DataError(f"{where}: expected an object with a 'prompt' field")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return prompt
    if (isinstance(prompt, list) and prompt
            and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in prompt)):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of {{role, content}} messages")


def uses_chat_template(prompt: Prompt, tokenizer, template: str) -> bool:
    """`auto`: conversations always, strings when the tokenizer has a chat template (a chat model);
    `chat`: always; `none`: never (a string is continued as plain text)."""
    if template not in TEMPLATES:
        raise DataError(f"template must be one of {', '.join(TEMPLATES)}; got {template!r}")
    if isinstance(prompt, list):
        if template == "none":
            raise DataError("a conversation prompt needs the chat template; use --template auto or chat")
        return True
    return template == "chat" or (template == "auto" and tokenizer.chat_template is not None)


def as_model_input(prompt: Prompt, tokenizer, template: str = "auto") -> tuple[Prompt, list[int]]:
    """The prompt as later steps should store it (a string wrapped as one user message when the chat
    template applies) and the token ids the model continues from."""
    if uses_chat_template(prompt, tokenizer, template):
        if tokenizer.chat_template is None:
            raise DataError("the chat template was asked for but the tokenizer has none; use --template none")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return messages, list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not ids:  # the first completion token needs a position to be predicted from
        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return prompt, ids


def prompt_text(prompt: Prompt) -> str:
    """A prompt as one line of text, for tables and judges that read plain text."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


@dataclass(frozen=True)
class PromptItem:
    """A prompt an online method samples from: as the judge reads it, its token ids, its file:line."""

    prompt: Prompt  # a string, or messages when the chat template was applied
    ids: tuple[int, ...]
    source: str


def prompt_items(path: str, tokenizer, template: str, max_prompt_length: int) -> list[PromptItem]:
    """The prompts of `path` encoded for sampling (PPO's rollouts, online DPO's samples); an over-long prompt
    keeps its last `max_prompt_length` tokens, the text the model continues."""
    items = []
    for k, prompt in enumerate(read_prompts(path)):
        stored, ids = as_model_input(prompt, tokenizer, template)
        items.append(PromptItem(stored, tuple(ids[-max_prompt_length:]), f"{path}:{k + 1}"))
    if not items:
        raise DataError(f"{path}: no prompts")
    return items
