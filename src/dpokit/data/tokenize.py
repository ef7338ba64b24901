"""Records → token ids, with a prompt/completion boundary that cannot shift.

The prompt and each completion are tokenized separately and their ids concatenated, so no token can
merge across the boundary (TRL #2054, #1640). Conversations are rendered with the tokenizer's chat
template: the prompt with the generation prompt, the completion as the text the full conversation
adds after it. Completions end with EOS, the token generation stops at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpokit.data.records import PreferenceRecord, Problems
from dpokit.errors import DataError


@dataclass(frozen=True)
class TokenizedPair:
    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    source: str

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


def render(record: PreferenceRecord, tokenizer) -> tuple[str, str, str]:
    """The prompt and completion texts, chat template applied for conversations."""
    if not record.conversational:
        return record.prompt, record.chosen, record.rejected
    if tokenizer.chat_template is None:
        raise DataError(f"{record.source}: conversational rows need a tokenizer with a chat template")
    prompt = tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True)
    completions = []
    for completion in (record.chosen, record.rejected):
        if not completion:  # the empty rejected side of a single completion
            completions.append("")
            continue
        full = tokenizer.apply_chat_template(record.prompt + completion, tokenize=False)
        if full.startswith(prompt):
            text = full[len(prompt):]
        else:  # a template that renders the prompt differently alone: continue from where they agree
            n = next((i for i, (a, b) in enumerate(zip(full, prompt)) if a != b), min(len(full), len(prompt)))
            text = full[n:]
        # the template's text after the end-of-turn token (a newline) is never generated: end at EOS
        completions.append(text.rstrip())
    return prompt, completions[0], completions[1]


def tokenize_records(
    records: list[PreferenceRecord],
    tokenizer,
    settings: TokenizeSettings,
    problems: Problems,
) -> tuple[list[TokenizedPair], TruncationStats]:
    """Tokenize, append EOS, truncate to the limits; rows that cannot fit go to `problems`."""
    return truncate_pairs(encode_records(records, tokenizer), settings, problems)


def encode_records(records: list[PreferenceRecord], tokenizer) -> list[TokenizedPair]:
    """Token ids of every record at full length: prompt and completions tokenized separately, EOS once."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    if not records:
        return []
    texts = [render(r, tokenizer) for r in records]
    conv = [r.conversational for r in records]
    # chat templates carry their own special tokens; plain prompts get the tokenizer's (e.g. BOS)
    prompt_ids: list[list[int]] = [[] for _ in records]
    for special in (True, False):
        rows = [i for i, c in enumerate(conv) if c != special]
        if rows:
            ids = tokenizer([texts[i][0] for i in rows], add_special_tokens=special)["input_ids"]
            for i, row_ids in zip(rows, ids):
                prompt_ids[i] = row_ids
    completions = tokenizer([t for _, ch, rj in texts for t in (ch, rj)], add_special_tokens=False)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos

    pairs: list[TokenizedPair] = []
    for i, record in enumerate(records):
        prompt = list(prompt_ids[i]) or [start]  # the first completion token needs a position to be predicted from
        chosen, rejected = (list(completions[2 * i]), list(completions[2 * i + 1]))
        for ids, text in ((chosen, record.chosen), (rejected, record.rejected)):
            if text and (not ids or ids[-1] != eos):  # an empty rejected side stays empty: one completion
                ids.append(eos)
        pairs.append(TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected), record.source))
    return pairs


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
            pair = TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected), pair.source)
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
