"""RLHF with PPO on the shared loop: prompts → rollouts → judge or reward model → KL-shaped rewards →
GAE → clipped policy and value losses (Ziegler et al. 2019; Stiennon et al. 2020; the recipe of "The N+
Implementation Details of RLHF with PPO", Huang et al. 2024). The arithmetic is `dpokit.rl`'s.

One loop step is one PPO iteration on `train.batch_size` prompts of `data.train` (a prompt file, or any
file with a `prompt` field):

1. `prepare` (no gradients): one completion per prompt sampled from the policy itself (temperature 1,
   top-p 1, `generation.backends.generate`), cut after its first EOS (tokens after it are never trained on
   or penalised) or at `ppo.max_new_tokens`; the judge scores each completion (`ppo.judge`: any judge is
   PPO with the ground-truth reward, `reward-model` with `ppo.judge_model` PPO with a learned reward);
   a completion with no EOS loses `ppo.missing_eos_penalty` (the N+ details' EOS trick). The policy's
   log-probs, values and entropies and the reference's log-probs are computed on the rollouts (a pair
   with an empty rejected side scores one completion in every layout); per-token rewards
   r_t = −β (log π − log π_ref) + score·[t = T], optionally whitened (`ppo.whiten_rewards`); GAE (γ, λ)
   gives advantages and returns; the advantages are whitened over the batch. β is `ppo.kl_coef`, or,
   with `ppo.target_kl`, Ziegler et al.'s adaptive controller's value, updated after each batch.
2. `updates`: `ppo.epochs` passes over the rollouts in shuffled minibatches of `ppo.minibatch_size`;
   each is one optimizer update of the loop (micro-batches, clipping, the non-finite guard).
3. `forward` on a micro-batch: the clipped policy loss plus `ppo.vf_coef` × the clipped value loss,
   each a token mean per sequence, then a mean over sequences (OpenRLHF's reduction; TRL takes a token
   mean over the minibatch).

Value head: a linear layer (zero-initialised, so V starts at 0) on the policy's own last hidden state,
a shared trunk, trained with the policy by one optimizer. It costs no second model in memory and no
second forward pass per update, which decides it on one CPU or GPU; the N+ details and TRL use a
separate value model initialised from the reward model, which this choice gives up (the value loss's
gradient reaches the policy's trunk, scaled by `ppo.vf_coef`). The head is saved in each checkpoint's
trainer state with β, so a resumed run continues exactly; the exported model is the policy alone.

KL: the penalty and the logged `kl` use the single-sample estimate Σ_t (log π − log π_ref) on the
sampled tokens (k1, Ziegler et al., TRL), whose mean is the sequence KL that `dpokit evaluate` reports.
Rewards are used as the judge gives them (no reward-model normalisation); advantages are whitened.

Under several processes each rank samples the whole batch (the same seeds) and trains on its share; under
FSDP2 the rollouts are sampled through the sharded module (its `lm_forward`), every rank stepping until all finish.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dpokit import models, reference, rl
from dpokit.config import Config
from dpokit.data.layouts import collate
from dpokit.data.tokenize import TokenizedPair
from dpokit.distributed import Runtime
from dpokit.errors import ConfigError
from dpokit.generation.backends import build_backend, pad_id_for, stop_token_ids
from dpokit.generation.judges import (
    check_scoring_judge,
    checked_scores,
    configured_judge,
)
from dpokit.generation.prompts import prompt_items
from dpokit.logps import CompletionLogProbs, causal_lm
from dpokit.methods.base import Method
from dpokit.metrics import MicroBatch


@dataclass
class PolicyOutputs:
    logps: torch.Tensor  # [n] log π(a_t | s_t) of every completion token, in the batch's target order
    values: torch.Tensor  # [n] V(s_t), read where a_t is predicted
    entropy: torch.Tensor | None = None  # [n] entropy of π(· | s_t), when asked for (no gradient)


class PolicyWithValue(CompletionLogProbs):
    """The policy and its value head on one trunk: `forward(batch)` → per-token log-probs and values
    from one pass (the module DDP or FSDP wrap). `.model` is the causal LM the loop checkpoints."""

    def __init__(self, model: nn.Module, *, chunk_tokens: int = 1024):
        super().__init__(model, lm_head="selective", chunk_tokens=chunk_tokens)
        config = causal_lm(model).config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.value_head = nn.Linear(text.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, batch, entropy: bool = False) -> PolicyOutputs:
        hidden = self.completion_hidden(batch)
        logps = self.head_logps(hidden, batch.target_ids)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return PolicyOutputs(logps, values, self.head_entropy(hidden) if entropy else None)


@dataclass
class Rollouts:
    """One batch of rollouts and what the updates need of it, per rollout (index k of the batch)."""

    pairs: list[TokenizedPair]  # prompt ids, sampled completion ids, empty rejected side
    old_logps: list[torch.Tensor]
    old_values: list[torch.Tensor]
    advantages: list[torch.Tensor]
    returns: list[torch.Tensor]


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D tensors → ([B, T] right-padded with 0, mask)."""
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width, dtype=rows[0].dtype, device=rows[0].device)
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        mask[i, :len(r)] = True
    return out, mask


