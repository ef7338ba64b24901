"""The packed-row attention kernel: each query span attends causally, bottom-right aligned, to its own keys."""

from types import SimpleNamespace

import pytest
import torch

from dpokit.attention import segment_attention
from dpokit.data.layouts import Segments

# plain packing: spans of 5 and 3 tokens; prefix sharing: a 3-token prompt, a 2-token chosen span, a 3-token
# rejected span that attends to the prompt and itself (positions 0-2 and 5-7)
PACKED = Segments([0, 5, 8], [0, 5, 8])
PREFIX_SHARED = Segments([0, 3, 5, 8], [0, 3, 8, 14], torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7]))
MODULE = SimpleNamespace(training=False)


def qkv(seed=0):
    """Queries of 4 heads, keys and values of 2 (grouped-query attention), over a row of 8 positions."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 16, generator=g), torch.randn(1, 2, 8, 16, generator=g), torch.randn(1, 2, 8, 16,
                                                                                                     generator=g)


def by_hand(q, k, v, segments):
    """Each query span against its keys with an explicit bottom-right causal mask, in float64."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    index = segments.key_index if segments.key_index is not None else torch.arange(q.shape[2])
    out = []
    for i in range(len(segments.cu_q) - 1):
        qs = q.double()[:, :, segments.cu_q[i]:segments.cu_q[i + 1]]
        keys = index[segments.cu_k[i]:segments.cu_k[i + 1]]
        ks, vs = k[:, :, keys], v[:, :, keys]
        lq, lk = qs.shape[2], ks.shape[2]
        scores = qs @ ks.transpose(-1, -2) / qs.shape[-1] ** 0.5
        scores = scores.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq), float("-inf"))
        out.append(scores.softmax(-1) @ vs)
    return torch.cat(out, 2).transpose(1, 2)


@pytest.mark.parametrize("segments", [PACKED, PREFIX_SHARED], ids=["packed", "prefix_shared"])
def test_each_span_attends_causally_to_its_own_keys(segments):
    q, k, v = qkv()
    out, _ = segment_attention(MODULE, q, k, v, None, dpokit_segments=segments)
    assert out.shape == (1, 8, 4, 16)
    assert torch.allclose(out.double(), by_hand(q, k, v, segments), atol=1e-5)
