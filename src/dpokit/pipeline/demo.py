"""`make demo`: the DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, §6.1, Figure 2) end
to end, on the embedded SmolLM2-135M-Instruct and a CPU, in about ten minutes.

Each step is the `dpokit` command shown before it runs, so the same pipeline runs by hand on other
prompts, models and judges:

    1  sample    the starting model continues each training opening 4 times (temperature 1)
    2  sample    the reference's completions of the held-out openings, drawn once and reused
    3  label     VADER scores the training samples: all pairs of a prompt's 4 samples (up to 6), except
                 those whose scores differ by less than 0.3 (VADER's near-ties are mostly noise: with
                 them the policy drifts as far from the reference for a smaller gain in reward)
    4  label     the held-out samples' best-vs-worst pairs: the held-out preference accuracy
    5  train     DPO (configs/sentiment.yaml), a checkpoint every few steps
    6  frontier  every checkpoint and the final policy against the reference on the held-out openings:
                 mean reward, win rate, KL(π‖π_ref); frontier.csv and frontier.png

The openings are data/sentiment/ (see make_prompts.py there). Finished samples are kept: rerunning
resumes sampling where it stopped; `--fresh` starts over.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

DATA = Path("data/sentiment")


def steps(out: Path, config: str, *, model: str, train_prompts: Path, heldout_prompts: Path,
          max_new_tokens: int, eval_samples: int, batch_size: int, margin: float) -> list[tuple[str, list[str]]]:
    gen = ["--max-new-tokens", str(max_new_tokens), "--template", "none", "--batch-size", str(batch_size)]
    judge = ["--judge", "sentiment"]
    return [
        ("sample the starting model on the training openings",
         ["sample", str(train_prompts), "--model", model, "--n", "4", "--seed", "0", *gen,
          "--out", str(out / "samples_train.jsonl")]),
        ("sample the reference on the held-out openings (reused by every evaluation)",
         ["sample", str(heldout_prompts), "--model", model, "--n", "4", "--seed", "1", *gen,
          "--out", str(out / "samples_heldout.jsonl")]),
        ("label the training samples: all pairs, those whose scores differ by less than the margin dropped",
         ["label", str(out / "samples_train.jsonl"), *judge, "--mode", "all-pairs", "--margin", f"{margin:g}",
          "--out", str(out / "pairs_train.jsonl"), "--scored-out", str(out / "scored_train.jsonl")]),
        ("label the held-out samples: best vs worst",
         ["label", str(out / "samples_heldout.jsonl"), *judge, "--mode", "best-vs-worst",
          "--out", str(out / "pairs_heldout.jsonl")]),
        ("train DPO",
         ["train", config, f"model.name={model}", f"data.train={out / 'pairs_train.jsonl'}",
          f"data.eval={out / 'pairs_heldout.jsonl'}", f"output.dir={out / 'dpo'}", "output.overwrite=true"]),
        ("evaluate every checkpoint against the reference: the reward-KL frontier",
         ["frontier", str(out / "dpo"), "--checkpoints", "--reference-samples", str(out / "samples_heldout.jsonl"),
          "--pairs", str(out / "pairs_heldout.jsonl"), *judge, "--n", str(eval_samples), "--seed", "2",
          "--batch-size", str(batch_size), "--out", str(out / "frontier")]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpokit.pipeline.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/sentiment", help="experiment directory (default runs/sentiment)")
    parser.add_argument("--config", default="configs/sentiment.yaml", help="DPO training config")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="starting model (and reference)")
    parser.add_argument("--train-prompts", default=str(DATA / "prompts_train.jsonl"))
    parser.add_argument("--heldout-prompts", default=str(DATA / "prompts_heldout.jsonl"))
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per completion (default 16)")
    parser.add_argument("--eval-samples", type=int, default=2, help="policy samples per held-out opening (default 2)")
    parser.add_argument("--batch-size", type=int, default=128, help="sequences per generation batch (default 128)")
    parser.add_argument("--margin", type=float, default=0.3,
                        help="drop training pairs whose scores differ by less than this (default 0.3)")
    parser.add_argument("--fresh", action="store_true", help="delete the experiment directory first")
    args = parser.parse_args(argv)

    from dpokit.cli import main as dpokit

    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    plan = steps(out, args.config, model=args.model, train_prompts=Path(args.train_prompts),
                 heldout_prompts=Path(args.heldout_prompts), max_new_tokens=args.max_new_tokens,
                 eval_samples=args.eval_samples, batch_size=args.batch_size, margin=args.margin)
    start = time.perf_counter()
    timings = []
    for k, (title, command) in enumerate(plan, 1):
        print(f"\n[{k}/{len(plan)}] {title}\n$ dpokit {shlex.join(command)}", flush=True)
        if command[0] == "sample":
            drop_stale_samples(command)
        t0 = time.perf_counter()
        code = dpokit(command)
        timings.append((command[0], time.perf_counter() - t0))
        if code != 0:
            print(f"demo stopped: step {k} exited with {code}", file=sys.stderr)
            return code
    total = time.perf_counter() - start
    report(out, timings, total)
    return 0


def drop_stale_samples(command: list[str]) -> None:
    """Samples kept from an earlier demo with other settings (a changed default, say) are not resumed
    but drawn again; `dpokit sample` itself refuses to mix them."""
    from dpokit.pipeline.commands import DEFAULT_MODEL
    from dpokit.pipeline.jsonl import read_meta
    from dpokit.pipeline.prompts import read_prompts
    from dpokit.pipeline.sample import SamplingSettings, sample_meta

    opts = dict(zip(command[2::2], command[3::2]))
    out = Path(opts["--out"])
    saved = read_meta(out) if out.exists() else None
    if saved is None:
        return
    settings = SamplingSettings(n=int(opts["--n"]), max_new_tokens=int(opts["--max-new-tokens"]),
                                seed=int(opts["--seed"]), batch_size=int(opts["--batch-size"]),
                                template=opts["--template"])
    if saved != sample_meta(opts.get("--model", DEFAULT_MODEL), read_prompts(command[1]), settings):
        print(f"{out} holds samples drawn with other settings: sampling again", flush=True)
        out.unlink()


def report(out: Path, timings: list[tuple[str, float]], total: float) -> None:
    """The final policy against the reference (the before/after table) and the frontier's points."""
    from rich.console import Console

    from dpokit.pipeline.evaluate import EvalResult, result_table

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
