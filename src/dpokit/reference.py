"""The reference model π_ref, behind one interface with four strategies.

- copy: a frozen copy of the starting policy, optionally in a lower precision.
- adapters: with LoRA, the policy itself with its adapters disabled (one copy of the weights).
- precomputed: reference log-probs of every pair computed once before training (with the policy at
  step 0, which is π_ref), cached on disk keyed by the reference weights, the token ids and the
  tokenization settings; no reference model in memory during training.
- none: reference-free objectives (SimPO).

`reference.name` makes π_ref a model of its own instead of the policy's start (copy, or the source of the
precomputed log-probs): loaded like `model.name` (a LoRA adapter merged onto its base), after checking
that its tokenizer is the policy's, since it scores the policy's token ids.

`build` chooses and constructs the strategy; the trainer only calls `reference.logps(batch, split)`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpokit import models
from dpokit.data.dataset import PreparedData, settings_of
from dpokit.data.layouts import Batch
from dpokit.data.tokenize import TokenizedPair
from dpokit.distributed import Runtime, decoder_layer_classes, shard_module
from dpokit.errors import ModelError
from dpokit.logps import CompletionLogProbs, SequenceLogps, causal_lm, logps_table
from dpokit.models import torch_dtype


class Reference:
    """π_ref log-probs for a batch of the named split ("train" or "eval")."""

    name: str

    def logps(self, batch: Batch, split: str) -> SequenceLogps | None:
        raise NotImplementedError


class NoReference(Reference):
    """Reference-free objectives: there is no π_ref to ask."""

    name = "none"

    def logps(self, batch: Batch, split: str) -> None:
        return None


class FrozenCopy(Reference):
    name = "copy"

    def __init__(self, start: CompletionLogProbs, dtype: torch.dtype | None = None, runtime: Runtime | None = None,
                 *, bf16_linears: bool = False):
        self.module = copy.deepcopy(start)
        if hasattr(self.module.model, "unload"):
            # a LoRA start is the policy itself: π_ref is its base model, not its adapters (a resumed run's are
            # trained)
            self.module.model = self.module.model.unload()
        if dtype is not None:
            self.module.to(dtype)
        elif bf16_linears:
            bf16_linear_weights(self.module)
        self.module.eval().requires_grad_(False)
        if runtime is not None and runtime.sharded:
            shard_module(self.module, decoder_layer_classes(self.module.model))

    @torch.no_grad()
    def logps(self, batch: Batch, split: str) -> SequenceLogps:
        return self.module(batch)


def bf16_linear_weights(module: torch.nn.Module) -> None:
    """A frozen model run under bf16 autocast: its linear layers' weights (and biases) stored in bf16 once.
    Autocast casts them at every forward pass otherwise (the whole model's weights, ≈ 0.1 s for 135M parameters
    on a 2-core CPU, each micro-batch); its cast is this same rounding, so the products are bit-identical, and
    the copy takes ≈ 30% less memory. Embeddings and norms, which autocast runs in their own dtype, stay as
    they are: an output layer tied to the embedding gets a bf16 weight of its own."""
    for m in module.modules():
        if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32:
            m.weight = torch.nn.Parameter(m.weight.detach().to(torch.bfloat16), requires_grad=False)
            if m.bias is not None:
                m.bias = torch.nn.Parameter(m.bias.detach().to(torch.bfloat16), requires_grad=False)


def copy_in_bf16(cfg, precision: str, sharded: bool) -> bool:
    """Whether the reference copy holds its linear layers in bf16 (`bf16_linear_weights`): a plain copy (not
    `reference.name`'s model, not TR-DPO's following copy, no `reference.dtype`) under bf16-mixed, unsharded
    (mixed dtypes in an FSDP2-sharded module are untried here, so a sharded copy stays as loaded)."""
    r = cfg.reference
    return precision == "bf16-mixed" and not sharded and r.dtype is None and r.name is None and not r.sync_every


class NamedModel(FrozenCopy):
    """`reference.name`: a model of its own, frozen as it was loaded (no copy is taken)."""

    def __init__(self, module: CompletionLogProbs, label: str, runtime: Runtime | None = None):
        self.name = f"{label} (reference.name)"
        self.module = module.eval().requires_grad_(False)
        if runtime is not None and runtime.sharded:
            shard_module(self.module, decoder_layer_classes(self.module.model))


class FollowingCopy(FrozenCopy):
    """TR-DPO (Gorbatovski et al. 2024): a copy of the starting weights that follows the policy. `follow`
    sets π_ref ← α π_θ + (1 - α) π_ref (α = 1: the policy's weights, the paper's hard update). With LoRA the
    copy holds merged weights, W + (α-mixed) scale·B·A: an exact mix of the policy's effective weights,
    which no adapter of the policy's rank could hold, at the price of a full model beside the policy."""

    def __init__(self, start: CompletionLogProbs, dtype: torch.dtype | None, *, every: int, alpha: float):
        super().__init__(start, dtype)  # a LoRA start's copy is its base model, which `follow` mixes toward the policy
        self.alpha = alpha
        self.name = f"copy following the policy (TR-DPO: α={alpha} every {every} steps)"

    @torch.no_grad()
    def follow(self, policy: CompletionLogProbs) -> None:
        target = effective_weights(policy.model)
        for name, p in causal_lm(self.module.model).named_parameters():
            p.mul_(1 - self.alpha).add_(target[name].to(p.dtype), alpha=self.alpha)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in causal_lm(self.module.model).state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        causal_lm(self.module.model).load_state_dict(state)


