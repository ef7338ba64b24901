"""DPO and its family on the shared loop: preference pairs → policy and reference log-probs → objective.

KTO (`objective.loss=kto`) runs here too, on single completions labelled desirable or not: unpaired rows
(data.format=kto) or pairs, each two rows (the chosen completion desirable, the rejected one not). A
completion travels as a pair whose rejected side is another row's completion under this row's prompt,
the mismatched pair KTO's reference point z₀ is estimated from; both are scored in one forward pass and
by every reference strategy, the precomputed one included.

With `reference.sync_every` (TR-DPO) the reference follows the policy: `prepare` moves it before each
step that follows a multiple of τ updates, and checkpoints carry its weights.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from dpokit import models, reference
from dpokit.config import Config
from dpokit.data.dataset import LABEL, prepare_data, row_values, weight_field
from dpokit.data.layouts import collate
from dpokit.data.records import Problems, RowReader
from dpokit.data.tokenize import TokenizedPair
from dpokit.distributed import Runtime
from dpokit.errors import ConfigError, DataError
from dpokit.logps import CompletionLogProbs, SequenceLogps
from dpokit.methods.base import SITE, Method
from dpokit.metrics import PAIR_SUMS, MeanOver, MicroBatch, pair_sums
from dpokit.objectives.losses import build_objective, kto, kto_reference_point
from dpokit.objectives.registry import OBJECTIVES

# KTO's metrics, TRL's names: rewards and log-probs averaged over the desirable (chosen) or undesirable
# (rejected) completions; `kl` is z₀; `desirable` and `undesirable` the shares of each
KTO_METRICS = ("loss", "kl", MeanOver("rewards/chosen", "desirable"), MeanOver("rewards/rejected", "undesirable"),
               MeanOver("logps/chosen", "desirable"), MeanOver("logps/rejected", "undesirable"), "desirable",
               "undesirable")


class DPO(Method):
    name = "dpo"
    unit = "pairs"  # what the loop counts: `pairs` and `pairs_per_s` in the metrics
    metric_names = PAIR_SUMS

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        use, single = cfg.data.use, any(OBJECTIVES[n].single_completions for n in cfg.objective.losses)
        if single and use not in ("auto", "pairs"):
            raise ConfigError(f"objective.loss={cfg.objective.name} reads unpaired rows (prompt, completion, label) "
                              f"or pairs; data.use={use} is neither")
        if not single and use not in ("auto", "pairs"):
            raise ConfigError(f"data.use={use} reads single completions, which `dpokit sft` trains on; "
                              "preference objectives need data.use=pairs")

    def __init__(self, cfg: Config, runtime: Runtime, tokenizer):
        self.cfg, self.rt, self.tokenizer = cfg, runtime, tokenizer
        o = cfg.objective
        self.kto = o.losses == ["kto"]
        if self.kto:
            self.unit, self.metric_names = "completions", KTO_METRICS
            use = kto_use(cfg.data)
        else:
            use = "pairs"
        self.data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed, use=use,
                                 fields=(o.weight_field, "label" if use == "labelled" else None))
        if not self.data.train:
            raise DataError(f"{cfg.data.train}: no valid training rows ({self.data.summary()})")
        splits = {"train": self.data.train, "eval": self.data.eval}
        weights = row_values(splits, weight_field(o.weight_field))
        if weights is not None and not all(OBJECTIVES[n].pair_weights for n in o.losses):
            raise ConfigError(f"the rows have per-pair weights ('{o.weight_field}'), which {o.name} cannot apply: it "
                              "sorts the pairs of a batch apart; set objective.weight_field=null")
        self.labels: dict[str, torch.Tensor] = {}
        if self.kto:
            labels = row_values(splits, LABEL) if use == "labelled" else None
            splits, self.labels, weights = kto_items(splits, labels, weights, seed=cfg.train.seed,
                                                     max_length=cfg.data.max_length)
            self.data = dataclasses.replace(self.data, train=splits["train"], eval=splits["eval"], noun="completions")
        self.weights = None if weights is None else {s: torch.tensor(w, dtype=torch.float32) for s, w in weights.items()}
        self.train_set, self.eval_set = self.data.train, self.data.eval
        self.objective = None if self.kto else build_objective(o)
        self.reference: reference.Reference = reference.NoReference()
        self.policy: CompletionLogProbs | None = None

    def build(self, *, precision: str, autocast, resume_from: Path | None, echo) -> CompletionLogProbs:
        """The policy to train; the reference is built beside it, from the same starting weights."""
        o = self.cfg.objective
        policy, start = models.build_policy(self.cfg, precision=precision, runtime=self.rt, resume_from=resume_from,
                                            with_start=o.needs_reference)
        for module in (policy, start):
            if module is not None:  # LD-DPO weighs the tokens of policy and reference alike
                module.ld_alpha = o.ld_alpha
        self.reference = reference.build(self.cfg, policy, start, needs_reference=o.needs_reference,
                                         runtime=self.rt, data=self.data, pad_id=self.tokenizer.pad_token_id,
                                         precision=precision, autocast=autocast, echo=echo,
                                         tokenizer=self.tokenizer)
        policy.unlikelihood = "unlikelihood" in o.losses  # its token-level term on the rejected side
        policy.wpo = o.wpo  # WPO's weights come from the policy alone
        models.enable_training_features(policy.model, self.cfg.train)
        self.policy = policy
        return policy

    def pairs_of(self, split: str) -> list[TokenizedPair]:
        """The pairs of `split` ("train" or "eval") that `forward`'s ids index."""
        return self.train_set if split == "train" else self.eval_set

    def forward(self, policy, ids: list[int], split: str) -> MicroBatch:
        """The objective on pairs `ids` of `split` ("train" or "eval"); `policy` may be DDP/FSDP-wrapped."""
        pairs = self.pairs_of(split)
        batch = collate([pairs[j] for j in ids], ids, self.cfg.train.layout, self.tokenizer.pad_token_id)
        batch = batch.to(self.rt.device)
        logps = policy(batch)
        weights = None if self.weights is None else self.weights[split][ids].to(logps.chosen.device)
        if self.kto:
            return self._kto(logps, self.reference_logps(batch, split), self.labels[split][ids], weights,
                             batch.num_tokens)
        out = self.objective(logps, self.reference_logps(batch, split), weights)
        return MicroBatch(out.losses, pair_sums(out, logps), batch.num_tokens)

    def reference_logps(self, batch, split: str) -> SequenceLogps | None:
        """π_ref's log-probs of the batch's pairs (None for a reference-free objective)."""
        return self.reference.logps(batch, split)

    def _kto(self, logps, ref, labels, weights, tokens: int) -> MicroBatch:
        """KTO on completions (the `chosen` side) with their mismatched pairs (the `rejected` side)."""
        o = self.cfg.objective
        desirable = labels.to(logps.chosen.device)
        z0 = kto_reference_point(logps.rejected, ref.rejected, self.rt.all_reduce_sum)  # over every rank's batch
        ratios = logps.chosen - ref.chosen
        losses = kto(ratios, desirable, z0, beta=o.beta, desirable_weight=o.kto_desirable_weight,
                     undesirable_weight=o.kto_undesirable_weight)
        if weights is not None:
            losses = losses * weights
        rewards, lp, d = (o.beta * ratios).detach().double(), logps.chosen.detach().double(), desirable.double()
        sums = {"loss": losses.detach().double().sum(), "kl": z0.double() * len(losses),
                "rewards/chosen": (rewards * d).sum(), "rewards/rejected": (rewards * (1 - d)).sum(),
                "logps/chosen": (lp * d).sum(), "logps/rejected": (lp * (1 - d)).sum(),
                "desirable": d.sum(), "undesirable": (1 - d).sum()}
        return MicroBatch(losses, sums, tokens)

    # ------------------------------------------------------------------- TR-DPO: the reference follows

    def prepare(self, policy, item_ids: list[int], step: int) -> dict:
        """Before step `step` (0-based, `step` steps done): every τ = reference.sync_every steps the reference
        moves toward the policy (TRL does it at the end of the τ-th step: the same weights). A step is the
        loop's, so one that made no update (online DPO keeping no pair, a skipped non-finite update) counts."""
        every = self.cfg.reference.sync_every
        if every and step and step % every == 0:
            self.reference.follow(self.policy)
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint keeps beyond the policy: a following reference's weights."""
        return {"reference": self.reference.state_dict()} if self.cfg.reference.sync_every else {}

    def load_state_dict(self, state: dict) -> None:
        if "reference" in state:
            self.reference.load_state_dict(state["reference"])

    def describe(self) -> str:
        o = self.cfg.objective
        return f"objective {o.name} β={o.beta}, reference {self.reference.name}"

    def card(self, config: dict, base_model: str, contents: str) -> tuple[str, str]:
        obj = config.get("objective", {})
        loss = "+".join(obj["loss"]) if isinstance(obj.get("loss"), list) else obj.get("loss")  # several: summed
        return (f"{base_model} aligned with dpokit",
                f"Trained with Direct Preference Optimization by {SITE}:\n"
                f"objective `{loss}`, β = {obj.get('beta')}. Contents: {contents}, tokenizer.")


