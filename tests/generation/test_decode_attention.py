"""A decode step's attention on a CPU in bf16: SDPA's result without its kernel, and only while generating."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dpokit import attention
from dpokit.generation import decode_attention as decode_attention_module
from dpokit.generation.backends import generate
from dpokit.generation.decode_attention import NAME, applies, decode_attention, decode_attention_for
from dpokit.generation.kv_cache import preallocated_cache
from dpokit.logps import CompletionLogProbs
from tests.helpers import tiny_llama

MODULE = SimpleNamespace(training=False, num_key_value_groups=3, is_causal=True, layer_idx=0)


def decode_step(dtype, seed=0, rows=4, filled=7, capacity=12):
    """One query a row for 6 heads against the KV cache's keys and values for 2 (grouped-query attention):
    `filled` of its `capacity` positions, the first rows left-padded by 0, 1, 2, ... positions."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, 6, 1, 16, generator=g).to(dtype)
    cache = preallocated_cache(capacity)
    k, v = cache.update(*(torch.randn(rows, 2, filled, 16, generator=g).to(dtype) for _ in range(2)), 0)
    mask = torch.ones(rows, 1, 1, filled, dtype=torch.bool)
    for r in range(rows):
        mask[r, :, :, :r] = False
    return q, k, v, mask, cache


def by_hand(q, k, v, mask):
    """Attention written out in float64, each query head on key/value head head // groups."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = (q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [rows, 1, heads, d]


@pytest.fixture
def any_rows(monkeypatch):
    monkeypatch.setattr(decode_attention_module, "MIN_ROWS", 1)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 3e-2)])
def test_one_query_a_row_attends_to_its_filled_unpadded_positions(any_rows, dtype, tolerance):
    q, k, v, mask, cache = decode_step(dtype)
    out, _ = decode_attention(MODULE, q, k, v, mask, dpokit_kv_cache=cache)
    assert out.shape == (4, 1, 6, 16) and out.dtype == dtype
    exact = by_hand(q, k, v, mask)
    assert (out.double() - exact).abs().max() < tolerance
    sdpa, _ = sdpa_attention_forward(MODULE, q, k, v, mask)
    assert (sdpa.double() - exact).abs().max() < tolerance  # the kernel it replaces, to the same tolerance
    out, _ = decode_attention(MODULE, q, k, v, None, dpokit_kv_cache=cache)  # no padding: every filled position
    assert (out.double() - by_hand(q, k, v, torch.ones_like(mask))).abs().max() < tolerance


def test_a_prefill_a_few_rows_or_no_cache_are_sdpa_itself(any_rows, monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 6, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g), \
        torch.randn(2, 2, 5, 16, generator=g)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    assert torch.equal(decode_attention(MODULE, q, k, v, mask)[0], sdpa_attention_forward(MODULE, q, k, v, mask)[0])
    q, k, v, mask, cache = decode_step(torch.float32)
    sdpa = sdpa_attention_forward(MODULE, q, k, v, mask)[0]
    assert torch.equal(decode_attention(MODULE, q, k, v, mask)[0], sdpa)
    with pytest.raises(ValueError, match="softcap"):  # Gemma 2's soft-capping: SDPA refuses it, and so here
        decode_attention(MODULE, q, k, v, mask, dpokit_kv_cache=cache, softcap=50.0)
    monkeypatch.setattr(decode_attention_module, "MIN_ROWS", 5)  # 4 rows: SDPA's kernel is as fast
    assert torch.equal(decode_attention(MODULE, q, k, v, mask, dpokit_kv_cache=cache)[0], sdpa)


@pytest.fixture
def without_amx(monkeypatch):
    """As on the CPUs where this attention applies (on an AMX CPU, SDPA's kernel is the faster one)."""
    monkeypatch.setattr(decode_attention_module, "sdpa_has_amx", lambda: False)


def test_switched_in_only_for_bf16_cpu_models_and_restored(without_amx):
    bf16 = tiny_llama(vocab_size=300).to(torch.bfloat16)
    fp32 = tiny_llama(vocab_size=300)
    assert applies(bf16) and not applies(fp32)
    for model, inside in [(bf16, NAME), (fp32, "sdpa")]:
        with decode_attention_for(model, "the cache") as kwargs:
            assert model.config._attn_implementation == inside
            assert kwargs == ({"dpokit_kv_cache": "the cache"} if inside == NAME else {})
        assert model.config._attn_implementation == "sdpa"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed training's generation (online DPO, PPO)
        assert applies(fp32)
    bf16.set_attn_implementation(attention.NAME)  # a policy in training, with packed rows
    with pytest.raises(KeyError), decode_attention_for(bf16, None):
        raise KeyError
    assert bf16.config._attn_implementation == attention.NAME


def test_bf16_generation_draws_what_sdpa_would(monkeypatch, without_amx, any_rows):
    """The same greedy tokens, and log-probs to bf16's precision, as with SDPA's decode step, rows finishing
    early (moved in the cache) included: the tiny model's logits move by rounding, not by a wrong mask or head."""
    from dpokit.generation import backends

    model = tiny_llama(vocab_size=300, seed=3).to(torch.bfloat16)
    prompts = [[5, 9, 17, 4], [3, 8, 1], [3, 8, 1], [7], [11, 12]]  # left-padded rows, and a repeated prompt
    kwargs = dict(temperature=0.0, top_p=1.0, max_new_tokens=8, pad_id=0, seed=0)
    with monkeypatch.context() as m:
        m.setattr(backends, "decode_attention_for", lambda lm, cache: contextlib.nullcontext({}))
        unstopped = generate(model, prompts, stop_ids=[299], **kwargs)
        stop = unstopped[0].ids[2]  # the first row stops at its third token
        plain = generate(model, prompts, stop_ids=[stop], **kwargs)
    assert 1 <= sum(c.finished for c in plain) < len(prompts)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    fast = generate(CompletionLogProbs(model), prompts, stop_ids=[stop], **kwargs)  # as the trainer's policy does
    assert len(calls) == 2  # the prefill's, one a layer; none in the decode steps
    assert [c.ids for c in fast] == [c.ids for c in plain]
    assert [c.logp for c in fast] == pytest.approx([c.logp for c in plain], abs=0.05)


def test_compiled_layers_and_amx_keep_sdpa(monkeypatch, without_amx):
    """Switching the implementation would recompile a compiled layer at every generation call; with AMX,
    SDPA's kernel is the faster one."""
    model = tiny_llama(vocab_size=300).to(torch.bfloat16)
    assert applies(model)
    monkeypatch.setattr(decode_attention_module, "sdpa_has_amx", lambda: True)
    assert not applies(model)
    monkeypatch.setattr(decode_attention_module, "sdpa_has_amx", lambda: False)
    model.model.layers[0].compile()  # lazily: nothing is compiled until it runs
    assert not applies(model)
    assert not applies(torch.nn.Linear(4, 4, dtype=torch.bfloat16))  # not a transformers model
