"""Records → token ids, with a prompt/completion boundary that cannot shift.

The prompt is tokenized on its own, so no token can merge across the prompt/completion boundary (TRL
#2054, #1640). Each completion's ids are the rest of the joint text's ids (prompt + completion) wherever
the prompt's ids begin them: what the model reads after the prompt, so a SentencePiece tokenizer (Llama,
Mistral) puts no word-start mark (`▁`) on a completion that continues the prompt's text. Where a token
merges across the boundary the completion is tokenized apart instead. Conversations are rendered with the
tokenizer's chat template (or `data.chat_template`), with the row's `tools` as transformers passes them: the
prompt with the generation prompt, the completion as the text the full conversation adds after it.
Completions end with EOS, the token generation stops at: the template's text after it (a newline) is not
trained.

A template that cannot render a row's tool calls either fails (the row is reported with the
template's message) or leaves them out; so every tool call's function name, every tool result and every
tool schema's name must appear in the rendered text, or the row is reported: content never disappears
without a word.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpokit.data.records import PreferenceRecord, Problems, tool_name
from dpokit.errors import ConfigError, DataError, first_line


@dataclass(frozen=True)
class TokenizedPair:
    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    source: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # the record's extra fields (weight, ...)

    @property
    def num_tokens(self) -> int:
        """Tokens of its sequences: the prompt counts once per non-empty completion."""
        return (1 + bool(self.rejected)) * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class TruncationStats:
    truncated_prompt: int = 0
    truncated_completion: int = 0
    truncated_rows: list[str] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        return len(self.truncated_rows)


@dataclass(frozen=True)
class TokenizeSettings:
    max_length: int = 1024
    max_prompt_length: int = 512
    truncation_mode: str = "keep_end"  # keep_end | keep_start | error


class RenderError(ValueError):
    """A row the chat template cannot render whole; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def render(record: PreferenceRecord, tokenizer) -> tuple[str, str, str]:
    """The prompt and completion texts, chat template applied for conversations (with the row's tools).
    Raises RenderError when the template fails on the row or leaves out a tool call, result or schema."""
    if not record.conversational:
        return record.prompt, record.chosen, record.rejected
    if tokenizer.chat_template is None:
        raise DataError(f"{record.source}: conversational rows need a tokenizer with a chat template "
                        "(or data.chat_template)")

    def apply(messages, **kwargs) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tools=record.tools, tokenize=False, **kwargs)
        except Exception as e:  # jinja2's errors, and the template's own raise_exception(...)
            raise RenderError("template_error", f"the chat template cannot render this row "
                                                f"({type(e).__name__}: {first_line(e)})") from None

    prompt = apply(record.prompt, add_generation_prompt=True)
    completions = []
    for completion in (record.chosen, record.rejected):
        if not completion:  # the empty rejected side of a single completion
            completions.append("")
            continue
        full = apply(record.prompt + completion)
        if full.startswith(prompt):
            text = full[len(prompt):]
        else:  # a template that renders the prompt differently alone: continue from where they agree
            n = next((i for i, (a, b) in enumerate(zip(full, prompt)) if a != b), min(len(full), len(prompt)))
            text = full[n:]
            _warn_prefix_mismatch(record.source, prompt, full, n)
        # the template's text after the end-of-turn token (a newline) is never generated: end at EOS
        completions.append(text.rstrip())
    _check_tools_rendered(record, prompt, completions)
    return prompt, completions[0], completions[1]


_PREFIX_MISMATCH_WARNED = False


def _warn_prefix_mismatch(source: str, prompt: str, full: str, n: int) -> None:
    """Once a process (as TRL warns): the chat template renders a prompt alone otherwise than at the start of
    prompt + completion, so the completion is taken from where they first differ, and what the model is
    trained on after the prompt is not what it is asked to continue at generation time."""
    global _PREFIX_MISMATCH_WARNED
    if _PREFIX_MISMATCH_WARNED:
        return
    _PREFIX_MISMATCH_WARNED = True
    warnings.warn(f"{source}: the chat template renders the prompt alone differently from the start of prompt + "
                  f"completion (they differ at character {n}: {prompt[n:n + 40]!r} alone, {full[n:n + 40]!r} with the "
                  "completion); the completion is taken from there. Common with templates that drop earlier turns' "
                  "reasoning; set data.chat_template to one that renders both alike. (Warned once.)", stacklevel=2)


