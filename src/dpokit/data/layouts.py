"""Tokenized pairs → one batch in one of three layouts.

- padded: 2B rows, [prompt][chosen] then [prompt][rejected], right-padded (what TRL does).
- packed: every sequence of the batch in one row, no padding; position ids restart per sequence and
  attention stays inside each sequence.
- prefix_shared: one [prompt][chosen][rejected] block per pair, packed; the rejected span attends to
  the prompt but not to the chosen span and its positions continue from the prompt, so each prompt
  is computed once (Wang & Hegde 2024, arXiv 2410.20305).

Whatever the layout, a batch says which output position predicts which completion token
(`target_index`, `target_ids`) and which sequence that token belongs to (`target_seq`: chosen i is
sequence i, rejected i is sequence B + i). Only this module and `logps.py` know about layouts.

A pair whose rejected side is empty scores its chosen completion alone (SFT data, samples to score):
the empty sequence is not computed in any layout, and its log-prob sums to 0 over 0 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from dpokit.data.tokenize import TokenizedPair

LAYOUTS = ("padded", "packed", "prefix_shared")


@dataclass
class Segments:
    """Attention inside a packed row. Query span i (`cu_q[i]:cu_q[i+1]`, spans cover the row in order)
    attends causally, aligned bottom-right, to the row positions `key_index[cu_k[i]:cu_k[i+1]]`;
    `key_index` is None when every span attends only to itself (plain packing)."""

    cu_q: list[int]
    cu_k: list[int]
    key_index: torch.Tensor | None = None

    @property
    def max_q(self) -> int:
        return max(b - a for a, b in zip(self.cu_q, self.cu_q[1:]))

    @property
    def max_k(self) -> int:
        return max(b - a for a, b in zip(self.cu_k, self.cu_k[1:]))

    def to(self, device) -> Segments:
        key_index = None if self.key_index is None else self.key_index.to(device)
        return Segments(self.cu_q, self.cu_k, key_index)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # [rows, width]
    attention_mask: torch.Tensor | None  # [rows, width], 1 for real tokens (padded layout only)
    segments: Segments | None  # packed layouts only
    target_index: torch.Tensor  # [n] flat positions (row * width + column) whose output predicts target_ids
    target_ids: torch.Tensor  # [n]
    target_seq: torch.Tensor  # [n] sequence of each target: chosen i → i, rejected i → num_pairs + i
    pair_ids: torch.Tensor  # [num_pairs] indices of the pairs in their dataset
    num_pairs: int
    num_tokens: int  # 2·prompt + chosen + rejected summed over pairs: the same count in every layout
    sources: list[str] = field(default_factory=list)  # file:line of each pair
    # [2·num_pairs] flat position of each sequence's last token (its EOS), in `target_seq` order; -1 for an
    # empty sequence. With `target_index` of a sequence's first target (the prompt's last position) it places
    # every token: in every layout a sequence's prompt and its completion are each contiguous.
    last_index: torch.Tensor | None = None

    def to(self, device) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, (torch.Tensor, Segments)):
                moved[name] = value.to(device)
        return replace(self, **moved)


def collate(pairs: Sequence[TokenizedPair], pair_ids: Sequence[int], layout: str, pad_id: int = 0) -> Batch:
    if layout == "padded":
        return collate_padded(pairs, pair_ids, pad_id)
    if layout == "packed":
        return collate_packed(pairs, pair_ids)
    if layout == "prefix_shared":
        return collate_prefix_shared(pairs, pair_ids)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def collate_padded(pairs: Sequence[TokenizedPair], pair_ids: Sequence[int], pad_id: int) -> Batch:
    rows = [(s, prompt, completion) for s, (prompt, completion) in enumerate(_sequences(pairs)) if completion]
    width = max(len(pr) + len(c) for _, pr, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    index, targets, seq, last = [], [], [], [-1] * (2 * len(pairs))
    for r, (s, prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[r, :n] = torch.tensor(prompt + completion)
        attention_mask[r, :n] = 1
        last[s] = r * width + n - 1
        start = r * width + len(prompt) - 1  # the last prompt position predicts the first completion token
        index.extend(range(start, start + len(completion)))
        targets.extend(completion)
        seq.extend([s] * len(completion))
    position_ids = torch.arange(width).expand(len(rows), width).contiguous()
    return _batch(input_ids, position_ids, attention_mask, None, index, targets, seq, pairs, pair_ids, last)


def collate_packed(pairs: Sequence[TokenizedPair], pair_ids: Sequence[int]) -> Batch:
    ids, positions, index, targets, seq, cu = [], [], [], [], [], [0]
    last = [-1] * (2 * len(pairs))
    for s, (prompt, completion) in enumerate(_sequences(pairs)):
        if not completion:
            continue
        offset = len(ids)
        ids.extend(prompt + completion)
        positions.extend(range(len(prompt) + len(completion)))
        start = offset + len(prompt) - 1
        index.extend(range(start, start + len(completion)))
        targets.extend(completion)
        seq.extend([s] * len(completion))
        cu.append(len(ids))
        last[s] = len(ids) - 1
    segments = Segments(cu_q=cu, cu_k=list(cu), key_index=None)
    return _batch(torch.tensor([ids]), torch.tensor([positions]), None, segments, index, targets, seq, pairs, pair_ids,
                  last)


def collate_prefix_shared(pairs: Sequence[TokenizedPair], pair_ids: Sequence[int]) -> Batch:
    b = len(pairs)
    ids, positions, index, targets, seq = [], [], [], [], []
    cu_q, cu_k, keys, last = [0], [0], [], [-1] * (2 * b)
    for i, p in enumerate(pairs):
        o = len(ids)
        lp, lc, lr = len(p.prompt), len(p.chosen), len(p.rejected)
        ids.extend(p.prompt + p.chosen + p.rejected)
        positions.extend(range(lp + lc))
        positions.extend(range(lp, lp + lr))  # the rejected span continues from the prompt
        # chosen: predicted from the prompt's last position, then from its own positions
        index.extend(range(o + lp - 1, o + lp - 1 + lc))
        targets.extend(p.chosen)
        seq.extend([i] * lc)
        # attention: [prompt][chosen] causal over itself; [rejected] over the prompt and itself
        keys.extend(range(o, o + lp + lc))
        cu_q.append(o + lp + lc)
        cu_k.append(len(keys))
        last[i] = o + lp + lc - 1
        if not lr:
            continue
        # rejected: its first token is predicted from the prompt's last position too
        r0 = o + lp + lc
        index.append(o + lp - 1)
        index.extend(range(r0, r0 + lr - 1))
        targets.extend(p.rejected)
        seq.extend([b + i] * lr)
        keys.extend(range(o, o + lp))
        keys.extend(range(r0, r0 + lr))
        cu_q.append(r0 + lr)
        cu_k.append(len(keys))
        last[b + i] = r0 + lr - 1
    segments = Segments(cu_q=cu_q, cu_k=cu_k, key_index=torch.tensor(keys))
    return _batch(torch.tensor([ids]), torch.tensor([positions]), None, segments, index, targets, seq, pairs, pair_ids,
                  last)


def _sequences(pairs: Sequence[TokenizedPair]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(prompt, completion) of every sequence in `target_seq` order: the chosen ones, then the rejected."""
    return [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]


