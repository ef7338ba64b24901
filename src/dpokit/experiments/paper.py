"""`make paper`: the DPO paper's comparison (Rafailov et al. 2023, §6.1, Figure 2) as one command, on the
embedded SmolLM2-135M-Instruct, the sentiment openings and the VADER judge as the ground-truth reward:
DPO, offline and on-policy, beside the RLHF pipeline it replaces, on one reward-vs-KL frontier.

    sample, label      the starting model's samples of the training openings become preference pairs (as
                       `make demo`); the reference's samples of the selection and evaluation openings are
                       drawn once, for every point
    reward             a Bradley–Terry reward model on the training pairs
    DPO                one epoch over the pairs, one run per (β, lr) of the sweep; the reference's log-probs
                       of the pairs are computed once and shared by the sweep
    Preferred-FT       SFT on the chosen side of the pairs
    Unlikelihood       the paper's Unlikelihood baseline
    PPO                against the learned reward model, one run per KL coefficient β_KL
    PPO-GT             against the judge itself (the ground truth)
    online DPO         pairs sampled from the policy at every step, ranked by the learned reward model, and
                       (online DPO-GT) by the judge itself
    iterative DPO      rounds of sample → rank best against worst → DPO (RLHFlow's recipe), with either reward;
                       with the learned reward, online and iterative DPO sweep β as PPO sweeps β_KL (as many
                       values); against the judge, PPO, online and iterative DPO each run their first value
    select             every checkpoint of every run on the selection openings (a split of the training side,
                       never evaluated against): each method's configuration, and its checkpoint at KL ≤ 2 / 5
                       / 10, are chosen there
    frontier           the chosen configurations' checkpoints and Best-of-N (N = 4, 16) on the held-out
                       openings, scored by the judge and by a second judge no method trains on (AFINN)

It ends with a table of each method at KL ≤ 2 / 5 / 10: the held-out reward (and KL) of the checkpoint
chosen on the selection openings, the second judge's reward, the configurations tried, and the wall-clock
seconds charged: the sampling and labelling its data needed, the reward model where it learns from one, the
training of every configuration tried; for Best-of-N the sampling and judging of its candidates. `--seeds N`
repeats everything (data sampling, training, evaluation) with N seeds and reports each figure's mean and
min–max. `--resume` reads the seeds already finished with the same settings (the one-seed run is seed 0)
and, in a seed cut short, skips the steps that finished (their records in OUT/[seed-K/]steps/). Once a
seed's results are written, its runs' weights and training states are deleted (≈ 43 GB a seed) unless
`--keep-weights`. Every step prints the `dpokit` command that does the same. The policies start from the
reference itself (the instruction-tuned model); no SFT step comes first.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
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
from dpokit.pipeline.frontier import BEST_OF_SERIES, Target, best_of_targets, expand_targets
from dpokit.storage import json_text

JUDGE = demo.JUDGE
SECOND_JUDGE = "afinn"  # reported beside VADER, trained on by nothing: over-optimisation shows as a gap
KL_BINS = (2.0, 5.0, 10.0)  # best reward at KL ≤ each, nats
SEED_STRIDE = 100  # seed s offsets every sampling seed by 100·s and train.seed by s: seed 0 is the one-seed run


@dataclass(frozen=True)
class Run:
    """One training run of the comparison: its series on the frontier and the command that trains it."""

    series: str
    name: str  # directory under the experiment's runs/
    trainer: str  # dpokit command: train | sft | reward | ppo | online | iterate
    config: str
    overrides: tuple[str, ...]
    reward: str = "pairs"  # what it learns from: pairs (the labelled samples), model (the learned reward model), judge
    setting: str = ""  # the configuration, in words, for the table

    @property
    def needs_reward_model(self) -> bool:
        return self.reward == "model"


def runs(configs: Path, *, dpo: list[tuple[float, float]], alphas: list[float], kl_coefs: list[float],
         online_betas: list[float]) -> list[Run]:
    """Every configuration tried, grouped by series: DPO's (β, lr) sweep, the baselines, PPO's β_KL sweep and
    PPO-GT, and online and iterative DPO with each reward. The on-policy methods are tuned alike: with the
    learned reward, PPO sweeps β_KL and online and iterative DPO sweep β, as many values each; against the
    judge itself each runs the first value of its sweep."""
    out = [Run("DPO", f"dpo-beta{b:g}-lr{lr:g}", "train", str(configs / "dpo.yaml"),
               (f"objective.beta={b}", f"train.lr={lr}"), setting=f"β {b:g}, lr {lr:g}") for b, lr in dpo]
    out.append(Run("Preferred-FT", "preferred-ft", "sft", str(configs / "preferred_ft.yaml"), (), setting="lr 1e-4"))
    out += [Run("Unlikelihood", f"unlikelihood-alpha{a:g}", "train", str(configs / "unlikelihood.yaml"),
                (f"objective.unlikelihood_alpha={a}",), setting=f"α {a:g}") for a in alphas]
    out += [Run("PPO", f"ppo-kl{k:g}", "ppo", str(configs / "ppo.yaml"), (f"ppo.kl_coef={k}",), reward="model",
                setting=f"β_KL {k:g}") for k in kl_coefs]
    out.append(Run("PPO-GT", "ppo-gt", "ppo", str(configs / "ppo.yaml"), (f"ppo.kl_coef={kl_coefs[0]}",),
                   reward="judge", setting=f"β_KL {kl_coefs[0]:g}"))
    on_policy = (("Online DPO", "online", "online_dpo.yaml", ""),
                 ("Iterative DPO", "iterate", "iterate.yaml", "3 rounds of 85 openings, "))
    for reward, suffix, betas in (("model", "", online_betas), ("judge", "-GT", online_betas[:1])):
        tag = "rm" if reward == "model" else "gt"
        out += [Run(f"{method}{suffix}", f"{trainer}-{tag}-beta{b:g}", trainer, str(configs / config),
                    (f"objective.beta={b}",), reward=reward, setting=f"{rounds}β {b:g}, lr 1e-4, K 4")
                for method, trainer, config, rounds in on_policy for b in betas]
    return out


def plan(out: Path, configs: Path, *, model: str, train_prompts: Path, select_prompts: Path, heldout_prompts: Path,
         dpo: list[tuple[float, float]], alphas: list[float], kl_coefs: list[float], online_betas: list[float],
         best_of: list[int], max_new_tokens: int, eval_samples: int, select_samples: int, batch_size: int, margin: float,
         seed: int = 0, also: tuple[str, ...] = (SECOND_JUDGE,)) -> tuple[list[tuple[str, demo.Step]], list[Run]]:
    """The steps of one seed, each with the name its time is charged under, and the runs they train."""
    shift = SEED_STRIDE * seed
    sampling = SamplingSettings(n=4, max_new_tokens=max_new_tokens, template="none", batch_size=batch_size)
    evaluation = replace(sampling, n=eval_samples, seed=2 + shift)
    selection = replace(sampling, n=select_samples, seed=4 + shift)
    samples_train, samples_heldout = out / "samples_train.jsonl", out / "samples_heldout.jsonl"
    samples_select = out / "samples_select.jsonl"
    pairs_train, pairs_heldout = out / "pairs_train.jsonl", out / "pairs_heldout.jsonl"
    data = (f"model.name={model}", f"data.train={pairs_train}", f"data.eval={pairs_heldout}")
    seeded = (f"train.seed={42 + seed}",)
    reward_dir = out / "runs" / "reward"
    steps = [
        ("sample train", demo.sample_step("sample the starting model on the training openings", train_prompts,
                                          samples_train, model, replace(sampling, seed=0 + shift))),
        ("sample heldout", demo.sample_step("sample the reference on the held-out openings (reused by every "
                                            "evaluation)", heldout_prompts, samples_heldout, model,
                                            replace(sampling, seed=1 + shift))),
        ("sample select", demo.sample_step("sample the reference on the selection openings (where each method's "
                                           "settings are chosen)", select_prompts, samples_select, model,
                                           replace(sampling, n=2, seed=3 + shift))),
        ("label train", demo.label_step("label the training samples: all pairs, near-ties dropped", samples_train,
                                        pairs_train, PairingSettings("all-pairs", margin))),
        ("label heldout", demo.label_step("label the held-out samples: best vs worst", samples_heldout, pairs_heldout,
                                          PairingSettings("best-vs-worst"))),
        ("reward", train_step("train the reward model", "reward", str(configs / "reward.yaml"),
                              [*data, *seeded, f"output.dir={reward_dir}"])),
    ]
    planned = runs(configs, dpo=dpo, alphas=alphas, kl_coefs=kl_coefs, online_betas=online_betas)
    for run in planned:
        steps.append((run.name, train_step(f"train {run.series} ({run.setting})", run.trainer, run.config,
                                           run_overrides(run, out, model=model, train_prompts=train_prompts,
                                                         max_new_tokens=max_new_tokens, seed=seed))))
    select_dir, final_dir = out / "select", out / "frontier"
    best = [a for n in best_of for a in ("--best-of", str(n))]
    also_args = [a for j in also for a in ("--also-judge", j)]

    def select_command() -> list[str]:  # an iterative run's rounds exist once it has run
        targets = [f"{run.name}={p}" for run in planned for p in run_paths(run, out)]
        return ["frontier", *targets, "--checkpoints", "--reference-samples", str(samples_select), "--judge", JUDGE,
                *as_arguments(selection, commands.GENERATION), "--out", str(select_dir)]

    def final_command() -> list[str]:  # the configurations chosen by the step before
        return ["frontier", *chosen_specs(planned, out, read_selection(select_dir)), "--checkpoints", *best,
                "--reference-samples", str(samples_heldout), "--judge", JUDGE, *also_args,
                *as_arguments(evaluation, commands.GENERATION), "--out", str(final_dir)]

    steps.append(("select", demo.Step(
        "evaluate every checkpoint of every run on the selection openings; choose each method's configuration and "
        "its checkpoint at each KL there", select_command,
        partial(select, planned, out, model, selection, samples_select, select_dir))))

    steps.append(("frontier", demo.Step(
        "evaluate the chosen configurations' checkpoints, and Best-of-N, on the held-out openings: the frontier",
        final_command, partial(frontier, planned, out, best_of, model, evaluation, samples_heldout, final_dir,
                               also))))
    return steps, planned


def run_overrides(run: Run, out: Path, *, model: str, train_prompts: Path, max_new_tokens: int,
                  seed: int) -> list[str]:
    """A run's command-line settings: its data, its reward, its seed and its directory."""
    where = [*run.overrides, f"train.seed={42 + seed}", f"output.dir={out / 'runs' / run.name}"]
    if run.reward == "pairs":
        # the DPO sweep's runs share one set of pairs and one reference: its log-probs are computed once a seed
        shared = [f"reference.cache_dir={out / 'reference-logps'}"] if run.series == "DPO" else []
        return [f"model.name={model}", f"data.train={out / 'pairs_train.jsonl'}",
                f"data.eval={out / 'pairs_heldout.jsonl'}", *shared, *where]
    # PPO, online and iterative DPO learn on the training openings; their rollouts as long as the evaluation's
    section = "ppo" if run.trainer == "ppo" else "online"
    judge = ([f"{section}.judge=reward-model", f"{section}.judge_model={out / 'runs' / 'reward' / 'model'}"]
             if run.needs_reward_model else [f"{section}.judge={JUDGE}"])
    return [f"model.name={model}", f"data.train={train_prompts}", f"{section}.max_new_tokens={max_new_tokens}",
            *judge, *where]


