"""`dpokit sample`: N completions per prompt from any model, with each completion's log-prob.

Generation is batched (prompts left-padded) and seeded per batch. A completion is the sampled token
ids up to and including the first stop token (EOS), or `max_new_tokens` ids when none came: the cut
sequence is exactly what was sampled, so summing its log-probs gives log π(y|x) of the truncated
distribution, which is what the KL estimate of `evaluate` needs. Log-probs are those of the model's
unmodified distribution, i.e. at temperature 1 and without top-p, whatever settings the samples were drawn
with: recorded from the logits the generation computed (the transformers backend), else recomputed on the
ids with `dpokit.logps.CompletionLogProbs` (the trainer's own code); the two agree within 1e-4 in fp32:

    log π(y|x) = Σ_t log softmax(f(x, y_<t))[y_t]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dpokit import models
from dpokit.data.tokenize import TokenizedPair
from dpokit.distributed import pick_device
from dpokit.generation.backends import Completion, TransformersBackend, pad_id_for, stop_token_ids
from dpokit.generation.jsonl import ResumableJsonl, write_jsonl
from dpokit.generation.packed_linear import packed_linears
from dpokit.generation.prompts import Prompt, as_model_input, read_prompts
from dpokit.generation.settings import SamplingSettings
from dpokit.logps import CompletionLogProbs, logps_table
from dpokit.rundir import load_tokenizer_for


def completion_logps(model, prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                     pad_id: int, batch_size: int = 32) -> list[float]:
    """log π(y_i | x_i) summed over the completion's tokens, for each (prompt_ids[i], completions[i]).

    Consecutive completions of the same prompt share one padded pair (the prompt tokenized once per
    two completions); a completion left over scores alone."""
    if not isinstance(model, CompletionLogProbs):
        model = CompletionLogProbs(model)
    units: list[tuple[int, int | None]] = []  # (item, next item with the same prompt, or None)
    i = 0
    while i < len(completions):
        if i + 1 < len(completions) and tuple(prompt_ids[i]) == tuple(prompt_ids[i + 1]):
            units.append((i, i + 1))
            i += 2
        else:
            units.append((i, None))
            i += 1
    pairs = [TokenizedPair(tuple(prompt_ids[a]), tuple(completions[a]), () if b is None else tuple(completions[b]), "")
             for a, b in units]
    table = logps_table(model, pairs, pad_id=pad_id, batch_pairs=max(1, batch_size // 2))
    out = [math.nan] * len(completions)
    for (a, b), (first, second) in zip(units, table.tolist()):
        out[a] = first
        if b is not None:
            out[b] = second
    return out


def length_order(prompt_ids: Sequence[Sequence[int]]) -> list[int]:
    """Indices of `prompt_ids` from the shortest prompt to the longest, ties in their order: batches drawn
    in this order pad little."""
    return sorted(range(len(prompt_ids)), key=lambda k: len(prompt_ids[k]))


class Sampler:
    """A loaded model and tokenizer that turn prompts into sample rows."""

    def __init__(self, model, tokenizer, settings: SamplingSettings, *, backend=None):
        """`backend`: a `backends.GenerationBackend` (default: the transformers backend)."""
        self.model, self.tokenizer, self.settings = model, tokenizer, settings.check()
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = pad_id_for(tokenizer, self.stop_ids)
        self.scorer = CompletionLogProbs(model)
        self.backend = backend if backend is not None else TransformersBackend(model)

    @classmethod
    def load(cls, name: str, settings: SamplingSettings, *, device: str = "auto", dtype: str = "float32",
             tokenizer_from: str | None = None) -> Sampler:
        tokenizer = load_tokenizer_for(name, fallback=tokenizer_from)
        model = models.load_for_generation(name, dtype=dtype, device=pick_device(device))
        return cls(model, tokenizer, settings)

    def encode(self, prompt: Prompt) -> tuple[Prompt, list[int]]:
        return as_model_input(prompt, self.tokenizer, self.settings.template)

    def sample_ids(self, prompt_ids: Sequence[Sequence[int]], *, first_index: int = 0,
                   on_batch: Callable[[int], None] | None = None) -> list[list[Completion]]:
        """`n` completions for each prompt (token ids), in generate calls of at most `batch_size` sequences
        (`on_batch` gets each call's count), the prompts ordered by length so that a call pads little; a
        call is seeded with `seed * 1_000_003` plus the index of its first sequence in that order, counted
        from prompt `first_index` (the prompts of earlier calls)."""
        s = self.settings
        rows = [(k, prompt_ids[k]) for k in length_order(prompt_ids) for _ in range(s.n)]
        done: list[Completion] = []
        with torch.no_grad(), packed_linears(self.model):  # bf16 weights packed once for all the calls
            for start in range(0, len(rows), s.batch_size):
                batch = rows[start:start + s.batch_size]
                done += self.backend.generate([ids for _, ids in batch], temperature=s.temperature, top_p=s.top_p,
                                              max_new_tokens=s.max_new_tokens, stop_ids=self.stop_ids,
                                              pad_id=self.pad_id, seed=s.seed * 1_000_003 + first_index * s.n + start)
                if on_batch is not None:
                    on_batch(len(batch))
        per_prompt: list[list[Completion]] = [[] for _ in prompt_ids]
        for (k, _), completion in zip(rows, done):
            per_prompt[k].append(completion)
        return per_prompt

    def logps(self, prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> list[float]:
        return completion_logps(self.scorer, prompt_ids, completions, pad_id=self.pad_id,
                                batch_size=self.settings.batch_size)

    def completion_logps(self, prompt_ids: Sequence[Sequence[int]], per_prompt: Sequence[Sequence[Completion]]
                         ) -> list[float]:
        """log π(y|x) of every completion, prompt by prompt: those the backend recorded while sampling,
        else recomputed by the trainer's own code (one more forward pass)."""
        flat = [c for cs in per_prompt for c in cs]
        if all(c.logp is not None for c in flat):
            return [c.logp for c in flat]
        return self.logps([ids for ids, cs in zip(prompt_ids, per_prompt) for _ in cs], [c.ids for c in flat])

    def decode(self, ids: Sequence[int]) -> str:
        stops = set(self.stop_ids)
        return self.tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)

    def draw(self, prompts: Sequence[Prompt], *, first_index: int = 0,
             on_batch: Callable[[int], None] | None = None) -> list[PromptSamples]:
        """`n` completions of each prompt with their token ids and log-probs under this model."""
        encoded = [self.encode(p) for p in prompts]
        per_prompt = self.sample_ids([ids for _, ids in encoded], first_index=first_index, on_batch=on_batch)
        logps = iter(self.completion_logps([ids for _, ids in encoded], per_prompt))
        return [PromptSamples(stored, tuple(ids), cs, [next(logps) for _ in cs], [self.decode(c.ids) for c in cs])
                for (stored, ids), cs in zip(encoded, per_prompt)]

    def sample(self, prompts: Sequence[Prompt], *, first_index: int = 0) -> list[dict]:
        """Sample rows for `prompts`: prompt (as trained on later), completions, their log-probs under this
        model, token counts and whether each ended with a stop token."""
        return [s.row(first_index + k) for k, s in enumerate(self.draw(prompts, first_index=first_index))]


