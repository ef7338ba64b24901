"""`make demo`: the DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, §6.1, Figure 2) end
to end, on the embedded SmolLM2-135M-Instruct and a CPU, in about eight minutes.

Each step calls what the `dpokit` command shown before it calls, so the same pipeline runs by hand on
other prompts, models and judges:

    1  sample    the starting model continues each training opening 4 times (temperature 1)
    2  sample    the reference's completions of the held-out openings, drawn once and reused
    3  label     VADER scores the training samples: all pairs of a prompt's 4 samples (up to 6), except
                 those whose scores differ by less than 0.3 (VADER's near-ties are mostly noise: with
                 them the policy drifts as far from the reference for a smaller gain in reward)
    4  label     the held-out samples' best-vs-worst pairs: the held-out preference accuracy
    5  train     DPO (configs/sentiment.yaml), a checkpoint every few steps
    6  frontier  every checkpoint and the final policy against the reference on the held-out openings:
                 mean reward, win rate, KL(π‖π_ref); frontier.csv and frontier.png

`make demo` gives it the repository's openings (data/sentiment/, see make_prompts.py there) and
training config (configs/sentiment.yaml):

    python -m dpokit.experiments.demo --config configs/sentiment.yaml \
        --train-prompts data/sentiment/prompts_train.jsonl --heldout-prompts data/sentiment/prompts_heldout.jsonl

Finished samples are kept: rerunning resumes sampling where it stopped; `--fresh` starts over.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from dpokit import host_memory, models
from dpokit.config_loader import load_config
from dpokit.errors import exit_status
from dpokit.fields import as_arguments
from dpokit.generation.jsonl import read_meta
from dpokit.generation.judges import build_judge
from dpokit.generation.prompts import read_prompts
from dpokit.generation.sampling import sample_meta
from dpokit.generation.settings import PairingSettings, SamplingSettings
from dpokit.pipeline import commands
from dpokit.pipeline.evaluate import EvalResult, Evaluator, result_table
from dpokit.pipeline.frontier import expand_targets
from dpokit.storage import json_text

JUDGE = "sentiment"
SEED_STRIDE = 100  # seed s offsets every sampling seed by 100·s and train.seed by s: seed 0 is the published run


@dataclass(frozen=True)
class Step:
    title: str
    # the `dpokit` command that does the same, printed before the step runs (a function of nothing where the
    # command depends on the steps before it)
    command: list[str] | Callable[[], list[str]]
    run: Callable[[], int]  # returns the command's exit status


def steps(out: Path, config: str, *, model: str, train_prompts: Path, heldout_prompts: Path,
          max_new_tokens: int, eval_samples: int, batch_size: int, margin: float, seed: int = 0) -> list[Step]:
    shift = SEED_STRIDE * seed
    sampling = SamplingSettings(n=4, max_new_tokens=max_new_tokens, template="none", batch_size=batch_size)
    evaluation = replace(sampling, n=eval_samples, seed=2 + shift)
    samples_train, samples_heldout = out / "samples_train.jsonl", out / "samples_heldout.jsonl"
    pairs_train, pairs_heldout = out / "pairs_train.jsonl", out / "pairs_heldout.jsonl"
    overrides = [f"model.name={model}", f"data.train={pairs_train}", f"data.eval={pairs_heldout}",
                 f"output.dir={out / 'dpo'}", "output.overwrite=true", *([f"train.seed={42 + seed}"] if seed else [])]
    return [
        sample_step("sample the starting model on the training openings",
                    train_prompts, samples_train, model, replace(sampling, seed=0 + shift)),
        sample_step("sample the reference on the held-out openings (reused by every evaluation)",
                    heldout_prompts, samples_heldout, model, replace(sampling, seed=1 + shift)),
        label_step("label the training samples: all pairs, those whose scores differ by less than the margin dropped",
                   samples_train, pairs_train, PairingSettings("all-pairs", margin),
                   scored_out=out / "scored_train.jsonl"),
        label_step("label the held-out samples: best vs worst", samples_heldout, pairs_heldout,
                   PairingSettings("best-vs-worst")),
        Step("train DPO", ["train", config, *overrides], partial(train, config, overrides)),
        Step("evaluate every checkpoint against the reference: the reward-KL frontier",
             ["frontier", str(out / "dpo"), "--checkpoints", "--reference-samples", str(samples_heldout),
              "--pairs", str(pairs_heldout), "--judge", JUDGE, *as_arguments(evaluation, commands.GENERATION),
              "--out", str(out / "frontier")],
             partial(frontier, out / "dpo", model, evaluation, samples_heldout, pairs_heldout, out / "frontier")),
    ]


def sample_step(title: str, prompts: Path, out: Path, model: str, settings: SamplingSettings) -> Step:
    # the sampling runs in float32 (commands.sample's default), where the command line's default is auto
    command = ["sample", str(prompts), "--model", model, *as_arguments(settings), "--dtype", "float32",
               "--out", str(out)]
    return Step(title, command, partial(sample, prompts, out, model, settings))


def sample(prompts: Path, out: Path, model: str, settings: SamplingSettings) -> int:
    drop_stale_samples(prompts, out, model, settings)
    return commands.sample(prompts, out, settings, model=model)


def drop_stale_samples(prompts: Path, out: Path, model: str, settings: SamplingSettings) -> None:
    """Samples kept from an earlier demo with other settings (a changed default, say) are not resumed
    but drawn again; `dpokit sample` itself refuses to mix them."""
    saved = read_meta(out) if out.exists() else None
    if saved is not None and saved != sample_meta(model, read_prompts(prompts), settings):
        print(f"{out} holds samples drawn with other settings: sampling again", flush=True)
        out.unlink()


def label_step(title: str, samples: Path, out: Path, pairing: PairingSettings, *,
               scored_out: Path | None = None) -> Step:
    command = ["label", str(samples), "--judge", JUDGE, *as_arguments(pairing), "--out", str(out)]
    if scored_out is not None:
        command += ["--scored-out", str(scored_out)]
    return Step(title, command, partial(label, samples, out, pairing, scored_out))


def label(samples: Path, out: Path, pairing: PairingSettings, scored_out: Path | None) -> int:
    return commands.label(samples, out, build_judge(JUDGE), pairing, scored_out=scored_out)


def train(config: str, overrides: list[str]) -> int:
    return commands.train(load_config(config, overrides))


def frontier(run_dir: Path, reference: str, settings: SamplingSettings, reference_samples: Path, pairs: Path,
             out: Path) -> int:
    targets = expand_targets([str(run_dir)], checkpoints=True)
    evaluator = Evaluator(reference, build_judge(JUDGE), settings, reference_samples=reference_samples, pairs=pairs)
    return commands.frontier(targets, evaluator, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpokit.experiments.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="DPO training config (configs/sentiment.yaml)")
    add_experiment_arguments(parser, out="runs/sentiment")
    parser.add_argument("--fresh", action="store_true", help="delete the experiment directory first")
    parser.add_argument("--seed", type=int, default=0,
                        help="another draw of the whole experiment: every sampling seed + 100·SEED, train.seed + SEED "
                             "(default 0, the published run)")
    args = parser.parse_args(argv)
    host_memory.reuse_freed_memory()  # as `dpokit sample` and `train.reuse_freed_memory`: the same results, sooner
    host_memory.huge_pages()  # what its training steps ask for by default (train.huge_pages), before any tensor

    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    plan = steps(out, args.config, model=args.model, train_prompts=Path(args.train_prompts),
                 heldout_prompts=Path(args.heldout_prompts), max_new_tokens=args.max_new_tokens,
                 eval_samples=args.eval_samples, batch_size=args.batch_size, margin=args.margin, seed=args.seed)
    return run(plan, out)


def run(plan: list[Step], out: Path) -> int:
    start = time.perf_counter()
    code, seconds = run_steps(plan, "demo")
    if code == 0:
        report(out, [(step.command[0], t) for step, t in zip(plan, seconds)], time.perf_counter() - start)
    return code


def run_steps(plan: list[Step], name: str, *, records: Path | None = None, reuse: bool = False,
              settings: dict | None = None) -> tuple[int, list[float]]:
    """Each step after the command it equals, timed; stops at the first that fails (its error as `dpokit`
    prints it). Returns the exit status and the seconds of each step.

    `records`: a folder where each step that succeeds leaves its command, `settings` and seconds. With
    `reuse`, a step whose record matches is not run again and counts its recorded seconds, as long as every
    step before it was reused too; the first step that runs removes its own record and the later steps'."""

    seconds, reusing = [], reuse and records is not None
    for k, step in enumerate(plan, 1):
        command = step.command() if callable(step.command) else step.command
        record = None if records is None else records / f"step-{k:02d}.json"
        mark = json.loads(json_text({"command": command, "settings": settings}))
        done = json.loads(record.read_text()) if reusing and record.is_file() else {}
        if reusing and {key: done.get(key) for key in mark} == mark:
            print(f"\n[{k}/{len(plan)}] {step.title}: finished before ({done['seconds']:.0f} s), not run again",
                  flush=True)
            seconds.append(done["seconds"])
            continue
        if records is not None and (reusing or k == 1):  # what a step rewrites, the later steps read
            for later in range(k, len(plan) + 1):
                (records / f"step-{later:02d}.json").unlink(missing_ok=True)
        reusing = False
        print(f"\n[{k}/{len(plan)}] {step.title}\n$ dpokit {shlex.join(command)}", flush=True)
        t0 = time.perf_counter()
        code = exit_status(step.run)
        seconds.append(time.perf_counter() - t0)
        if code != 0:
            print(f"{name} stopped: step {k} exited with {code}", file=sys.stderr)
            return code, seconds
        if record is not None:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json_text({**mark, "seconds": seconds[-1]}) + "\n")
    return 0, seconds


