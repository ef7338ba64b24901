"""A Bradley–Terry reward model on the shared loop: preference pairs → a scalar head on the LM → the
loss −log σ(r_w − r_l − m) + c·(r_w + r_l)² (`objectives.bradley_terry`).

The model is the start model as a Hugging Face `AutoModelForSequenceClassification` with one label: its
trunk plus a linear `score` head, new for a causal LM (`models.load_reward_model`). A sequence's reward is
the head applied to the trunk's last hidden state at the sequence's last token that is not padding,
which is where transformers pools the same model, so the exported directory scores exactly as it was
trained wherever it is loaded (`--judge reward-model --judge-model DIR`). With the pad token equal to EOS
(the embedded model's tokenizer; TRL falls back to it too) that is the token before the completion's
EOS. Every layout applies: the trunk runs on the padded, packed or prefix-shared batch and the head reads
one position per sequence (`layouts.last_non_pad_index`).

A per-pair margin m comes from the rows' `reward.margin_field` field (TRL's `margin` column) when they
have one. With LoRA (`lora.enabled`, as TRL's RewardTrainer with a peft_config) the trunk gets adapters and
the head is trained whole; checkpoints hold the adapters and the head, and the exported model is always
merged, a full directory as the judge and PPO load it. A quantized base (QLoRA) is not supported.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dpokit import models
from dpokit.config import Config
from dpokit.data.dataset import margin_field, prepare_data, row_values
from dpokit.data.layouts import Batch, collate, last_non_pad_index
from dpokit.distributed import Runtime
from dpokit.errors import ConfigError, DataError
from dpokit.logps import causal_lm, trunk_states
from dpokit.methods.base import SITE, Method
from dpokit.metrics import MicroBatch
from dpokit.objectives.losses import bradley_terry


class ScalarRewards(nn.Module):
    """Wraps a one-label sequence-classification model so that `forward(batch, read_index)` returns the
    reward of every sequence of the batch ([2·pairs]: chosen, then rejected), read at the flat positions
    `read_index`: the module DDP or FSDP wrap."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, read_index: torch.Tensor) -> torch.Tensor:
        hidden = trunk_states(self.model, batch).index_select(0, read_index)
        return causal_lm(self.model).score(hidden).squeeze(-1).float()


