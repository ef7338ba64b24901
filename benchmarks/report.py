"""The report: each contender's numbers, the ratios between them, the tables, the targets and the JSON.

- pairs/s = pairs in the timed updates / their wall time (data collation, forward, backward, optimizer).
- tokens/s counts the same logical tokens for everyone: 2*prompt + chosen + rejected per pair (the two
  sequences a pair stands for), no padding, completions including their EOS.
- useful MFU = useful FLOPs / wall time / measured matmul peak of the contender's dtype; HFU (estimate) = the
  FLOPs a contender actually executes / wall time / peak (both defined in measure.py). Padding, prompts computed
  twice, recomputation and full-vocabulary heads do not count as useful, so they show as lower MFU.
- precomputed reference: the one-time pass over the run's pairs is timed and amortised over the run it serves
  (one epoch of the benchmark set = warmup + steps updates): run-level time = timed updates + pass time *
  (the updates' share of the pass's reference FLOPs). Per-step numbers leave the pass out, and count only the
  policy's 3F as useful.
"""

from __future__ import annotations

import math

from contenders import LABELS, PRECOMPUTED, computation
from measure import peak_bytes
from workload import logical_tokens

SCHEMA = "dpokit-throughput/1"
GB = 1e9
DEFINITIONS = {
    "pairs_per_s": "pairs in the timed updates / their wall time (collation, forward, backward, optimizer)",
    "tokens_per_s": "sum of 2*prompt + chosen + rejected tokens (EOS included, no padding) / wall time",
    "useful_flops": "4F per pair, F = 2*N_lin*(P+C+R) + 4*L*h*d_h*(causal(P+C) + R*P + causal(R)) "
                    "+ 2*d*V*(C+R), causal(n) = n(n+1)/2; 3F per pair in the per-update numbers of the "
                    "precomputed reference",
    "useful_mfu": "useful FLOPs / wall time / measured matmul peak of the contender's dtype",
    "hfu_estimate": "estimated executed matmul FLOPs (layout, LM head, recomputation, reference) / time / peak",
    "x_trl": "pairs/s over TRL's on the timed updates both ran (TRL of the same dtype where measured)",
    "peak_memory": "ru_maxrss of the contender's own process (CPU) or torch.cuda.max_memory_allocated (GPU)",
    "outside_cpu_cores": "CPU time other processes on the machine used while the contender ran, in cores",
    "precomputed_run_level": "timed updates + the one-time reference pass, charged to each update by its "
                             "share of the pass's reference FLOPs",
}


def fmt(x, spec: str = ".2f", missing: str = "–") -> str:
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# ------------------------------------------------------------------------------------------ a contender's numbers


def summarise(spec: dict, raw: dict, flops, peaks: dict, work) -> dict:
    """A contender's row: its worker's result `raw` turned into rates, MFU and memory (`flops`: measure.Flops,
    `work`: workload.Workload)."""
    kind, mode = spec["kind"], spec["mode"]
    row = {"name": spec["name"], "label": LABELS[spec["name"]], "kind": kind, "mode": mode,
           "ok": bool(raw.get("ok")), "error": raw.get("error"), "precision": raw.get("precision"),
           "warmup": spec["warmup"], "steps": spec["steps"], "raw": raw}
    steps = raw.get("steps") or []
    if not row["ok"] or len(steps) < spec["warmup"] + spec["steps"]:
        row["ok"] = False
        row["error"] = row["error"] or f"ran {len(steps)} of {spec['warmup'] + spec['steps']} updates"
        return row
    first = spec["first_update"]
    timed = {first + i: s["seconds"] for i, s in enumerate(steps) if i >= spec["warmup"]}
    dtype = "bf16" if raw.get("precision") == "bf16-mixed" else "fp32"
    peak = peaks[dtype]["peak_flops_per_s"]
    computes = computation(kind, mode)
    mem = raw.get("memory", {})
    row.update(
        dtype=dtype, peak_flops_per_s=peak, per_update_seconds=timed, step_seconds=[s["seconds"] for s in steps],
        peak_memory_bytes=peak_bytes(mem),
        memory_metric="torch.cuda.max_memory_allocated" if "cuda_max_allocated_bytes" in mem else "ru_maxrss",
        setup_memory_bytes=_setup_rss(raw), setup_seconds=raw.get("setup_seconds"),
        outside_cpu_cores=raw.get("outside_cpu_cores"), process_seconds=raw.get("process_seconds"),
        first_step_logps_chosen=steps[0].get("logps/chosen"), token_lengths_match=raw.get("token_lengths") ==
        [list(x) for u in range(first, first + len(steps)) for x in work.update(u)],
    )
    row.update(rates(timed, work, flops, peak, computes, reference=computes["reference"]))
    if mode == "compile":
        row["first_step_seconds"] = steps[0]["seconds"]
        row["dynamo"] = raw.get("dynamo")
    if mode in PRECOMPUTED and raw.get("precompute"):
        pre = raw["precompute"]
        # the pass computes every pair's reference forward once: charge each timed update its FLOP share
        in_pass = range(first, first + spec["warmup"] + spec["steps"])
        total_ref = sum(flops.forward_min(*x) for u in in_pass for x in work.update(u))
        charged = {u: s + pre["seconds"] * sum(flops.forward_min(*x) for x in work.update(u)) / total_ref
                   for u, s in timed.items()}
        # the run executes the pass's reference forward besides the update's own work
        run = rates(charged, work, flops, peak, computes, reference=True)
        run["executed_flops_estimate"] += sum(flops.forward_min(*x) for u in timed for x in work.update(u))
        run["hfu_estimate"] = run["executed_flops_estimate"] / run["seconds"] / peak
        run.update(per_update_seconds=charged, precompute_seconds=pre["seconds"], precompute_pairs=pre["pairs"],
                   run_updates=spec["warmup"] + spec["steps"])
        row["run_level"] = run
    return row