def add_experiment_arguments(parser: argparse.ArgumentParser, *, out: str) -> None:
    """The options `make demo` and `make paper` share: the openings, the model, sampling and labelling."""
    parser.add_argument("--train-prompts", required=True, help="training openings (data/sentiment/prompts_train.jsonl)")
    parser.add_argument("--heldout-prompts", required=True,
                        help="held-out openings (data/sentiment/prompts_heldout.jsonl)")
    parser.add_argument("--out", default=out, help=f"experiment directory (default {out})")
    parser.add_argument("--model", default=models.DEFAULT_MODEL, help="starting model (and reference)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per completion (default 16)")
    parser.add_argument("--eval-samples", type=int, default=2, help="policy samples per held-out opening (default 2)")
    parser.add_argument("--batch-size", type=int, default=128, help="sequences per generation batch (default 128)")
    parser.add_argument("--margin", type=float, default=0.3,
                        help="drop training pairs whose scores differ by less than this (default 0.3)")


def report(out: Path, timings: list[tuple[str, float]], total: float) -> None:
    """The final policy against the reference (the before/after table) and the frontier's points."""
    from rich.console import Console


    frontier = json.loads((out / "frontier" / "frontier.json").read_text())
    points = sorted((out / "frontier" / "points").glob("*.json"))
    final = json.loads(points[-1].read_text())
    result = EvalResult.from_json(final)
    console = Console()
    console.print()
    console.print(result_table(result, title=f"sentiment experiment: the DPO policy ({final['label']}) against "
                                             f"the starting model on {result.prompts} held-out openings"))
    for p in frontier["points"]:
        console.print(f"  {p['series']} {p['label']}: KL {p['kl']:.2f} nats, mean reward {p['reward']:.3f}, "
                      f"win rate {p['win_rate']:.3f}")
    gain = result.reward_policy.mean - result.reward_reference.mean
    console.print(f"\nmean reward {result.reward_reference.mean:.3f} → {result.reward_policy.mean:.3f} "
                  f"({gain:+.3f}), win rate {result.win_rate.mean:.1%}, at KL {result.kl.mean:.1f} nats")
    console.print(f"plot: {out / 'frontier' / 'frontier.png'}; points: {out / 'frontier' / 'frontier.csv'}")
    console.print("time: " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in timings)
                  + f"; total {total / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