def effective_weights(model) -> dict[str, torch.Tensor]:
    """The weights a model computes with, by their names in a plain (not PEFT) model: its parameters, or for
    a LoRA model each adapted layer's base weight plus its adapter's delta (peft's `get_delta_weight`)."""
    lm = causal_lm(model)
    if not hasattr(model, "get_base_model"):
        return dict(lm.named_parameters())
    from peft.tuners.lora import LoraLayer

    out = {name.replace(".base_layer", ""): p for name, p in lm.named_parameters() if "lora_" not in name}
    for name, module in lm.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            weight = module.base_layer.weight
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter)
            out[f"{name}.weight"] = weight
    return out


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


def build(cfg, policy: CompletionLogProbs, start: CompletionLogProbs, *, needs_reference: bool, runtime: Runtime,
          data: PreparedData, pad_id: int, precision: str, autocast, echo, tokenizer=None) -> Reference:
    """The reference the config asks for. `start` holds the starting weights: a separate module for full
    fine-tuning, the policy itself for LoRA (whose adapters are then disabled); with `reference.name`, the
    named model replaces it (checked against the policy's `tokenizer`)."""
    strategy = resolve_strategy(cfg.reference.strategy, needs_reference=needs_reference, lora=cfg.lora.enabled,
                                named=cfg.reference.name is not None, follows=bool(cfg.reference.sync_every))
    dtype = torch_dtype(cfg.reference.dtype) if cfg.reference.dtype else None
    if strategy == "none":
        return NoReference()
    if cfg.reference.name is not None:
        # the policy's own weights leave nothing to copy or disable: π_ref is the named model
        load_dtype = cfg.reference.dtype or ("bfloat16" if precision == "bf16" else "float32")
        start = load_named(cfg, tokenizer or models.load_tokenizer(cfg.model.name), runtime, dtype=load_dtype)
        if strategy == "copy":
            return NamedModel(start, cfg.reference.name, runtime)
        dtype = None
    if strategy == "adapters":
        return AdaptersDisabled(policy)
    if strategy == "copy" and cfg.reference.sync_every:
        return FollowingCopy(start, dtype, every=cfg.reference.sync_every, alpha=cfg.reference.sync_alpha)
    if strategy == "copy":
        return FrozenCopy(start, dtype, runtime, bf16_linears=copy_in_bf16(cfg, precision, runtime.sharded))
    module = FrozenCopy(start, dtype).module if dtype is not None else start
    settings = {**vars(settings_of(cfg.data)), "precision": precision, "dtype": cfg.reference.dtype}
    if cfg.objective.ld_alpha is not None:  # LD-DPO's sums are other numbers
        settings["ld_alpha"] = cfg.objective.ld_alpha
    return precompute(module, {"train": data.train, "eval": data.eval}, cache=ReferenceCache(cfg.reference.cache_dir),
                      settings=settings, weights=weights_fingerprint(start.model), runtime=runtime,
                      layout=cfg.train.layout, batch_pairs=cfg.train.micro_batch_size, pad_id=pad_id,
                      autocast=autocast, echo=echo, model_name=cfg.reference.name or cfg.model.name)


