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
reference itself (the instruction-tuned model); no SFT step comes first. The runs of the comparison are
defined in `paper_runs.py`, the table and plots made in `paper_report.py`; this module plans and runs the
steps, makes the selection and goes over the seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

from dpokit import host_memory
from dpokit.config_loader import load_config
from dpokit.experiments import demo
from dpokit.experiments.paper_report import aggregate, plot_spread, print_table, seed_report, spread
from dpokit.experiments.paper_runs import (
    JUDGE,
    KL_BINS,
    SECOND_JUDGE,
    Run,
    read_selection,
    run_overrides,
    run_paths,
    runs,
)
from dpokit.fields import as_arguments
from dpokit.generation.judges import build_judge
from dpokit.generation.settings import PairingSettings, SamplingSettings
from dpokit.pipeline import commands
from dpokit.pipeline.evaluate import Evaluator
from dpokit.pipeline.frontier import Target, best_of_targets, expand_targets
from dpokit.storage import json_text


def plan(out: Path, configs: Path, *, model: str, train_prompts: Path, select_prompts: Path, heldout_prompts: Path,
         dpo: list[tuple[float, float]], alphas: list[float], kl_coefs: list[float], online_betas: list[float],
         best_of: list[int], max_new_tokens: int, eval_samples: int, select_samples: int, batch_size: int, margin: float,
         seed: int = 0, also: tuple[str, ...] = (SECOND_JUDGE,)) -> tuple[list[tuple[str, demo.Step]], list[Run]]:
    """The steps of one seed, each with the name its time is charged under, and the runs they train."""
    shift = demo.SEED_STRIDE * seed
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
    host_memory.reuse_freed_memory()  # as `dpokit sample` and `train.reuse_freed_memory`: the same results, sooner
    host_memory.huge_pages()  # what its training steps ask for by default (train.huge_pages), before any tensor

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
        rows, reference = seed_report(where, planned, read_selection(where / "select"),
                                      dict(zip((k for k, _ in steps), seconds)), elapsed, also, settings)
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
