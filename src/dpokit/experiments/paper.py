"""`make paper`: the DPO paper's comparison (Rafailov et al. 2023, §6.1, Figure 2) as one command, on the
embedded SmolLM2-135M-Instruct, the sentiment openings and the VADER judge as the ground-truth reward:
DPO beside the RLHF pipeline it replaces, on one reward-vs-KL frontier.

    1-4  sample and label   the starting model's samples of the training openings become preference pairs
                            (as `make demo`); the reference's held-out samples are drawn once, for every point
    5    reward             a Bradley–Terry reward model on the training pairs
    6    DPO                one run per β of the sweep
    7    Preferred-FT       SFT on the chosen side of the pairs
    8    Unlikelihood       the paper's Unlikelihood baseline
    9    PPO                against the learned reward model, one run per KL coefficient β_KL
    10   PPO-GT             against the judge itself (the ground truth)
    11   frontier           every checkpoint of every run and Best-of-N (N = 4, 16) against the reference:
                            frontier.csv and frontier.png, one series per method

It ends with a table of each method's best mean reward at matched KL and the wall-clock seconds charged
to it: the sampling and labelling its data needed, the reward model PPO trains against, its own
training, and for Best-of-N the sampling and judging of its candidates. Every step prints the `dpokit`
command that does the same. The policies start from the reference itself (the instruction-tuned model);
no SFT step comes first, as the paper's sentiment runs had an SFT model on IMDb to start from.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from dpokit.config_loader import load_config
from dpokit.experiments import demo
from dpokit.fields import as_arguments
from dpokit.generation.judges import build_judge
from dpokit.generation.settings import PairingSettings, SamplingSettings
from dpokit.pipeline import commands
from dpokit.pipeline.evaluate import Evaluator
from dpokit.pipeline.frontier import best_of_targets, expand_targets
from dpokit.storage import json_text

JUDGE = demo.JUDGE
KL_BINS = (2.0, 5.0, 10.0)  # best reward at KL ≤ each, nats


@dataclass(frozen=True)
class Run:
    """One training run of the comparison: its series on the frontier and the command that trains it."""

    series: str
    name: str  # directory under the experiment's runs/
    trainer: str  # dpokit command: train | sft | reward | ppo
    config: str
    overrides: tuple[str, ...]
    needs_reward_model: bool = False


def runs(configs: Path, *, betas: list[float], alphas: list[float], kl_coefs: list[float]) -> list[Run]:
    out = [Run("DPO", f"dpo-beta{b:g}", "train", str(configs / "dpo.yaml"), (f"objective.beta={b}",)) for b in betas]
    out.append(Run("Preferred-FT", "preferred-ft", "sft", str(configs / "preferred_ft.yaml"), ()))
    out += [Run("Unlikelihood", f"unlikelihood-alpha{a:g}", "train", str(configs / "unlikelihood.yaml"),
                (f"objective.unlikelihood_alpha={a}",)) for a in alphas]
    out += [Run("PPO", f"ppo-kl{k:g}", "ppo", str(configs / "ppo.yaml"), (f"ppo.kl_coef={k}",),
                needs_reward_model=True) for k in kl_coefs]
    out.append(Run("PPO-GT", "ppo-gt", "ppo", str(configs / "ppo.yaml"), (f"ppo.judge={JUDGE}",)))
    return out


def plan(out: Path, configs: Path, *, model: str, train_prompts: Path, heldout_prompts: Path, betas: list[float],
         alphas: list[float], kl_coefs: list[float], best_of: list[int], max_new_tokens: int, eval_samples: int,
         batch_size: int, margin: float) -> tuple[list[demo.Step], list[Run]]:
    sampling = SamplingSettings(n=4, max_new_tokens=max_new_tokens, template="none", batch_size=batch_size)
    evaluation = replace(sampling, n=eval_samples, seed=2)
    samples_train, samples_heldout = out / "samples_train.jsonl", out / "samples_heldout.jsonl"
    pairs_train, pairs_heldout = out / "pairs_train.jsonl", out / "pairs_heldout.jsonl"
    data = (f"model.name={model}", f"data.train={pairs_train}", f"data.eval={pairs_heldout}")
    reward_dir = out / "runs" / "reward"
    steps = [
        demo.sample_step("sample the starting model on the training openings", train_prompts, samples_train, model,
                         replace(sampling, seed=0)),
        demo.sample_step("sample the reference on the held-out openings (reused by every evaluation)",
                         heldout_prompts, samples_heldout, model, replace(sampling, seed=1)),
        demo.label_step("label the training samples: all pairs, near-ties dropped", samples_train, pairs_train,
                        PairingSettings("all-pairs", margin)),
        demo.label_step("label the held-out samples: best vs worst", samples_heldout, pairs_heldout,
                        PairingSettings("best-vs-worst")),
        train_step("train the reward model", "reward", str(configs / "reward.yaml"),
                   [*data, f"output.dir={reward_dir}"]),
    ]
    planned = runs(configs, betas=betas, alphas=alphas, kl_coefs=kl_coefs)
    for run in planned:
        overrides = [*data, *run.overrides, f"output.dir={out / 'runs' / run.name}"]
        if run.trainer == "ppo":  # PPO learns on the training openings, not on the pairs
            overrides = [f"model.name={model}", f"data.train={train_prompts}", f"ppo.max_new_tokens={max_new_tokens}",
                         *run.overrides, f"output.dir={out / 'runs' / run.name}"]
            if run.needs_reward_model:
                overrides += ["ppo.judge=reward-model", f"ppo.judge_model={reward_dir / 'model'}"]
        steps.append(train_step(f"train {run.series} ({run.name})", run.trainer, run.config, overrides))
    targets = [f"{run.series}={out / 'runs' / run.name}" for run in planned]
    best = [a for n in best_of for a in ("--best-of", str(n))]
    steps.append(demo.Step(
        "evaluate every checkpoint of every run, and Best-of-N, against the reference: the reward-KL frontier",
        ["frontier", *targets, "--checkpoints", *best, "--reference-samples", str(samples_heldout),
         "--judge", JUDGE, *as_arguments(evaluation, commands.GENERATION), "--out", str(out / "frontier")],
        partial(frontier, targets, best_of, model, evaluation, samples_heldout, out / "frontier")))
    return steps, planned


def train_step(title: str, trainer: str, config: str, overrides: list[str]) -> demo.Step:
    return demo.Step(title, [trainer, config, *overrides], partial(train, trainer, config, overrides))


def train(trainer: str, config: str, overrides: list[str]) -> int:
    return commands.train(load_config(config, overrides), method=trainer)


def frontier(targets: list[str], best_of: list[int], reference: str, settings: SamplingSettings,
             reference_samples: Path, out: Path) -> int:
    points = expand_targets(targets, checkpoints=True) + best_of_targets(best_of, reference)
    evaluator = Evaluator(reference, build_judge(JUDGE), settings, reference_samples=reference_samples)
    return commands.frontier(points, evaluator, out)


# ------------------------------------------------------------------------------------------ the report


def charged_seconds(planned: list[Run], timings: dict[str, float], evaluations: list[dict]) -> dict[str, float]:
    """Wall-clock seconds per series: its data (sampling and labelling the training openings), the reward
    model for PPO, its own training runs; Best-of-N: sampling and judging its largest N's candidates."""
    data = sum(timings.get(k, 0.0) for k in ("sample train", "label train"))
    charged: dict[str, float] = {}
    for run in planned:
        own = timings.get(run.name, 0.0)
        if run.series not in charged:
            charged[run.series] = data if run.trainer != "ppo" or run.needs_reward_model else 0.0
            if run.needs_reward_model:
                charged[run.series] += timings.get("reward", 0.0)
        charged[run.series] += own
    best = [e for e in evaluations if e.get("best_of")]  # the largest N's candidates include the smaller N's
    if best:
        charged["Best-of-N"] = max(e.get("seconds_candidates") or 0.0 for e in best)
    return charged