def _setup_rss(raw: dict) -> int | None:
    """The worker's peak RSS once its trainer was built, before the first update."""
    return (raw.get("setup_memory") or {}).get("max_rss_bytes")


def sweep_result(raw: dict) -> dict:
    """A memory-sweep point's entry for one contender, from its worker's result."""
    steps = raw.get("steps") or []
    return {"ok": bool(raw.get("ok")) and bool(steps), "error": raw.get("error"),
            "peak_memory_bytes": peak_bytes(raw.get("memory", {})), "setup_memory_bytes": _setup_rss(raw),
            "seconds": steps[0]["seconds"] if steps else None, "outside_cpu_cores": raw.get("outside_cpu_cores")}


def rates(per_update: dict, work, flops, peak: float, computes: dict, *, reference: bool) -> dict:
    """Rates over the updates `per_update` (update → seconds); `reference`: count its forward as useful."""
    batches = [work.update(u) for u in per_update]
    seconds = sum(per_update.values())
    pairs = sum(len(b) for b in batches)
    tokens = sum(logical_tokens(b) for b in batches)
    useful = sum(flops.useful(b, reference=reference) for b in batches)
    executed = sum(flops.executed(b, **computes) for b in batches)
    return {"seconds": seconds, "seconds_per_step": seconds / len(batches), "pairs": pairs, "tokens": tokens,
            "pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds, "useful_flops": useful,
            "executed_flops_estimate": executed, "useful_mfu": useful / seconds / peak,
            "hfu_estimate": executed / seconds / peak}


def speed_ratio(a: dict | None, b: dict | None) -> float | None:
    """pairs/s of `a` over pairs/s of `b`, on the timed updates both ran (every update has the same pairs)."""
    if not a or not b:
        return None
    shared = set(a["per_update_seconds"]) & set(b["per_update_seconds"])
    if not shared:
        return None
    return sum(b["per_update_seconds"][u] for u in shared) / sum(a["per_update_seconds"][u] for u in shared)


def comparisons(rows: list[dict]) -> None:
    """Ratios against TRL (same dtype where measured, else fp32, marked) and against dpokit plain."""
    by = {r["name"]: r for r in rows if r.get("ok")}
    for r in rows:
        if not r.get("ok"):
            continue
        trl = by.get("trl_bf16") if r["dtype"] == "bf16" and "trl_bf16" in by else by.get("trl")
        for target in (r, r.get("run_level")):
            if target is None:
                continue
            target["vs_trl"] = speed_ratio(target, trl)
            target["vs_trl_dtype"] = trl["dtype"] if trl else None
            target["vs_plain"] = speed_ratio(target, by.get("plain"))
        r["memory_vs_trl"] = r["peak_memory_bytes"] / trl["peak_memory_bytes"] if trl else None
    compiled, eager = by.get("compile"), by.get("prefix_shared")
    if compiled and eager and compiled["warmup"] and eager["warmup"]:
        # compilation happens in the first (warm-up) update: its extra time over the same update in eager mode
        compiled["compile_seconds_estimate"] = compiled["step_seconds"][0] - eager["step_seconds"][0]


def jsonable(row: dict) -> dict:
    """A row as the JSON keeps it: the worker's result under `detail`, without the token lengths."""
    raw = {k: v for k, v in row.get("raw", {}).items() if k != "token_lengths"}
    return {k: v for k, v in row.items() if k != "raw"} | {"detail": raw}


# ------------------------------------------------------------------------------------------ tables


