"""`make paper`'s report: one seed's table rows from its held-out frontier and the selection made on the
selection openings, the compute charged to each method, the mean and range over seeds, the printed table
and the plots (the spread over seeds, PPO's and online DPO's training curves)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dpokit.experiments.paper_runs import JUDGE, KL_BINS, SECOND_JUDGE, Run
from dpokit.pipeline.frontier import BEST_OF_SERIES
from dpokit.storage import json_text, text_lines


def charged_seconds(planned: list[Run], timings: dict[str, float], evaluations: list[dict]) -> dict[str, float]:
    """Wall-clock seconds per series: its data (sampling and labelling the training openings) where it learns
    from them directly or through the reward model, the reward model, and every configuration it tried;
    Best-of-N: sampling and judging its largest N's candidates."""
    data = sum(timings.get(k, 0.0) for k in ("sample train", "label train"))
    charged: dict[str, float] = {}
    for run in planned:
        if run.series not in charged:
            charged[run.series] = data if run.reward != "judge" else 0.0
            if run.needs_reward_model:
                charged[run.series] += timings.get("reward", 0.0)
        charged[run.series] += timings.get(run.name, 0.0)
    best = [e for e in evaluations if e.get("best_of")]  # the largest N's candidates include the smaller N's
    if best:
        charged[BEST_OF_SERIES] = max(e.get("seconds_candidates") or 0.0 for e in best)
    return charged


def seed_rows(points: list[dict], chosen: dict[str, dict], charged: dict[str, float],
              also: tuple[str, ...] = (SECOND_JUDGE,)) -> list[dict]:
    """One row per series of one seed: at each KL limit, the held-out point of the checkpoint chosen on the
    selection openings (reward, KL, second judges' rewards); Best-of-N's point is the largest N whose KL bound
    is within the limit (no choice made on rewards). The final KL is the chosen configuration's last point."""
    rows = []
    for series in dict.fromkeys(p["series"] for p in points):
        mine = [p for p in points if p["series"] == series]
        at = {}
        for k in KL_BINS:
            if series == BEST_OF_SERIES:
                within = [p for p in mine if p["kl"] <= k]
                point = max(within, key=lambda p: p["best_of"]) if within else None
            else:
                model = chosen.get(series, {}).get("picks", {}).get(f"{k:g}")
                point = next((p for p in mine if p["model"] == model), None)
            at[f"{k:g}"] = None if point is None else {
                "reward": point["reward"], "kl": point["kl"], "label": point["label"],
                **{j: point.get(f"{j}_reward") for j in also}}
        c = chosen.get(series, {})
        rows.append({"series": series, "setting": c.get("setting", ""), "tried": c.get("tried", []),
                     "at_kl": at, "final_kl": mine[-1]["kl"], "seconds": charged.get(series)})
    return rows


