"""`dpokit estimate` against measured peaks on the embedded model.

Two sources of measured peaks:

- recorded (default): the throughput benchmark's results files of the newest date
  (`benchmarks/results/throughput-DATE*.json`; a row measured in a later run of that date replaces the earlier
  one of the same mode), their dpokit rows that ran a warm-up update before the timed one (so the optimizer state exists
  during the measured step, as the estimate assumes). The estimate is given the timed update's pairs (the
  workload's length plan) grouped the worst way: the micro_batch_size longest together, as
  `dpokit estimate --from-data` does. Nothing is trained; a few seconds.
- `--measure`: trains each of the benchmark's dpokit modes named (`contenders.DPOKIT_MODES`) for two updates (the first a warm-up) in a fresh process on a generated
  pairs file and reads the process's peak (`ru_maxrss` on a CPU, `torch.cuda.max_memory_allocated` on a
  GPU), then estimates the same config from the same data. Minutes on a GPU; on a 2-core CPU about a
  minute of CPU per setting at the default lengths.

    python benchmarks/estimate_check.py                          # against the recorded benchmark
    python benchmarks/estimate_check.py --measure --device cuda  # fresh measurements
    python benchmarks/estimate_check.py --measure --device cpu --settings prefix_shared,lean --length-scale 0.5
    python benchmarks/estimate_check.py --measure --settings lora --set train.release_freed_memory=true

Prints one row per setting: estimate, measured, their ratio, and the freed heap glibc may keep on top of the
estimate (`Estimate.heap_allowance`, on a CPU without train.release_freed_memory); exit status 1 when a ratio
is outside 1 ± --tolerance (default 0.15).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

MODEL = "smollm2-135m-instruct"

CHILD = """
import json, resource, sys
import torch
from dpokit.config import Config
from dpokit.config_loader import load_config
from dpokit.trainer import train
cfg = load_config(None, json.loads(sys.argv[1]))
train(cfg)
if torch.cuda.is_available():
    peak = torch.cuda.max_memory_allocated()
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("PEAK", json.dumps(peak))
"""


def worst_lengths(pairs, micro_batch_size: int, layout: str):
    from dpokit.estimate import micro_batch_lengths

    def key(x):
        return x[0] + max(x[1], x[2]) if layout == "padded" else sum(x)

    return micro_batch_lengths(sorted(pairs, key=key, reverse=True)[:micro_batch_size], layout, "")


def recorded(args) -> list[tuple[str, float, float]]:
    paths = [Path(p) for p in args.results] if args.results else newest_results()
    rows = {}
    for path in paths:  # a later file's row of a mode replaces an earlier one's
        for row in recorded_rows(path):
            rows[row[0]] = row
    return list(rows.values())


def newest_results() -> list[Path]:
    """The throughput results files of the newest date, in the order they were written."""
    files = list((HERE / "results").glob("throughput-*.json"))
    newest = max(f.name[len("throughput-"):][:10] for f in files)
    return sorted((f for f in files if f.name.startswith(f"throughput-{newest}")),
                  key=lambda f: json.loads(f.read_text())["date"])


def recorded_rows(path: Path) -> list[tuple[str, float, float]]:
    from contenders import DPOKIT_MODES, mode_overrides, override_args
    from workload import length_plan

    from dpokit.config_loader import load_config
    from dpokit.estimate import estimate, model_shape

    results = json.loads(path.read_text())
    s = results["settings"]
    if s.get("device", "cpu") != "cpu":
        raise SystemExit(f"{path}: measured on {s['device']}; this comparison reads CPU peaks")
    timed = length_plan(s["steps"] * s["batch"], s["seed"], s["length_scale"])[-s["batch"]:]
    shape = model_shape(s["model"])
    rows = []
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as f:
        f.write('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
        f.flush()
        for r in results["contenders"]:
            if r["kind"] != "dpokit" or not r.get("ok") or r["mode"] not in DPOKIT_MODES or not r.get("warmup"):
                continue
            if r["mode"] in ("compile", "bf16", "bf16_reuse"):  # compiled graphs and a bf16 CPU path: not modelled
                continue
            overrides = {"model.name": s["model"], "data.train": f.name, "data.max_length": s["max_length"],
                         "train.batch_size": s["batch"], "train.precision": "fp32",
                         **mode_overrides(r["mode"], s["batch"])}
            cfg = load_config(None, override_args(overrides))
            est = estimate(cfg, lengths=worst_lengths(timed, cfg.train.micro_batch_size, cfg.train.layout),
                           shape=shape, device="cpu")
            rows.append((r["label"], est.peak, r["peak_memory_bytes"], est.heap_allowance))
    return rows


def measure(args) -> list[tuple[str, float, float]]:
    from contenders import DPOKIT_MODES, mode_overrides, override_args
    from workload import length_plan, make_pairs

    from dpokit import models
    from dpokit.config_loader import load_config
    from dpokit.estimate import data_lengths, estimate, model_shape

    tokenizer = models.load_tokenizer(MODEL)
    shape = model_shape(MODEL)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        plan = length_plan(2 * args.batch, args.seed, args.length_scale)
        data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(tokenizer, plan, args.seed)))
        for name in args.settings.split(","):
            if name not in DPOKIT_MODES:
                raise SystemExit(f"unknown setting {name!r}; choose from {', '.join(DPOKIT_MODES)}")
            mode = override_args(mode_overrides(name, args.batch))
            overrides = [f"model.name={MODEL}", f"data.train={data}", f"train.batch_size={args.batch}",
                         "train.max_steps=2", "checkpoint.every=0", "output.report_to=[]", "train.precision=fp32",
                         f"output.dir={Path(tmp) / name}", f"reference.cache_dir={Path(tmp) / 'cache'}",
                         *mode, *args.set]
            cfg = load_config(None, overrides)
            est = estimate(cfg, lengths=data_lengths(cfg, tokenizer), shape=shape, device=args.device)
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides)], capture_output=True,
                                 text=True, timeout=args.timeout)
            peak = next((float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("PEAK ")),
                        None)
            if peak is None:
                print(f"{name}: the run failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append((name, est.peak, peak, est.heap_allowance))
            print(f"{name}: estimate {est.peak / 1e9:.2f} GB, measured {peak / 1e9:.2f} GB", file=sys.stderr,
                  flush=True)  # as each finishes: a long run cut short keeps what it measured
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", action="store_true", help="train and measure instead of reading the results file")
    ap.add_argument("--results", nargs="+", help="throughput results JSON files, a later one's rows replacing an "
                                                 "earlier one's (default: those of the newest date)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--settings", default="prefix_shared,precomputed,grad_ckpt,adamw8bit,lean,lora",
                    help="--measure: comma-separated benchmark modes (benchmarks/contenders.py DPOKIT_MODES)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="--measure: an override on top of every mode's (repeatable)")
    ap.add_argument("--batch", type=int, default=8, help="--measure: pairs per update (micro-batches as the "
                                                         "benchmark's: dpokit's default unless the mode sets them)")
    ap.add_argument("--length-scale", type=float, default=1.0, help="--measure: scale of the workload's lengths")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--tolerance", type=float, default=0.15)
    args = ap.parse_args()
    rows = measure(args) if args.measure else recorded(args)
    bad = 0
    print(f"{'setting':<64} {'estimate GB':>11} {'measured GB':>11} {'ratio':>6} {'+ heap GB':>9}")
    for name, est, peak, allowance in rows:
        ratio = est / peak
        outside = abs(ratio - 1) > args.tolerance
        bad += outside
        where = ""
        if outside:
            where = "  outside, within the heap allowance" if est <= peak <= est + allowance else "  outside"
        print(f"{name:<64} {est / 1e9:11.2f} {peak / 1e9:11.2f} {ratio:6.2f} {allowance / 1e9:9.2f}{where}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
