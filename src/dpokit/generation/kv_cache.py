"""The KV cache of dpokit's decode loop: transformers' `Cache`, each layer's keys and values written in
place into a buffer allocated once for the whole generation (prompt width + `max_new_tokens` positions).

transformers' `DynamicCache` grows by `torch.cat`, copying every layer's whole cache at every step: with
128 rows of the demo's prompts that was 137 ms of a 480 ms fp32 decode step on a 2-core CPU (profiled
2026-12-07). Here a step writes one position a layer and attention reads a view of the filled part, the
same values in the same layout along the sequence, so the logits, and the samples drawn from them, are
bit-identical to `DynamicCache`'s (tests/generation/test_kv_cache.py)."""

from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One decoder layer's keys and values, `capacity` positions allocated at the first update.

    `keys` and `values` are views of the filled positions (what attention reads); `buffers()` are the whole
    allocation, zeros past the positions ever filled, so that a product over all of it adds nothing there
    and never meets an uninitialised NaN (`decode_attention`)."""

    def __init__(self, capacity: int, **kwargs):
        super().__init__(**kwargs)
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        rows, heads, _, _ = key_states.shape
        self._keys = key_states.new_zeros((rows, heads, self.capacity, key_states.shape[-1]))
        self._values = value_states.new_zeros((rows, heads, self.capacity, value_states.shape[-1]))
        self.is_initialized = True
        self._views()

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[rows, heads, capacity, d] keys and values, contiguous: the first `length` positions filled."""
        return self._keys, self._values

    def _views(self) -> None:
        self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} positions asked of {self.capacity}")
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices`, in that order (a prompt's prefill copied to its samples' rows)."""
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._views()

    def move_rows(self, source: torch.Tensor, target: torch.Tensor, rows: int) -> None:
        """Rows `source` (all ≥ `rows`) overwrite rows `target` (all < `rows`), then the batch is cut to its
        first `rows`: only the moved rows' filled positions are copied, not the whole cache."""
        if self.is_initialized:
            if len(source):
                self._keys[target, :, :self.length] = self._keys[source, :, :self.length]
                self._values[target, :, :self.length] = self._values[source, :, :self.length]
            self._keys, self._values = self._keys[:rows], self._values[:rows]
            self._views()


def drop_finished(cache: Cache, running: torch.Tensor) -> torch.Tensor:
    """Drop the finished rows of every layer in place: the running rows past the new batch size fill the
    finished rows' places. Selecting the running rows in order (`batch_select_indices`) copies the whole
    cache at every step a row finishes: 9% of a bf16 call at 128 rows, profiled 2026-12-07. Returns `order`,
    the old row of each new row (the batch's other tensors follow it)."""
    rows = int(running.sum())
    order = torch.arange(len(running), device=running.device)
    target = (~running[:rows]).nonzero().squeeze(1)
    source = running[rows:].nonzero().squeeze(1) + rows
    order[target] = source
    for layer in cache.layers:
        layer.move_rows(source, target, rows)
    return order[:rows]


def preallocated_cache(capacity: int) -> Cache:
    """A cache whose every layer holds up to `capacity` positions."""
    return Cache(layer_class_to_replicate=partial(PreallocatedLayer, capacity))  # a layer made at its first update
