"""`dpokit sample | label | evaluate | frontier | generate | chat`: each command's options and what it runs.

`add_<command>(sub)` declares a command's options; every option with a default, range or choices is a
field of a settings dataclass (`SamplingSettings`, `PairingSettings`, `Placement`, `ChatSettings` in
`dpokit.generation.settings`), so it is stated and checked once. `<command>_command(args)` reads the options
into those settings and calls the library function (`dpokit.pipeline.commands`).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dpokit import models
from dpokit.errors import ConfigError
from dpokit.fields import add_arguments, from_arguments
from dpokit.generation.jsonl import read_meta
from dpokit.generation.prompts import read_prompts
from dpokit.generation.settings import ChatSettings, PairingSettings, Placement, SamplingSettings
from dpokit.pipeline import commands
from dpokit.pipeline.chat import Chat, chat_loop
from dpokit.pipeline.commands import EVAL_SEED, GENERATION
from dpokit.storage import json_text

if TYPE_CHECKING:
    from dpokit.pipeline.evaluate import Evaluator


# ------------------------------------------------------------------------------------------ judge options


def _add_judge(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("judge")
    g.add_argument("--judge", required=required, default=None,
                   help="sentiment (VADER), reward-model, length, keywords, llm (a language model compares two "
                        "completions or scores one), or module:function (a Python callable "
                        "fn(prompt, completion) -> float; the module may be a .py path)")
    g.add_argument("--judge-model", default=None,
                   help="model of the reward-model judge, a sentiment classifier to use instead of VADER (hub id or "
                        "local directory), or the llm judge's local model (anything model.name accepts)")
    if required:  # evaluate and frontier: judges that report beside the judge, never optimised
        g.add_argument("--also-judge", action="append", default=[], metavar="JUDGE",
                       help="repeatable: another judge (any that scores, e.g. afinn, a second sentiment lexicon) whose "
                            "mean reward and win rate are reported beside the judge's for every point")
    g.add_argument("--judge-option", action="append", default=[], metavar="KEY=VALUE",
                   help="judge setting, repeatable: on=text|completion, label=NAME (classifiers), unit=words|chars "
                        "and target=N (length), words=a,b,c and weight=W (keywords), batch_size=N; llm: "
                        "url=http://host:port/v1 and model=NAME (an OpenAI-compatible server), mode=pairwise|score, "
                        "template=FILE, max_new_tokens=N, api_key=KEY, workers=N")


def _judge(args: argparse.Namespace):
    from dpokit.generation.judges import build_judge, parse_options

    if args.judge is None:
        return None
    return build_judge(args.judge, model=args.judge_model, options=parse_options(args.judge_option, "--judge-option"))


# ------------------------------------------------------------------------------------------ sample


def add_sample(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sample", help="sample N completions per prompt from a model",
                       description="Sample N completions per prompt and write JSONL rows: prompt, completions, their "
                                   "log-probs under the model (summed over tokens, temperature 1), token counts. "
                                   "Rows are written as batches finish; rerunning the same command resumes.")
    p.add_argument("prompts", help="prompt file: .jsonl/.json rows with 'prompt' (string or messages), or .txt lines")
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help=f"model: {models.DEFAULT_MODEL} (embedded default), hub id, local dir, .gguf, dpokit run or "
                        "checkpoint")
    p.add_argument("--out", required=True, help="output JSONL")
    add_arguments(p, SamplingSettings, (*GENERATION, "temperature", "top_p"))
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming an existing --out")
    add_arguments(p, Placement, defaults={"dtype": "auto"})  # bf16 where bf16 matmul is fast
    return p


def sample_command(args: argparse.Namespace) -> int:
    return commands.sample(args.prompts, args.out, from_arguments(SamplingSettings, args), model=args.model,
                  overwrite=args.overwrite, placement=from_arguments(Placement, args))


# ------------------------------------------------------------------------------------------ label


def add_label(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("label", help="score samples with a judge and write preference pairs",
                       description="Score each completion of a `dpokit sample` file with a judge and pair the "
                                   "completions of each prompt: the output is a preference file `dpokit train` reads "
                                   "(prompt, chosen, rejected).")
    p.add_argument("samples", help="JSONL from `dpokit sample` (or rows with 'prompt', 'completions' and 'scores')")
    p.add_argument("--out", required=True, help="preference pairs JSONL")
    _add_judge(p, required=False)
    add_arguments(p, PairingSettings)
    p.add_argument("--scored-out", default=None, help="also write the samples with their scores to this JSONL")
    p.add_argument("--missing-eos-penalty", type=float, default=0.0,
                   help="subtracted from the score of a completion cut at the sampler's token budget (no EOS) "
                        "before pairing, as online.missing_eos_penalty (default 0: none)")
    return p


def label_command(args: argparse.Namespace) -> int:
    pairing = from_arguments(PairingSettings, args).check()  # before a judge loads
    if args.missing_eos_penalty < 0:
        raise ConfigError(f"--missing-eos-penalty must be >= 0, got {args.missing_eos_penalty}")
    return commands.label(args.samples, args.out, _judge(args), pairing, scored_out=args.scored_out,
                          missing_eos_penalty=args.missing_eos_penalty)


# ------------------------------------------------------------------------------------------ evaluate


def _add_evaluation(p: argparse.ArgumentParser) -> None:
    """The options evaluate and frontier share: the reference, the held-out data, the judge, the sampling."""
    p.add_argument("--reference", default=None,
                   help="reference model (default: the model a dpokit run started from)")
    p.add_argument("--prompts", default=None, help="held-out prompt file")
    p.add_argument("--reference-samples", default=None,
                   help="reference samples from `dpokit sample` at temperature 1 (reused instead of sampling the "
                        "reference again; their prompts, max-new-tokens and template are used)")
    p.add_argument("--pairs", default=None, help="held-out preference pairs for the preference accuracy")
    p.add_argument("--against", choices=("reference", "chosen"), default="reference",
                   help="the win rate's opponents: the reference's samples, or the chosen completions of the "
                        "--prompts file (a preference file), as the DPO paper's GPT-4 win rates (default reference)")
    _add_judge(p)
    add_arguments(p, SamplingSettings, GENERATION, defaults={"seed": EVAL_SEED})
    add_arguments(p, Placement)


def _evaluator(args: argparse.Namespace, reference: str, *, scores: str | None = None) -> Evaluator:
    """The evaluator of the arguments; `scores` names what needs a judge that scores (not a pairwise one)."""
    from dpokit.pipeline.evaluate import Evaluator, read_chosen

    settings = from_arguments(SamplingSettings, args).check()
    prompts = read_prompts(args.prompts) if args.prompts else None
    if args.against == "chosen" and prompts is None:
        raise ConfigError("--against chosen reads the chosen completions from --prompts (a preference file)")
    chosen = read_chosen(args.prompts) if args.against == "chosen" else None
    from dpokit.generation.judges import parse_options  # judges load torch: not for `dpokit --help`

    if scores is not None and args.judge == "llm" and parse_options(args.judge_option, "--judge-option").get(
            "mode", "pairwise") != "score":  # before the judge is built (an endpoint is probed then)
        raise ConfigError(f"{scores} needs a judge that scores each completion; the llm judge compares pairs unless "
                          "--judge-option mode=score")
    judge = _judge(args)
    placement = from_arguments(Placement, args)
    from dpokit.generation.judges import build_judge

    also = [build_judge(spec) for spec in args.also_judge]
    return Evaluator(reference, judge, settings, prompts=prompts, reference_samples=args.reference_samples,
                     pairs=args.pairs, device=placement.device, dtype=placement.dtype, against=args.against,
                     chosen=chosen, also=also)


BEST_OF_HELP = ("the reference's Best-of-N as a policy: each of the --n samples per prompt is the judge's best of N "
                "fresh reference samples; its KL is the analytic bound log N − (N−1)/N, not an estimate. Costs "
                "N × --n reference samples per prompt (N times a policy's sampling)")


def _best_of(values: list[int]) -> list[int]:
    bad = [n for n in values if n < 1]
    if bad:
        raise ConfigError(f"--best-of must be >= 1; got {bad[0]}")
    return values


def _best_of_reference(args: argparse.Namespace) -> str:
    """Best-of-N's reference: --reference, else the model of --reference-samples."""
    if args.reference is not None:
        return args.reference
    meta = read_meta(args.reference_samples) if args.reference_samples else None
    if meta is None or not meta.get("model"):
        raise ConfigError("--best-of samples the reference: name it with --reference")
    return meta["model"]


