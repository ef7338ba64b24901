"""Write a trained policy as a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` and
vLLM load: safetensors weights (or the LoRA adapter, merged on request), the tokenizer and a model card
with the run's config and final metrics. Weights with NaN or inf are never written."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from dpokit import attention
from dpokit.errors import TrainingError
from dpokit.logps import causal_lm
from dpokit.models import nonfinite_parameters
from dpokit.storage import atomic_dir, json_text


def save_pretrained(model, directory: Path, *, state_dict: dict | None = None) -> None:
    """save_pretrained with safetensors, refusing non-finite weights and dpokit's own attention setting."""
    bad = nonfinite_parameters(model) if state_dict is None else [
        k for k, v in state_dict.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise TrainingError(f"refusing to write weights with NaN/inf ({len(bad)} tensors, first: {bad[0]})")
    if state_dict is not None:
        state_dict = _without_tied_duplicates(model, state_dict)
    lm = causal_lm(model)
    impl = lm.config._attn_implementation
    if impl == attention.NAME:  # the saved config must load anywhere: store the standard kernel
        lm.config._attn_implementation_internal = "sdpa"
    try:
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    finally:
        lm.config._attn_implementation_internal = impl


def _without_tied_duplicates(model, state_dict: dict) -> dict:
    """A gathered (FSDP2) state dict holds tied weights (embeddings = LM head) as separate copies, which
    save_pretrained cannot recognise as tied: keep the first name of each shared parameter."""
    first: dict[int, str] = {}
    drop = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            drop.add(name)
        else:
            first[id(param)] = name
    return {k: v for k, v in state_dict.items() if k not in drop}


def export(model, tokenizer, directory: Path, *, method, merge_lora: bool, config: dict, metrics: dict,
           base_model: str, state_dict: dict | None = None) -> Path:
    """`state_dict`: the full weights when `model` is sharded (FSDP2), gathered by the caller. `method` (the
    run's `methods.base.Method`, passed down: export sits below the methods) writes the model card's words
    and loads a merged copy of its adapters."""
    directory = Path(directory)
    lora = hasattr(model, "peft_config")
    with atomic_dir(directory) as tmp:
        if merge_lora and lora:
            # merge through a plain copy: the adapter saved, then loaded onto its base and merged
            save_pretrained(model, tmp / "adapter", state_dict=state_dict)
            model = method.load_merged(tmp / "adapter")
            state_dict, lora = None, False
            shutil.rmtree(tmp / "adapter")
        save_pretrained(model, tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(method, config, metrics, base_model, lora=lora))
        (tmp / "dpokit_metrics.json").write_text(json_text(metrics, indent=2) + "\n")
    return directory


def model_card(method, config: dict, metrics: dict, base_model: str, *, lora: bool) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    kind = "LoRA adapter (load with peft, or `AutoModelForCausalLM` with peft installed)" if lora else "full weights"
    title, how = method.card(config, base_model, kind)
    return f"""---
library_name: transformers
base_model: {base_model}
tags: [{method.hub_tag or method.name}, dpokit]
---
# {title}

{how}

## Final metrics

| metric | value |
|---|---|
{rows}

## Configuration

```yaml
{yaml.safe_dump(config, sort_keys=False).rstrip()}
```
"""
