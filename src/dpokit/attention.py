"""Attention for packed rows, registered with transformers as the `dpokit_segments` implementation.

Every model family that dispatches attention through `transformers.AttentionInterface` (Llama, Qwen2,
Mistral, Gemma, GPT-2, ...) calls this function with its projected queries, keys and values; the
batch's `Segments` arrive as a keyword argument, so gradient checkpointing replays them too. Each
query span attends causally, aligned bottom-right, to its keys: for plain packing the span itself,
for prefix sharing the prompt followed by the rejected span. On CUDA with flash-attn installed this is
one variable-length kernel call in bf16/fp16 (its causal mask is bottom-right aligned); elsewhere one
SDPA call per span, so no row-wide mask is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dpokit.data.layouts import Segments

NAME = "dpokit_segments"

try:  # optional, GPU only
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      dpokit_segments: Segments | None = None, **kwargs):
    """query [1, heads, n, d], key/value [1, kv_heads, n, d] → ([1, n, heads, d], None)."""
    segments = dpokit_segments
    if segments is None:  # an ordinary padded batch (generation, say): plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed layouts hold all sequences in one row")
    window = kwargs.get("sliding_window")
    if window is not None and segments.max_k > window:
        raise NotImplementedError(f"a packed sequence of {segments.max_k} tokens exceeds the model's sliding window "
                                  f"({window}); use train.layout=padded")
    dropout = dropout if module.training else 0.0
    if query.is_cuda and flash_attn_varlen_func is not None and query.dtype in (torch.float16, torch.bfloat16):
        return _flash_varlen(query, key, value, segments, dropout, scaling), None

    groups = query.shape[1] // key.shape[1]
    # Every span's queries, keys and values are cut from the row in one operation each: a span's own slice or
    # index_select would take, in the backward pass, a zero-filled gradient the size of the whole row, then an
    # addition of it, for every span (measured: 0.4 s of a 22 s fp32 update of 8 pairs)
    q_sizes = [b - a for a, b in zip(segments.cu_q, segments.cu_q[1:])]
    if segments.key_index is None:
        keys, values = key.split(q_sizes, dim=2), value.split(q_sizes, dim=2)
    else:
        k_sizes = [b - a for a, b in zip(segments.cu_k, segments.cu_k[1:])]
        keys = key.index_select(2, segments.key_index).split(k_sizes, dim=2)
        values = value.index_select(2, segments.key_index).split(k_sizes, dim=2)
    outputs = []
    for q, k, v in zip(query.split(q_sizes, dim=2), keys, values):
        lq, lk = q.shape[2], k.shape[2]
        if lq == lk:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling,
                                               enable_gqa=groups > 1)
        else:  # bottom-right causal: query j sees keys up to j + (lk - lq)
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                               enable_gqa=groups > 1)
        outputs.append(o)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _flash_varlen(query, key, value, segments: Segments, dropout: float, scaling: float | None):
    q = query[0].transpose(0, 1)  # [n, heads, d]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    if segments.key_index is not None:
        k, v = k.index_select(0, segments.key_index), v.index_select(0, segments.key_index)
    cu_q = torch.tensor(segments.cu_q, dtype=torch.int32, device=q.device)
    cu_k = torch.tensor(segments.cu_k, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, segments.max_q, segments.max_k, dropout_p=dropout,
                                 softmax_scale=scaling, causal=True)
    return out.unsqueeze(0)


def segment_mask(*, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask transformers builds for this implementation: none for packed rows, which carry no padding
    mask (each span's causality is the kernel's own), SDPA's for a padded batch, which the SDPA fallback
    reads. Without it transformers builds no mask for an implementation it does not know, and the left
    padding of a generation batch would be attended to."""
    if attention_mask is None:
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


AttentionInterface.register(NAME, segment_attention)
AttentionMaskInterface.register(NAME, segment_mask)