def kto_use(data_cfg) -> str:
    """How KTO reads data.train: unpaired labelled rows (`labelled`, data.format=kto, named or detected) or
    pairs (data.use=pairs, or rows that are not KTO's)."""
    if data_cfg.use == "pairs":
        return "pairs"
    rows = RowReader(data_cfg.train, data_cfg.train_split, Problems("collect"), format=data_cfg.format,
                     use="completion")
    next(iter(rows), None)  # the first row (or a table's columns) tells the format when it is auto
    return "labelled" if rows.format == "kto" else "pairs"


def kto_items(splits: dict[str, list[TokenizedPair]], labels: dict[str, list[bool]] | None,
              weights: dict[str, list[float]] | None, *, seed: int, max_length: int):
    """KTO's completions, per split: (items, labels, weights). Without `labels` the split holds pairs, each
    becoming two completions (chosen: desirable, rejected: undesirable, each with the pair's weight). Each
    item's rejected side is then another item's completion, cut to fit max_length under this item's prompt:
    the mismatched pairs (x_i, y'_i) of KTO's reference point. The paper draws y' within the batch; here each
    item's y' is fixed once (a seeded shuffle, y' the previous item's in that order), as TRL fixes it in its
    dataset, so precomputed reference log-probs hold for it too."""
    items_out, labels_out, weights_out = {}, {}, None if weights is None else {}
    for k, (split, items) in enumerate(splits.items()):
        if labels is not None:
            rows = [(p.prompt, p.chosen, p.source) for p in items]
            flags = list(labels[split])
            w = None if weights is None else list(weights[split])
        else:
            rows = [r for p in items for r in ((p.prompt, p.chosen, p.source), (p.prompt, p.rejected, p.source))]
            flags = [flag for _ in items for flag in (True, False)]
            w = None if weights is None else [x for x in weights[split] for _ in (0, 1)]
        order = list(range(len(rows)))
        random.Random(seed + k).shuffle(order)
        mismatched = {order[j]: rows[order[j - 1]][1] for j in range(len(order))}
        items_out[split] = [TokenizedPair(prompt, completion, mismatched[i][: max_length - len(prompt)], source)
                            for i, (prompt, completion, source) in enumerate(rows)]
        labels_out[split] = torch.tensor(flags, dtype=torch.bool)
        if weights_out is not None:
            weights_out[split] = w
    return items_out, labels_out, weights_out
