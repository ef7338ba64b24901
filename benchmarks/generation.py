"""Generation speed: dpokit's sampling path against plain `model.generate`, on the same model and prompts.

    .venv/bin/python benchmarks/generation.py                       # the grid below, fp32 and bf16
    .venv/bin/python benchmarks/generation.py --batch-sizes 16 128 --new-tokens 16 --dtypes float32
    .venv/bin/python benchmarks/generation.py --batch-sizes 128 --new-tokens 16 --samples-per-prompt 4   # make demo's

For each cell (batch size × new tokens × dtype) it times, on the same prompts (the sentiment openings, each
repeated to fill the batch; with `--samples-per-prompt N`, N consecutive rows share an opening):
- `plain generate`: transformers' `model.generate`, default dynamic cache, sampling at temperature 1 with
  every other logits processor off (the same distribution dpokit samples from), generation alone;
- `dpokit generate`: the transformers backend of `dpokit.generation.backends` (what PPO's rollouts and the
  samples during training call; its own decode loop since 2026-12-07, `model.generate` before), generation
  alone;
- `dpokit sample`: `Sampler.sample`, what `dpokit sample` runs per batch: generation, the log-prob of each
  completion under the model (recorded from the generation's own logits since 2026-12-06, before that a
  second forward pass), decoding;
- `llama.cpp`: llama.cpp on the same GGUF file, its own quantised weights and kernels, sampling with its
  own `dist` sampler (`llama_cpp_anchor.py`), where llama-cpp-python is installed, else the report says why
  it is skipped; measured in the first dtype's cells only, since its weights are the file's.

It prints completions/s and generated tokens/s of each, the matmul floor (2 × parameters FLOPs per
generated token at the measured matmul peak of this dtype), and the sample distribution of plain generate
and dpokit: the mean log-prob of the samples under the model and the judge's mean reward (VADER), each with
its standard error, which must agree within noise. Results go to benchmarks/results/generation-<date>.json.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import statistics
import time
from pathlib import Path

import torch
from llama_cpp_anchor import Anchor, available

from dpokit import host_memory, models
from dpokit.generation.backends import TransformersBackend, left_padded, pad_id_for, stop_token_ids
from dpokit.generation.judges import build_judge, checked_scores
from dpokit.generation.packed_linear import packed_linears
from dpokit.generation.prompts import as_model_input, read_prompts
from dpokit.generation.sampling import Sampler, SamplingSettings, completion_logps
from dpokit.storage import json_text

ROOT = Path(__file__).resolve().parents[1]


def matmul_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul in `dtype` on the CPU."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size ** 3 * n / (time.perf_counter() - start)


def plain_generate(model, input_ids, attention_mask, *, max_new_tokens: int, pad_id: int, stop_ids, seed: int):
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                              eos_token_id=list(stop_ids), pad_token_id=pad_id)
    torch.manual_seed(seed)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)


def cut(rows, stops):
    out = []
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in stops), None)
        out.append(row if end is None else row[:end + 1])
    return out


def mean_se(values):
    values = [v for v in values if math.isfinite(v)]
    if len(values) < 2:
        return {"mean": values[0] if values else None, "se": None}
    return {"mean": statistics.fmean(values), "se": statistics.stdev(values) / math.sqrt(len(values))}


def cell(model, tokenizer, judge, prompts, *, batch: int, new_tokens: int, calls: int, seed: int = 0,
         per_prompt: int = 1, anchor: Anchor | None = None) -> dict:
    stops = stop_token_ids(model, tokenizer)
    pad_id = pad_id_for(tokenizer, stops)
    encoded = [as_model_input(p, tokenizer, "none") for p in prompts]
    backend = TransformersBackend(model)
    settings = SamplingSettings(n=per_prompt, max_new_tokens=new_tokens, batch_size=batch, template="none", seed=seed)
    sampler = Sampler(model, tokenizer, settings)
    out = {"batch_size": batch, "new_tokens": new_tokens, "calls": calls, "samples_per_prompt": per_prompt}
    samples = {"plain generate": [], "dpokit generate": [], **({"llama.cpp": []} if anchor else {})}
    if anchor is not None:  # its first call sets up its kernels; untimed, as the torch paths' warm-up
        anchor.generate([encoded[0][1]], max_new_tokens=2, stop_ids=stops, seed=seed)
    for name in ("plain generate", "dpokit generate", "dpokit sample", *(["llama.cpp"] if anchor else [])):
        tokens = completions = 0
        # `dpokit sample` packs bf16 weights once for the whole file (`sample_file`), not once a call
        packed = packed_linears(model) if name == "dpokit sample" else contextlib.nullcontext()
        start = time.perf_counter()
        with packed:
            for k in range(calls):
                # `per_prompt` consecutive rows share a prompt, as `dpokit sample --n` lays them out
                chunk = [encoded[(k * batch + i) // per_prompt % len(encoded)] for i in range(batch)]
                ids = [c[1] for c in chunk]
                if name == "plain generate":
                    input_ids, mask = left_padded(ids, max(len(i) for i in ids), pad_id)
                    rows = plain_generate(model, input_ids, mask, max_new_tokens=new_tokens, pad_id=pad_id,
                                          stop_ids=stops, seed=seed + k)[:, input_ids.shape[1]:].tolist()
                    got = cut(rows, set(stops))
                elif name == "llama.cpp":
                    got = anchor.generate(ids, max_new_tokens=new_tokens, stop_ids=stops, seed=seed + k)
                elif name == "dpokit generate":
                    got = [c.ids for c in backend.generate(ids, temperature=1.0, top_p=1.0, max_new_tokens=new_tokens,
                                                          stop_ids=stops, pad_id=pad_id, seed=seed + k)]
                else:  # generation, each completion's log-prob and its text: one `dpokit sample` batch
                    rows = sampler.sample([c[0] for c in chunk[::per_prompt]], first_index=k * batch // per_prompt)
                    got = [()] * len(rows) * per_prompt
                    tokens += sum(sum(r["num_tokens"]) for r in rows)
                tokens += sum(len(g) for g in got)
                completions += len(got)
                if name in samples:
                    samples[name] += [(chunk[i][0], ids[i], got[i]) for i in range(len(got))]
        seconds = time.perf_counter() - start
        out[name] = {"seconds": seconds, "completions_per_s": completions / seconds, "tokens_per_s": tokens / seconds,
                     "tokens": tokens}
    # the same distribution: log-probs of the samples under the model, and the judge's reward
    for name, drawn in samples.items():
        logps = completion_logps(model, [d[1] for d in drawn], [d[2] for d in drawn], pad_id=pad_id,
                                 batch_size=max(2, batch))
        texts = [tokenizer.decode([t for t in d[2] if t not in stops], skip_special_tokens=True) for d in drawn]
        rewards = checked_scores(judge, [d[0] for d in drawn], texts)
        out[name]["logp"] = mean_se(logps)
        out[name]["reward"] = mean_se(rewards)
    return out


def across_dtypes(cells: list[dict]) -> list[dict]:
    """`dpokit sample`'s completions/s in the dtype `--dtype auto` picks on this machine against plain
    `generate` in float32 (transformers' default), for each batch and length measured in both dtypes."""
    auto = models.resolve_dtype("auto", "cpu")
    by = {(c["dtype"], c["batch_size"], c["new_tokens"]): c for c in cells}
    rows = []
    for (dtype, batch, new_tokens), c in by.items():
        plain = by.get(("float32", batch, new_tokens))
        if dtype == auto and plain is not None:
            rows.append({"auto": auto, "batch_size": batch, "new_tokens": new_tokens,
                         "ratio": c["dpokit sample"]["completions_per_s"] / plain["plain generate"]["completions_per_s"]})
    return rows


def llama_cpp_anchor(model: str, *, repack: bool) -> tuple[Anchor | None, dict]:
    """llama.cpp loaded on the model's GGUF file, and what the report says of it (or why it is skipped)."""
    why = available()
    source = models.resolve(model)
    if why is None and source.kind != "gguf":
        why = f"{model} is not a GGUF file"
    if why is not None:
        return None, {"skipped": why}
    import llama_cpp

    anchor = Anchor(source.path, torch.get_num_threads(), extra_buffers=repack)
    return anchor, {"llama_cpp_python": llama_cpp.__version__, "gguf": source.path, "threads": anchor.threads,
                    "repacked_weights": repack, "sampler": "dist (softmax at temperature 1, whole vocabulary)",
                    "weights": "the GGUF's own (quantised); dpokit's rows dequantise them"}


def print_cell(r: dict) -> None:
    """One cell's speeds, each against plain generate's, and its samples' distributions."""
    plain = r["plain generate"]["completions_per_s"]
    line = [f"  batch {r['batch_size']:>3} × {r['new_tokens']:>3} tokens, {r['samples_per_prompt']} a prompt:"]
    for name in ("plain generate", "dpokit generate", "dpokit sample", "llama.cpp"):
        if name not in r:
            continue
        x = r[name]
        line.append(f"{name} {x['completions_per_s']:7.1f} compl/s {x['tokens_per_s']:7.0f} tok/s "
                    f"({x['completions_per_s'] / plain:.2f}×)")
    print(" | ".join(line) + f" | floor {r['floor_tokens_per_s']:.0f} tok/s")
    p, d = r["plain generate"], r["dpokit generate"]
    print(f"    same distribution: log-prob {p['logp']['mean']:.2f}±{p['logp']['se']:.2f} vs "
          f"{d['logp']['mean']:.2f}±{d['logp']['se']:.2f}; reward {p['reward']['mean']:.3f}±"
          f"{p['reward']['se']:.3f} vs {d['reward']['mean']:.3f}±{d['reward']['se']:.3f}")
    if "llama.cpp" in r:
        q = r["llama.cpp"]
        print(f"    llama.cpp's samples: log-prob {q['logp']['mean']:.2f}±{q['logp']['se']:.2f}; "
              f"reward {q['reward']['mean']:.3f}±{q['reward']['se']:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--prompts", default=str(ROOT / "data/sentiment/prompts_train.jsonl"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--samples-per-prompt", type=int, default=1,
                        help="completions of each prompt, consecutive in a batch as `dpokit sample --n` draws them "
                             "(make demo samples 4; default 1)")
    parser.add_argument("--completions", type=int, default=256,
                        help="completions per cell and path, at least one batch (default 256)")
    parser.add_argument("--max-calls", type=int, default=16,
                        help="generate calls per cell and path at the most (batch 1: 16 completions; default 16)")
    parser.add_argument("--llama-cpp-repack", action="store_true",
                        help="let llama.cpp repack the weights for its AMX/extra-buffer kernels (off: with "
                             "llama-cpp-python 0.3.36 on the AMX Xeon, Q4_1 repacked for AMX crashed in llama_decode)")
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="keep freed memory in glibc's heap for reuse, as the sampling commands do "
                             "(dpokit.host_memory); it holds for the whole process, so for every row")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/generation-<date>.json)")
    args = parser.parse_args(argv)
    if args.reuse_freed_memory:
        host_memory.reuse_freed_memory()

    from measure import machine, versions

    tokenizer = models.load_tokenizer(args.model)
    prompts = read_prompts(args.prompts)
    judge = build_judge("sentiment")
    params = None
    anchor, llama = llama_cpp_anchor(args.model, repack=args.llama_cpp_repack)
    report = {"date": datetime.date.today().isoformat(), "machine": machine("cpu"), "versions": versions(),
              "model": args.model, "prompts": args.prompts, "cells": [], "llama.cpp": llama,
              "allocator": "reuse_freed_memory" if args.reuse_freed_memory else "glibc's default"}
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, flags "
          f"{' '.join(report['machine']['cpu_flags'])}")
    for dtype_name in args.dtypes:
        dtype = models.torch_dtype(dtype_name)
        model = models.load_model(args.model, dtype=dtype_name).eval()
        params = sum(p.numel() for p in model.parameters())
        peak = matmul_peak(dtype)
        print(f"\n{dtype_name}: matmul peak {peak / 1e9:.0f} GFLOP/s; floor = 2 × {params / 1e6:.0f}M FLOPs a token")
        for new_tokens in args.new_tokens:
            for batch in args.batch_sizes:
                calls = max(1, min(args.completions // batch, args.max_calls))
                with torch.no_grad():
                    r = cell(model, tokenizer, judge, prompts, batch=batch, new_tokens=new_tokens, calls=calls,
                             per_prompt=args.samples_per_prompt,
                             anchor=anchor if dtype_name == args.dtypes[0] else None)  # dtype-free: once
                r["dtype"] = dtype_name
                r["matmul_peak_flops"] = peak
                r["floor_tokens_per_s"] = peak / (2 * params)
                report["cells"].append(r)
                print_cell(r)
        del model
    if anchor is not None:
        anchor.close()
    report["sample_auto_vs_plain_defaults"] = across_dtypes(report["cells"])
    for row in report["sample_auto_vs_plain_defaults"]:
        print(f"`dpokit sample --dtype auto` ({row['auto']}) against plain generate's defaults (float32), batch "
              f"{row['batch_size']} × {row['new_tokens']} tokens: {row['ratio']:.2f}×")
    print(f"\nllama.cpp: {report['llama.cpp']}")
    out = Path(args.out or ROOT / f"benchmarks/results/generation-{report['date']}.json")
    out.write_text(json_text(report, indent=1) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