def run_paths(run: Run, out: Path) -> list[Path]:
    """The run directories of a run: one, or an iterative run's rounds."""
    base = out / "runs" / run.name
    if run.trainer != "iterate":
        return [base]
    return sorted((base.glob("round-*")), key=lambda p: int(p.name.split("-")[1])) or [base / "round-1"]


def train_step(title: str, trainer: str, config: str, overrides: list[str]) -> demo.Step:
    return demo.Step(title, [trainer, config, *overrides], partial(train, trainer, config, overrides))


def train(trainer: str, config: str, overrides: list[str]) -> int:
    cfg = load_config(config, overrides)
    if trainer == "iterate":
        from dpokit.pipeline.iterate import iterate

        shutil.rmtree(cfg.output.dir, ignore_errors=True)  # its finished rounds are never redone: start over
        iterate(cfg)
        return 0
    return commands.train(cfg, method="online_dpo" if trainer == "online" else trainer)


def targets_of(series: str, paths: list[Path]) -> list[Target]:
    """A run's checkpoints and final model as frontier targets; an iterative run's rounds labelled as such."""
    found = []
    for k, path in enumerate(paths, 1):
        targets = expand_targets([f"{series}={path}"], checkpoints=True)
        if path.name.startswith("round-"):  # the round's final model, after its checkpoints if any
            targets = [replace(t, label=f"round {k}" + ("" if t is targets[-1] else f" step {t.step}"))
                       for t in targets]
        found += targets
    return found


