"""The generation backend seam: everything that samples completions (`dpokit sample`, evaluate and the
frontier, Best-of-N, PPO's rollouts, `train.sample_every`) asks a `GenerationBackend`, chosen by
`generation.backend`.

    transformers  the model being trained or evaluated, in the same process and memory, through dpokit's
                  own decode loop over transformers' KV cache (`generate` below: temperature and top-p only,
                  seeded per call, cut after the first stop token). The default, and the only backend built
                  so far.

A backend for GPU users (vLLM, colocated in-process as TRL's `use_vllm` colocate mode runs it) plugs in by
implementing the two methods below and registering in `BACKENDS`: `generate` returns one `Completion` per
prompt row, seeded, cut after the first stop token as `generate` cuts it, and `sync_weights`
receives the policy after each optimizer update (a colocated vLLM engine loads its state dict there; the
transformers backend samples from the live module and needs nothing). A `Completion` may carry its
log-prob under the sampling model (the transformers backend records it from the logits it computes anyway,
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
from dpokit.generation.decode_attention import decode_attention_for
from dpokit.generation.kv_cache import drop_finished, preallocated_cache
from dpokit.generation.packed_linear import packed_linears
from dpokit.logps import causal_lm


@dataclass
class Completion:
    ids: tuple[int, ...]  # sampled ids, the stop token included when one was sampled
    finished: bool  # ended with a stop token (else cut at max_new_tokens)
    logp: float | None = None  # log π(ids|prompt) at temperature 1, without top-p, where the backend has it


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
    """One sampled completion per row of `prompt_ids` (repeat a prompt to get several), seeded by `seed`
    alone, with its log-prob under the model (temperature 1, no top-p) from the logits the loop computes.

    transformers' `generate` loop (left-padded prefill, then one cached forward a token), less what costs
    here without changing the distribution drawn from:
      - a prompt repeated in the batch is prefilled once and its KV cache copied to its rows;
      - the KV cache is allocated once and written in place (`kv_cache.py`), where `DynamicCache` copies it
        whole at every step; bf16 linear layers on a CPU (fp32 ones under bf16 autocast) run on weights packed
        once (`packed_linear.py`), and a decode step's attention there skips SDPA's flash kernel where that
        pays (`decode_attention.py`);
      - a row leaves the batch, and its cache, as soon as it samples a stop token, the batch's last running
        row moved into its place, each sequence still drawing its own uniforms (kept longer, it changes the
        batch's matrix shapes, and with them fp32 products in their last bits: one draw in 340 of make
        paper's iterative DPO-GT flipped);
      - a token is drawn by inverse CDF, one uniform number a row (`inverse_cdf`), where `torch.multinomial`
        draws one exponential per vocabulary entry: measured 168 ms a step of 128 rows × 49k tokens on a
        2-core CPU, 23% of `generate`'s whole call. The draws are therefore not `generate`'s for a seed.
    Temperature 0 is greedy; temperature and top-p are transformers' own warpers, applied in generate's order.
    A transformers streamer (one prompt) receives the prompt, then each token. `synced`: every process of a
    sharded (FSDP2) model runs a forward pass each step until all have finished, since the layers'
    parameters are gathered collectively."""
    from transformers import TopPLogitsWarper

    device = next(model.parameters()).device
    forward = getattr(model, "lm_forward", model)  # a `CompletionLogProbs` wrapper's causal LM, or the LM itself
    unique = list(dict.fromkeys(tuple(p) for p in prompt_ids))
    row_of = {p: k for k, p in enumerate(unique)}
    width = max(len(p) for p in unique)
    cache = preallocated_cache(width + max_new_tokens)
    input_ids, mask = (t.to(device) for t in left_padded(unique, width, pad_id))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    top_p_warper = TopPLogitsWarper(top_p) if temperature > 0 and top_p < 1.0 else None
    rng = torch.Generator(device=device).manual_seed(seed)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    model.eval()
    # bf16 on a CPU: weights packed once, not at every product; a decode step's attention without SDPA's kernel
    with packed_linears(model), decode_attention_for(language_model(model), cache) as attention_kwargs:
        cached = {cache_argument(model): cache, **attention_kwargs}
        logits = forward(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **cached).logits[:, -1].float()
        rows = torch.tensor([row_of[tuple(p)] for p in prompt_ids], device=device)  # each sequence's prompt row
        cache.batch_select_indices(rows)
        logits, mask, last = logits[rows], mask[rows], positions[rows, -1]
        active = torch.arange(len(prompt_ids), device=device)  # the sequences still running, in the batch's order
        place = None  # once rows have moved: each row's place among the running sequences, which draw in that order
        tokens = [[] for _ in prompt_ids]
        logps = [0.0] * len(prompt_ids)
        stops = torch.tensor(sorted(set(stop_ids)), device=device)
        for step in range(max_new_tokens):
            if len(active):  # (a process whose rows are done only steps with the others, below)
                sampled, picked = next_tokens(logits, temperature=temperature, top_p_warper=top_p_warper, rng=rng,
                                              place=place)
                for k, token, lp in zip(active.tolist(), sampled.tolist(), picked.tolist()):
                    tokens[k].append(token)
                    logps[k] += lp
                if streamer is not None:
                    streamer.put(sampled.cpu())
            if step + 1 == max_new_tokens:
                break
            running = ~torch.isin(sampled, stops)
            if len(active) and not running.all():  # finished rows leave the batch and its cache
                order = drop_finished(cache, running)
                active, sampled, mask, last = active[order], sampled[order], mask[order], last[order]
                place = active.argsort().argsort()
            if not (_any_running(len(active), device) if synced else len(active)):
                break
            if len(active) == 0:  # this process is done, another is not: step with it (its parameters are gathered)
                forward(input_ids=torch.full((1, 1), pad_id, device=device))
                continue
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            last = last + 1
            logits = forward(input_ids=sampled[:, None], attention_mask=mask, position_ids=last[:, None],
                             use_cache=True, **cached).logits[:, -1].float()
    if streamer is not None:
        streamer.end()
    stop_set = set(stop_ids)
    return [Completion(tuple(t), bool(t) and t[-1] in stop_set, lp) for t, lp in zip(tokens, logps)]


def left_padded(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows left-padded to `width` (every row's next token at the same column) and their attention mask."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def next_tokens(logits: torch.Tensor, *, temperature: float, top_p_warper, rng: torch.Generator,
                place: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token a row, greedy at temperature 0, else drawn by inverse CDF (one uniform a row from `rng`)
    from the logits warped by temperature and top-p; and its log-prob under the unwarped logits. `place`:
    each row's place in its sequences' order, which the uniforms are drawn in (rows are reordered as
    sequences finish; a sequence's draws stay those of the order it was started in).
    The probabilities are exp(logits - logsumexp(logits)) as computed since the loop was written: computed
    otherwise (exp(logits - max), one pass fewer), they differ in the last bits and flipped one draw in
    16,384 of make paper's seed-1 samples, whose published figures stand on those draws."""
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    if temperature == 0:
        sampled = logits.argmax(dim=-1)
    else:
        scores = logits / temperature if temperature != 1.0 else logits
        if top_p_warper is not None:
            scores = top_p_warper(None, scores)
        probs = torch.softmax(scores, dim=-1) if scores is not logits else (logits - log_norm).exp()
        u = torch.rand((len(logits), 1), generator=rng, device=logits.device, dtype=torch.float64)
        u = u if place is None else u[place]
        sampled = inverse_cdf(probs, u)
    return sampled, (logits.gather(1, sampled[:, None]) - log_norm).squeeze(1).double()


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The token of each row whose cumulative probability first exceeds `u` (rows × 1, uniform in [0, 1))
    times the row's total: an exact draw from `probs` (rows × vocab, unnormalised is fine), never a
    zero-probability token. In two levels, blocks of `block` tokens then tokens within the chosen block,
    since a cumulative sum over the whole vocabulary costs as much as a forward step's sampling."""
    rows, vocab = probs.shape
    if vocab % block:
        probs = torch.nn.functional.pad(probs, (0, block - vocab % block))
    blocks = probs.reshape(rows, -1, block)
    mass = block_sums(blocks)  # rows × blocks
    upto = mass.cumsum(dim=-1)
    target = u * upto[:, -1:]
    b = torch.searchsorted(upto, target, right=True).clamp_(max=mass.shape[1] - 1)  # rows × 1
    inside = blocks[torch.arange(rows, device=probs.device), b.squeeze(1)]  # rows × block
    within = torch.searchsorted(inside.double().cumsum(dim=-1), target - (upto.gather(1, b) - mass.gather(1, b)),
                                right=True)
    # rounding may put the target past the block's own sum: its last token with mass, then
    last = (torch.arange(block, device=probs.device) * (inside > 0)).argmax(dim=-1, keepdim=True)
    return (b * block + torch.minimum(within, last)).squeeze(1)


def language_model(model):
    """The transformers causal LM that generates: the model, or the one inside a `CompletionLogProbs`
    wrapper (which has `lm_forward`), either unwrapped from PEFT by `logps.causal_lm`."""
    return causal_lm(model.model if hasattr(model, "lm_forward") else model)


def block_sums(blocks: torch.Tensor) -> torch.Tensor:
    """[rows, blocks, block] → [rows, blocks] float64 sums; on a CPU 16 rows at a time: the same sums bit for
    bit as one reduction of the whole batch, which took 18.5 ms for 128 rows × 49,152 tokens against 1.0
    (2-core AMD EPYC, 2026-12-08). Other devices reduce the whole batch at once, as before."""
    if blocks.device.type != "cpu":
        return blocks.sum(dim=-1, dtype=torch.float64)
    return torch.cat([chunk.sum(dim=-1, dtype=torch.float64) for chunk in blocks.split(16)])


def cache_argument(model) -> str:
    """The name the causal LM's forward takes its KV cache by: `cache` in recent transformers releases,
    `past_key_values` before (a name it does not know would go into its **kwargs, unused and silently)."""
    import inspect

    return "cache" if "cache" in inspect.signature(language_model(model).forward).parameters else "past_key_values"


def _any_running(count: int, device) -> bool:
    """Whether any process of the group still has sequences running."""
    import torch.distributed as dist

    flag = torch.tensor([float(count > 0)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


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
    """`generate` on the live model. `synced`: every process of a sharded
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
