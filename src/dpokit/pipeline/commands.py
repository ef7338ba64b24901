"""The commands' library functions: each runs a step of the pipeline (or a training run) and prints the
summary `dpokit` prints. The command line (`dpokit.cli`) parses options into their typed settings and
calls these; the experiments (`dpokit.experiments`) call them directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dpokit import models
from dpokit.generation import pairs
from dpokit.generation.jsonl import write_jsonl
from dpokit.generation.llm_judge import query_text
from dpokit.generation.prompts import read_prompts
from dpokit.generation.settings import PairingSettings, Placement, SamplingSettings
from dpokit.methods.registry import method_class
from dpokit.pipeline.chat import generate_rows

if TYPE_CHECKING:
    from dpokit.config import Config
    from dpokit.pipeline.evaluate import Evaluator
    from dpokit.pipeline.frontier import Target

# the sampling options of evaluate and frontier (sample has temperature and top-p besides), and their seed
GENERATION = ("n", "max_new_tokens", "seed", "batch_size", "template")
EVAL_SEED = 1234


def train(cfg: Config, *, method: str | type = "dpo", resume: bool = False) -> int:
    """Train as `cfg` says and print the held-out metrics before and after; 130 when a signal stopped it."""
    from dpokit.trainer import train as run_training

    method = method_class(method)
    result = run_training(cfg, resume=resume, method=method)
    if result.stopped_by_signal:
        return 130
    if result.eval_before and result.eval_after:
        count = result.eval_after[method.unit]
        print_before_after(result.eval_before, result.eval_after, title=f"held-out {method.unit} ({count})")
    return 0


def print_before_after(before: dict, after: dict, *, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "before", "after"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected"):
        if key in before and key in after:
            table.add_row(key, f"{before[key]:.4f}", f"{after[key]:.4f}")
    Console().print(table)


def sample(prompts: str | Path, out: str | Path, settings: SamplingSettings, *, model: str = models.DEFAULT_MODEL,
           overwrite: bool = False, placement: Placement = Placement()) -> int:
    from dpokit.generation.sampling import sample_file

    s = sample_file(model, prompts, out, settings, overwrite=overwrite, device=placement.device, dtype=placement.dtype)
    resumed = f" ({s.resumed} from an earlier run)" if s.resumed else ""
    print(f"{s.completions} completions for {s.prompts} prompts{resumed} → {s.path}; "
          f"{s.finished_share:.0%} ended with EOS, mean log-prob {s.mean_logp:.2f}")
    return 0


def label(samples: str | Path, out: str | Path, judge, pairing: PairingSettings, *,
          scored_out: str | Path | None = None, missing_eos_penalty: float = 0.0) -> int:
    s = pairs.label_file(samples, out, judge, mode=pairing.mode, margin=pairing.margin, scored_out=scored_out,
                         missing_eos_penalty=missing_eos_penalty)
    print(f"{s.counts.summary()} → {s.pairs_path}; mean score {s.mean_score:.3f}")
    return 0


def frontier(targets: list[Target], evaluator: Evaluator, out: str | Path) -> int:
    """Evaluate `targets` (`frontier.expand_targets`) with `evaluator` into `out` and print the points."""
    from rich.console import Console
    from rich.table import Table

    from dpokit.pipeline.frontier import run_frontier

    points = run_frontier(evaluator, targets, out)
    table = Table(title=f"frontier against {evaluator.reference_name}")
    also = list(points[0].result.extra.get("also", {})) if points else []  # --also-judge: reported, not optimised
    for col in ("series", "point", "KL", "reward", "win rate", *(f"{n} reward" for n in also)):
        table.add_column(col, justify="left" if col in ("series", "point") else "right")
    if points:
        ref = points[0].result
        table.add_row("reference", "π_ref", "0", f"{ref.reward_reference.mean:.3f}", "0.500",
                      *(f"{ref.extra['also'][n]['reward_reference']['mean']:.3f}" for n in also))
    for pt in points:
        r = pt.result
        kl = f"{r.kl.mean:.2f}" + (" (bound)" if r.kl_kind == "bound" else "")
        table.add_row(pt.target.series, pt.target.label, kl, f"{r.reward_policy.mean:.3f}", f"{r.win_rate.mean:.3f}",
                      *(f"{r.extra['also'][n]['reward_policy']['mean']:.3f}" for n in also))
    Console().print(table)
    print(f"written: {Path(out) / 'frontier.csv'}, {Path(out) / 'frontier.png'}")
    return 0


def generate(prompts: str | Path, settings: SamplingSettings, *, model: str = models.DEFAULT_MODEL,
             out: str | Path | None = None, placement: Placement = Placement()) -> int:
    from dpokit.generation.sampling import Sampler
    from dpokit.rundir import check_model

    settings.check()
    items = read_prompts(prompts)
    check_model(model)
    sampler = Sampler.load(model, settings, device=placement.device, dtype=placement.dtype)
    rows = generate_rows(sampler, items)
    if out is not None:
        write_jsonl(out, rows)
        print(f"{sum(len(r['completions']) for r in rows)} completions for {len(rows)} prompts → {out}")
        return 0
    for row in rows:
        print(f"### {query_text(row['prompt'])}")
        for completion in row["completions"]:
            print(completion)
        print()
    return 0