def select(planned: list[Run], out: Path, reference: str, settings: SamplingSettings, reference_samples: Path,
           select_dir: Path) -> int:
    targets = [t for run in planned for t in targets_of(run.name, run_paths(run, out))]
    evaluator = Evaluator(reference, build_judge(JUDGE), settings, reference_samples=reference_samples)
    code = commands.frontier(targets, evaluator, select_dir)
    result = json.loads((select_dir / "frontier.json").read_text())
    chosen = choose(result["points"], planned, result["reference"]["reward"])
    (select_dir / "selection.json").write_text(json_text(chosen, indent=2) + "\n")
    for series, c in chosen.items():
        print(f"{series}: {c['setting']} (of {len(c['tried'])} tried)")
    return code


def choose(points: list[dict], planned: list[Run], reference_reward: float) -> dict[str, dict]:
    """Per series, on the selection openings' points (their series: the run's name): the configuration whose
    frontier is best — the mean over KL_BINS of its best reward at KL ≤ k, the reference's where it has no
    point there; the first of the grid on a tie — and, per KL limit, that configuration's checkpoint with the
    best reward within it (None where it has none)."""
    by_run: dict[str, list[dict]] = {}
    for p in points:
        by_run.setdefault(p["series"], []).append(p)

    def best(pts: list[dict], limit: float) -> dict | None:
        within = [p for p in pts if p["kl"] <= limit]
        return max(within, key=lambda p: p["reward"]) if within else None

    def score(run: Run) -> float:
        found = [best(by_run.get(run.name, []), k) for k in KL_BINS]
        return sum(reference_reward if p is None else p["reward"] for p in found) / len(KL_BINS)

    chosen = {}
    for series in dict.fromkeys(r.series for r in planned):
        tried = [r for r in planned if r.series == series]
        winner = max(tried, key=score)  # max keeps the first of equals
        picks = {f"{k:g}": (p["model"] if (p := best(by_run.get(winner.name, []), k)) else None) for k in KL_BINS}
        chosen[series] = {"run": winner.name, "setting": winner.setting, "tried": [r.setting for r in tried],
                          "scores": {r.setting: score(r) for r in tried}, "picks": picks}
    return chosen