def best_at_kl(points: list[dict], series: str, limit: float) -> float | None:
    rewards = [p["reward"] for p in points if p["series"] == series and p["kl"] <= limit]
    return max(rewards) if rewards else None


def ppo_curves(out: Path, planned: list[Run]) -> Path | None:
    """The PPO runs' rollout reward and KL per step (their metrics.jsonl), one line per run: ppo_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for run in planned:
        path = out / "runs" / run.name / "metrics.jsonl"
        if run.trainer == "ppo" and path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            curves[run.name] = [r for r in rows if "reward" in r and "kl" in r]
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=120)
    for name, rows in curves.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["reward"] for r in rows], marker="o", markersize=3, label=name)
        axes[1].plot(steps, [r["kl"] for r in rows], marker="o", markersize=3, label=name)
    axes[0].set_ylabel(f"rollout mean reward ({JUDGE})")
    axes[1].set_ylabel("rollout KL(π ‖ π_ref), nats")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ppo_curves.png")
    plt.close(fig)
    return out / "ppo_curves.png"


def report(out: Path, planned: list[Run], timings: dict[str, float], total: float) -> list[dict]:
    """The comparison table (printed and written to comparison.json): per series, the best reward at each
    KL limit, the largest KL reached and the seconds charged."""
    from rich.console import Console
    from rich.table import Table

    result = json.loads((out / "frontier" / "frontier.json").read_text())
    points = result["points"]
    evaluations = [json.loads(f.read_text()) for f in sorted((out / "frontier" / "points").glob("*.json"))]
    charged = charged_seconds(planned, timings, evaluations)
    series = list(dict.fromkeys(p["series"] for p in points))
    rows = []
    table = Table(title=f"the paper's comparison: best mean reward ({JUDGE}) at matched KL(π‖π_ref), and compute")
    for col in ("method", *(f"KL ≤ {k:g}" for k in KL_BINS), "largest KL", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name in series:
        best = {k: best_at_kl(points, name, k) for k in KL_BINS}
        largest = max(p["kl"] for p in points if p["series"] == name)
        rows.append({"series": name, "best_reward_at_kl": {f"{k:g}": v for k, v in best.items()},
                     "largest_kl": largest, "seconds": charged.get(name)})
        table.add_row(name, *("—" if v is None else f"{v:.3f}" for v in best.values()), f"{largest:.2f}",
                      "—" if charged.get(name) is None else f"{charged[name]:.0f}")
    reference = result.get("reference", {}).get("reward")
    console = Console()
    console.print(table)
    if reference is not None and not math.isnan(reference):
        console.print(f"reference (π_ref) mean reward {reference:.3f}")
    curves = ppo_curves(out, planned)
    console.print(f"plot: {out / 'frontier' / 'frontier.png'}" + (f"; PPO's curves: {curves}" if curves else "")
                  + f"; total {total / 60:.1f} min")
    (out / "comparison.json").write_text(json_text({"rows": rows, "timings": timings, "total_seconds": total},
                                                    indent=2) + "\n")
    return rows


# ------------------------------------------------------------------------------------------ command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpokit.experiments.paper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", required=True, help="the methods' training configs (configs/paper)")
    demo.add_experiment_arguments(parser, out="runs/paper")
    parser.add_argument("--beta", type=float, action="append", help="DPO β, repeatable (default 0.1, 1, 5)")
    parser.add_argument("--alpha", type=float, action="append", help="Unlikelihood α, repeatable (default 0.1)")
    # Fixed coefficients, not the paper's target KLs: Ziegler's adaptive controller moves β_KL by at most
    # 0.2·n/horizon a batch, about 2 % over this run's 1,024 rollouts, so two targets would be one run twice.
    parser.add_argument("--kl-coef", type=float, action="append",
                        help="β_KL of PPO with the learned reward, repeatable (default 0.05 as the N+ details, "
                             "0.2 as TRL's sentiment example)")
    parser.add_argument("--best-of", type=int, action="append", help="Best-of-N, repeatable (default 4, 16)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps, planned = plan(out, Path(args.configs), model=args.model, train_prompts=Path(args.train_prompts),
                          heldout_prompts=Path(args.heldout_prompts), betas=args.beta or [0.1, 1.0, 5.0],
                          alphas=args.alpha or [0.1], kl_coefs=args.kl_coef or [0.05, 0.2],
                          best_of=args.best_of or [4, 16], max_new_tokens=args.max_new_tokens,
                          eval_samples=args.eval_samples, batch_size=args.batch_size, margin=args.margin)
    return run(steps, planned, out)


def run(steps: list[demo.Step], planned: list[Run], out: Path) -> int:
    start = time.perf_counter()
    code, seconds = demo.run_steps(steps, "paper comparison")
    if code == 0:
        names = ["sample train", "sample heldout", "label train", "label heldout", "reward",
                 *(r.name for r in planned), "frontier"]
        report(out, planned, dict(zip(names, seconds)), time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