def _batch(input_ids, position_ids, attention_mask, segments, index, targets, seq, pairs, pair_ids, last) -> Batch:
    return Batch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        segments=segments,
        target_index=torch.tensor(index, dtype=torch.long),
        target_ids=torch.tensor(targets, dtype=torch.long),
        target_seq=torch.tensor(seq, dtype=torch.long),
        pair_ids=torch.tensor(list(pair_ids), dtype=torch.long),
        num_pairs=len(pairs),
        num_tokens=sum(p.num_tokens for p in pairs),
        sources=[p.source for p in pairs],
        last_index=torch.tensor(last, dtype=torch.long),
    )


def last_non_pad_index(batch: Batch, pairs: Sequence[TokenizedPair], pad_id: int | None) -> torch.Tensor:
    """[2·num_pairs] flat position of each sequence's last token that is not `pad_id`, in `target_seq`
    order: where transformers' sequence-classification models pool (position 0 when every token is
    padding; the last token when `pad_id` is None). Every sequence must be non-empty. In every layout a
    sequence's completion is contiguous and ends at `last_index`, and its prompt is contiguous and ends
    at the position that predicts the first completion token."""
    first: dict[int, int] = {}
    for index, s in zip(batch.target_index.tolist(), batch.target_seq.tolist()):
        first.setdefault(s, index)
    last = batch.last_index.tolist()
    n = len(pairs)
    out = []
    for s in range(2 * n):
        pair = pairs[s % n]
        completion = pair.chosen if s < n else pair.rejected
        if not completion:
            raise ValueError(f"{pair.source}: an empty {'chosen' if s < n else 'rejected'} sequence has no last token")
        tokens = pair.prompt + completion
        j = next((j for j in range(len(tokens) - 1, -1, -1) if tokens[j] != pad_id), 0)
        lp, lc = len(pair.prompt), len(completion)
        out.append(last[s] - (lp + lc - 1 - j) if j >= lp else first[s] - (lp - 1 - j))
    return torch.tensor(out, dtype=torch.long)