class RewardModel(Method):
    name = "reward"
    unit = "pairs"
    can_sample = False  # a reward model scores text
    exports_merged = True  # with LoRA too: the judge and PPO load a full model directory
    hub_tag = "reward-model"
    metric_names = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")

    @classmethod
    def check(cls, cfg: Config) -> None:
        if cfg.train.sample_every:
            raise ConfigError("train.sample_every: a reward model scores text, it does not generate; leave it at 0")
        if cfg.data.use not in ("auto", "pairs"):
            raise ConfigError(f"data.use={cfg.data.use} reads single completions; dpokit reward trains on "
                              "preference pairs (data.use=pairs)")
        if cfg.lora.enabled and cfg.model.quantization != "none":
            raise ConfigError(f"dpokit reward loads its base in float: model.quantization={cfg.model.quantization} "
                              "(QLoRA) is not supported for reward models; LoRA alone is")

    def __init__(self, cfg: Config, runtime: Runtime, tokenizer):
        self.cfg, self.rt, self.tokenizer = cfg, runtime, tokenizer
        self.data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed, use="pairs",
                                 fields=(cfg.reward.margin_field,))
        if not self.data.train:
            raise DataError(f"{cfg.data.train}: no valid training pairs ({self.data.summary()})")
        self.train_set, self.eval_set = self.data.train, self.data.eval
        self.margins = read_margins(cfg, {"train": self.train_set, "eval": self.eval_set})
        self.new_head: bool | None = True

    def build(self, *, precision: str, autocast, resume_from: Path | None, echo) -> ScalarRewards:
        cfg = self.cfg
        load = dict(pad_token_id=self.tokenizer.pad_token_id, seed=cfg.train.seed,
                    dtype="bfloat16" if precision == "bf16" else "float32", revision=cfg.model.revision,
                    trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation)
        if resume_from is not None and not cfg.lora.enabled:
            load["revision"] = None
            model, _ = models.load_reward_model(str(resume_from), **load)
            self.new_head = None  # the checkpoint's head: whether the run began with a new one is not known here
        else:
            with self.rt.main_first():  # the first load may convert the GGUF default model
                model, self.new_head = models.load_reward_model(cfg.model.name, **load)
            head = model.score
            if self.new_head and resume_from is None:
                echo(f"reward head: new linear {head.in_features} → 1, initialised N(0, 1/{head.in_features + 1})")
        models.disable_dropout(model)
        models.use_layout(model, cfg.train.layout)
        if cfg.lora.enabled and resume_from is None:
            model = models.apply_lora(model, cfg.lora, task_type="SEQ_CLS")
        elif cfg.lora.enabled:  # the checkpoint's adapters and head on the start model
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(resume_from), is_trainable=True)
            self.new_head = None
        module = ScalarRewards(model).to(self.rt.device)
        models.enable_training_features(module.model, cfg.train)
        return module

    def forward(self, policy, ids: list[int], split: str) -> MicroBatch:
        """The Bradley–Terry loss on pairs `ids` of `split` ("train" or "eval"); `policy` may be wrapped."""
        pairs = [(self.train_set if split == "train" else self.eval_set)[j] for j in ids]
        batch = collate(pairs, ids, self.cfg.train.layout, self.tokenizer.pad_token_id)
        read = last_non_pad_index(batch, pairs, self.tokenizer.pad_token_id)
        batch = batch.to(self.rt.device)
        rewards = policy(batch, read.to(self.rt.device))
        n = len(pairs)
        chosen, rejected = rewards[:n], rewards[n:]
        margin = None if self.margins is None else self.margins[split][ids].to(rewards.device)
        losses = bradley_terry(chosen, rejected, margin, center_coefficient=self.cfg.reward.center_coefficient)
        c, r = chosen.detach().double(), rejected.detach().double()
        sums = {"loss": losses.detach().double().sum(), "rewards/accuracies": (c > r).double().sum(),
                "rewards/margins": (c - r).sum(), "rewards/chosen": c.sum(), "rewards/rejected": r.sum()}
        return MicroBatch(losses, sums, batch.num_tokens)

    def describe(self) -> str:
        r = self.cfg.reward
        margin = f"per-pair margins ({r.margin_field})" if self.margins is not None else "no margin"
        head = {True: "new scalar head", False: "the start model's scalar head", None: "scalar head"}[self.new_head]
        return f"Bradley–Terry reward model ({head}, {margin}, centering c={r.center_coefficient})"

    def card(self, config: dict, base_model: str, contents: str) -> tuple[str, str]:
        r = config.get("reward", {})
        return (f"Reward model from {base_model}, trained with dpokit",
                f"A Bradley–Terry reward model trained on preference pairs by {SITE}: loss −log σ(r_w − r_l − m) "
                f"+ c·(r_w + r_l)², c = {r.get('center_coefficient')}, m the pairs' `{r.get('margin_field')}` field "
                "where they have one. Load it with `AutoModelForSequenceClassification` (one label: the reward, "
                "read at the last token that is not padding) or as a judge, `dpokit evaluate --judge reward-model "
                f"--judge-model DIR`. Contents: {contents}, tokenizer.")

    def load_merged(self, adapter_dir: Path):
        """The sequence-classification model, its trained head from the adapter, merged."""
        model, _ = models.load_reward_model(str(adapter_dir), pad_token_id=self.tokenizer.pad_token_id)
        return model


def read_margins(cfg: Config, splits: dict[str, list]) -> dict[str, torch.Tensor] | None:
    """Each pair's margin from its row's `reward.margin_field` field, per split, in the order of the pairs;
    None when no row has the field (or it is set to null)."""
    margins = row_values(splits, margin_field(cfg.reward.margin_field))
    return None if margins is None else {split: torch.tensor(m, dtype=torch.float32) for split, m in margins.items()}
