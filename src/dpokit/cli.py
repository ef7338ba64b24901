"""`dpokit` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from dpokit.errors import DpokitError


def _train(args: argparse.Namespace) -> int:
    from dpokit.config import Config
    from dpokit.train import train

    cfg = Config.load(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if result.stopped_by_signal:
        return 130
    if result.eval_before and result.eval_after:
        print_before_after(result.eval_before, result.eval_after, title=f"held-out pairs ({result.eval_after['pairs']})")
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
    from dpokit import validate
    from dpokit.config import describe
    from dpokit.pipeline import commands as pipeline_commands

    parser = argparse.ArgumentParser(prog="dpokit", description="Direct Preference Optimization for causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a policy with DPO",
        description="Train with DPO. CONFIG is a YAML file of sections; any key can be overridden as "
                    "section.key=value. Keys, defaults and descriptions:\n\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last checkpoint")
    p.set_defaults(func=_train)
    validate.add_commands(sub)  # validate
    pipeline_commands.add_commands(sub)  # sample, label, evaluate, frontier
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    # `dpokit train key=value` without a file: the first positional is an override
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides, args.config = [args.config, *args.overrides], None
    try:
        return args.func(args)
    except (DpokitError, OSError) as e:
        # bad input or environment: one line, no traceback; other exceptions are bugs and keep theirs
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
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return " ".join(lines) if isinstance(e, DpokitError) else lines[0]


if __name__ == "__main__":
    sys.exit(main())
