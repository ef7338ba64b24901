"""`dpokit sample | label | evaluate | frontier`: argument parsing and printing around the library calls."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dpokit.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_commands(sub) -> None:
    """Register the experiment-pipeline sub-commands on the `dpokit` parser's subparsers."""
    _add_sample(sub)
    _add_label(sub)
    _add_evaluate(sub)
    _add_frontier(sub)


# ------------------------------------------------------------------------------------------ shared options


def _judge_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("judge")
    g.add_argument("--judge", required=required, default=None,
                   help="sentiment (VADER), reward-model, length, keywords, or module:function (a Python callable "
                        "fn(prompt, completion) -> float; the module may be a .py path)")
    g.add_argument("--judge-model", default=None,
                   help="model of the reward-model judge, or a sentiment classifier to use instead of VADER "
                        "(hub id or local directory)")
    g.add_argument("--judge-option", action="append", default=[], metavar="KEY=VALUE",
                   help="judge setting, repeatable: on=text|completion, label=NAME (classifiers), unit=words|chars "
                        "and target=N (length), words=a,b,c and weight=W (keywords), batch_size=N")


def _judge(args: argparse.Namespace):
    import yaml

    from dpokit.pipeline.judges import build_judge

    if args.judge is None:
        return None
    options = {}
    for item in args.judge_option:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--judge-option {item!r} must look like key=value")
        try:
            options[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            options[key.strip()] = raw
    return build_judge(args.judge, model=args.judge_model, options=options)


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model weights dtype (float32 on CPUs without fast bf16)")


def _generation_args(p: argparse.ArgumentParser, *, seed: int, n: int) -> None:
    p.add_argument("--n", type=int, default=n, help=f"completions per prompt (default {n})")
    p.add_argument("--max-new-tokens", type=int, default=32, help="most tokens per completion (default 32)")
    p.add_argument("--seed", type=int, default=seed, help=f"sampling seed (default {seed})")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generation batch (default 32)")
    p.add_argument("--template", default="auto", choices=("auto", "chat", "none"),
                   help="chat template: auto applies it to conversations, and to string prompts when the model "
                        "has one; none continues strings as plain text (default auto)")


# ------------------------------------------------------------------------------------------ sample


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample N completions per prompt from a model",
                       description="Sample N completions per prompt and write JSONL rows: prompt, completions, their "
                                   "log-probs under the model (summed over tokens, temperature 1), token counts. "
                                   "Rows are written as batches finish; rerunning the same command resumes.")
    p.add_argument("prompts", help="prompt file: .jsonl/.json rows with 'prompt' (string or messages), or .txt lines")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model: {DEFAULT_MODEL} (embedded default), hub id, local dir, .gguf, dpokit run or checkpoint")
    p.add_argument("--out", required=True, help="output JSONL")
    _generation_args(p, seed=0, n=4)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, 0 for greedy (default 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming an existing --out")
    _device_args(p)
    p.set_defaults(func=_sample)


def _sample(args: argparse.Namespace) -> int:
    from dpokit.pipeline.sample import SamplingSettings, sample_file

    settings = SamplingSettings(n=args.n, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                                template=args.template).check()
    s = sample_file(args.model, args.prompts, args.out, settings, overwrite=args.overwrite, device=args.device,
                    dtype=args.dtype)
    resumed = f" ({s.resumed} from an earlier run)" if s.resumed else ""
    print(f"{s.completions} completions for {s.prompts} prompts{resumed} → {s.path}; "
          f"{s.finished_share:.0%} ended with EOS, mean log-prob {s.mean_logp:.2f}")
    return 0


# ------------------------------------------------------------------------------------------ label


def _add_label(sub) -> None:
    p = sub.add_parser("label", help="score samples with a judge and write preference pairs",
                       description="Score each completion of a `dpokit sample` file with a judge and pair the "
                                   "completions of each prompt: the output is a preference file `dpokit train` reads "
                                   "(prompt, chosen, rejected).")
    p.add_argument("samples", help="JSONL from `dpokit sample` (or rows with 'prompt', 'completions' and 'scores')")
    p.add_argument("--out", required=True, help="preference pairs JSONL")
    _judge_args(p, required=False)
    p.add_argument("--mode", default="all-pairs", choices=("all-pairs", "best-vs-worst"),
                   help="all-pairs: every two completions of a prompt (4 → 6 pairs); best-vs-worst: one pair")
    p.add_argument("--margin", type=float, default=0.0,
                   help="drop pairs whose scores differ by less than this (ties are always dropped)")
    p.add_argument("--scored-out", default=None, help="also write the samples with their scores to this JSONL")
    p.set_defaults(func=_label)


def _label(args: argparse.Namespace) -> int:
    from dpokit.pipeline.pairs import label_file

    judge = _judge(args)
    s = label_file(args.samples, args.out, judge, mode=args.mode, margin=args.margin, scored_out=args.scored_out)
    print(f"{s.counts.summary()} → {s.pairs_path}; mean score {s.mean_score:.3f}")
    return 0


# ------------------------------------------------------------------------------------------ evaluate


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", default=None,
                   help="reference model (default: the model a dpokit run started from)")
    p.add_argument("--prompts", default=None, help="held-out prompt file")
    p.add_argument("--reference-samples", default=None,
                   help="reference samples from `dpokit sample` at temperature 1 (reused instead of sampling the "
                        "reference again; their prompts, max-new-tokens and template are used)")
    p.add_argument("--pairs", default=None, help="held-out preference pairs for the preference accuracy")
    _judge_args(p)
    _generation_args(p, seed=1234, n=4)
    _device_args(p)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="reward, win rate and KL of a policy against its reference",
                       description="Sample the policy and the reference on held-out prompts (temperature 1, no top-p) "
                                   "and report the mean judge reward of each, the policy's win rate over the reference, "
                                   "the sequence-level KL(π‖π_ref) on the policy's samples and, given held-out pairs, "
                                   "the preference accuracy.")
    p.add_argument("policy", help="policy: dpokit run directory, checkpoint, local dir or hub id")
    _eval_args(p)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--samples-out", default=None, help="write the policy's scored samples to this JSONL")
    p.set_defaults(func=_evaluate)


