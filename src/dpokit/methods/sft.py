"""Supervised fine-tuning on the shared loop: the NLL of completion tokens only.

The data are single completions: `prompt` + `completion` or `messages` rows (`data.use=completion`),
or the chosen side of preference pairs (`data.use=chosen`: the DPO paper's Preferred-FT, and its SFT
start when no SFT model exists). Each is a pair with an empty rejected side, so every layout applies:
`packed` puts the batch's sequences in one row without padding.
"""

from __future__ import annotations

from pathlib import Path

from dpokit import models
from dpokit.config import Config
from dpokit.data.dataset import prepare_data
from dpokit.data.layouts import collate
from dpokit.distributed import Runtime
from dpokit.errors import ConfigError, DataError
from dpokit.logps import CompletionLogProbs
from dpokit.methods.base import SITE, Method
from dpokit.metrics import MicroBatch
from dpokit.objectives.losses import nll


class SFT(Method):
    name = "sft"
    unit = "sequences"
    metric_names = ("loss", "logps/completion", "tokens/completion")

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        if cfg.data.use == "pairs":
            raise ConfigError("dpokit sft trains on single completions: data.use=completion (prompt/completion or "
                              "messages rows) or data.use=chosen (the chosen side of preference pairs)")

    def __init__(self, cfg: Config, runtime: Runtime, tokenizer):
        use = "completion" if cfg.data.use == "auto" else cfg.data.use
        self.cfg, self.rt, self.tokenizer = cfg, runtime, tokenizer
        self.data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed, use=use)
        if not self.data.train:
            raise DataError(f"{cfg.data.train}: no valid training rows ({self.data.summary()})")
        self.train_set, self.eval_set = self.data.train, self.data.eval

    def build(self, *, precision: str, autocast, resume_from: Path | None, echo) -> CompletionLogProbs:
        policy, _ = models.build_policy(self.cfg, precision=precision, runtime=self.rt, resume_from=resume_from,
                                        with_start=False)
        models.enable_training_features(policy.model, self.cfg.train)
        return policy

    def forward(self, policy, ids: list[int], split: str) -> MicroBatch:
        """Token-mean NLL of each completion (the mean over sequences then weighs every example alike)."""
        rows = self.train_set if split == "train" else self.eval_set
        batch = collate([rows[j] for j in ids], ids, self.cfg.train.layout, self.tokenizer.pad_token_id)
        batch = batch.to(self.rt.device)
        logps = policy(batch)
        losses = nll(logps.chosen, logps.chosen_lengths)
        sums = {"loss": losses.detach().double().sum(), "logps/completion": logps.chosen.detach().double().sum(),
                "tokens/completion": logps.chosen_lengths.double().sum()}
        return MicroBatch(losses, sums, batch.num_tokens)

    def describe(self) -> str:
        return f"supervised fine-tuning on {'chosen completions' if self.cfg.data.use == 'chosen' else 'completions'}"

    def card(self, config: dict, base_model: str, contents: str) -> tuple[str, str]:
        return (f"{base_model} fine-tuned with dpokit",
                f"Trained with supervised fine-tuning on completion tokens by {SITE}. Contents: {contents}, tokenizer.")

