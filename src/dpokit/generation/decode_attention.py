"""Attention of a decode step (one new token a row against its KV cache) on a CPU in bf16 or fp16,
registered with transformers as the `dpokit_decode` implementation while a generation call runs.

PyTorch's CPU SDPA kernel is a flash-attention kernel tiled for long queries; on a CPU without AMX its
bf16 call at a decode step's shapes (128 rows, 3 key/value heads of 3 query heads each, 40-60 cached
positions) took 1.5 ms a layer, 19% of a bf16 generation call of the embedded model (profiled 2026-12-08,
2-core AMD EPYC with AVX512-BF16). Here the step is computed as transformers' eager attention computes it
(scores by a bf16 product, softmax in fp32, the weights in bf16 times the values), on SDPA's layout for
grouped-query heads (each key/value head's query heads as its rows, so keys and values are not repeated),
over the KV cache's whole buffers: 1.2-2.3x SDPA's speed from 32 rows up, slower below (0.6-0.9x at 8 rows),
so fewer rows keep SDPA. make demo's 1,024 bf16 completions: 35.5 -> 30.0 s of generation. Its results
differ from SDPA's in the last bits of bf16: the weights are rounded to bf16 before the product with the
values, as in eager attention.

With AMX, SDPA's kernel runs its bf16 products on AMX tiles: on the AMX Xeon (2026-12-07) an earlier
hand-written decode attention took 1.37 ms a layer against its 0.63, so SDPA stays there. Everything else
keeps SDPA too: the prefill (more than one query a row), fp32 (whose draws the published figures stand on;
there a variant saved 7% of a call), GPUs, models whose attention is not SDPA, and compiled layers.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dpokit import attention

NAME = "dpokit_decode"
# implementations whose decode step this one replaces: SDPA, and dpokit's packed-row attention, which
# runs SDPA on a padded (generation) batch
REPLACES = ("sdpa", attention.NAME)
MIN_ROWS = 32  # below, SDPA's kernel is as fast or faster (measured: see the module's docstring)


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     dpokit_kv_cache=None, **kwargs):
    """query [rows, heads, 1, d] against the decode loop's KV cache (`dpokit_kv_cache`, whose layer
    `module.layer_idx` holds `key` and `value` as its first positions) → ([rows, 1, heads, d], None);
    anything else (a prefill, a few rows, no such cache) goes to SDPA."""
    rows, heads, length, dim = query.shape
    # a position bias, logit soft-capping or attention sinks are not computed here: SDPA's path has (or refuses) them
    special = any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux", "sinks"))
    if length != 1 or rows < MIN_ROWS or dpokit_kv_cache is None or special or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # the products run over the cache's whole contiguous buffers: its filled positions are a strided view, which
    # batched products would copy at every layer and step (the copies cost more than the positions past them)
    keys, values = dpokit_kv_cache.layers[module.layer_idx].buffers()
    filled = key.shape[2]
    q = query.reshape(rows, keys.shape[1], heads // keys.shape[1], dim)  # query head h uses key/value head h // groups
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * (scaling if scaling is not None else dim ** -0.5)
    scores[..., filled:] = float("-inf")
    seen = scores[..., :filled]
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # [rows, 1, 1, filled]: True if attended
        seen.masked_fill_(~attention_mask, float("-inf"))
    elif attention_mask is not None:  # additive: 0 where attended
        seen.add_(attention_mask)
    out = torch.matmul(scores.softmax(dim=-1).to(values.dtype), values)  # [rows, kv_heads, groups, d]
    return out.reshape(rows, 1, heads, dim), None


def applies(lm) -> bool:
    """Whether the causal LM's decode steps would use this attention: on a CPU without AMX, in bf16 or fp16
    (its weights, or autocast's), with SDPA, and no layer compiled (switching the implementation would
    recompile it)."""
    weight, config = next(lm.parameters(), None), getattr(lm, "config", None)
    if weight is None or weight.device.type != "cpu" or getattr(config, "_attn_implementation", None) not in REPLACES:
        return False
    low = (torch.bfloat16, torch.float16)
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low
    return ((weight.dtype in low or autocast) and not sdpa_has_amx()
            and not any(getattr(m, "_compiled_call_impl", None) is not None for m in lm.modules()))


def sdpa_has_amx() -> bool:
    """Whether this CPU has AMX, on which SDPA's kernel runs its bf16 products (oneDNN's brgemm)."""
    return torch.cpu._is_amx_tile_supported()


@contextmanager
def decode_attention_for(lm, cache):
    """Inside: the causal LM's decode steps over `cache` (a `kv_cache.preallocated_cache`) run
    `decode_attention` where it `applies`. Yields the keyword arguments its forward passes take for it
    (none where it does not apply, and nothing changes)."""
    if not applies(lm):
        yield {}
        return
    previous = lm.config._attn_implementation
    lm.set_attn_implementation(NAME)
    try:
        yield {"dpokit_kv_cache": cache}
    finally:
        lm.set_attn_implementation(previous)


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the padding mask SDPA reads, which the prefill still runs
