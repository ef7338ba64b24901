"""The generation backend seam: everything that samples completions (`dpokit sample`, evaluate and the
frontier, Best-of-N, PPO's rollouts, `train.sample_every`) asks a `GenerationBackend`, chosen by
`generation.backend`.

    transformers  `model.generate` on the model being trained or evaluated, in the same process and memory
                  (`generate` below: temperature and top-p only, seeded per call, cut after the first stop
                  token). The default, and the only backend built so far.

A backend for GPU users (vLLM, colocated in-process as TRL's `use_vllm` colocate mode runs it) plugs in by
implementing the two methods below and registering in `BACKENDS`: `generate` returns one `Completion` per
prompt row, seeded, cut after the first stop token as `generate` cuts it, and `sync_weights`
receives the policy after each optimizer update (a colocated vLLM engine loads its state dict there; the
transformers backend samples from the live module and needs nothing). A `Completion` may carry its
log-prob under the sampling model (the transformers backend records it from the logits it computed anyway,
equal to the trainer's own within 1e-4 in fp32): `dpokit sample`, evaluate and the frontier use it instead of
a second forward pass, and recompute it with the trainer's own `CompletionLogProbs` where a backend gives
none. Losses (PPO's old log-probs, the DPO family's) are always computed by the trainer's own code, so a
backend's numerics never reach a loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from dpokit.errors import ConfigError
from dpokit.fields import did_you_mean


@dataclass
class Completion:
    ids: tuple[int, ...]  # sampled ids, the stop token included when one was sampled
    finished: bool  # ended with a stop token (else cut at max_new_tokens)
    logp: float | None = None  # log π(ids|prompt) at temperature 1, without top-p, where the backend has it


class SampledLogProbs:
    """Records log π of every sampled token from the raw logits the generation computed anyway, so that
    the samples' log-probs need no second forward pass. It runs first, before temperature and top-p,
    and sees the token sampled at step t only at step t + 1: it keeps one step's log-softmax
    (batch × vocab) and gathers it then; `finish` gathers the last step's. A transformers logits processor."""

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sampled: torch.Tensor) -> torch.Tensor | None:
        """(batch, steps) log-probs of `sampled` (the generated columns), or None if the steps don't line up
        (generation ran extra passes, as a synced sharded model can)."""
        if self.previous is None or len(self.steps) + 1 != sampled.shape[1]:
            return None
        last = self.previous.gather(1, sampled[:, -1:].to(self.previous.device)).squeeze(1)
        return torch.stack([*self.steps, last], dim=1)


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS of the tokenizer and of the model's generation config (chat models often list end-of-turn too)."""
    ids = [tokenizer.eos_token_id]
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra]
    return sorted({i for i in ids if i is not None})


def pad_id_for(tokenizer, stop_ids: Sequence[int]) -> int:
    """The id that pads sampled rows: the tokenizer's pad token, else the first stop token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]


@torch.no_grad()
def generate(model, prompt_ids: Sequence[Sequence[int]], *, temperature: float, top_p: float, max_new_tokens: int,
             stop_ids: Sequence[int], pad_id: int, seed: int, streamer=None, synced: bool = False) -> list[Completion]:
    """One sampled completion per row of `prompt_ids` (repeat a prompt to get several). Every logits
    processor but temperature and top-p is switched off, so temperature 1 / top-p 1 samples from π itself.
    A transformers streamer (one prompt) receives the tokens as they are generated (`dpokit chat`).
    `synced`: every process of a sharded model runs forward passes until all have finished (FSDP2 gathers
    each layer's parameters collectively); otherwise transformers decides (DeepSpeed ZeRO-3, FSDP1)."""
    from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):  # left padding: every row's next token is at the same column
        input_ids[i, width - len(ids):] = torch.tensor(list(ids))
        attention_mask[i, width - len(ids):] = 1
    greedy = temperature == 0
    # temperature and top-p are passed as processors after the log-prob recorder, which must see the raw
    # logits (transformers puts the processors it builds itself before any passed in); the same warpers
    # in the same order as generate's own, so the samples are those it would draw
    recorder = SampledLogProbs()
    processors = [recorder]
    if not greedy and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if not greedy and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    config = GenerationConfig(
        do_sample=not greedy, temperature=None, top_p=None, top_k=0 if not greedy else None, typical_p=1.0,
        min_p=None, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids), pad_token_id=pad_id, num_return_sequences=1, use_cache=True,
    )
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config, logits_processor=LogitsProcessorList(processors),
                             streamer=streamer, synced_gpus=synced or None)
    sampled = out[:, width:]
    token_logps = recorder.finish(sampled)
    stops = set(stop_ids)
    completions = []
    for i, row in enumerate(sampled.tolist()):
        end = next((j for j, t in enumerate(row) if t in stops), None)
        n = len(row) if end is None else end + 1
        logp = None if token_logps is None else token_logps[i, :n].double().sum().item()
        completions.append(Completion(tuple(row[:n]), end is not None, logp))
    return completions


@runtime_checkable
class GenerationBackend(Protocol):
    name: str

    def generate(self, prompt_ids: Sequence[Sequence[int]], *, temperature: float, top_p: float,
                 max_new_tokens: int, stop_ids: Sequence[int], pad_id: int, seed: int) -> list[Completion]:
        """One sampled completion per row of `prompt_ids`; temperature 0 is greedy."""
        ...

    def sync_weights(self, model) -> None:
        """The policy's weights after an optimizer update, for a backend that holds a copy."""
        ...


class TransformersBackend:
    """`model.generate` of the live model (`generate`). `synced`: every process of a sharded
    (FSDP2) model steps until all have finished."""

    name = "transformers"

    def __init__(self, model, *, synced: bool = False):
        self.model, self.synced = model, synced

    def generate(self, prompt_ids: Sequence[Sequence[int]], *, temperature: float, top_p: float,
                 max_new_tokens: int, stop_ids: Sequence[int], pad_id: int, seed: int) -> list[Completion]:
        return generate(self.model, prompt_ids, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                        stop_ids=stop_ids, pad_id=pad_id, seed=seed, synced=self.synced)

    def sync_weights(self, model) -> None:
        self.model = model  # the module itself: nothing to copy


BACKENDS = {"transformers": TransformersBackend}


def build_backend(name: str, model, *, synced: bool = False) -> GenerationBackend:
    if name not in BACKENDS:
        raise ConfigError(f"generation.backend: unknown backend {name!r}{did_you_mean(name, BACKENDS)}; choose from "
                          f"{', '.join(BACKENDS)}")
    return BACKENDS[name](model, synced=synced)
