"""bf16 linear layers on a CPU, their weights packed once for oneDNN instead of at every call.

`torch.nn.functional.linear` in bf16 on a CPU goes through oneDNN, which reorders the weight into its
blocked (AMX) layout at every call: in a decode step of 128 rows that reorder is a large part of each
product. `packed_linears(model)` reorders each `nn.Linear`'s weight once (`mkldnn._reorder_linear_weight`,
what inductor's freezing pass does) and runs the layers on it (`mkldnn._linear_pointwise`) while the
context is open. Measured on a 2-core Xeon with AMX (2026-12-07), 128 rows: the 576 × 49,152 output layer
10.9 → 6.3 ms, a 576 → 1,536 projection 0.24 → 0.19 ms; outputs bit-identical to `F.linear` (the same
oneDNN kernel, fed a packed weight). Under CPU autocast to bf16 (the rollouts of online DPO and PPO in
bf16-mixed training) each call also casts the fp32 weight to bf16: there the bf16 copy is made and packed
once, with autocast's results bit for bit. On a 2-core AMD EPYC with AVX512-BF16 (2026-12-08), `make demo`'s
1,024 completions drawn under autocast in 8 calls, alternated: 35.1 → 32.4 s (−8%), the same samples.
The packed copies live only while the context is open: packing the embedded model's 211 layers takes
0.16 s, and kept for as long as the model lives they would double its weights' memory. A generation call
opens it; a sampler opens it around all of its calls (the contexts nest: an inner one packs nothing), where
the packed copies are in memory during each call anyway.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

_BATCH_HINT = 128  # rows the packing is tuned for (any number runs)


def packable(module: torch.nn.Module) -> bool:
    """A plain `nn.Linear` (not a quantized or sharded one) on a CPU whose oneDNN has bf16, whose products run
    in bf16: a bf16 weight, or an fp32 one under CPU autocast to bf16 (bf16-mixed training's rollouts)."""
    if type(module) is not torch.nn.Linear:
        return False
    w = module.weight
    return (type(w) in (torch.Tensor, torch.nn.Parameter) and w.device.type == "cpu"
            and (w.dtype == torch.bfloat16 or (w.dtype == torch.float32 and autocast_to_bf16()))
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_to_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def packed_weight(module: torch.nn.Linear) -> torch.Tensor:
    """The module's weight in bf16 and oneDNN's layout."""
    return torch.ops.mkldnn._reorder_linear_weight(module.weight.detach().to(torch.bfloat16), _BATCH_HINT)


def _packed_forward(module: torch.nn.Linear, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    bias = module.bias.detach().to(torch.bfloat16) if module.bias is not None else None
    if module.weight.dtype != torch.bfloat16:  # an fp32 layer packed under autocast: its input cast as autocast would
        x = x.to(torch.bfloat16)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@contextmanager
def packed_linears(model: torch.nn.Module):
    """Inside: the model's bf16 CPU linear layers run on packed weights (no gradients flow through them:
    for generation, under `torch.no_grad`); opened under CPU autocast to bf16, its fp32 ones too, on bf16
    copies packed once instead of cast at every call. Elsewhere, and for other dtypes or devices, nothing
    changes."""
    # a layer whose forward is already replaced is packed by an enclosing context (or wrapped by something else)
    linears = [m for m in model.modules() if packable(m) and "forward" not in vars(m)] \
        if not torch.is_grad_enabled() else []
    for m in linears:
        m.forward = partial(_packed_forward, m, packed_weight(m))
    try:
        yield
    finally:
        for m in linears:
            del m.forward  # the class's forward again