def main_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["contender", "dtype", "timed updates", "s/update", "pairs/s", "tokens/s", "× TRL", "× plain",
            "peak mem GB", "mem / TRL", "useful MFU", "HFU (est.)", "notes"]
    out = []
    for r in rows:
        if not r.get("ok"):
            out.append([r["label"], r.get("precision") or "–", "–", "–", "–", "–", "–", "–", "–", "–", "–", "–",
                        f"failed: {r.get('error')}"])
            continue
        for src, label in ((r, r["label"]), (r.get("run_level"), r["label"] + ", whole run")):
            if src is None:
                continue
            vs_trl, vs_plain = src.get("vs_trl"), src.get("vs_plain")
            out.append([
                label, r["dtype"], str(len(src["per_update_seconds"])), fmt(src["seconds_per_step"], ".1f"),
                fmt(src["pairs_per_s"], ".3f"), fmt(src["tokens_per_s"], ".0f"),
                fmt(vs_trl, ".2f") + ("×" if vs_trl else ""), fmt(vs_plain, ".2f") + ("×" if vs_plain else ""),
                fmt(r["peak_memory_bytes"] / GB, ".2f"), fmt(r.get("memory_vs_trl"), ".2f"),
                fmt(100 * src["useful_mfu"], ".0f") + "%", fmt(100 * src["hfu_estimate"], ".0f") + "%",
                "; ".join(_notes(r, src)),
            ])
    return head, out


def _notes(r: dict, src: dict) -> list[str]:
    """The notes column of row `r`'s line for `src` (the row itself, or its whole-run numbers)."""
    notes = []
    if r["kind"] == "trl":
        notes.append("TRL defaults: grad checkpointing on, fused AdamW")
    if r["mode"] == "compile" and r.get("compile_seconds_estimate") is not None:
        notes.append(f"compilation ≈ {r['compile_seconds_estimate']:.0f} s (warm-up update, not timed)")
    if r["mode"] in PRECOMPUTED and src is r:
        notes.append("per update, reference pass left out")
    if src is not r:
        notes.append(f"+ one reference pass ({src['precompute_seconds']:.0f} s for {src['precompute_pairs']} "
                     f"pairs) charged to a {src['run_updates']}-update run")
    if r["dtype"] == "bf16" and src.get("vs_trl_dtype") == "fp32":
        notes.append("× TRL against TRL fp32 (no TRL bf16 row)")
    if (r.get("outside_cpu_cores") or 0) > 0.2:
        notes.append(f"machine busy: other processes used {r['outside_cpu_cores']:.1f} cores")
    if not r.get("token_lengths_match", True):
        notes.append("token lengths differ from dpokit's tokenization")
    return notes


