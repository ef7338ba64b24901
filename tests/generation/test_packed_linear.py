"""bf16 linear layers on packed oneDNN weights during generation: the same outputs, packed once per weight."""

from __future__ import annotations

import pytest
import torch

from dpokit.generation.packed_linear import packable, packed_linears
from tests.helpers import tiny_llama

needs_bf16 = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                 reason="this CPU's oneDNN has no bf16 kernels")


@needs_bf16
def test_bf16_logits_are_unchanged_and_the_layers_restored():
    model = tiny_llama(vocab_size=300).to(torch.bfloat16)
    ids = torch.tensor([[5, 9, 17, 4], [3, 3, 8, 1]])
    with torch.no_grad():
        plain = model(ids).logits
        with packed_linears(model):
            assert all("forward" in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))
            packed = model(ids).logits
    assert torch.equal(packed, plain)
    assert not any("forward" in m.__dict__ for m in model.modules())


@needs_bf16
def test_each_context_packs_the_weights_as_they_are_then():
    layer = torch.nn.Linear(16, 8, dtype=torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        with packed_linears(layer):
            before = layer(x)
        layer.weight.mul_(2)  # an optimizer step between two generation calls
        with packed_linears(layer):
            after = layer(x)
    assert torch.equal(after, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert not torch.equal(after, before)


def test_other_dtypes_and_gradients_are_left_alone():
    fp32 = torch.nn.Linear(16, 8)
    assert not packable(fp32)
    bf16 = torch.nn.Linear(16, 8, dtype=torch.bfloat16)
    with packed_linears(bf16):  # gradients on (training): the plain layer, which autograd differentiates
        assert "forward" not in bf16.__dict__


@needs_bf16
def test_contexts_nest_the_inner_one_packs_nothing(monkeypatch):
    """A sampler packs once around its generation calls, each of which opens the context again."""
    from dpokit.generation import packed_linear

    packed = []
    monkeypatch.setattr(packed_linear, "packed_weight", lambda m: packed.append(m) or
                        torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 128))
    layer = torch.nn.Linear(16, 8, dtype=torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad(), packed_linears(layer):
        outer = vars(layer)["forward"]
        for _ in range(3):
            with packed_linears(layer):
                assert vars(layer)["forward"] is outer and torch.equal(layer(x), torch.nn.functional.linear(
                    x, layer.weight, layer.bias))
        assert vars(layer)["forward"] is outer  # the inner contexts leave the outer packing in place
    assert len(packed) == 1 and "forward" not in vars(layer)


@needs_bf16
def test_under_autocast_fp32_layers_run_on_packed_bf16_copies_with_autocast_s_results():
    """bf16-mixed training's rollouts: the same logits as autocast's own casts, the fp32 weights untouched."""
    model = tiny_llama(vocab_size=300)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 9, 17, 4], [3, 3, 8, 1]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(ids).logits
        with packed_linears(model):
            assert all("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.Linear))
            packed = model(ids).logits
    assert packed.dtype == plain.dtype == torch.bfloat16 and torch.equal(packed, plain)
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(torch.equal(v, weights[k]) and v.dtype == torch.float32 for k, v in model.state_dict().items())
    with torch.no_grad(), packed_linears(model):  # fp32 without autocast: left alone
        assert not any("forward" in vars(m) for m in model.modules())