def read_selection(select_dir: Path) -> dict[str, dict]:
    path = select_dir / "selection.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def chosen_specs(planned: list[Run], out: Path, chosen: dict[str, dict]) -> list[str]:
    """`SERIES=PATH` of each series' chosen configuration (every configuration's before the choice is made)."""
    names = {c["run"] for c in chosen.values()}
    return [f"{run.series}={p}" for run in planned if not chosen or run.name in names for p in run_paths(run, out)]


def frontier(planned: list[Run], out: Path, best_of: list[int], reference: str, settings: SamplingSettings,
             reference_samples: Path, final_dir: Path, also: tuple[str, ...]) -> int:
    chosen = read_selection(out / "select")
    names = {c["run"] for c in chosen.values()}
    targets = [t for run in planned if run.name in names for t in targets_of(run.series, run_paths(run, out))]
    targets += best_of_targets(best_of, reference)
    evaluator = Evaluator(reference, build_judge(JUDGE), settings, reference_samples=reference_samples,
                          also=[build_judge(j) for j in also])
    return commands.frontier(targets, evaluator, final_dir)


# ------------------------------------------------------------------------------------------ the report


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


def cell(s: dict | None, digits: int = 3) -> str:
    if s is None:
        return "—"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


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
        tried = f"{len(r['tried'])}: {r['setting']}" if r["tried"] else "—"
        cells = []
        for k in (f"{b:g}" for b in KL_BINS):
            c = r["at_kl"][k]
            cells.append("—" if c["reward"] is None else f"{cell(c['reward'])} (KL {c['kl']['mean']:.1f})")
        table.add_row(r["series"], tried, *cells, *(cell(r["at_kl"][last][j]) for j in also),
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
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
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


def seed_settings(args: argparse.Namespace, seed: int) -> dict:
    """What one seed's results depend on besides the code: the command's settings, the seed and the text of
    every config it trains with. A finished seed that recorded the same is reused by `--resume`."""
    import hashlib

    from dpokit import __version__

    keep = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "seeds", "resume", "keep_weights")}
    configs = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
               for p in sorted(Path(args.configs).glob("*.yaml"))}
    return json.loads(json_text({**keep, "seed": seed, "config_files": configs, "dpokit": __version__}))