def _check_tools_rendered(record: PreferenceRecord, prompt: str, completions: list[str]) -> None:
    """Every tool schema's name in the prompt text; every tool call's function name (and argument names)
    and every tool result in the text of the part that holds it. Templates without tool support skip
    `tools` and `tool_calls` without an error, which would train on a conversation that never happened."""
    for tool in record.tools or ():
        if tool_name(tool) not in prompt:
            raise RenderError("tools_not_rendered", f"the chat template does not render the row's 'tools' (function "
                                                    f"{tool_name(tool)!r} is not in the rendered prompt); use a "
                                                    "model or data.chat_template whose template supports tools")
    for key, messages, text in (("prompt", record.prompt, prompt), ("chosen", record.chosen, completions[0]),
                                ("rejected", record.rejected, completions[1])):
        for i, m in enumerate(messages):
            for call in m.get("tool_calls") or ():
                function = call["function"]
                arguments = function.get("arguments")
                names = [function["name"], *(arguments if isinstance(arguments, dict) else ())]
                missing = next((n for n in names if str(n) not in text), None)
                if missing is not None:
                    raise RenderError("tool_calls_not_rendered", f"'{key}' message {i}: the chat template does not "
                                                                 f"render its tool call {function['name']!r} ("
                                                                 f"{missing!r} is not in the rendered text); use a "
                                                                 "model or data.chat_template that supports tool calls")
            content = m.get("content")
            if m["role"] == "tool" and isinstance(content, str) and content.strip() not in text:
                raise RenderError("tool_results_not_rendered", f"'{key}' message {i}: the chat template does not "
                                                               "render this tool result")


def tokenize_records(
    records: list[PreferenceRecord],
    tokenizer,
    settings: TokenizeSettings,
    problems: Problems,
) -> tuple[list[TokenizedPair], TruncationStats]:
    """Tokenize, append EOS, truncate to the limits; rows that cannot be rendered or fit go to `problems`."""
    return truncate_pairs(encode_records(records, tokenizer, problems), settings, problems)


def encode_records(records: list[PreferenceRecord], tokenizer, problems: Problems | None = None) -> list[TokenizedPair]:
    """Token ids of every record at full length: the prompt on its own, each completion as it follows it, EOS once.
    Rows the chat template cannot render whole go to `problems` (default: raise)."""
    problems = problems if problems is not None else Problems()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    rendered = []
    for record in records:
        try:
            rendered.append((record, render(record, tokenizer)))
        except RenderError as e:
            problems.add(record.source, e.reason, str(e))
    if not rendered:
        return []
    records = [r for r, _ in rendered]
    texts = [t for _, t in rendered]
    conv = [r.conversational for r in records]
    prompt_ids = _encode(tokenizer, [t[0] for t in texts], conv)
    completions = _completion_ids(tokenizer, texts, conv, prompt_ids)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos

    pairs: list[TokenizedPair] = []
    for i, record in enumerate(records):
        prompt = list(prompt_ids[i]) or [start]  # the first completion token needs a position to be predicted from
        chosen, rejected = (list(completions[2 * i]), list(completions[2 * i + 1]))
        for ids, text in ((chosen, record.chosen), (rejected, record.rejected)):
            if text and (not ids or ids[-1] != eos):  # an empty rejected side stays empty: one completion
                ids.append(eos)
        pairs.append(TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected), record.source, record.extra))
    return pairs


def _encode(tokenizer, texts: list[str], conv: list[bool]) -> list[list[int]]:
    """Ids of texts that begin a sequence: chat templates carry their own special tokens; plain text gets the
    tokenizer's (e.g. BOS)."""
    out: list[list[int]] = [[] for _ in texts]
    for special in (True, False):
        rows = [i for i, c in enumerate(conv) if c != special]
        if rows:
            for i, ids in zip(rows, tokenizer([texts[i] for i in rows], add_special_tokens=special)["input_ids"]):
                out[i] = ids
    return out


