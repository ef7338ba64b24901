"""Model + batch → summed completion log-probs per sequence.

`log π(y|x) = Σ_t log softmax(W h_t)[y_t]` over completion tokens only. The selective LM head
projects only the hidden states that predict a completion token, in chunks, so the
[batch, seq, vocab] logits never exist; in training each chunk's logits are recomputed in the backward
pass instead of being kept. `lm_head="full"` is the plain path (all logits, as TRL does) kept for
comparison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpokit import attention
from dpokit.data.layouts import Batch, collate
from dpokit.data.tokenize import TokenizedPair


@dataclass
class SequenceLogps:
    """Summed completion log-probs and completion lengths, per pair."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    # Σ_t log(1 - π(y_t | x, y_<t)) of the rejected completions, for the unlikelihood objective (when asked)
    rejected_unlikely: torch.Tensor | None = None
    # WPO's log-weights (1/|y|) Σ_t [log π(y_t|·) - log Σ_v π(v|·)²], detached (when asked)
    chosen_wpo: torch.Tensor | None = None
    rejected_wpo: torch.Tensor | None = None

    def detach(self) -> SequenceLogps:
        return SequenceLogps(self.chosen.detach(), self.rejected.detach(), self.chosen_lengths, self.rejected_lengths)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class CompletionLogProbs(nn.Module):
    """Wraps a causal LM so that `forward(batch)` returns completion log-probs: the module DDP or FSDP wrap."""

    def __init__(self, model: nn.Module, *, lm_head: str = "selective", chunk_tokens: int = 512,
                 unlikelihood: bool = False, ld_alpha: float | None = None, wpo: bool = False):
        super().__init__()
        if lm_head not in ("selective", "full"):
            raise ValueError(f"lm_head must be selective or full, got {lm_head!r}")
        self.model = model
        self.lm_head = lm_head
        self.chunk_tokens = chunk_tokens
        self.unlikelihood = unlikelihood  # also sum log(1 - p) over the rejected tokens
        self.ld_alpha = ld_alpha  # LD-DPO: weight of the tokens past the shorter completion's length
        self.wpo = wpo  # also WPO's per-sequence log-weights
        self._scale, self._softcap = _logit_transform(causal_lm(model).config)

    def lm_forward(self, **kwargs):
        """One plain forward of the causal LM (a step of `generation.backends.generate`), called on this
        module so that FSDP2, which shards it as the root, gathers the root's parameters around it
        (`distributed.shard_module` registers it, and `token_logps`, as forward methods)."""
        return self.model(**kwargs)

    def forward(self, batch: Batch) -> SequenceLogps:
        token_logps, log_sum_sq = self._token_outputs(batch)
        n = 2 * batch.num_pairs
        lengths = torch.bincount(batch.target_seq, minlength=n)
        weighted = token_logps if self.ld_alpha is None else token_logps * ld_weights(batch, lengths, self.ld_alpha)
        sums = torch.zeros(n, dtype=torch.float32, device=token_logps.device).index_add(0, batch.target_seq, weighted)
        out = SequenceLogps(sums[: n // 2], sums[n // 2:], lengths[: n // 2], lengths[n // 2:])
        if self.unlikelihood:
            # log(1 - p), with p kept below 1 so a certain token costs a large but finite penalty
            unlikely = torch.log1p(-token_logps.exp().clamp(max=1 - 1e-5))
            out.rejected_unlikely = torch.zeros_like(sums).index_add(0, batch.target_seq, unlikely)[n // 2:]
        if log_sum_sq is not None:
            aligned = torch.zeros_like(sums).index_add(0, batch.target_seq, token_logps.detach() - log_sum_sq)
            wpo = aligned / lengths.clamp(min=1)
            out.chosen_wpo, out.rejected_wpo = wpo[: n // 2], wpo[n // 2:]
        return out

    def token_logps(self, batch: Batch) -> torch.Tensor:
        """log π(y_t | x, y_<t) of every completion token, in the batch's target order (`batch.target_seq`
        says whose token each one is): what per-token objectives and PPO need."""
        return self._token_outputs(batch, wpo=False)[0]

    def _token_outputs(self, batch: Batch, wpo: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`token_logps`, and with WPO the no-gradient log Σ_v π(v|·)² at the same positions."""
        wpo = self.wpo if wpo is None else wpo
        if self.lm_head == "full":
            logits = self.model(input_ids=batch.input_ids, **layout_inputs(self.model, batch)).logits
            logits = logits.flatten(0, 1)[batch.target_index].float()
            return _gather_logps(logits, batch.target_ids), (_log_sum_sq(logits.detach()) if wpo else None)
        hidden = self.completion_hidden(batch)
        return self.head_logps(hidden, batch.target_ids), (self.head_log_sum_sq(hidden) if wpo else None)

    def completion_hidden(self, batch: Batch) -> torch.Tensor:
        """[n, d] the trunk's last hidden state at every position that predicts a completion token, in
        target order: the LM head's input (`head_logps`, `head_entropy`), and what a value head reads (PPO)."""
        return trunk_states(self.model, batch).index_select(0, batch.target_index)

    def head_logps(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[n] log softmax(W h)[y] of `completion_hidden`'s states, the LM head applied in chunks."""
        head = causal_lm(self.model).get_output_embeddings()
        return self._chunked_logps(hidden, head.weight, head.bias, targets)

    @torch.no_grad()
    def head_entropy(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n] entropy −Σ_v p_v log p_v of the next-token distribution at each of `completion_hidden`'s
        states (no gradient: a logged quantity), in chunks of `chunk_tokens`."""
        def entropy(logits):
            logp = logits.log_softmax(-1)
            return -(logp.exp() * logp).sum(-1)

        return self._head_statistic(hidden, entropy)

    @torch.no_grad()
    def head_log_sum_sq(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n] log Σ_v π(v|·)² at each of `completion_hidden`'s states (no gradient): WPO's alignment term."""
        return self._head_statistic(hidden, _log_sum_sq)

    def _head_statistic(self, hidden: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """fn of the logits at each state, over chunks of `chunk_tokens` states."""
        head = causal_lm(self.model).get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        out = []
        for start in range(0, hidden.shape[0], self.chunk_tokens):
            logits = _transformed_logits(hidden[start:start + self.chunk_tokens], weight, bias, self._scale,
                                         self._softcap)
            out.append(fn(logits))
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)

    def _chunked_logps(self, hidden, weight, bias, targets):
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: the root's parameters are already gathered in forward
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        chunks = []
        for start in range(0, hidden.shape[0], self.chunk_tokens):
            h = hidden[start:start + self.chunk_tokens]
            t = targets[start:start + self.chunk_tokens]
            if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
                # keep only the chunk's inputs; its logits are rebuilt in the backward pass
                chunks.append(checkpoint(_head_logps, h, weight, bias, t, self._scale, self._softcap,
                                         use_reentrant=False))
            else:
                chunks.append(_head_logps(h, weight, bias, t, self._scale, self._softcap))
        if not chunks:
            return hidden.new_zeros(0, dtype=torch.float32)
        return torch.cat(chunks)


def layout_inputs(model: nn.Module, batch: Batch) -> dict:
    """The keyword arguments of a transformers forward pass on `batch` in its layout: the padding mask, or
    the packed segments (which need dpokit's attention, `models.use_layout`)."""
    kwargs = {"position_ids": batch.position_ids, "use_cache": False}
    if batch.segments is not None:
        if causal_lm(model).config._attn_implementation != attention.NAME:
            raise RuntimeError("packed layouts need the model's attention set with dpokit.models.use_layout")
        kwargs["dpokit_segments"] = batch.segments
    else:
        kwargs["attention_mask"] = batch.attention_mask
    return kwargs


def trunk_states(model: nn.Module, batch: Batch) -> torch.Tensor:
    """[rows · width, d] the last hidden states of the model's trunk (no head) on `batch`, flattened so that
    the batch's flat indices (`target_index`, `last_index`) select from them."""
    lm = causal_lm(model)
    return lm.base_model(input_ids=batch.input_ids, **layout_inputs(model, batch)).last_hidden_state.flatten(0, 1)


@torch.no_grad()
def logps_table(module: CompletionLogProbs, pairs: Sequence[TokenizedPair], *, pad_id: int, batch_pairs: int,
                layout: str = "padded", runtime=None,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """[pairs, 2] float32: the summed completion log-probs of each pair's chosen and rejected sequence
    under `module`, in eval mode. A pair with an empty rejected side scores its chosen completion alone
    (its second column is 0). Under several processes (`runtime`) each rank computes its share of the
    pairs and every rank ends with the whole table."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    everything = list(range(len(pairs)))
    mine = runtime.shard(everything) if runtime is not None else everything
    out = torch.zeros(len(pairs), 2)
    for start in range(0, len(mine), batch_pairs):
        ids = mine[start:start + batch_pairs]
        batch = collate([pairs[i] for i in ids], ids, layout, pad_id).to(device)
        with autocast():
            lp = module(batch)
        out[ids, 0], out[ids, 1] = lp.chosen.float().cpu(), lp.rejected.float().cpu()
    module.train(was_training)
    if runtime is not None and runtime.distributed:  # each rank filled its own rows, the others are zero
        out = runtime.all_reduce_sum(out.to(runtime.device)).cpu()
    return out


def ld_weights(batch: Batch, lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """[n] LD-DPO's token weights (Liu et al. 2024): 1 for a completion's first min(|y_w|, |y_l|) tokens, the
    length its pair's completions share, and α past them. A sequence's targets are contiguous and in order
    in every layout, so a token's place in its completion is its index minus its sequence's first index."""
    n = lengths.numel()
    index = torch.arange(batch.target_seq.numel(), device=batch.target_seq.device)
    first = torch.full((n,), index.numel(), device=index.device).scatter_reduce(0, batch.target_seq, index, "amin")
    place = index - first[batch.target_seq]
    shared = torch.minimum(lengths[: n // 2], lengths[n // 2:]).repeat(2)
    ones = torch.ones_like(place, dtype=torch.float32)
    return torch.where(place < shared[batch.target_seq], ones, alpha * ones)


def _log_sum_sq(logits: torch.Tensor) -> torch.Tensor:
    # log Σ_v softmax(z)_v² = logsumexp(2z) - 2 logsumexp(z)
    return torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)


def _head_logps(hidden, weight, bias, targets, scale: float, softcap: float | None):
    return _gather_logps(_transformed_logits(hidden, weight, bias, scale, softcap), targets)


def _transformed_logits(hidden, weight, bias, scale: float, softcap: float | None) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _gather_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # log softmax at the target only: logit[y] - logsumexp(logits), without a [n, vocab] log-prob tensor
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _logit_transform(config) -> tuple[float, float | None]:
    """Scaling and soft-capping some families apply to the logits after the LM head."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)  # Cohere
    if scale is None and getattr(text, "logits_scaling", None):  # Granite divides
        scale = 1.0 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), softcap