WEIGHT_FILES = ("*.safetensors", "*.pt", "*.bin")


def drop_weights(where: Path) -> int:
    """Deletes the weights and training states under a finished seed's runs/ (every checkpoint and exported
    model, the reward model): ≈ 3.6 GB a run and 43 GB a seed on the embedded model. What the comparison
    reads stays: each run's config, metrics and run.json, the samples and pairs, the selection and every
    evaluation. Returns the bytes freed."""
    freed = 0
    for pattern in WEIGHT_FILES:
        for path in (where / "runs").rglob(pattern):
            freed += path.stat().st_size
            path.unlink()
    return freed


def finished_seed(where: Path, settings: dict) -> tuple[list[dict], dict, float] | None:
    """A seed's rows, reference and seconds from its comparison.json, if it finished with `settings`."""
    path = where / "comparison.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    if done.get("settings") != settings:
        return None
    return done["rows"], done["reference"], done["total_seconds"]


def seed_report(out: Path, planned: list[Run], timings: dict[str, float], total: float,
                also: tuple[str, ...] = (SECOND_JUDGE,), settings: dict | None = None) -> tuple[list[dict], dict]:
    """One seed's rows (`seed_rows`), written with its timings and settings to comparison.json; returns them
    and the reference's mean rewards (the judge's and the second judges')."""
    result = json.loads((out / "frontier" / "frontier.json").read_text())
    evaluations = [json.loads(f.read_text()) for f in sorted((out / "frontier" / "points").glob("*.json"))]
    chosen = read_selection(out / "select")
    rows = seed_rows(result["points"], chosen, charged_seconds(planned, timings, evaluations), also)
    ref = result.get("reference", {})
    reference = {JUDGE: ref.get("reward"), **{j: ref.get(f"{j}_reward") for j in also}}
    ppo_curves(out, planned)
    (out / "comparison.json").write_text(json_text({"rows": rows, "reference": reference, "selection": chosen,
                                                    "timings": timings, "total_seconds": total,
                                                    "settings": settings}, indent=2) + "\n")
    return rows, reference


# ------------------------------------------------------------------------------------------ command


def parse_dpo(text: str) -> tuple[float, float]:
    beta, _, lr = text.partition(",")
    try:
        pair = float(beta), float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dpo takes BETA,LR (e.g. 0.1,1e-4), got {text!r}") from None
    if not all(v > 0 and math.isfinite(v) for v in pair):
        raise argparse.ArgumentTypeError(f"--dpo: β and lr must be positive, got {text!r}")
    return pair