def _completion_ids(tokenizer, texts: list[tuple[str, str, str]], conv: list[bool],
                    prompt_ids: list[list[int]]) -> list[list[int]]:
    """The ids of each row's chosen and rejected text (2 per row, in order) as they follow its prompt's ids.
    Tokenized apart, a completion's first characters read as the start of a text, which a SentencePiece
    tokenizer marks as a word start: "hello" + "world" would train on "hello world", and a legacy Llama
    normalizer turns " world" into a lone "▁" token followed by "▁world". So where the joint text's ids
    begin with the prompt's, the rest is the completion's; where they do not (a token merged across the
    boundary), the completion is tokenized apart and the boundary still cannot shift."""
    rows = [(i, text) for i, (_, chosen, rejected) in enumerate(texts) for text in (chosen, rejected)]
    out: list[list[int] | None] = [None if text else [] for _, text in rows]  # an empty side stays empty
    todo = [k for k, ids in enumerate(out) if ids is None]
    joint = _encode(tokenizer, [texts[rows[k][0]][0] + rows[k][1] for k in todo], [conv[rows[k][0]] for k in todo])
    for k, whole in zip(todo, joint):
        mine = prompt_ids[rows[k][0]]
        # an empty prompt leaves the completion at the text's start: apart, without special tokens
        if mine and len(whole) > len(mine) and list(whole[:len(mine)]) == list(mine):
            out[k] = list(whole[len(mine):])
    apart = [k for k, ids in enumerate(out) if ids is None]  # only these are tokenized again, on their own
    if apart:
        for k, ids in zip(apart, tokenizer([rows[k][1] for k in apart], add_special_tokens=False)["input_ids"]):
            out[k] = list(ids)
    return out


def truncate_pairs(pairs: list[TokenizedPair], settings: TokenizeSettings,
                   problems: Problems) -> tuple[list[TokenizedPair], TruncationStats]:
    """Pairs over `settings.max_length` shortened (or reported, with truncation_mode=error)."""
    stats = TruncationStats()
    kept: list[TokenizedPair] = []
    for pair in pairs:
        fitted = _fit(pair.prompt, pair.chosen, pair.rejected, settings, pair.source, problems)
        if fitted is None:
            continue
        prompt, chosen, rejected = fitted
        cut_prompt = len(prompt) < len(pair.prompt)
        cut_completion = len(chosen) < len(pair.chosen) or len(rejected) < len(pair.rejected)
        stats.truncated_prompt += cut_prompt
        stats.truncated_completion += cut_completion
        if cut_prompt or cut_completion:
            stats.truncated_rows.append(pair.source)
            pair = TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected), pair.source, pair.extra)
        kept.append(pair)
    return kept, stats


def _fit(prompt, chosen, rejected, s: TokenizeSettings, source: str, problems: Problems):
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer <= s.max_length:
        return prompt, chosen, rejected
    if s.truncation_mode == "error":
        if len(prompt) > s.max_prompt_length:
            problems.add(source, "prompt_too_long",
                         f"prompt is {len(prompt)} tokens, over data.max_prompt_length={s.max_prompt_length}")
        else:
            problems.add(source, "too_long", f"prompt + completion is {len(prompt) + longer} tokens, over "
                                             f"data.max_length={s.max_length}")
        return None
    # the original DPO code's rule: shorten the prompt first, then the completions
    if len(prompt) > s.max_prompt_length:
        keep = s.max_prompt_length
        prompt = prompt[-keep:] if s.truncation_mode == "keep_end" else prompt[:keep]
    room = s.max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room]


def chat_template_text(value: str) -> str:
    """`data.chat_template`: a Jinja template, or the path of a file holding one; checked for syntax."""
    import jinja2

    path = Path(value).expanduser()
    looks_like_template = "{{" in value or "{%" in value
    if not looks_like_template:
        if not path.is_file():
            raise ConfigError(f"data.chat_template: {value!r} is neither a file nor a Jinja template")
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"data.chat_template: cannot read {path}: {e}") from None
    try:  # the extension transformers compiles chat templates with
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(value)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"data.chat_template: invalid Jinja at line {e.lineno}: {e.message}") from None
    return value


def use_chat_template(tokenizer, value: str | None) -> None:
    """Replace the tokenizer's chat template with `data.chat_template` (when set); saved with the model,
    so the exported tokenizer renders conversations as training did."""
    if value is not None:
        tokenizer.chat_template = chat_template_text(value)
