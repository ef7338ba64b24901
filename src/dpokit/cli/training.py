"""`dpokit train | sft | reward | ppo CONFIG [section.key=value ...]`: one command per registered method
(`dpokit.methods.registry`), each reading the same typed config."""

from __future__ import annotations

import argparse

from dpokit.config import describe
from dpokit.config_loader import command_line_config, load_config
from dpokit.methods.registry import METHODS
from dpokit.pipeline import commands


def add_trainer(sub, method: str) -> argparse.ArgumentParser:
    info = METHODS[method]
    p = sub.add_parser(
        info.command,
        help=info.help,
        description=f"{info.help[0].upper()}{info.help[1:]}. CONFIG is a YAML file of sections; any key can be "
                    "overridden as section.key=value. Keys, defaults and descriptions:\n\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last checkpoint")
    p.set_defaults(method=method)
    return p


def train_command(args: argparse.Namespace) -> int:
    config, overrides = command_line_config(args.config, args.overrides)
    return commands.train(load_config(config, overrides), method=args.method, resume=args.resume)


def add_iterate(sub) -> argparse.ArgumentParser:
    help = "iterative DPO: rounds of sampling the latest policy, judging, pairing and DPO"
    p = sub.add_parser(
        "iterate", help=help,
        description=f"{help[0].upper()}{help[1:]} (RLHFlow's recipe), each round a run directory "
                    "<output.dir>/round-R; iterate.rounds and iterate.reference, the online section's sampling, judge "
                    "and pairing, and every DPO setting apply. A finished round is never redone. Keys, defaults "
                    "and descriptions:\n\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config file (data.train: the prompts)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--resume", action="store_true", help="continue an interrupted round's DPO from its last checkpoint")
    return p


def iterate_command(args: argparse.Namespace) -> int:
    from dpokit.pipeline.iterate import iterate

    config, overrides = command_line_config(args.config, args.overrides)
    rounds = iterate(load_config(config, overrides), resume=args.resume)
    for r in rounds:
        print(f"round {r.index}: sampled from {r.policy_from}, mean score {r.mean_score:.4g}, {r.pairs} pairs, "
              f"reference {r.reference}{' (finished earlier)' if r.resumed else ''} → {r.run_dir / 'model'}")
    return 0
