"""`dpokit estimate` against measured peaks on the embedded model.

Two sources of measured peaks:

- recorded (default): the throughput benchmark's results file (`benchmarks/results/throughput-*.json`, the
  newest), its dpokit rows that ran a warm-up update before the timed one (so the optimizer state exists
  during the measured step, as the estimate assumes). The estimate is given the timed update's pairs (the
  workload's length plan) grouped the worst way: the micro_batch_size longest together, as
  `dpokit estimate --from-data` does. Nothing is trained; a few seconds.
- `--measure`: trains each setting for two updates (the first a warm-up) in a fresh process on a generated
  pairs file and reads the process's peak (`ru_maxrss` on a CPU, `torch.cuda.max_memory_allocated` on a
  GPU), then estimates the same config from the same data. Minutes on a GPU; on a 2-core CPU about a
  minute of CPU per setting at the default lengths.

    python benchmarks/estimate_check.py                          # against the recorded benchmark
    python benchmarks/estimate_check.py --measure --device cuda  # fresh measurements
    python benchmarks/estimate_check.py --measure --device cpu --settings default,lean --length-scale 0.5

Prints one row per setting: estimate, measured, their ratio; exit status 1 when a ratio is outside
1 ± --tolerance (default 0.15).
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
# settings for --measure: overrides on top of the common ones
SETTINGS = {
    "default": [],
    "precomputed": ["reference.strategy=precomputed"],
    "grad_ckpt": ["train.gradient_checkpointing=true"],
    "adamw8bit": ["train.optimizer=adamw8bit"],
    "lean": ["train.preset=lean"],
    "lora": ["lora.enabled=true"],
    "qlora": ["lora.enabled=true", "model.quantization=nf4"],
}

CHILD = """
import json, resource, sys
import torch
from dpokit.config import Config
from dpokit.train import train
cfg = Config.load(None, json.loads(sys.argv[1]))
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
    from contenders import DPOKIT_MODES, mode_overrides
    from workload import length_plan

    from dpokit.config import Config
    from dpokit.estimate import estimate, model_shape

    path = args.results or sorted((HERE / "results").glob("throughput-*.json"))[-1]
    results = json.loads(Path(path).read_text())
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
            if r["mode"] in ("compile", "bf16"):  # compiled graphs and a bf16 CPU path: not modelled
                continue
            overrides = {"model.name": s["model"], "data.train": f.name, "data.max_length": s["max_length"],
                         "train.batch_size": s["batch"], "train.precision": "fp32",
                         **mode_overrides(r["mode"], s["batch"])}
            cfg = Config.load(None, [f"{k}={v}" for k, v in overrides.items()])
            est = estimate(cfg, lengths=worst_lengths(timed, cfg.train.micro_batch_size, cfg.train.layout),
                           shape=shape, device="cpu")
            rows.append((r["label"], est.peak, r["peak_memory_bytes"]))
    return rows


def measure(args) -> list[tuple[str, float, float]]:
    from workload import length_plan, make_pairs

    from dpokit import models
    from dpokit.config import Config
    from dpokit.estimate import data_lengths, estimate, model_shape

    tokenizer = models.load_tokenizer(MODEL)
    shape = model_shape(MODEL)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        plan = length_plan(2 * args.batch, args.seed, args.length_scale)
        data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(tokenizer, plan, args.seed)))
        for name in args.settings.split(","):
            overrides = [f"model.name={MODEL}", f"data.train={data}", f"train.batch_size={args.batch}",
                         "train.max_steps=2", "checkpoint.every=0", "output.report_to=[]",
                         f"output.dir={Path(tmp) / name}", f"reference.cache_dir={Path(tmp) / 'cache'}",
                         f"train.micro_batch_size={args.micro_batch}", *SETTINGS[name]]
            if name == "lean":  # the preset sets micro_batch_size itself
                overrides = [o for o in overrides if not o.startswith("train.micro_batch_size")]
            cfg = Config.load(None, overrides)
            est = estimate(cfg, lengths=data_lengths(cfg, tokenizer), shape=shape, device=args.device)
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides)], capture_output=True,
                                 text=True, timeout=args.timeout)
            peak = next((float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("PEAK ")),
                        None)
            if peak is None:
                print(f"{name}: the run failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append((name, est.peak, peak))
            print(f"{name}: estimate {est.peak / 1e9:.2f} GB, measured {peak / 1e9:.2f} GB", file=sys.stderr,
                  flush=True)  # as each finishes: a long run cut short keeps what it measured
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", action="store_true", help="train and measure instead of reading the results file")
    ap.add_argument("--results", help="the throughput results JSON (default: the newest)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--settings", default="default,precomputed,grad_ckpt,adamw8bit,lean,lora",
                    help=f"--measure: comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--batch", type=int, default=8, help="--measure: pairs per update")
    ap.add_argument("--micro-batch", type=int, default=4, help="--measure: pairs per forward")
    ap.add_argument("--length-scale", type=float, default=1.0, help="--measure: scale of the workload's lengths")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--tolerance", type=float, default=0.15)
    args = ap.parse_args()
    rows = measure(args) if args.measure else recorded(args)
    bad = 0
    print(f"{'setting':<72} {'estimate GB':>11} {'measured GB':>11} {'ratio':>6}")
    for name, est, peak in rows:
        ratio = est / peak
        bad += abs(ratio - 1) > args.tolerance
        print(f"{name:<72} {est / 1e9:11.2f} {peak / 1e9:11.2f} {ratio:6.2f}{'' if abs(ratio - 1) <= args.tolerance else '  outside'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