def spread(values: list[float | None]) -> dict | None:
    """Mean, min and max of the seeds that have a value (`n` of them)."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return None
    return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def aggregate(per_seed: list[list[dict]], also: tuple[str, ...] = (SECOND_JUDGE,)) -> list[dict]:
    """Each series over the seeds: the mean and min–max of its reward (and second judges') at each KL limit,
    of its final KL and of its seconds."""
    out = []
    for series in dict.fromkeys(r["series"] for rows in per_seed for r in rows):
        mine = [r for rows in per_seed for r in rows if r["series"] == series]
        at = {}
        for k in (f"{b:g}" for b in KL_BINS):
            cells = [r["at_kl"].get(k) for r in mine]
            at[k] = {key: spread([c[key] if c else None for c in cells]) for key in ("reward", "kl", *also)}
        out.append({"series": series, "setting": mine[0]["setting"], "tried": mine[0]["tried"],
                    "settings_chosen": [r["setting"] for r in mine], "at_kl": at,
                    "final_kl": spread([r["final_kl"] for r in mine]), "seconds": spread([r["seconds"] for r in mine]),
                    "seeds": len(mine)})
    return out


def cell(s: dict | None, digits: int = 3, seeds: int | None = None) -> str:
    """A spread as `mean [min, max]`, with `(n of N seeds)` where only n of the row's N seeds have a value."""
    if s is None:
        return "—"
    if s["n"] == 1 or s["min"] == s["max"]:
        text = f"{s['mean']:.{digits}f}"
    else:
        text = f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"
    return text if seeds is None or s["n"] == seeds else f"{text} ({s['n']} of {seeds} seeds)"


def chosen_cell(row: dict) -> str:
    """How many configurations were tried and the one chosen, with the seeds that chose each where they differ."""
    if not row["tried"]:
        return "—"
    seeds_of: dict[str, list[str]] = {}
    for seed, setting in enumerate(row.get("settings_chosen") or [row["setting"]]):
        seeds_of.setdefault(setting, []).append(str(seed))
    if len(seeds_of) == 1:
        return f"{len(row['tried'])}: {next(iter(seeds_of))}"
    return f"{len(row['tried'])}: " + "; ".join(f"{s} (seed{'s' if len(k) > 1 else ''} {', '.join(k)})"
                                                for s, k in seeds_of.items())


def print_table(rows: list[dict], title: str, reference: dict, also: tuple[str, ...] = (SECOND_JUDGE,)) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    cols = ("method", "configurations tried (chosen)", *(f"KL ≤ {k:g}" for k in KL_BINS),
            *(f"{j} at KL ≤ {KL_BINS[-1]:g}" for j in also), "final KL", "seconds")
    for col in cols:
        table.add_column(col, justify="left" if col.startswith(("method", "config")) else "right")
    last = f"{KL_BINS[-1]:g}"
    for r in rows:
        n, cells = r["seeds"], []
        for k in (f"{b:g}" for b in KL_BINS):
            c = r["at_kl"][k]
            cells.append("—" if c["reward"] is None else f"{cell(c['reward'], seeds=n)} (KL {c['kl']['mean']:.1f})")
        table.add_row(r["series"], chosen_cell(r), *cells, *(cell(r["at_kl"][last][j], seeds=n) for j in also),
                      cell(r["final_kl"], 2), cell(r["seconds"], 0))
    console = Console(width=220)
    console.print(table)
    console.print("reference (π_ref) mean reward: " + ", ".join(f"{name} {cell(s)}" for name, s in reference.items()))


def plot_spread(rows: list[dict], reference: dict, path: Path) -> Path:
    """Each method's held-out reward at each KL limit: the mean over seeds, a bar from the lowest to the
    highest seed; one panel per limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KL_BINS), figsize=(4.0 * len(KL_BINS), 0.45 * len(rows) + 1.4), dpi=120,
                             sharey=True)
    names = [r["series"] for r in rows]
    for ax, k in zip(axes, (f"{b:g}" for b in KL_BINS)):
        for y, r in enumerate(rows):
            s = r["at_kl"][k]["reward"]
            if s is not None:
                ax.errorbar([s["mean"]], [y], xerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]], fmt="o",
                            color="C0", capsize=3)
        if reference.get(JUDGE):
            ax.axvline(reference[JUDGE]["mean"], color="black", linestyle=":", linewidth=1, label="reference")
        ax.set_title(f"KL ≤ {k} nats")
        ax.set_xlabel(f"held-out mean reward ({JUDGE})")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    seeds = max(r["seeds"] for r in rows)
    fig.suptitle(f"best reward at matched KL, checkpoints chosen on the selection openings "
                 f"({seeds} seed{'s' if seeds > 1 else ''}: mean, min–max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def ppo_curves(out: Path, planned: list[Run]) -> Path | None:
    """The PPO runs' rollout reward and KL per step (their metrics.jsonl), one line per run: ppo_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for run in planned:
        path = out / "runs" / run.name / "metrics.jsonl"
        if run.trainer in ("ppo", "online") and path.is_file():
            rows = [json.loads(line) for line in text_lines(path.read_text(encoding="utf-8")) if line.strip()]
            curves[run.name] = [r for r in rows if "reward" in r and "kl" in r]
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=120)
    for name, rows in curves.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["reward"] for r in rows], marker="o", markersize=3, label=name)
        axes[1].plot(steps, [r["kl"] for r in rows], marker="o", markersize=3, label=name)
    axes[0].set_ylabel("rollout mean reward (its own judge)")
    axes[1].set_ylabel("rollout KL(π ‖ π_ref), nats")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ppo_curves.png")
    plt.close(fig)
    return out / "ppo_curves.png"


def seed_report(out: Path, planned: list[Run], chosen: dict[str, dict], timings: dict[str, float], total: float,
                also: tuple[str, ...] = (SECOND_JUDGE,), settings: dict | None = None) -> tuple[list[dict], dict]:
    """One seed's rows (`seed_rows`), written with its timings and settings to comparison.json; returns them
    and the reference's mean rewards (the judge's and the second judges')."""
    result = json.loads((out / "frontier" / "frontier.json").read_text())
    evaluations = [json.loads(f.read_text()) for f in sorted((out / "frontier" / "points").glob("*.json"))]
    rows = seed_rows(result["points"], chosen, charged_seconds(planned, timings, evaluations), also)
    ref = result.get("reference", {})
    reference = {JUDGE: ref.get("reward"), **{j: ref.get(f"{j}_reward") for j in also}}
    ppo_curves(out, planned)
    (out / "comparison.json").write_text(json_text({"rows": rows, "reference": reference, "selection": chosen,
                                                    "timings": timings, "total_seconds": total,
                                                    "settings": settings}, indent=2) + "\n")
    return rows, reference
