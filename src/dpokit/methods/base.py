"""The method protocol: what a method adds to the shared loop in `dpokit.trainer`, and the defaults of the
hooks most methods leave alone.

A method turns the config into its data and its models, and a micro-batch of item ids into per-item
losses and metric sums (`forward`). The loop asks it, never its name:
- `check(cfg)`: the rules of the config sections only this method reads, before anything loads;
- `prepare(policy, ids, step)`: work before a step's updates (PPO: rollouts, rewards, advantages), its
  metrics joining the step's row; `updates(ids)`: the optimizer updates of a step (default: one);
- `state_dict()` / `load_state_dict()`: what a checkpoint keeps beyond the policy's weights;
- `summary()`, `write_report(run_dir)`, `describe()`: what the run prints and writes about its data;
- `card()`, `load_merged(dir)`: the exported model's card and how adapters are merged into it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dpokit import models
from dpokit.errors import ConfigError
from dpokit.generation.judges import check_scoring_judge

if TYPE_CHECKING:
    from dpokit.config import Config
    from dpokit.data.dataset import PreparedData
    from dpokit.distributed import Runtime
    from dpokit.metrics import MicroBatch

SITE = "[dpokit](https://github.com/dpokit/dpokit)"


class Method:
    name: str  # the registry's key (`methods.registry.METHODS`), recorded in the run directory
    unit: str  # what the loop counts: `<unit>` and `<unit>_per_s` in the metrics
    metric_names: tuple  # the metrics `forward` sums (`metrics.MeanMetrics`)
    can_sample = True  # its model generates text (train.sample_every applies)
    exports_merged = False  # with LoRA, the exported model is always merged (whatever lora.merge_on_export says)
    hub_tag: str | None = None  # the model card's tag (default: the name)
    data: PreparedData  # the tokenized splits, for the default summary and report
    train_set: list
    eval_set: list
    total_steps: int = 0  # the run's loop steps (train.max_steps, or all epochs), set by the loop before `build`

    @classmethod
    def check(cls, cfg: Config) -> None:
        """The rules of the settings only this method reads; runs after `check_config`, before anything
        loads. Overrides call this one first."""
        if cfg.train.sample_every and not cls.can_sample:
            raise ConfigError(f"train.sample_every: dpokit {cls.name} trains a model that does not generate; leave "
                              "it at 0")
        if cfg.train.sample_every:
            check_scoring_judge(cfg.train.sample_judge, cfg.train.sample_judge_options, "train.sample_judge")

    def __init__(self, cfg: Config, runtime: Runtime, tokenizer):
        raise NotImplementedError

    def build(self, *, precision: str, autocast, resume_from: Path | None, echo):
        """The module to train (its `.model` is the model checkpointed and exported)."""
        raise NotImplementedError

    def forward(self, policy, ids: list[int], split: str) -> MicroBatch:
        """Per-item losses and metric sums of items `ids` of `split` ("train" or "eval"); `policy` may be
        wrapped by DDP or FSDP."""
        raise NotImplementedError

    def prepare(self, policy, item_ids: list[int], step: int) -> dict:
        """Before step `step` (0-based) over `item_ids`: the method's own work; returns metrics for the row."""
        return {}

    def updates(self, item_ids: list[int]) -> list[list[int]]:
        """The optimizer updates of one step, each a list of item ids."""
        return [item_ids]

    def state_dict(self) -> dict:
        """What a checkpoint keeps beyond the policy."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def describe(self) -> str:
        return self.name

    def summary(self) -> str:
        return self.data.summary()

    def write_report(self, run_dir: Path) -> None:
        self.data.write_report(run_dir)

    def card(self, config: dict, base_model: str, contents: str) -> tuple[str, str]:
        """The exported model card's title and the sentence that says how the model was trained."""
        return (f"{base_model} trained with dpokit",
                f"Trained with `{self.name}` by {SITE}. Contents: {contents}, tokenizer.")

    def load_merged(self, adapter_dir: Path):
        """The model of a saved LoRA adapter, loaded on its base and merged (the exported model)."""
        return models.load_model(str(adapter_dir))