def precompute(module: CompletionLogProbs, splits: dict[str, list[TokenizedPair]], *, cache: ReferenceCache,
               settings: dict, weights: str, runtime: Runtime, layout: str, batch_pairs: int, pad_id: int, autocast,
               echo, model_name: str) -> Precomputed:
    """Reference log-probs of every pair of every split, read from the cache or computed once (adapters
    disabled, the ranks sharing the work) and cached."""
    tables = {}
    for split, pairs in splits.items():
        if not pairs:
            continue
        key = cache.key(weights, data_fingerprint(pairs), settings)
        # rank 0 decides and shares: the other ranks may not see its cache directory (several nodes)
        table = cache.get(key) if runtime.is_main else None
        hit = runtime.broadcast(torch.tensor([int(table is not None)], device=runtime.device)).item()
        if hit:
            table = table if table is not None else torch.zeros(len(pairs), 2)
            table = runtime.broadcast(table.to(runtime.device)).cpu()
            echo(f"reference log-probs for {split} read from {cache.path(key)}")
        else:
            echo(f"precomputing reference log-probs for {len(pairs)} {split} pairs")
            with disabled_adapters(module):
                table = logps_table(module, pairs, layout=layout, batch_pairs=batch_pairs, pad_id=pad_id,
                                    runtime=runtime, autocast=autocast)
            if runtime.is_main:
                cache.put(key, table, {"model": model_name, "pairs": len(pairs), "split": split})
        tables[split] = table
    return Precomputed(tables)


def resolve_strategy(requested: str, *, needs_reference: bool, lora: bool, named: bool = False,
                     follows: bool = False) -> str:
    """`follows`: TR-DPO's reference moves, so it is a copy even with LoRA."""
    if not needs_reference:
        return "none"
    if requested == "auto":
        return "adapters" if lora and not named and not follows else "copy"
    return requested


def load_named(cfg, tokenizer, runtime: Runtime, *, dtype: str) -> CompletionLogProbs:
    """`reference.name` as a frozen model on the runtime's device, prepared as the policy is (dropout off,
    attention for the layout), once its tokenizer is known to be the policy's."""
    name, m = cfg.reference.name, cfg.model
    with runtime.main_first():  # the first load may convert a GGUF file
        check_same_tokenizer(tokenizer, name, trust_remote_code=m.trust_remote_code)
        model = models.load_model(name, dtype=dtype, trust_remote_code=m.trust_remote_code,
                                  attn_implementation=m.attn_implementation)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ModelError(f"reference.name {name!r}: its embeddings hold {model.get_input_embeddings().num_embeddings} "
                         f"tokens, fewer than the policy's tokenizer's {len(tokenizer)}")
    models.disable_dropout(model)
    models.use_layout(model, cfg.train.layout)
    # LD-DPO weighs the reference's tokens as the policy's
    module = CompletionLogProbs(model, lm_head=cfg.train.lm_head, chunk_tokens=cfg.train.logps_chunk_tokens,
                                ld_alpha=cfg.objective.ld_alpha)
    return module.to(runtime.device).eval().requires_grad_(False)


def check_same_tokenizer(tokenizer, name: str, *, trust_remote_code: bool = False) -> None:
    """Refuse a reference whose tokenizer differs from the policy's: it would score other tokens than the
    ids the data was tokenized into, and the log-ratios would be meaningless."""
    other = models.load_tokenizer(name, trust_remote_code=trust_remote_code)
    ours, theirs = tokenizer.get_vocab(), other.get_vocab()
    if ours != theirs:
        token = next((t for t in sorted(ours, key=ours.get) if theirs.get(t) != ours[t]), None)
        if token is None:  # the other has extra tokens
            token = next(t for t in sorted(theirs, key=theirs.get) if t not in ours)
        def where(i):
            return "absent" if i is None else f"id {i}"

        raise ModelError(f"reference.name {name!r}: its tokenizer differs from the policy's ({len(theirs)} tokens "
                         f"against {len(ours)}; token {token!r} is {where(ours.get(token))} for the policy and "
                         f"{where(theirs.get(token))} for the reference); the reference must score the policy's "
                         "token ids")
    if other.eos_token_id != tokenizer.eos_token_id:
        raise ModelError(f"reference.name {name!r}: its EOS token ({other.eos_token!r}) is not the policy's "
                         f"({tokenizer.eos_token!r}); completions end with the policy's")


def disabled_adapters(module: CompletionLogProbs):
    """Context where a LoRA policy computes as its base model (a no-op for full fine-tuning)."""
    model = module.model
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
