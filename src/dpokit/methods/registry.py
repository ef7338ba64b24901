"""The training methods: name → where its class lives, its command, its help line and its display name.

Torch-free, so `dpokit --help` and the frontier's series names read it without loading a method.
`dpokit.train(cfg, method=NAME)` and the command line (`dpokit <command>`) both look a method up here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from dpokit.errors import ConfigError
from dpokit.fields import did_you_mean


@dataclass(frozen=True)
class MethodInfo:
    target: str  # module:Class
    command: str  # `dpokit <command>`
    help: str
    display: str  # its series name on the frontier


METHODS: dict[str, MethodInfo] = {
    "dpo": MethodInfo("dpokit.methods.dpo:DPO", "train",
                      "train a policy with DPO or another objective of its family", "DPO"),
    "sft": MethodInfo("dpokit.methods.sft:SFT", "sft",
                      "supervised fine-tuning on completion tokens (or the chosen side of pairs)", "SFT"),
    "reward": MethodInfo("dpokit.methods.reward:RewardModel", "reward",
                         "train a Bradley–Terry reward model on preference pairs", "Reward model"),
    "ppo": MethodInfo("dpokit.methods.ppo:PPO", "ppo", "RLHF with PPO against a judge or a reward model", "PPO"),
    "online_dpo": MethodInfo("dpokit.methods.online_dpo:OnlineDPO", "online",
                             "online DPO: pairs sampled from the current policy and ranked by a judge at every step",
                             "Online DPO"),
}
BY_COMMAND = {info.command: name for name, info in METHODS.items()}


def method_class(method: str | type) -> type:
    """The method class of a registry name (`dpo`, `sft`, ...) or command (`train`); a class is returned as is."""
    if isinstance(method, type):
        return method
    name = BY_COMMAND.get(method, method)
    if name not in METHODS:
        raise ConfigError(f"unknown method {method!r}{did_you_mean(method, METHODS)}; choose from "
                          f"{', '.join(METHODS)}")
    module, _, cls = METHODS[name].target.partition(":")
    return getattr(importlib.import_module(module), cls)