def _evaluator(args: argparse.Namespace, reference: str):
    from dpokit.pipeline.evaluate import EvalSettings, Evaluator
    from dpokit.pipeline.prompts import read_prompts

    if args.prompts is None and args.reference_samples is None:
        raise ConfigError("give the held-out prompts (--prompts) or reference samples (--reference-samples)")
    settings = EvalSettings(n=args.n, max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                            template=args.template)
    settings.sampling()  # checks the values
    prompts = read_prompts(args.prompts) if args.prompts else None
    return Evaluator(reference, _judge(args), settings, prompts=prompts, reference_samples=args.reference_samples,
                     pairs=args.pairs, device=args.device, dtype=args.dtype)


def _evaluate(args: argparse.Namespace) -> int:
    from dpokit.pipeline.evaluate import print_result, resolve_reference, write_result
    from dpokit.pipeline.runs import check_model

    check_model(args.policy)  # a missing policy path is the error, not the reference it would imply
    evaluator = _evaluator(args, resolve_reference(args.policy, args.reference))
    result = evaluator.evaluate(args.policy, samples_out=args.samples_out)
    print_result(result)
    if args.out:
        print(f"result written to {write_result(result, args.out)}")
    else:
        print(json.dumps(result.to_json()))
    return 0


# ------------------------------------------------------------------------------------------ frontier


def _add_frontier(sub) -> None:
    p = sub.add_parser("frontier", help="evaluate runs and checkpoints: reward vs KL, CSV and plot",
                       description="Evaluate several runs and/or checkpoints against one reference and write the "
                                   "(KL, reward) points as CSV and a PNG plot, one series per method (DPO paper, "
                                   "Figure 2).")
    p.add_argument("targets", nargs="+", metavar="[SERIES=]PATH",
                   help="dpokit run directory, checkpoint or model; SERIES= names its series (default: the run's "
                        "method, e.g. DPO)")
    p.add_argument("--checkpoints", action="store_true", help="also evaluate every checkpoint of each run directory")
    _eval_args(p)
    p.add_argument("--out", required=True, help="output directory: frontier.csv, frontier.png, points/*.json")
    p.set_defaults(func=_frontier)


def _frontier(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from dpokit.pipeline.frontier import expand_targets, run_frontier
    from dpokit.pipeline.runs import run_model

    targets = expand_targets(args.targets, checkpoints=args.checkpoints)
    reference = args.reference
    if reference is None:
        bases = {info.base_model for t in targets if (info := run_model(t.model)) is not None}
        if len(bases) != 1:
            raise ConfigError("name the reference with --reference: the targets "
                              + ("are not dpokit runs" if not bases else f"start from different models: {sorted(bases)}"))
        reference = bases.pop()
    points = run_frontier(_evaluator(args, reference), targets, args.out)
    table = Table(title=f"frontier against {reference}")
    for col in ("series", "point", "KL", "reward", "win rate"):
        table.add_column(col, justify="left" if col in ("series", "point") else "right")
    if points:
        ref = points[0].result.reward_reference
        table.add_row("reference", "π_ref", "0", f"{ref.mean:.3f}", "0.500")
    for pt in points:
        r = pt.result
        table.add_row(pt.target.series, pt.target.label, f"{r.kl.mean:.2f}", f"{r.reward_policy.mean:.3f}",
                      f"{r.win_rate.mean:.3f}")
    Console().print(table)
    print(f"written: {Path(args.out) / 'frontier.csv'}, {Path(args.out) / 'frontier.png'}")
    return 0
