"""DPO training throughput: dpokit's modes against TRL 1.16's DPOTrainer, same model, data and settings.

One command, one run (`python benchmarks/throughput.py`, see benchmarks/README.md), in phases:

1. the workload (workload.py): a deterministic synthetic preference set, the same pairs in the same order for
   every contender;
2. the machine's matmul peak in fp32 and bf16 (measure.py, with the FLOP formulas and the memory and load
   measurements);
3. the contenders (contenders.py): dpokit's modes and TRL's DPOTrainer, each in its own process, `--warmup`
   untimed updates then `--steps` timed ones;
4. the memory sweep: peak memory of dpokit's default, lean-preset and plain paths against batch size and sequence
   length;
5. the losses: every dpokit mode trains `--loss-steps` updates on short pairs and its losses are compared with the
   default's (QLoRA's with LoRA's), against the tolerances in report.py;
6. the report (report.py): rates, ratios, the tables and targets, printed and written as JSON and markdown to
   benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import contenders
import measure
import report
from measure import WAITED, Flops, LoadSampler, model_dims, wait_quiet
from workload import Workload, length_plan, logical_tokens, make_pairs, tokenized_lengths

from dpokit.config import ModelSection
from dpokit.generation.jsonl import write_jsonl

HERE = Path(__file__).resolve().parent
SWEEP_CONTENDERS = ["prefix_shared", "lean", "plain"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=ModelSection().name, help="model for every contender (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=1,
                    help="timed optimizer updates per contender; the default keeps the whole run near 40 minutes on "
                         "a 2-core CPU, where one TRL update takes minutes (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed updates before them (default: %(default)s)")
    ap.add_argument("--warmup-length-scale", type=float, default=0.25,
                    help="token lengths of the warm-up pairs relative to the timed ones: a warm-up update runs every "
                         "code path (compilation, optimizer state) at a fraction of the cost (default: %(default)s)")
    ap.add_argument("--bf16-steps", type=int, default=1,
                    help="timed updates for bf16 rows, the first of the timed updates (bf16 matmul can be much slower "
                         "than fp32 on CPUs without AMX/AVX512-BF16); 0 skips them (default: %(default)s)")
    ap.add_argument("--bf16-warmup", type=int, default=0, help="untimed updates for bf16 rows (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer update, everyone (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=5,
                    help="seed of the synthetic data; with the default, the first timed update sits at the median of "
                         "the distribution's padded width and padding overhead (see workload.typical_batch in the "
                         "JSON), so one timed update is representative (default: %(default)s)")
    ap.add_argument("--length-scale", type=float, default=1.0,
                    help="scale every token length (for quick checks of the script; 1.0 for real numbers)")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated contenders to run (default: all): {', '.join(contenders.ALL_CONTENDERS)}")
    ap.add_argument("--trl-bf16", choices=("auto", "yes", "no"), default="auto",
                    help="run TRL in bf16 too; auto: only where the measured bf16 peak is at least the fp32 one")
    ap.add_argument("--sweep", choices=("yes", "no"), default="yes", help="run the memory sweep")
    ap.add_argument("--sweep-batches", default="2,4,8", help="pairs per update for the batch-size sweep")
    ap.add_argument("--sweep-lengths", default="256,512,1024", help="tokens per sequence for the length sweep")
    ap.add_argument("--sweep-length-batch", type=int, default=2, help="pairs per update in the length sweep")
    ap.add_argument("--sweep-trl", action="store_true", help="include TRL in the memory sweep (slow)")
    ap.add_argument("--losses", choices=("yes", "no"), default="yes", help="run the loss comparison")
    ap.add_argument("--loss-steps", type=int, default=20, help="updates per mode in the loss comparison")
    ap.add_argument("--loss-batch", type=int, default=4, help="pairs per update in the loss comparison")
    ap.add_argument("--loss-length-scale", type=float, default=0.25,
                    help="token lengths of the loss comparison's pairs relative to the timed ones (default: %(default)s)")
    ap.add_argument("--loss-lr", type=float, default=1e-5,
                    help="learning rate of the loss comparison, large enough for the losses to move in 20 updates")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each contender, wait up to SECONDS for other processes to use under 0.15 cores "
                         "(on a shared machine; default: do not wait)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before a contender is stopped")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/throughput-<date>.json)")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:  # a contender's own process, started by contenders.run_worker
        contenders.worker_main(*args.worker)
        return 0
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    names = contenders.selected(args.only)
    env = environment(args)
    with tempfile.TemporaryDirectory(prefix="dpokit-bench-") as tmp_name, LoadSampler() as load:
        tmp = Path(tmp_name)
        work, dims, flops, workload = prepare_workload(args, tmp)
        peaks = matmul_peaks(dims, args.device)
        skipped = contenders.drop_skipped(names, args, peaks)
        rows = run_contenders(args, work, names, flops, peaks, tmp)
        sweep = run_sweep(args, work, tmp, rows, flops) if args.sweep == "yes" else []
        losses = run_losses(args, work, names, tmp) if args.losses == "yes" else []
        load_samples = list(load.samples)
    finish(args, env, {"model": dims, "workload": workload, "peaks": peaks}, rows, skipped, sweep, losses,
           load_samples)
    return 0


def environment(args) -> dict:
    """The start time, the device (set on `args`), the load before the run, where the results go, the machine and
    the versions."""
    import torch

    env = {"wall_start": time.perf_counter(), "started": dt.datetime.now().astimezone()}
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    load = env["load_before"] = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    if load[0] > 0.5:
        print("  warning: the machine is busy; other processes make the numbers meaningless", flush=True)
    default_out = HERE / "results" / f"throughput-{env['started']:%Y-%m-%d}.json"
    env["out_path"] = Path(args.out) if args.out else default_out
    env["out_path"].parent.mkdir(parents=True, exist_ok=True)
    env.update(machine=measure.machine(args.device), versions=measure.versions())
    return env


def prepare_workload(args, tmp: Path) -> tuple[Workload, dict, Flops, dict]:
    """The pairs, the model's dimensions and FLOP formulas, and what the JSON records about the workload."""
    from dpokit import models

    tokenizer = models.load_tokenizer(args.model)
    dims = model_dims(args.model)
    flops = Flops(dims)
    work = Workload(args, tokenizer, tmp)
    workload = work.summary(flops)
    print(f"workload: {workload['timed_pairs']} timed pairs; prompt {workload['prompt_tokens']}; chosen "
          f"{workload['chosen_tokens']}; rejected {workload['rejected_tokens']}", flush=True)
    timed = [x for x in workload["per_update"] if not x["warmup"]]
    typical = workload["typical_batch"]
    print("  timed updates: padded width " + ", ".join(str(x["padded_width"]) for x in timed)
          + ", padding overhead " + ", ".join(str(x["padding_overhead"]) for x in timed)
          + f" (medians over {typical['batches']} batches of the distribution: "
          f"{typical['padded_width']['median']}, {typical['padding_overhead']['median']})", flush=True)
    return work, dims, flops, workload


