"""Where one DPO update's time goes: torch.profiler over dpokit's default step, fp32 against bf16-mixed.

    .venv/bin/python benchmarks/profile_step.py                                  # default step, fp32 and bf16-mixed
    .venv/bin/python benchmarks/profile_step.py --modes bf16 compile_bf16        # a chosen set of rows

It builds the throughput benchmark's workload (the same pairs, update sizes and settings: 8 pairs an update,
β 0.1, lr 1e-6, `workload.py`), runs `--warmup` short untimed updates, times `--steps` updates without the
profiler, then profiles one more update and groups every operator's own (exclusive) CPU time into:
matrix products, attention, dtype casts and copies, the optimizer, and the rest (element-wise kernels,
norms, the loss). Useful MFU is the throughput benchmark's (`measure.Flops.useful` over the timed updates,
against the matmul peak of the row's precision measured in the same run). Results go to
benchmarks/results/profile-step-<date>.json. Run it on an otherwise idle machine; each row runs in its own
process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent

# row → overrides on the default step (contenders.DPOKIT_MODES' names where one exists)
MODES = {
    "fp32": {},
    "bf16": {"train.precision": "bf16-mixed"},
    "compile": {"train.compile": True},
    "compile_bf16": {"train.precision": "bf16-mixed", "train.compile": True},
    # the LM head's chunks as they were until 2026-12-07
    "chunk1024": {"train.logps_chunk_tokens": 1024},
    "bf16_chunk1024": {"train.precision": "bf16-mixed", "train.logps_chunk_tokens": 1024},
}
CATEGORIES = ("matmul", "attention", "casts and copies", "optimizer", "other")


def category(name: str) -> str:
    """The group an operator's own time is charged to."""
    n = name.lower()
    if any(k in n for k in ("scaled_dot_product", "flash", "attention", "flex", "sdpa")):
        return "attention"
    if any(k in n for k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn_", "_linear",
                            "aten::linear", "aten::matmul", "onednn", "gemm")):
        return "matmul"
    if any(k in n for k in ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous",
                            "aten::cat", "aten::index_select", "aten::index", "aten::gather", "aten::scatter")):
        return "casts and copies"
    if any(k in n for k in ("adam", "optimizer", "_foreach", "clip_grad")):
        return "optimizer"
    return "other"


def worker(spec: dict) -> dict:
    import torch
    from contenders import dpokit_overrides, dpokit_trainer, override_args
    from measure import Flops, model_dims, sync
    from workload import Workload

    from dpokit import models
    from dpokit.config_loader import load_config

    tmp = Path(spec["tmp"])
    args = SimpleNamespace(batch=spec["batch"], warmup=spec["warmup"], steps=spec["steps"] + 1, seed=spec["seed"],
                           length_scale=1.0, warmup_length_scale=0.25, max_length=1024)
    work = Workload(args, models.load_tokenizer(spec["model"]), tmp)
    b, total = args.batch, args.warmup + args.steps
    # the throughput benchmark's default row (prefix_shared), with this row's overrides
    overrides = dpokit_overrides({**spec, "data": str(work.path), "max_length": args.max_length, "lr": 1e-6,
                                  "beta": 0.1, "steps": args.steps, "mode": "prefix_shared",
                                  "overrides": MODES[spec["mode"]]})
    trainer = dpokit_trainer(load_config(None, override_args(overrides)), "cpu")
    flops = Flops(model_dims(spec["model"]))
    seconds, useful = [], 0.0
    for k in range(total):
        row, s = trainer.step(list(range(k * b, (k + 1) * b)))
        if args.warmup <= k < total - 1:  # the timed updates; the last one is profiled
            seconds.append(s)
            useful += flops.useful(work.update(k))
    k = total - 1
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _, profiled_seconds = trainer.step(list(range(k * b, (k + 1) * b)))
        sync("cpu")
    trainer.close()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_self = sum(e.self_cpu_time_total for e in events)
    groups = {c: 0.0 for c in CATEGORIES}
    for e in events:
        groups[category(e.key)] += e.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
    return {
        "mode": spec["mode"], "overrides": MODES[spec["mode"]], "precision": trainer.precision,
        "seconds_per_update": sum(seconds) / len(seconds), "updates_timed": len(seconds),
        "useful_flops_per_update": useful / len(seconds), "profiled_update_seconds": profiled_seconds,
        "share": {c: v / total_self for c, v in groups.items()},
        "top_ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
                     "share": e.self_cpu_time_total / total_self} for e in top],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=list(MODES))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1, help="timed updates before the profiled one (default 1)")
    parser.add_argument("--seed", type=int, default=5, help="the throughput benchmark's workload seed")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(worker(spec)))
        return 0

    import torch
    from measure import machine, measure_peaks, model_dims, versions

    peaks = measure_peaks(model_dims(args.model), "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            spec = {"mode": mode, "model": args.model, "batch": args.batch, "warmup": args.warmup,
                    "steps": args.steps, "seed": args.seed, "tmp": str(Path(tmp) / mode)}
            Path(spec["tmp"]).mkdir()
            spec_path, result_path = Path(tmp) / f"{mode}.json", Path(tmp) / f"{mode}.result.json"
            spec_path.write_text(json.dumps(spec))
            start = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--worker", str(spec_path), str(result_path)], check=True)
            row = json.loads(result_path.read_text())
            row["process_seconds"] = time.perf_counter() - start
            peak = peaks["bf16" if row["precision"] == "bf16-mixed" else "fp32"]["peak_flops_per_s"]
            row["useful_mfu"] = row["useful_flops_per_update"] / row["seconds_per_update"] / peak
            rows.append(row)
            shares = ", ".join(f"{c} {100 * v:.0f}%" for c, v in row["share"].items())
            print(f"{mode}: {row['seconds_per_update']:.2f} s/update, useful MFU {100 * row['useful_mfu']:.0f}% "
                  f"(peak {peak / 1e9:.0f} GFLOP/s); profiled update {row['profiled_update_seconds']:.2f} s: {shares}",
                  flush=True)
            for op in row["top_ops"][:12]:
                print(f"    {op['op']:<48} {op['self_ms']:9.1f} ms {op['calls']:6d} calls {100 * op['share']:5.1f}%")
    out = Path(args.out or HERE / "results" / f"profile-step-{datetime.date.today()}.json")
    out.write_text(json.dumps({"machine": machine("cpu"), "versions": versions(), "torch_threads":
                               torch.get_num_threads(), "peaks": {k: v["peak_flops_per_s"] for k, v in peaks.items()},
                               "settings": vars(args) | {"worker": None}, "rows": rows}, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
