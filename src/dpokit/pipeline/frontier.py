"""`dpokit frontier`: evaluate several runs and checkpoints against one reference and draw reward
against KL(π‖π_ref), one series per method, as in the DPO paper's Figure 2.

Targets are `[SERIES=]PATH`: a dpokit run directory (its final model; with `checkpoints`, every checkpoint
too), a checkpoint, or any model. A run's series is its method (`objective.loss`: DPO, IPO, ...), so a β
sweep of one method forms one series; give `SERIES=` to name it otherwise.

`best_of_targets([4, 16], reference)` adds the reference's Best-of-N (`Evaluator.evaluate_best_of`) as the
series "Best-of-N", a point per N, whose KL is the analytic bound log N − (N−1)/N (column `kl_kind`:
`bound`; the other points' KL is `estimate`d from samples).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from dpokit import models
from dpokit.errors import ConfigError
from dpokit.methods.registry import METHODS
from dpokit.objectives.registry import OBJECTIVES
from dpokit.pipeline.evaluate import EvalResult, Evaluator, write_result
from dpokit.rundir import RunModel, run_model, run_models
from dpokit.storage import json_text

CSV_FIELDS = ("series", "label", "model", "beta", "step", "kl", "kl_se", "reward", "reward_se", "win_rate",
              "win_rate_se", "preference_accuracy", "tokens", "best_of", "kl_kind")
BEST_OF_SERIES = "Best-of-N"


@dataclass(frozen=True)
class Target:
    series: str
    label: str
    model: str
    beta: float | None = None
    step: int | None = None
    best_of: int | None = None  # the reference's best-of-N (`model` is then the reference)


def best_of_targets(ns: list[int], reference: str) -> list[Target]:
    """One "Best-of-N" point per distinct N, in increasing N."""
    return [Target(BEST_OF_SERIES, f"N={n}", reference, best_of=n) for n in sorted(set(ns))]


def expand_targets(specs: list[str], *, checkpoints: bool = False) -> list[Target]:
    """`[SERIES=]PATH` specs → the models to evaluate, checkpoints first, each run's final model last."""
    targets: list[Target] = []
    for spec in specs:
        series, sep, path = spec.partition("=")
        if not sep:
            series, path = "", spec
        if not path:
            raise ConfigError(f"target {spec!r} names no model")
        info = run_model(path)
        if info is not None and info.final and Path(path).expanduser().resolve() == info.run_dir:
            found = run_models(info.run_dir, checkpoints=checkpoints)
        elif info is not None:
            found = [info]
        else:
            models.resolve(path)  # a missing path stops here, before any target is evaluated
            targets.append(Target(series or path, Path(path).name or path, path))
            continue
        for m in found:
            step = f"step {m.step}" if m.step is not None else "final"
            beta = uses_beta(m)
            label = f"β={m.beta:g} {step}" if beta else step
            targets.append(Target(series or series_name(m), label, str(m.path), m.beta if beta else None, m.step))
    return targets


def series_name(m: RunModel) -> str:
    """A run's default series: its objective's display name (DPO's family), else its method's."""
    if m.loss == "sft-chosen":
        return "Preferred-FT"
    if m.loss in OBJECTIVES:
        return OBJECTIVES[m.loss].display
    return METHODS[m.loss].display if m.loss in METHODS else m.loss


def uses_beta(m: RunModel) -> bool:
    """Whether objective.beta shaped the run (DPO's family but ORPO and Unlikelihood; not SFT or PPO)."""
    names = m.loss.split("+")
    return all(n in OBJECTIVES for n in names) and any(OBJECTIVES[n].uses_beta for n in names)


@dataclass
class FrontierPoint:
    target: Target
    result: EvalResult

    def row(self) -> dict:
        r = self.result
        return {"series": self.target.series, "label": self.target.label, "model": self.target.model,
                "beta": self.target.beta, "step": self.target.step, "kl": r.kl.mean, "kl_se": r.kl.se,
                "reward": r.reward_policy.mean, "reward_se": r.reward_policy.se, "win_rate": r.win_rate.mean,
                "win_rate_se": r.win_rate.se, "preference_accuracy": r.preference_accuracy, "tokens": r.tokens_policy,
                "best_of": self.target.best_of, "kl_kind": r.kl_kind, **also_columns(r.extra.get("also", {}))}


def also_columns(also: dict, side: str = "reward_policy") -> dict:
    """A second judge's columns (`--also-judge`): `<judge>_reward` and `<judge>_win_rate` of a point (`side`
    reward_reference: the reference's own row)."""
    out = {}
    for name, a in also.items():
        out[f"{name}_reward"] = a[side]["mean"]
        out[f"{name}_win_rate"] = a["win_rate"]["mean"] if side == "reward_policy" else 0.5
    return out