def add_evaluate(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="reward, win rate and KL of a policy (or the reference's best-of-N) against "
                                        "its reference",
                       description="Sample the policy and the reference on held-out prompts (temperature 1, no top-p) "
                                   "and report the mean judge reward of each, the policy's win rate over the reference, "
                                   "the sequence-level KL(π‖π_ref) on the policy's samples and, given held-out pairs, "
                                   "the preference accuracy. With --best-of N and no policy: the same report for the "
                                   "reference's Best-of-N, with the analytic KL bound log N − (N−1)/N.")
    p.add_argument("policy", nargs="?", default=None,
                   help="policy: dpokit run directory, checkpoint, local dir or hub id (leave out with --best-of)")
    p.add_argument("--best-of", type=int, default=None, metavar="N",
                   help=BEST_OF_HELP + "; needs --reference (or --reference-samples), not --pairs")
    _add_evaluation(p)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--samples-out", default=None, help="write the policy's scored samples to this JSONL")
    return p


def evaluate_command(args: argparse.Namespace) -> int:
    from dpokit.pipeline.evaluate import print_result, resolve_reference, write_result
    from dpokit.rundir import check_model

    if (args.policy is None) == (args.best_of is None):
        raise ConfigError("name a policy to evaluate, or --best-of N for the reference's best-of-N (not both)")
    if args.best_of is not None:
        _best_of([args.best_of])
        if args.pairs is not None:
            raise ConfigError("--pairs: best-of-N has no log-probs for a preference accuracy; leave --pairs out")
        evaluator = _evaluator(args, _best_of_reference(args), scores="--best-of")
        result = evaluator.evaluate_best_of(args.best_of, samples_out=args.samples_out)
    else:
        check_model(args.policy)  # a missing policy path is the error, not the reference it would imply
        evaluator = _evaluator(args, resolve_reference(args.policy, args.reference))
        result = evaluator.evaluate(args.policy, samples_out=args.samples_out)
    note = evaluator.judge.note() if hasattr(evaluator.judge, "note") else None
    if note:
        result.extra["judge_unparsed"] = evaluator.judge.unparsed
        print(note)
    print_result(result)
    if args.out:
        print(f"result written to {write_result(result, args.out)}")
    else:
        print(json_text(result.to_json()))
    return 0