@dataclass
class PromptSamples:
    prompt: Prompt  # as stored downstream (a conversation when the chat template was applied)
    prompt_ids: tuple[int, ...]
    completions: list[Completion]
    logps: list[float]  # log π(y|x) under the sampling model
    texts: list[str]

    def row(self, index: int) -> dict:
        return {"index": index, "prompt": self.prompt, "completions": self.texts, "logps": self.logps,
                "num_tokens": [len(c.ids) for c in self.completions], "finished": [c.finished for c in self.completions]}


def prompts_fingerprint(prompts: Sequence[Prompt]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()[:16]


def sample_meta(model: str, prompts: Sequence[Prompt], settings: SamplingSettings) -> dict:
    """What a sample file was made from; resuming with anything different is refused."""
    return {"model": model, "prompts_sha256": prompts_fingerprint(prompts), "num_prompts": len(prompts),
            **asdict(settings)}


@dataclass
class SampleSummary:
    path: Path
    prompts: int
    resumed: int  # prompts an earlier attempt had finished
    completions: int
    finished_share: float  # share of completions that ended with a stop token
    mean_logp: float


def sample_file(model: str, prompts_path: str | Path, out: str | Path, settings: SamplingSettings, *,
                overwrite: bool = False, device: str = "auto", dtype: str = "float32", progress: bool = True,
                sampler: Sampler | None = None) -> SampleSummary:
    """Sample every prompt of `prompts_path` into the JSONL `out`, one row per prompt, written as each
    batch finishes; prompts a previous attempt finished are kept, not redone."""
    from tqdm.auto import tqdm

    settings.check()
    prompts = read_prompts(prompts_path)
    with ResumableJsonl(out, sample_meta(model, prompts, settings), overwrite=overwrite) as sink:
        done = {row["index"]: row for row in sink.done}
        if len(done) < len(prompts) and sampler is None:
            sampler = Sampler.load(model, settings, device=device, dtype=dtype)
        # the whole file's prompts by length, so that each batch pads little; a batch's seed counts from its
        # first prompt's place in this order, so the batches after an interruption draw as uninterrupted
        order = length_order([sampler.encode(p)[1] for p in prompts]) if sampler is not None else []
        place = {i: k for k, i in enumerate(order)}
        todo = [i for i in order if i not in done]
        per_call = max(1, settings.batch_size // settings.n)
        packed = packed_linears(sampler.model) if sampler is not None else contextlib.nullcontext()
        with tqdm(total=len(prompts), initial=len(done), desc="sample", unit="prompt", disable=not progress,
                  dynamic_ncols=True) as bar, torch.no_grad(), packed:  # bf16 weights packed once for the file
            for start in range(0, len(todo), per_call):
                chunk = todo[start:start + per_call]
                rows = sampler.sample([prompts[i] for i in chunk], first_index=place[chunk[0]])
                for i, row in zip(chunk, rows):
                    row["index"] = i
                    sink.append(row)
                    done[i] = row
                bar.update(len(chunk))
    rows = [done[i] for i in range(len(prompts))]
    if todo:  # written as drawn, by length: finished, the file is in the prompts' order
        write_jsonl(out, rows)
    finished = [f for r in rows for f in r["finished"]]
    logps = [lp for r in rows for lp in r["logps"]]
    return SampleSummary(Path(out), len(prompts), len(prompts) - len(todo), len(logps),
                         sum(finished) / max(1, len(finished)), sum(logps) / max(1, len(logps)))