def run_frontier(evaluator: Evaluator, targets: list[Target], out_dir: str | Path) -> list[FrontierPoint]:
    """Evaluate each target; write `points/NNN.json` per target, `frontier.csv` and `frontier.png`."""
    out = Path(out_dir)
    (out / "points").mkdir(parents=True, exist_ok=True)
    points = []
    for k, target in enumerate(targets):
        evaluator.echo(f"[{k + 1}/{len(targets)}] {target.series} {target.label}: {target.model}")
        if target.best_of is not None:
            result = evaluator.evaluate_best_of(target.best_of)
        else:
            result = evaluator.evaluate(target.model)
        result.extra.update(series=target.series, label=target.label)
        write_result(result, out / "points" / f"{k:03d}.json")
        points.append(FrontierPoint(target, result))
        bound = " (analytic bound)" if result.kl_kind == "bound" else ""
        evaluator.echo(f"    KL {result.kl.mean:.2f}{bound}  reward {result.reward_policy.mean:.3f} "
                        f"(reference {result.reward_reference.mean:.3f})  win rate {result.win_rate.mean:.3f}")
    reference = evaluator_reference_row(evaluator, points)
    write_csv(points, reference, out / "frontier.csv")
    plot_frontier(points, reference, out / "frontier.png", judge=evaluator.judge.name)
    (out / "frontier.json").write_text(json_text({"reference": reference, "points": [p.row() for p in points]},
                                                  indent=2) + "\n", encoding="utf-8")
    return points


def evaluator_reference_row(evaluator: Evaluator, points: list[FrontierPoint]) -> dict:
    """The reference itself: KL 0 and its own mean reward."""
    ref = points[0].result.reward_reference if points else None
    return {"series": "reference", "label": "π_ref", "model": evaluator.reference_name, "beta": None, "step": 0,
            "kl": 0.0, "kl_se": 0.0, "reward": ref.mean if ref else math.nan, "reward_se": ref.se if ref else math.nan,
            "win_rate": 0.5, "win_rate_se": 0.0, "preference_accuracy": None,
            "tokens": points[0].result.tokens_reference if points else math.nan, "best_of": None, "kl_kind": None,
            **also_columns(points[0].result.extra.get("also", {}) if points else {}, "reward_reference")}


def write_csv(points: list[FrontierPoint], reference: dict, path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        extra = [k for k in reference if k not in CSV_FIELDS]  # the second judges' columns
        writer = csv.DictWriter(f, fieldnames=[*CSV_FIELDS, *extra])
        writer.writeheader()
        writer.writerow(reference)
        for p in points:
            writer.writerow(p.row())
    return path


def plot_frontier(points: list[FrontierPoint], reference: dict, path: str | Path, *, judge: str = "judge") -> Path:
    """Reward (y) against KL (x) with standard-error bars; points of one run joined in step order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.4), dpi=120)
    series: dict[str, list[FrontierPoint]] = {}
    for p in points:
        series.setdefault(p.target.series, []).append(p)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, members) in enumerate(series.items()):
        color = colors[k % len(colors)]
        xs = [p.result.kl.mean for p in members]
        ys = [p.result.reward_policy.mean for p in members]
        ax.errorbar(xs, ys, xerr=[_zero_nan(p.result.kl.se) for p in members],
                    yerr=[_zero_nan(p.result.reward_policy.se) for p in members], fmt="o", color=color,
                    label=f"{name} (KL: bound)" if name == BEST_OF_SERIES else name, capsize=2, markersize=5, elinewidth=0.8)
        if len(points) <= 16:
            for p, x, y in zip(members, xs, ys):
                ax.annotate(p.target.label, (x, y), xytext=(5, -11), textcoords="offset points", fontsize=7,
                            color=color)
        runs: dict[str, list[FrontierPoint]] = {}
        for p in members:  # one line per run (β), through its checkpoints; one through the best-of-N points
            runs.setdefault("best-of" if p.target.best_of else str(run_key(p.target.model)), []).append(p)
        for run_points in runs.values():
            if len(run_points) > 1:
                run_points = sorted(run_points, key=lambda p: p.target.step or p.target.best_of or 0)
                ax.plot([0.0] + [p.result.kl.mean for p in run_points],
                        [reference["reward"]] + [p.result.reward_policy.mean for p in run_points],
                        color=color, alpha=0.35, linewidth=1)
    ax.scatter([0.0], [reference["reward"]], marker="*", s=140, color="black", label="reference", zorder=3)
    ax.set_xlabel("KL(π ‖ π_ref) per completion (nats)")
    ax.set_ylabel(f"mean reward ({judge})")
    ax.set_title("reward vs KL frontier")
    ax.grid(alpha=0.3)
    # outside the axes, right of them: inside, it covered points wherever they lay
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def run_key(model: str) -> Path | str:
    info = run_model(model)
    return info.run_dir if info is not None else model


def _zero_nan(x: float) -> float:
    return 0.0 if math.isnan(x) else x