def sweep_table(sweep: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["axis", "pairs", "tokens/sequence (mean, max)", "logical tokens", "contender", "peak mem GB", "s/update",
            "[2B, width, V] fp32 logits GB"]
    out = []
    for s in sweep:
        for name in s["contenders"]:
            r = s["results"].get(name, {})
            mem = r.get("peak_memory_bytes")
            shown = fmt(mem / GB if mem else None, ".2f") if r.get("ok") else f"failed: {r.get('error')}"
            out.append([s["axis"], str(s["pairs"]), f"{s['seq_mean']:.0f}, {s['seq_max']}", str(s["logical_tokens"]),
                        LABELS[name], shown + (" (main run)" if r.get("from_main_run") else ""),
                        fmt(r.get("seconds"), ".1f"), fmt(s["padded_logits_bytes"] / GB, ".2f")])
    return head, out


def loss_table(losses: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["mode", "compared with", "|Δ| step 1", "max |Δ| over the updates", "tolerance", "within", "first → last loss"]
    out = []
    for c in losses:
        if c.get("error"):
            out.append([LABELS[c["mode"]], LABELS[c["base"]], "–", "–", "–", "–", f"failed: {c['error']}"])
            continue
        compared = "step 1 only" if c["first_only"] else f"{c['steps']} updates"
        out.append([LABELS[c["mode"]], LABELS[c["base"]], fmt(c["first"], ".1e"), fmt(c["max"], ".1e"),
                    f"{c['tolerance']:.0e} ({compared})", "yes" if c["within"] else "NO",
                    f"{c['losses'][0]:.4f} → {c['losses'][-1]:.4f}"])
    return head, out


def show(title: str, rows: list[dict], sweep: list[dict], losses: list[dict], targets: list[dict],
         skipped: dict[str, str]) -> str:
    """Print the tables, the targets and the skipped rows; return the tables as markdown."""
    head, table = main_table(rows)
    sweep_head, sweep_rows = sweep_table(sweep)
    loss_head, loss_rows = loss_table(losses)
    sweep_title = "Peak memory against batch size and sequence length"
    loss_title = "Losses of every mode against the default's, the same pairs in the same order"
    print()
    print_table(title, head, table)
    if sweep:
        print_table(f"{sweep_title} (one update per process)", sweep_head, sweep_rows)
    if losses:
        print_table(loss_title, loss_head, loss_rows)
    for t in targets:
        print(f"target {t['target']}: {t['value']} → {'met' if t['met'] else 'MISSED'}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    md = f"{title}\n\n{markdown(head, table)}\n"
    if sweep:
        md += f"\n{sweep_title}:\n\n{markdown(sweep_head, sweep_rows)}\n"
    if losses:
        md += f"\n{loss_title}:\n\n{markdown(loss_head, loss_rows)}\n"
    return md


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, head: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(markdown(head, rows))
        return
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i == 0 or h in ("notes", "contender", "axis") else "right",
                         overflow="fold")
    for r in rows:
        table.add_row(*r)
    Console(width=240).print(table)


# ------------------------------------------------------------------------------------------ targets


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """The targets, each as {target, value, met}: speed against TRL's pairs/s, peak memory against TRL's."""
    by = {r["name"]: r for r in rows if r.get("ok")}
    trl, default = by.get("trl"), by.get("prefix_shared")
    out = []

    def target(name: str, min_speed: float, max_memory: float, text: str) -> None:
        r = by.get(name)
        if not (trl and r):
            return
        speed, memory = (r.get("run_level") or r)["vs_trl"], r["memory_vs_trl"]
        out.append({"target": f"{LABELS[name]}{text}: >= {min_speed}x TRL's pairs/s at <= {max_memory}x its peak",
                    "value": f"{speed:.2f}x at {memory:.2f}x", "met": speed >= min_speed and memory <= max_memory})

    target("prefix_shared", 4, 1, "")
    target("lean", 2.5, 0.25, " (reference pass charged to the run)")
    for name in ("grad_ckpt", "ckpt_8bit", "in_backward"):  # full fine-tuning in less memory at the default's speed
        target(name, 4, 0.5, "")
    if default:
        mfu = default["useful_mfu"]
        out.append({"target": "dpokit default useful MFU >= 50%", "value": f"{100 * mfu:.0f}%", "met": mfu >= 0.5})
    bf16 = by.get("bf16")
    if bf16 and trl and default and bf16.get("vs_trl"):
        vs = "TRL bf16" if bf16["vs_trl_dtype"] == "bf16" else "TRL fp32, no TRL bf16 row"
        out.append({"target": f"dpokit bf16-mixed: more than the fp32 default's {default['vs_trl']:.2f}x over TRL "
                              f"(vs {vs})", "value": f"{bf16['vs_trl']:.2f}x", "met": bf16["vs_trl"] > default["vs_trl"]})
    return out


# ------------------------------------------------------------------------------------------ losses

# The loss comparison's tolerances on |loss - the compared mode's loss|. Modes doing the same arithmetic in another
# order (layouts, LM heads, recomputation, the reference's strategy, compilation, the step in the backward pass) are
# exact up to fp32 rounding; bf16 autocast, 8-bit optimizer state and a quantized base are not.
EXACT_TOLERANCE = 1e-4
APPROXIMATE_TOLERANCE = {"bf16": 2e-2, "trl_bf16": 2e-2, "adamw8bit": 1e-2, "ckpt_8bit": 1e-2, "lean": 1e-2,
                         "lora_lean": 1e-2, "qlora": 5e-2, "qlora_int8": 5e-2, "qlora_lean": 5e-2}


def loss_comparison(losses: dict[str, list[float] | str], steps: int) -> list[dict]:
    """Each mode's losses (or its error) against the default's; QLoRA against LoRA, TRL bf16 against TRL fp32, and
    LoRA against the default on the first update only (its adapters start at zero, then it trains other parameters)."""
    out = []
    for mode, mine in losses.items():
        base = "lora" if mode.startswith(("qlora", "lora_")) else "trl" if mode.startswith("trl") else "prefix_shared"
        if mode == base:
            continue
        entry = {"mode": mode, "base": base, "steps": steps, "first_only": mode == "lora",
                 "tolerance": APPROXIMATE_TOLERANCE.get(mode, EXACT_TOLERANCE)}
        theirs = losses.get(base)
        if isinstance(mine, str) or isinstance(theirs, str) or not theirs:
            out.append(entry | {"error": mine if isinstance(mine, str) else f"{base} failed"})
            continue
        deviations = [abs(a - b) for a, b in zip(mine, theirs)]
        entry.update(losses=mine, base_losses=theirs, deviations=deviations, first=deviations[0], max=max(deviations))
        entry["within"] = (entry["first"] if entry["first_only"] else entry["max"]) <= entry["tolerance"]
        out.append(entry)
    return out
