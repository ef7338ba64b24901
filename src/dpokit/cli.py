"""`dpokit` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from dpokit.errors import DpokitError, first_line

# the training commands, each a method on the shared loop: command → (method class, one-line help)
TRAINERS = {
    "train": ("dpokit.methods.dpo:DPO", "train a policy with DPO or another objective of its family"),
    "sft": ("dpokit.methods.sft:SFT", "supervised fine-tuning on completion tokens (or the chosen side of pairs)"),
    "reward": ("dpokit.methods.reward:RewardModel", "train a Bradley–Terry reward model on preference pairs"),
    "ppo": ("dpokit.methods.ppo:PPO", "RLHF with PPO against a judge or a reward model"),
}


def add_trainer(sub, name: str) -> argparse.ArgumentParser:
    from dpokit.config import describe

    _, help = TRAINERS[name]
    p = sub.add_parser(
        name,
        help=help,
        description=f"{help[0].upper()}{help[1:]}. CONFIG is a YAML file of sections; any key can be overridden as "
                    "section.key=value. Keys, defaults and descriptions:\n\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last checkpoint")
    p.set_defaults(trainer=name)
    return p


def train_command(args: argparse.Namespace) -> int:
    from dpokit.config import Config

    config, overrides = args.config, args.overrides
    if config and "=" in config:  # `dpokit train key=value` without a file: the first positional is an override
        config, overrides = None, [config, *overrides]
    return train_and_report(Config.load(config, overrides), resume=args.resume, method=method_class(args.trainer))


def method_class(trainer: str) -> type:
    import importlib

    module, _, name = TRAINERS[trainer][0].partition(":")
    return getattr(importlib.import_module(module), name)


def train_and_report(cfg, *, resume: bool = False, method: type | None = None) -> int:
    """Train as `cfg` says and print the held-out metrics before and after; 130 when a signal stopped it."""
    from dpokit.train import train

    method = method or method_class("train")
    result = train(cfg, resume=resume, method=method)
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


def build_parser() -> argparse.ArgumentParser:
    """Every `dpokit` command, in the order `--help` lists them: its module declares the options (`add_*`)
    and runs it (`*_command`)."""
    from dpokit import estimate, validate
    from dpokit.pipeline import commands as pipeline

    parser = argparse.ArgumentParser(prog="dpokit", description="Direct Preference Optimization for causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in TRAINERS:
        add_trainer(sub, name).set_defaults(func=train_command)
    for add, command in ((validate.add_validate, validate.validate_command),
                         (estimate.add_estimate, estimate.estimate_command),
                         (pipeline.add_sample, pipeline.sample_command),
                         (pipeline.add_label, pipeline.label_command),
                         (pipeline.add_evaluate, pipeline.evaluate_command),
                         (pipeline.add_frontier, pipeline.frontier_command),
                         (pipeline.add_generate, pipeline.generate_command),
                         (pipeline.add_chat, pipeline.chat_command)):
        add(sub).set_defaults(func=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run(args.func, args)


def run(command, *args) -> int:
    """Call a command and return its exit status. Bad input or environment is one line on stderr and
    status 2, without a traceback unless DPOKIT_DEBUG=1; other exceptions are bugs and keep theirs;
    Ctrl-C is 130."""
    try:
        return command(*args)
    except (DpokitError, OSError) as e:
        if os.environ.get("DPOKIT_DEBUG", "0") not in ("", "0"):
            traceback.print_exc()
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def error_line(e: BaseException) -> str:
    """An error as one line: an OSError as `strerror: filename`, dpokit's messages with their lines joined,
    other libraries' messages by their first line (the rest is advice for their own API)."""
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
        if e.filename is not None:
            text += f": {e.filename}"
        if e.filename2 is not None:
            text += f" -> {e.filename2}"
        return text
    if not isinstance(e, DpokitError):
        return first_line(e)
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
