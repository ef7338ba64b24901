"""The reference model π_ref, behind one interface with four strategies.

- copy: a frozen copy of the starting policy, optionally in a lower precision.
- adapters: with LoRA, the policy itself with its adapters disabled (one copy of the weights).
- precomputed: reference log-probs of every pair computed once before training (with the policy at
  step 0, which is π_ref), cached on disk keyed by the reference weights, the token ids and the
  tokenization settings; no reference model in memory during training.
- none: reference-free objectives (SimPO).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpokit.data.layouts import Batch, collate
from dpokit.data.tokenize import TokenizedPair
from dpokit.logps import CompletionLogProbs, SequenceLogps, causal_lm


class Reference:
    """π_ref log-probs for a batch of the named split ("train" or "eval"); None when reference-free."""

    name = "none"

    def logps(self, batch: Batch, split: str) -> SequenceLogps | None:
        return None


class FrozenCopy(Reference):
    name = "copy"

    def __init__(self, policy: CompletionLogProbs, dtype: torch.dtype | None = None):
        self.module = copy.deepcopy(policy)
        if dtype is not None:
            self.module.to(dtype)
        self.module.eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: Batch, split: str) -> SequenceLogps:
        return self.module(batch)


class AdaptersDisabled(Reference):
    name = "adapters"

    def __init__(self, policy: CompletionLogProbs):
        self.module = policy  # the unwrapped module: DDP/FSDP hooks must not fire for reference passes

    @torch.no_grad()
    def logps(self, batch: Batch, split: str) -> SequenceLogps:
        with disabled_adapters(self.module):
            return self.module(batch)


class Precomputed(Reference):
    name = "precomputed"

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables  # split → [pairs, 2] float32: chosen, rejected

    def logps(self, batch: Batch, split: str) -> SequenceLogps:
        rows = self.tables[split].index_select(0, batch.pair_ids.cpu()).to(batch.target_seq.device)
        lengths = torch.bincount(batch.target_seq, minlength=2 * batch.num_pairs)
        n = batch.num_pairs
        return SequenceLogps(rows[:, 0], rows[:, 1], lengths[:n], lengths[n:])


@torch.no_grad()
def compute_table(module: CompletionLogProbs, pairs: list[TokenizedPair], *, layout: str, batch_pairs: int,
                  pad_id: int, device, runtime, autocast) -> torch.Tensor:
    """[pairs, 2] log-probs of `module` as the reference (LoRA adapters disabled); ranks share the work
    and all end with the whole table."""
    was_training = module.training
    module.eval()
    order = list(range(len(pairs)))
    mine = runtime.shard(order)
    out = torch.zeros(len(pairs), 2)
    for start in range(0, len(mine), batch_pairs):
        ids = mine[start:start + batch_pairs]
        batch = collate([pairs[i] for i in ids], ids, layout, pad_id).to(device)
        with autocast(), disabled_adapters(module):
            lp = module(batch)
        out[ids, 0], out[ids, 1] = lp.chosen.float().cpu(), lp.rejected.float().cpu()
    module.train(was_training)
    if runtime.distributed:  # each rank filled its own rows, the others are zero
        out = runtime.all_reduce_sum(out.to(device)).cpu()
    return out


def weights_fingerprint(model) -> str:
    """Hash of the reference weights: a LoRA policy's base weights, or the whole model."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in sorted(causal_lm(model).state_dict().items()):
        if "lora_" in name:
            continue
        t = p.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(pairs: list[TokenizedPair]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    return h.hexdigest()


class ReferenceCache:
    """Precomputed tables on disk: one safetensors file per (weights, data, settings) key."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory).expanduser()

    @staticmethod
    def key(weights: str, data: str, settings: dict) -> str:
        raw = json.dumps({"weights": weights, "data": data, "settings": settings}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        p = self.path(key)
        return load_file(p)["logps"] if p.is_file() else None

    def put(self, key: str, table: torch.Tensor, meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path(key).with_suffix(".tmp")
        save_file({"logps": table.contiguous()}, str(tmp), metadata={k: str(v) for k, v in meta.items()})
        tmp.replace(self.path(key))


def resolve_strategy(requested: str, *, needs_reference: bool, lora: bool) -> str:
    if not needs_reference:
        return "none"
    if requested == "auto":
        return "adapters" if lora else "copy"
    return requested


def disabled_adapters(module: CompletionLogProbs):
    """Context where a LoRA policy computes as its base model (a no-op for full fine-tuning)."""
    model = module.model
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