DEFAULT_DPO = [(0.05, 1e-4), (0.1, 1e-4), (0.5, 1e-4), (0.1, 3e-5)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpokit.experiments.paper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", required=True, help="the methods' training configs (configs/paper)")
    demo.add_experiment_arguments(parser, out="runs/paper")
    parser.add_argument("--select-prompts", required=True,
                        help="the selection openings, a split of the training side where each method's settings are "
                             "chosen (data/sentiment/prompts_select.jsonl)")
    parser.add_argument("--select-samples", type=int, default=1,
                        help="policy samples per selection opening (default 1)")
    parser.add_argument("--dpo", type=parse_dpo, action="append", metavar="BETA,LR",
                        help="a DPO configuration, repeatable (default 0.05,1e-4 0.1,1e-4 0.5,1e-4 0.1,3e-5)")
    parser.add_argument("--alpha", type=float, action="append", help="Unlikelihood α, repeatable (default 0.1)")
    # Fixed coefficients, not the paper's target KLs: Ziegler's adaptive controller moves β_KL by at most
    # 0.2·n/horizon a batch, about 2 % over this run's 1,024 rollouts, so two targets would be one run twice.
    parser.add_argument("--kl-coef", type=float, action="append",
                        help="β_KL of PPO with the learned reward, repeatable (default 0.05 as the N+ details, "
                             "0.2 as TRL's sentiment example)")
    parser.add_argument("--online-beta", type=float, action="append",
                        help="β of online and iterative DPO with the learned reward, repeatable (default 0.1, 0.5: "
                             "as many values as PPO's β_KL); with the judge itself they run the first, as PPO-GT "
                             "runs the first β_KL")
    parser.add_argument("--best-of", type=int, action="append", help="Best-of-N, repeatable (default 4, 16)")
    parser.add_argument("--also-judge", action="append",
                        help=f"a judge reported beside {JUDGE} on the held-out openings, repeatable "
                             f"(default {SECOND_JUDGE})")
    parser.add_argument("--seeds", type=int, default=1,
                        help="repeat everything with N seeds and report the mean and min–max (default 1); seed 0 "
                             "runs in OUT itself (the one-seed run), seed K in OUT/seed-K")
    parser.add_argument("--resume", action="store_true",
                        help="read the seeds that already finished in OUT with the same settings and configs instead "
                             "of running them again (e.g. `make paper`'s run becomes seed 0 of --seeds 3), and skip "
                             "the steps that finished in a seed cut short")
    parser.add_argument("--keep-weights", action="store_true",
                        help="keep every run's weights and training states (≈ 43 GB a seed on the embedded model); "
                             "by default they are deleted once the seed's results are written")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    also = tuple(args.also_judge or [SECOND_JUDGE])
    per_seed, references, total = [], [], 0.0
    for seed in range(args.seeds):
        where = out if seed == 0 else out / f"seed-{seed}"
        where.mkdir(parents=True, exist_ok=True)
        settings = seed_settings(args, seed)
        if args.resume and (done := finished_seed(where, settings)) is not None:
            rows, reference, seconds = done
            print(f"seed {seed}: finished in {where} ({seconds / 60:.1f} min), read from its comparison.json")
            if not args.keep_weights and (freed := drop_weights(where)):
                print(f"seed {seed}: {freed / 1e9:.1f} GB of weights and training states deleted")
            per_seed.append(rows)
            references.append(reference)
            total += seconds
            continue
        steps, planned = plan(where, Path(args.configs), model=args.model, train_prompts=Path(args.train_prompts),
                              select_prompts=Path(args.select_prompts), heldout_prompts=Path(args.heldout_prompts),
                              dpo=args.dpo or DEFAULT_DPO, alphas=args.alpha or [0.1],
                              kl_coefs=args.kl_coef or [0.05, 0.2], online_betas=args.online_beta or [0.1, 0.5],
                              best_of=args.best_of or [4, 16],
                              max_new_tokens=args.max_new_tokens, eval_samples=args.eval_samples,
                              select_samples=args.select_samples, batch_size=args.batch_size, margin=args.margin,
                              seed=seed, also=also)
        code, seconds = demo.run_steps([s for _, s in steps], f"paper comparison (seed {seed})",
                                       records=where / "steps", reuse=args.resume, settings=settings)
        if code != 0:
            return code
        elapsed = sum(seconds)  # the steps reused from an interrupted run count the seconds they took then
        rows, reference = seed_report(where, planned, dict(zip((k for k, _ in steps), seconds)), elapsed, also,
                                      settings)
        if not args.keep_weights:
            print(f"seed {seed}: results written; {drop_weights(where) / 1e9:.1f} GB of weights and training "
                  f"states deleted (--keep-weights keeps them)")
        per_seed.append(rows)
        references.append(reference)
        total += elapsed
    rows = aggregate(per_seed, also)
    reference = {j: spread([r[j] for r in references]) for j in references[0]}
    title = (f"the paper's comparison over {args.seeds} seed{'s' if args.seeds > 1 else ''}: held-out mean reward "
             f"({JUDGE}) of the checkpoint chosen on the selection openings at KL(π‖π_ref) ≤ k"
             + (" (mean [min, max])" if args.seeds > 1 else ""))
    print_table(rows, title, reference, also)
    plot = plot_spread(rows, reference, out / "spread.png")
    (out / "seeds.json").write_text(json_text({"seeds": args.seeds, "rows": rows, "reference": reference,
                                               "total_seconds": total}, indent=2) + "\n")
    print(f"plots: {plot}, {out / 'frontier' / 'frontier.png'}; total {total / 60:.1f} min "
          f"(the seeds' own wall times summed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