def matmul_peaks(dims: dict, device: str) -> dict:
    print("measuring matmul peaks ...", flush=True)
    peaks = measure.measure_peaks(dims, device)
    for k, v in peaks.items():
        print(f"  {k}: {v['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({v['best']['method']} {v['best']['shape']})",
              flush=True)
    return peaks


def run_contenders(args, work: Workload, names: list[str], flops: Flops, peaks: dict, tmp: Path) -> list[dict]:
    """Every contender in its own process, one after the other; their rows, compared with each other."""
    rows = []
    for spec in contenders.make_specs(args, work, names):
        print(f"running {spec['name']} ({spec['warmup']} warm-up + {spec['steps']} timed updates) ...", flush=True)
        raw = run_worker(args, spec, tmp)
        row = report.summarise(spec, raw, flops, peaks, work)
        rows.append(row)
        if row["ok"]:
            print(f"  {row['seconds_per_step']:.1f} s/update, {row['pairs_per_s']:.3f} pairs/s, peak "
                  f"{row['peak_memory_bytes'] / report.GB:.2f} GB, useful MFU {100 * row['useful_mfu']:.0f}%, "
                  f"outside load {report.fmt(row.get('outside_cpu_cores'), '.2f')} cores", flush=True)
        else:
            print(f"  failed: {row['error']}\n{raw.get('traceback') or raw.get('log_tail') or ''}", flush=True)
    report.comparisons(rows)
    return rows


def run_worker(args, spec: dict, tmp: Path) -> dict:
    """contenders.run_worker, after waiting for the machine to be quiet where --wait-quiet asks it."""
    if args.wait_quiet:
        print(f"other processes use {wait_quiet(args.wait_quiet):.2f} cores", flush=True)
    return contenders.run_worker(spec, tmp, args.timeout)


