"""`dpokit` command line: thin wrappers that parse arguments and call the library. `training` declares the
training commands (one per method), `pipeline` the sampling, labelling and evaluation commands, `estimate`
the memory estimate's; `validate` declares its own."""

from __future__ import annotations

import argparse
import sys

from dpokit import host_memory, validate
from dpokit.cli import estimate, pipeline, training
from dpokit.errors import error_line, exit_status
from dpokit.methods.registry import METHODS

__all__ = ["build_parser", "error_line", "main", "run"]

run = exit_status  # a command's exit status: bad input is one line on stderr and 2


def build_parser() -> argparse.ArgumentParser:
    """Every `dpokit` command, in the order `--help` lists them: its module declares the options (`add_*`)
    and runs it (`*_command`)."""
    parser = argparse.ArgumentParser(prog="dpokit", description="Direct Preference Optimization for causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in METHODS:
        training.add_trainer(sub, name).set_defaults(func=training.train_command)
    training.add_iterate(sub).set_defaults(func=training.iterate_command)
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


# commands whose process only generates and scores: it keeps freed memory for reuse (`host_memory`), since a
# decode step's vocabulary-wide temporaries would otherwise be mapped and faulted in anew at every step
GENERATING = {pipeline.sample_command, pipeline.evaluate_command, pipeline.frontier_command,
              pipeline.generate_command, pipeline.chat_command}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.func in GENERATING:
        host_memory.reuse_freed_memory()
    return exit_status(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
