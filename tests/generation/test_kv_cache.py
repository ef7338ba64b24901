"""The decode loop's preallocated KV cache: the logits of transformers' growing `DynamicCache`, bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from dpokit.generation.kv_cache import drop_finished, preallocated_cache
from tests.helpers import tiny_llama


def _decode(model, cache, steps: int = 3) -> list[torch.Tensor]:
    """Left-padded prefill of three rows, a row dropped after the first step, then one token a step."""
    ids = torch.tensor([[2, 2, 5, 9], [7, 8, 9, 10], [2, 4, 4, 6]])
    mask = (ids != 2).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = [model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                     use_cache=True).logits[:, -1]]
        last = positions[:, -1]
        for step in range(steps):
            token = out[-1].argmax(-1)
            if step == 1:  # the second row has finished: it leaves the batch and the cache
                keep = torch.tensor([0, 2])
                cache.batch_select_indices(keep)
                token, mask, last = token[keep], mask[keep], last[keep]
            mask, last = torch.cat([mask, mask.new_ones((len(token), 1))], 1), last + 1
            out.append(model(input_ids=token[:, None], attention_mask=mask, position_ids=last[:, None],
                             past_key_values=cache, use_cache=True).logits[:, -1])
    return out


def test_logits_are_the_dynamic_cache_s_exactly():
    model = tiny_llama(vocab_size=64)
    ours, theirs = _decode(model, preallocated_cache(4 + 3)), _decode(model, DynamicCache())
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert ours[-1].shape == (2, 64)


def test_a_cache_asked_past_its_capacity_says_so():
    with pytest.raises(RuntimeError, match="KV cache full: 7 positions asked of 6"):
        _decode(tiny_llama(vocab_size=64), preallocated_cache(6))


def test_finished_rows_are_dropped_by_moving_the_last_running_rows_into_their_places():
    model = tiny_llama(vocab_size=64)
    ids = torch.arange(5 * 3).reshape(5, 3) % 60 + 3
    with torch.no_grad():
        ours, theirs = preallocated_cache(6), DynamicCache()
        for cache in (ours, theirs):
            model(input_ids=ids, past_key_values=cache, use_cache=True)
    order = drop_finished(ours, torch.tensor([True, False, True, False, True]))
    assert order.tolist() == [0, 4, 2]  # row 4 fills row 1's place; row 3 had finished too
    theirs.batch_select_indices(order)
    for a, b in zip(ours.layers, theirs.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and a.keys.shape[0] == 3
    assert drop_finished(ours, torch.tensor([True, True, True])).tolist() == [0, 1, 2]


def test_the_whole_buffers_hold_zeros_past_the_filled_positions():
    """What a product over the whole allocation (`decode_attention`) relies on: nothing past the filled
    positions, after the prefill, its copies to the samples' rows and rows moved."""
    model = tiny_llama(vocab_size=64)
    with torch.no_grad():
        cache = preallocated_cache(9)
        model(input_ids=torch.tensor([[5, 6, 7], [8, 9, 10]]), past_key_values=cache, use_cache=True)
        cache.batch_select_indices(torch.tensor([0, 0, 1, 1]))
        drop_finished(cache, torch.tensor([False, True, True, True]))
    for layer in cache.layers:
        keys, values = layer.buffers()
        assert keys.shape == values.shape == (3, 2, 9, 8) and keys.is_contiguous() and values.is_contiguous()
        assert torch.equal(keys[:, :, :3], layer.keys) and torch.equal(values[:, :, :3], layer.values)
        assert not keys[:, :, 3:].any() and not values[:, :, 3:].any()