def run_sweep(args, work: Workload, tmp: Path, rows: list[dict], flops: Flops) -> list[dict]:
    """Peak memory of dpokit's default, lean-preset and plain paths (and TRL with --sweep-trl), one update per process.
    Batch axis: the first pairs of the first timed update; length axis: pairs of a fixed length."""
    names = SWEEP_CONTENDERS + (["trl"] if args.sweep_trl else [])
    main_rows = {r["name"]: r for r in rows if r.get("ok")}
    points = [("batch", int(b), None) for b in args.sweep_batches.split(",") if b]
    points += [("length", args.sweep_length_batch, int(n)) for n in args.sweep_lengths.split(",") if n]
    out = []
    for axis, pairs, seq in points:
        pair_rows = work.sweep_rows(pairs, seq)
        if pair_rows is None:
            continue
        tag = f"sweep-{axis}-{pairs}-{seq or 'natural'}"
        data = write_jsonl(tmp / f"{tag}.jsonl", pair_rows)
        lengths = tokenized_lengths(data, work.tokenizer, args.max_length)
        seqs = [p + c for p, c, _ in lengths] + [p + r for p, _, r in lengths]
        point = {"axis": axis, "pairs": pairs, "seq_target": seq, "seq_mean": statistics.fmean(seqs),
                 "seq_max": max(seqs), "logical_tokens": logical_tokens(lengths),
                 "padded_logits_bytes": 2 * pairs * max(seqs) * flops.vocab * 4, "contenders": names,
                 "results": {}}
        # the main run's first timed update is this very batch: reuse its peak when it ran only that update
        reuse = axis == "batch" and pairs == args.batch and args.steps == 1
        for name in names:
            if reuse and name in main_rows:
                m = main_rows[name]
                point["results"][name] = {"ok": True, "peak_memory_bytes": m["peak_memory_bytes"],
                                          "seconds": m["per_update_seconds"].get(args.warmup), "from_main_run": True}
                continue
            spec = contenders.make_spec(args, name, data=data, batch=pairs, warmup=0, steps=1, first_update=0, tag=tag)
            print(f"sweep {axis}: {pairs} pairs, mean {point['seq_mean']:.0f} tokens/sequence, {name} ...", flush=True)
            r = point["results"][name] = report.sweep_result(run_worker(args, spec, tmp))
            print(f"  peak {report.fmt((r['peak_memory_bytes'] or 0) / report.GB, '.2f')} GB, "
                  f"{report.fmt(r['seconds'], '.1f')} s" + ("" if r["ok"] else f" failed: {r['error']}"), flush=True)
        out.append(point)
    return out


def run_losses(args, work: Workload, names: list[str], tmp: Path) -> list[dict]:
    """Every dpokit mode's losses over `--loss-steps` updates of the same short pairs, compared (report.py); with
    the TRL bf16 row, TRL's bf16 losses against its fp32 ones, the deviation bf16 autocast gives in the reference
    implementation. All run without global-norm clipping, which the step in the backward pass (and so the lean
    preset) excludes."""
    modes = [n for n in names if contenders.kind_and_mode(n)[0] == "dpokit"]
    modes = ["prefix_shared", "lora"] + [m for m in modes if m not in ("prefix_shared", "lora")]
    modes += ["trl", "trl_bf16"] if "trl_bf16" in names else []
    plan = length_plan(args.loss_steps * args.loss_batch, args.seed + 3, args.length_scale * args.loss_length_scale)
    data = write_jsonl(tmp / "losses.jsonl", make_pairs(work.tokenizer, plan, args.seed + 3))
    losses = {}
    for name in modes:
        spec = contenders.make_spec(args, name, data=data, batch=args.loss_batch, warmup=0, steps=args.loss_steps,
                                    first_update=0, tag="losses")
        spec.update(lr=args.loss_lr, max_grad_norm=0.0, overrides={"train.max_grad_norm": 0.0})
        print(f"losses: {name}, {args.loss_steps} updates of {args.loss_batch} pairs ...", flush=True)
        raw = run_worker(args, spec, tmp)
        steps = raw.get("steps") or []
        if not raw.get("ok"):
            losses[name] = raw.get("error")
        elif all("loss" in s for s in steps):
            losses[name] = [s["loss"] for s in steps]
        else:
            losses[name] = "an update recorded no loss"
    return report.loss_comparison(losses, args.loss_steps)


def finish(args, env: dict, measured: dict, rows: list[dict], skipped: dict, sweep: list[dict],
           losses: list[dict], load_samples: list[float]) -> None:
    """Print the tables and targets; write the JSON (`measured`: the model, workload and peaks) and markdown."""
    load_before, load_after = env["load_before"], os.getloadavg()
    started, machine, versions = env["started"], env["machine"], env["versions"]
    total_seconds = time.perf_counter() - env["wall_start"]
    title = (f"DPO training throughput, dpokit vs TRL {versions['trl']} DPOTrainer — {started:%Y-%m-%d}, "
             f"{machine['gpu'] or machine['cpu']} ({machine['cores']} cores), torch {versions['torch']}, transformers "
             f"{versions['transformers']}; {args.model}, {args.batch} pairs/update, lr {args.lr}, β {args.beta}")
    targets = report.evaluate_targets(rows)
    md = report.show(title, rows, sweep, losses, targets, skipped)
    max_load = max(load_samples, default=load_after[0])
    print(f"load average (1 min) before {load_before[0]:.2f}, max during {max_load:.2f}, after {load_after[0]:.2f}")
    result = {
        "schema": report.SCHEMA, "date": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "total_seconds": total_seconds,
        "seconds_waiting_for_quiet": WAITED[0], "machine": machine, "versions": versions,
        "load_average": {"before": load_before, "after": load_after, "samples_1min_every_15s": load_samples,
                         "max_1min": max_load},
        "settings": {k: v for k, v in vars(args).items() if k != "worker"}, **measured,
        "definitions": report.DEFINITIONS, "contenders": [report.jsonable(r) for r in rows],
        "skipped": skipped, "memory_sweep": sweep, "losses": losses, "targets": targets, "markdown": md,
    }
    out_path = env["out_path"]
    out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    out_path.with_suffix(".md").write_text(md)
    print(f"\nwrote {out_path} and {out_path.with_suffix('.md')} in {total_seconds / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