class PPO(Method):
    name = "ppo"
    unit = "sequences"  # sequence passes of the step's updates: ppo.epochs × train.batch_size
    metric_names = ("loss", "policy/loss", "value/loss", "policy/clipfrac", "value/clipfrac", "policy/approx_kl",
                    "policy/ratio")

    @classmethod
    def check(cls, cfg: Config) -> None:
        """The ppo section, and the reference PPO can use."""
        super().check(cfg)
        p, t = cfg.ppo, cfg.train
        if p.judge is None:
            raise ConfigError("dpokit ppo needs a reward: ppo.judge=sentiment|length|keywords|module:function, or "
                              "ppo.judge=reward-model with ppo.judge_model=DIR (a trained reward model)")
        if cfg.reference.strategy not in ("auto", "copy", "adapters"):
            raise ConfigError(f"reference.strategy={cfg.reference.strategy} does not apply to PPO: its rollouts are "
                              "new every step; use auto, copy or adapters (LoRA)")
        if cfg.lora.enabled and cfg.lora.dropout:
            # the rollouts' log-probs come from the eval-mode policy, the updates' from the train-mode one: the
            # ratio would not start at 1 (dropout elsewhere is off; TRL turns LoRA's off too)
            raise ConfigError(f"lora.dropout={cfg.lora.dropout}: PPO's ratio compares the rollouts' log-probs "
                              "(no dropout) with the updates'; set lora.dropout=0")
        if p.minibatch_size and t.batch_size % p.minibatch_size:
            raise ConfigError(f"ppo.minibatch_size ({p.minibatch_size}) must divide train.batch_size "
                              f"({t.batch_size})")
        if p.minibatch_size and p.minibatch_size % t.micro_batch_size:
            raise ConfigError(f"ppo.minibatch_size ({p.minibatch_size}) must be a multiple of "
                              f"train.micro_batch_size ({t.micro_batch_size})")
        check_scoring_judge(p.judge, p.judge_options, "ppo.judge")

    def __init__(self, cfg: Config, runtime: Runtime, tokenizer):
        self.cfg, self.rt, self.tokenizer = cfg, runtime, tokenizer
        p = cfg.ppo
        self.judge = configured_judge(p.judge, p.judge_model, p.judge_options, "ppo.judge")
        self.train_set = prompt_items(cfg.data.train, tokenizer, p.template, cfg.data.max_prompt_length)
        self.eval_set = []
        self.kl_coef = p.kl_coef
        self.score_stats: tuple[float, float] | None = None  # the judge's mean and std on the first batch
        self.rollouts: Rollouts | None = None
        self.step = 0
        self.reference: reference.Reference = reference.NoReference()

    # ----------------------------------------------------------------------------------- models

    def build(self, *, precision: str, autocast, resume_from: Path | None, echo) -> PolicyWithValue:
        cfg = self.cfg
        policy, start = models.build_policy(cfg, precision=precision, runtime=self.rt, resume_from=resume_from)
        module = PolicyWithValue(policy.model, chunk_tokens=cfg.train.logps_chunk_tokens).to(self.rt.device)
        if cfg.lora.enabled:
            start = module  # the reference is the policy with its adapters disabled
        self.reference = reference.build(cfg, module, start, needs_reference=True, runtime=self.rt, data=None,
                                         pad_id=self.tokenizer.pad_token_id, precision=precision, autocast=autocast,
                                         echo=echo, tokenizer=self.tokenizer)
        models.enable_training_features(module.model, cfg.train)
        self.policy, self.autocast = module, autocast
        self.stop_ids = stop_token_ids(module.model, self.tokenizer)
        self.pad_id = pad_id_for(self.tokenizer, self.stop_ids)
        self.sampler = build_backend(cfg.generation.backend, module, synced=self.rt.sharded)
        return module

    @torch.no_grad()
    def _reference_logps(self, batch) -> torch.Tensor:
        ref = self.reference.module
        with reference.disabled_adapters(ref):
            return ref.token_logps(batch)

    # ----------------------------------------------------------------------------------- rollouts

    @torch.no_grad()
    def prepare(self, policy, item_ids: list[int], step: int) -> dict:
        """Rollouts on prompts `item_ids`, their rewards and advantages; returns the rollout metrics."""
        cfg, p = self.cfg, self.cfg.ppo
        self.step = step
        items = [self.train_set[i] for i in item_ids]
        with self.autocast():  # the module itself: under FSDP2 its generate gathers the root's parameters
            completions = self.sampler.generate([it.ids for it in items], temperature=1.0, top_p=1.0,
                                                max_new_tokens=p.max_new_tokens, stop_ids=self.stop_ids,
                                                pad_id=self.pad_id, seed=cfg.train.seed * 1_000_003 + step)
        stops = set(self.stop_ids)
        texts = [self.tokenizer.decode([t for t in c.ids if t not in stops], skip_special_tokens=True)
                 for c in completions]
        raw = checked_scores(self.judge, [it.prompt for it in items], texts)
        device = self.rt.device
        scores = torch.tensor(raw, dtype=torch.float32, device=device)
        finished = torch.tensor([c.finished for c in completions], device=device)
        pairs = [TokenizedPair(it.ids, c.ids, (), it.source) for it, c in zip(items, completions)]

        logps, values, entropy, ref_logps = [], [], [], []
        mb = cfg.train.micro_batch_size
        for s in range(0, len(pairs), mb):
            chunk = pairs[s:s + mb]
            batch = collate(chunk, list(range(s, s + len(chunk))), cfg.train.layout, self.pad_id).to(device)
            with self.autocast():
                out = policy(batch, entropy=True)
                ref = self._reference_logps(batch)
            lengths = [len(pair.chosen) for pair in chunk]
            _check_order(batch.target_seq, lengths)
            logps += out.logps.float().split(lengths)
            values += out.values.float().split(lengths)
            entropy += out.entropy.float().split(lengths)
            ref_logps += ref.float().split(lengths)

        lp, mask = pad_rows(logps)
        v, _ = pad_rows(values)
        ref_lp, _ = pad_rows(ref_logps)
        if p.normalize_scores and self.score_stats is None:  # the first batch: samples of the start policy
            self.score_stats = (scores.mean().item(), scores.std().item() if len(scores) > 1 else 1.0)
        shaped = scores
        if p.normalize_scores:
            mean, std = self.score_stats
            shaped = (scores - mean) / (std if std > 1e-6 else 1.0)
        penalised = rl.penalize_missing_eos(shaped, finished, p.missing_eos_penalty)
        rewards, kl = rl.kl_shaped_rewards(penalised, lp, ref_lp, mask, self.kl_coef)
        if p.whiten_rewards:
            rewards = rl.whiten(rewards, mask, shift_mean=False)
        advantages, returns = rl.gae(rewards, v, mask, p.gamma, p.lam)
        advantages = rl.whiten(advantages, mask)
        lengths = [len(x) for x in logps]
        self.rollouts = Rollouts(pairs, logps, values, [a[:n] for a, n in zip(advantages, lengths)],
                                 [r[:n] for r, n in zip(returns, lengths)])

        seq_kl = kl.sum(1)
        kl_coef = self.kl_coef
        metrics = {
            "reward": scores.mean().item(),
            "kl": seq_kl.mean().item(),
            "kl_coef": kl_coef,
            "rlhf_reward": (penalised - kl_coef * seq_kl).mean().item(),
            "entropy": torch.cat(entropy).mean().item(),
            "completion_length": mask.sum(1).float().mean().item(),
            "eos_fraction": finished.float().mean().item(),
        }
        if p.target_kl is not None:
            self.kl_coef = rl.adaptive_kl_coef(self.kl_coef, metrics["kl"], target=p.target_kl, horizon=p.kl_horizon,
                                               batch_size=len(item_ids))
        return metrics

    def updates(self, item_ids: list[int]) -> list[list[int]]:
        """`ppo.epochs` shuffled passes over the batch's rollouts (indices 0..B-1) in minibatches, seeded by
        the step so a resumed run replays them."""
        n = len(item_ids)
        size = self.cfg.ppo.minibatch_size or n
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.step)
        out = []
        for _ in range(self.cfg.ppo.epochs):
            order = torch.randperm(n, generator=g).tolist()
            out += [order[k:k + size] for k in range(0, n, size)]
        return out

    def forward(self, policy, ids: list[int], split: str) -> MicroBatch:
        """PPO's loss on rollouts `ids` of the current batch; `policy` may be DDP/FSDP-wrapped."""
        r, p = self.rollouts, self.cfg.ppo
        batch = collate([r.pairs[k] for k in ids], ids, self.cfg.train.layout, self.pad_id).to(self.rt.device)
        out = policy(batch)
        device = out.logps.device

        def cat(rows):
            return torch.cat([rows[k] for k in ids]).to(device)

        old_logps, old_values = cat(r.old_logps), cat(r.old_values)
        pg, pg_clipped = rl.policy_loss(out.logps.float(), old_logps, cat(r.advantages), p.clip_range)
        vf, vf_clipped = rl.value_loss(out.values, old_values, cat(r.returns), p.value_clip_range)
        seq, n = batch.target_seq, len(ids)
        lengths = torch.bincount(seq, minlength=n)[:n].clamp(min=1)

        def per_sequence(x):  # token mean of each sequence
            return torch.zeros(n, dtype=x.dtype, device=device).index_add(0, seq, x) / lengths

        pg_seq, vf_seq = per_sequence(pg), per_sequence(vf)
        losses = pg_seq + p.vf_coef * vf_seq
        with torch.no_grad():
            delta = out.logps.float() - old_logps
            sums = {"loss": losses.detach().double().sum(), "policy/loss": pg_seq.detach().double().sum(),
                    "value/loss": vf_seq.detach().double().sum(),
                    "policy/clipfrac": per_sequence(pg_clipped).double().sum(),
                    "value/clipfrac": per_sequence(vf_clipped).double().sum(),
                    "policy/approx_kl": per_sequence(rl.approx_kl(out.logps.float(), old_logps)).double().sum(),
                    "policy/ratio": per_sequence(delta.exp()).double().sum()}
        return MicroBatch(losses, sums, batch.num_tokens)

    # ----------------------------------------------------------------------------------- state and reports

    def state_dict(self) -> dict:
        """What a checkpoint keeps beyond the policy: the value head and the KL coefficient."""
        return {"value_head": {k: v.detach().cpu() for k, v in self.policy.value_head.state_dict().items()},
                "kl_coef": self.kl_coef, "score_stats": self.score_stats}

    def load_state_dict(self, state: dict) -> None:
        self.policy.value_head.load_state_dict(state["value_head"])
        self.kl_coef = state["kl_coef"]
        self.score_stats = None if state["score_stats"] is None else tuple(state["score_stats"])

    def describe(self) -> str:
        p = self.cfg.ppo
        kl = (f"β {p.kl_coef} adaptive toward KL {p.target_kl}" if p.target_kl is not None else f"β {p.kl_coef}")
        updates = len(self.updates(list(range(self.cfg.train.batch_size))))
        return (f"PPO against judge {self.judge.name}, {kl}, {updates} updates per batch ({p.epochs} epochs), "
                f"value head on the policy's trunk, reference {self.reference.name}")

    def summary(self) -> str:
        return f"{len(self.train_set)} prompts from {self.cfg.data.train}; rollouts of up to {self.cfg.ppo.max_new_tokens} tokens"

    def write_report(self, run_dir: Path) -> None:
        return None


def _check_order(target_seq: torch.Tensor, lengths: list[int]) -> None:
    """The batch lists each sequence's tokens together, in order (every layout does): per-token tensors
    split by `lengths` then belong to their rollout."""
    expected = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    if not torch.equal(target_seq.cpu(), expected):
        raise RuntimeError("rollout tokens are not in sequence order in the batch")