# ------------------------------------------------------------------------------------------ frontier


def add_frontier(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("frontier", help="evaluate runs and checkpoints: reward vs KL, CSV and plot",
                       description="Evaluate several runs and/or checkpoints against one reference and write the "
                                   "(KL, reward) points as CSV and a PNG plot, one series per method (DPO paper, "
                                   "Figure 2).")
    p.add_argument("targets", nargs="*", metavar="[SERIES=]PATH",
                   help="dpokit run directory, checkpoint or model; SERIES= names its series (default: the run's "
                        "method, e.g. DPO)")
    p.add_argument("--checkpoints", action="store_true", help="also evaluate every checkpoint of each run directory")
    p.add_argument("--best-of", type=int, action="append", default=[], metavar="N",
                   help="repeatable: add a 'Best-of-N' series, a point per N, " + BEST_OF_HELP[0].lower()
                        + BEST_OF_HELP[1:] + "; candidates are shared: --best-of 4 --best-of 16 samples 16 × --n")
    _add_evaluation(p)
    p.add_argument("--out", required=True, help="output directory: frontier.csv, frontier.png, points/*.json")
    return p


def frontier_command(args: argparse.Namespace) -> int:
    from dpokit.pipeline.frontier import best_of_targets, expand_targets
    from dpokit.rundir import run_model

    best_of = _best_of(args.best_of)
    if not args.targets and not best_of:
        raise ConfigError("name runs or models to evaluate, or --best-of N")
    targets = expand_targets(args.targets, checkpoints=args.checkpoints)
    reference = args.reference if targets else _best_of_reference(args)
    if reference is None:
        bases = {info.base_model for t in targets if (info := run_model(t.model)) is not None}
        if len(bases) != 1:
            raise ConfigError("name the reference with --reference: the targets "
                              + ("are not dpokit runs" if not bases else f"start from different models: {sorted(bases)}"))
        reference = bases.pop()
    targets += best_of_targets(best_of, reference)
    return commands.frontier(targets, _evaluator(args, reference, scores="the frontier (mean reward against KL)"), args.out)


# ------------------------------------------------------------------------------------------ chat, generate


def add_chat(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help="chat with a model: a dpokit run, checkpoint or any model",
                       description="An interactive chat with the model: each line is a user turn, the reply streams "
                                   "as it is generated (chat template applied). /reset starts a new conversation, "
                                   "/exit or end of input leaves. Reads piped input too.")
    p.add_argument("model", metavar="RUN_OR_MODEL",
                   help="dpokit run directory (its exported model), checkpoint, local dir, .gguf, hub id or "
                        f"{models.DEFAULT_MODEL}")
    add_arguments(p, ChatSettings)
    add_arguments(p, Placement, defaults={"dtype": "auto"})  # bf16 where bf16 matmul is fast
    return p


def chat_command(args: argparse.Namespace) -> int:
    import sys

    from dpokit.rundir import check_model

    settings = from_arguments(ChatSettings, args).check()
    check_model(args.model)
    placement = from_arguments(Placement, args)
    chat = Chat.load(args.model, device=placement.device, dtype=placement.dtype, system=settings.system,
                     temperature=settings.temperature, top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
                     seed=settings.seed)
    return chat_loop(chat, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())


def add_generate(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate completions for a prompt file (no judge)",
                       description="Completions for every prompt of a file, greedy unless --temperature is set: "
                                   "printed, or written as JSONL rows (prompt, completions, token counts) with --out.")
    p.add_argument("prompts", help="prompt file: .jsonl/.json rows with 'prompt' (string or messages), or .txt lines")
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help=f"model: dpokit run or checkpoint, local dir, .gguf, hub id or {models.DEFAULT_MODEL}")
    p.add_argument("--out", default=None, help="write JSONL rows here instead of printing")
    add_arguments(p, SamplingSettings, (*GENERATION, "temperature", "top_p"),
                  defaults={"n": 1, "temperature": 0.0, "max_new_tokens": 128})
    add_arguments(p, Placement, defaults={"dtype": "auto"})  # bf16 where bf16 matmul is fast
    return p


def generate_command(args: argparse.Namespace) -> int:
    return commands.generate(args.prompts, from_arguments(SamplingSettings, args), model=args.model, out=args.out,
                    placement=from_arguments(Placement, args))


