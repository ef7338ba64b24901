"""`dpokit estimate CONFIG`: the estimate of `dpokit.estimate` printed (or as JSON), and with `--device-gb`
the settings that fit."""

from __future__ import annotations

import argparse
import dataclasses
import math

from dpokit import models
from dpokit.config_loader import command_line_config, load_config
from dpokit.estimate import GB, configured_lengths, data_lengths, estimate, model_shape, suggestions
from dpokit.methods.registry import METHODS
from dpokit.storage import json_text


def add_estimate(sub):
    p = sub.add_parser("estimate", help="expected peak memory per device of a training step, before loading",
                       description="The expected peak memory per device of a training step for CONFIG (weights, "
                                   "gradients, optimizer state, reference, activations at the configured lengths), "
                                   "from the model's config alone; with --device-gb, the settings that fit.")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--device-gb", type=_positive(float), default=None,
                   help="memory of one device in GB: suggest settings that fit")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where training runs (auto: cuda when a GPU is visible)")
    p.add_argument("--world", type=_positive(int), default=1, help="processes under torchrun (FSDP2 shards over them)")
    p.add_argument("--from-data", action="store_true",
                   help="activations for the largest micro-batch of data.train (reads the tokenizer and the data) "
                        "instead of the configured worst case")
    p.add_argument("--method", choices=tuple(METHODS), default="dpo",
                   help="the method the config trains (what its step holds: a reference, one or two completions "
                        "an item, an LM head or a scalar one); default dpo")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _positive(kind: type):
    """An argparse type: a finite number of `kind` above 0 (argparse's own line for anything else)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def estimate_command(args) -> int:

    config, overrides = command_line_config(args.config, args.overrides)
    cfg = load_config(config, overrides, need_data=args.from_data)  # the data only counts with --from-data
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = model_shape(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = None
    if args.from_data:
        tokenizer = models.load_tokenizer(cfg.model.name, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)

    def lengths_of(c):
        return data_lengths(c, tokenizer, args.method) if tokenizer is not None else configured_lengths(c, args.method)

    est = estimate(cfg, lengths=lengths_of(cfg), shape=shape, world=args.world, device=device, method=args.method)
    fits = None
    if args.device_gb:
        fits = suggestions(cfg, args.device_gb * GB, shape=shape, lengths_of=lengths_of, world=args.world,
                           device=device, method=args.method) if est.bound > args.device_gb * GB else []
    if args.json:
        print(json_text({"peak_bytes": est.peak, "step_bytes": est.step, "loading_bytes": est.loading,
                          "optimizer_step_bytes": est.stepping, "freed_heap_allowance_bytes": est.heap_allowance,
                          "parts_bytes": est.parts, "host_bytes": est.host, "lengths": dataclasses.asdict(est.lengths),
                          "device": device, "notes": est.notes, "device_gb": args.device_gb,
                          "fits": None if fits is None else est.bound <= args.device_gb * GB,
                          "suggestions": fits}, indent=1))
        return 0
    print(f"{cfg.model.name}: {shape.params / 1e6:.0f}M parameters; micro-batch: {est.lengths.source} = "
          f"{est.lengths.tokens} tokens ({cfg.train.layout}); {device}, {args.world} process(es)")
    for k, v in est.parts.items():
        print(f"  {k:<12} {v / GB:7.2f} GB")
    print(f"  {'step peak':<12} {est.step / GB:7.2f} GB")
    if est.loading:
        print(f"  {'loading':<12} {est.loading / GB:7.2f} GB  (weights file mapped while the weights are copied)")
    if est.stepping:
        print(f"  {'optim. step':<12} {est.stepping / GB:7.2f} GB  (activations freed, the optimizer's working copies "
              "of its largest tensor)")
    for k, v in est.host.items():
        print(f"  host {k:<7} {v / GB:7.2f} GB  (CPU offload)")
    print(f"expected peak per device: {est.peak / GB:.2f} GB")
    if est.heap_allowance:
        print(f"  glibc may keep up to {est.heap_allowance / GB:.2f} GB more of the heap freed by earlier steps "
              "(measured up to 0.45 × a micro-batch's activations, 1.4 × with LoRA or QLoRA); "
              "train.release_freed_memory=true returns it to the system, at 20-30% longer steps")
    for note in est.notes:
        print(f"  note: {note}")
    if args.device_gb:
        if est.bound <= args.device_gb * GB:
            print(f"fits {args.device_gb:g} GB")
        elif est.peak <= args.device_gb * GB:
            print(f"fits {args.device_gb:g} GB unless glibc keeps more freed heap: train.release_freed_memory=true "
                  "to be sure")
        else:
            print(f"does not fit {args.device_gb:g} GB; settings to try, each adding to the ones before:")
            for row in fits:
                mark = "fits" if row["fits"] else "    "
                heap = f" (+ up to {row['heap_allowance'] / GB:.2f} GB freed heap)" if row["heap_allowance"] else ""
                print(f"  {mark} {row['peak'] / GB:7.2f} GB{heap}  {row['label']}: {' '.join(row['overrides'])}")
            if not any(r["fits"] for r in fits):
                print("  none of them fits: a smaller model, shorter data.max_length, or FSDP2 over more devices "
                      "(--world N with distributed.strategy=fsdp)")
    return 0
