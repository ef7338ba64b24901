"""DPO and its family on the shared loop: preference pairs → policy and reference log-probs → objective."""

from __future__ import annotations

from pathlib import Path

from dpokit import models, reference
from dpokit.config import Config
from dpokit.data.dataset import prepare_data
from dpokit.data.layouts import collate
from dpokit.distributed import Runtime
from dpokit.errors import ConfigError, DataError
from dpokit.logps import CompletionLogProbs
from dpokit.metrics import PAIR_SUMS, MicroBatch, pair_sums
from dpokit.objectives import build_objective


class DPO:
    name = "dpo"
    unit = "pairs"  # what the loop counts: `pairs` and `pairs_per_s` in the metrics
    metric_names = PAIR_SUMS

    def __init__(self, cfg: Config, runtime: Runtime, tokenizer):
        self.cfg, self.rt, self.tokenizer = cfg, runtime, tokenizer
        if cfg.data.use not in ("auto", "pairs"):
            raise ConfigError(f"data.use={cfg.data.use} reads single completions, which `dpokit sft` trains on; "
                              "preference objectives need data.use=pairs")
        self.data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed, use="pairs")
        if not self.data.train:
            raise DataError(f"{cfg.data.train}: no valid training pairs ({self.data.summary()})")
        self.train_set, self.eval_set = self.data.train, self.data.eval
        self.objective = build_objective(cfg.objective)
        self.reference: reference.Reference = reference.NoReference()

    def build(self, *, precision: str, autocast, resume_from: Path | None, echo) -> CompletionLogProbs:
        """The policy to train; the reference is built beside it, from the same starting weights."""
        policy, start = models.build_policy(self.cfg, precision=precision, runtime=self.rt, resume_from=resume_from,
                                            with_start=self.objective.needs_reference)
        self.reference = reference.build(self.cfg, policy, start, needs_reference=self.objective.needs_reference,
                                         runtime=self.rt, data=self.data, pad_id=self.tokenizer.pad_token_id,
                                         precision=precision, autocast=autocast, echo=echo,
                                         tokenizer=self.tokenizer)
        policy.unlikelihood = self.cfg.objective.loss == "unlikelihood"  # its token-level term on the rejected side
        models.enable_training_features(policy.model, self.cfg.train)
        return policy

    def forward(self, policy, ids: list[int], split: str) -> MicroBatch:
        """The objective on pairs `ids` of `split` ("train" or "eval"); `policy` may be DDP/FSDP-wrapped."""
        pairs = self.train_set if split == "train" else self.eval_set
        batch = collate([pairs[j] for j in ids], ids, self.cfg.train.layout, self.tokenizer.pad_token_id)
        batch = batch.to(self.rt.device)
        logps = policy(batch)
        out = self.objective(logps, self.reference.logps(batch, split))
        return MicroBatch(out.losses, pair_sums(out, logps), batch.num_tokens)

    def describe(self) -> str:
        o = self.cfg.objective
        return f"objective {o.loss} β={o.beta}, reference {self.reference.name}"

    def summary(self) -> str:
        return self.data.summary()

    def write_report(self, run_dir: Path) -> None:
        self.data.write_report(run_dir)
