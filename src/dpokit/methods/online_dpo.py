"""Online DPO on the shared loop (Guo et al. 2024, "Direct Language Model Alignment from Online AI
Feedback"; TRL's OnlineDPOTrainer): the preference pairs of each step come from the current policy.

One loop step on `train.batch_size` prompts of `data.train` (a prompt file, as PPO's):

1. `prepare` (no gradients): `online.samples` = K completions per prompt sampled from the policy itself
   (`online.temperature`, `online.top_p`, `online.max_new_tokens`, seeded by the step, through the
   generation backend); the judge scores each (`online.judge`: any judge, a reward model, or the llm
   judge in score mode; the llm judge comparing pairs, its default mode, ranks each prompt's samples by
   their mean win probability over its other samples, every pair asked in both orders), less
   `online.missing_eos_penalty` for a sample cut without EOS; each prompt's
   samples become pairs (`online.pairing`: best-vs-worst, or all pairs) by `generation.pairs`, which
   drops, and counts, ties, pairs under `online.margin`, empty and identical samples (TRL keeps ties).
   One reference pass over the samples gives their KL to the reference, Σ_t (log π − log π_ref) on the
   sampled tokens as PPO logs it (log π from the generation itself), and the π_ref sums of the kept pairs,
   which the update reads instead of asking the reference again.
2. One optimizer update over the step's kept pairs with the configured pair objective (`objective.loss`,
   β, every option of the DPO family), against a reference frozen at the start or moved by TR-DPO
   (`reference.sync_every`): `methods.dpo.DPO`'s models, objective and reference, reused. A step that keeps
   no pair makes no update (its metrics say so). With `online.beta_schedule` [b0, ..., b(n-1)] step s of the
   run's T steps uses β = b(min(n-1, s*n // T)) (`scheduled_beta`), for the loss and the reward metrics alike:
   a pure function of the step, so a resumed run replays it.

Metrics: the step's `reward` (the judge's mean over all samples), `kl`, `pairs` kept, `dropped/<reason>`,
`beta` (the step's β), and DPO's loss and reward metrics over the kept pairs. Under several processes every rank samples the whole
batch with the same seeds and trains on its share of the pairs; a resumed run replays a step exactly.
"""

from __future__ import annotations

import dataclasses

import torch

from dpokit import reference
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
from dpokit.generation.llm_judge import round_robin_scores
from dpokit.generation.pairs import PairCounts, preference_pairs
from dpokit.generation.prompts import PromptItem, prompt_items
from dpokit.methods.dpo import DPO
from dpokit.metrics import PAIR_SUMS
from dpokit.objectives.losses import build_objective
from dpokit.objectives.registry import OBJECTIVES


def scheduled_beta(schedule: list[float], step: int, total_steps: int) -> float:
    """β of step `step` (0-based) of `total_steps` under `online.beta_schedule` [b0, ..., b(n-1)]: b(min(n-1,
    step*n // total_steps)), each value for an n-th of the run, the last one kept past the end."""
    n = len(schedule)
    return float(schedule[min(n - 1, step * n // max(1, total_steps))])


class OnlineDPO(DPO):
    name = "online_dpo"
    unit = "pairs"
    metric_names = PAIR_SUMS

    @classmethod
    def check(cls, cfg: Config) -> None:
        """The online section, and the objectives and references that apply to pairs made at every step."""
        super(DPO, cls).check(cfg)
        o = cfg.online
        if o.judge is None:
            raise ConfigError("dpokit online needs a judge to rank its samples: online.judge=sentiment|length|"
                              "keywords|module:function, or online.judge=reward-model with online.judge_model=DIR")
        check_scoring_judge(o.judge, o.judge_options, "online.judge", pairwise_ok=True)
        single = [n for n in cfg.objective.losses if OBJECTIVES[n].single_completions]
        if single:
            raise ConfigError(f"objective.loss={single[0]} trains on single completions; dpokit online makes pairs")
        if cfg.reference.strategy not in ("auto", "copy", "adapters", "none"):
            raise ConfigError(f"reference.strategy={cfg.reference.strategy} does not apply to dpokit online: its pairs "
                              "are new at every step; use auto, copy or adapters (LoRA)")
        if o.beta_schedule:
            bad = [b for b in o.beta_schedule if not b > 0]
            if bad:
                raise ConfigError(f"online.beta_schedule: every β must be > 0, not {bad[0]}")
            if not any(OBJECTIVES[n].uses_beta for n in cfg.objective.losses):
                raise ConfigError(f"online.beta_schedule: objective.loss={cfg.objective.name} has no β to schedule; "
                                  "leave online.beta_schedule empty")

    def __init__(self, cfg: Config, runtime: Runtime, tokenizer):
        self.cfg, self.rt, self.tokenizer = cfg, runtime, tokenizer
        o = cfg.online
        self.judge = configured_judge(o.judge, o.judge_model, o.judge_options, "online.judge")
        self.train_set = prompt_items(cfg.data.train, tokenizer, o.template, cfg.data.max_prompt_length)
        self.eval_set = []
        self.data = None  # no fixed pairs: the reference is never precomputed
        self.kto, self.weights, self.labels = False, None, {}
        self.beta = cfg.objective.beta  # the β self.objective was built with (online.beta_schedule moves it)
        self.objective = build_objective(cfg.objective)
        self.reference: reference.Reference = reference.NoReference()
        self.policy = None
        self.pairs: list[TokenizedPair] = []
        self.pair_reference: reference.Precomputed | None = None

    def build(self, *, precision: str, autocast, resume_from, echo):
        policy = super().build(precision=precision, autocast=autocast, resume_from=resume_from, echo=echo)
        self.autocast = autocast
        self.stop_ids = stop_token_ids(policy.model, self.tokenizer)
        self.pad_id = pad_id_for(self.tokenizer, self.stop_ids)
        self.sampler = build_backend(self.cfg.generation.backend, policy, synced=self.rt.sharded)
        return policy

    # ----------------------------------------------------------------------------------- samples → pairs

    @torch.no_grad()
    def prepare(self, policy, item_ids: list[int], step: int) -> dict:
        """K samples of each prompt of `item_ids`, scored and paired; returns the step's sample metrics."""
        metrics = super().prepare(policy, item_ids, step)  # TR-DPO: the reference follows first
        cfg, o = self.cfg, self.cfg.online
        self._set_beta(scheduled_beta(o.beta_schedule, step, self.total_steps) if o.beta_schedule else cfg.objective.beta)
        items = [self.train_set[i] for i in item_ids]
        rows = [it for it in items for _ in range(o.samples)]
        with self.autocast():
            samples = self.sampler.generate([it.ids for it in rows], temperature=o.temperature, top_p=o.top_p,
                                            max_new_tokens=o.max_new_tokens, stop_ids=self.stop_ids,
                                            pad_id=self.pad_id, seed=cfg.train.seed * 1_000_003 + step)
        stops = set(self.stop_ids)
        texts = [self.tokenizer.decode([t for t in c.ids if t not in stops], skip_special_tokens=True)
                 for c in samples]
        pairwise = getattr(self.judge, "pairwise", False)
        if pairwise:  # the llm judge comparing: each sample's mean win probability over its prompt's others
            ranked = round_robin_scores(self.judge, [it.prompt for it in items],
                                        [texts[k * o.samples:(k + 1) * o.samples] for k in range(len(items))])
            raw = [s for group in ranked for s in group]
        else:
            raw = checked_scores(self.judge, [it.prompt for it in rows], texts)
        penalty = o.missing_eos_penalty or 0.0
        scores = [s - (penalty if not c.finished else 0.0) for s, c in zip(raw, samples)]
        self.pairs, counts, sides = [], PairCounts(), []
        for k, it in enumerate(items):
            span = range(k * o.samples, (k + 1) * o.samples)
            chosen_rejected, c = preference_pairs([scores[i] for i in span], mode=o.pairing, margin=o.margin,
                                                  texts=[texts[i] for i in span])
            counts.add(c)
            for a, b in chosen_rejected:
                self.pairs.append(TokenizedPair(it.ids, samples[span[a]].ids, samples[span[b]].ids, it.source))
                sides.append((span[a], span[b]))
        ref = self._sample_reference_logps(rows, samples)
        # the update reads the pairs' π_ref sums from this pass rather than a second one (LD-DPO's sums
        # depend on the pair's two lengths, so it asks the reference itself)
        self.pair_reference = (reference.Precomputed({"train": ref[torch.tensor(sides, dtype=torch.long)]})
                               if ref is not None and sides and cfg.objective.ld_alpha is None else None)
        if not pairwise:  # a pairwise judge's win probabilities average ½ by construction: no reward to log
            metrics["reward"] = sum(raw) / len(raw)
        metrics.update({"kl": self._kl(rows, samples, ref),
                        "eos_fraction": sum(c.finished for c in samples) / len(samples),
                        "completion_length": sum(len(c.ids) for c in samples) / len(samples),
                        "pairs_kept": float(counts.pairs), "beta": self.beta,
                        **{f"dropped/{k}": float(v) for k, v in counts.dropped.items()}})
        return metrics

    def _set_beta(self, beta: float) -> None:
        """The objective of the step's β, rebuilt only when β changes (loss and reward metrics both read it)."""
        if beta != self.beta:
            self.beta = beta
            self.objective = build_objective(dataclasses.replace(self.cfg.objective, beta=beta))

    def _sample_reference_logps(self, rows: list[PromptItem], samples) -> torch.Tensor | None:
        """[n] log π_ref of each sample, Σ over its tokens (one reference pass over the step's samples), or
        None without a reference."""
        if isinstance(self.reference, reference.NoReference):
            return None
        with reference.disabled_adapters(self.reference.module):
            return self._sample_logps(self.reference.module, rows, samples)

    @torch.no_grad()
    def _sample_logps(self, module, rows: list[PromptItem], samples) -> torch.Tensor:
        """[n] Σ_t log π(y_t | x, y_<t) of each sample under `module` (plain sums, whatever the objective weighs)."""
        out, mb = [], self.cfg.train.micro_batch_size
        for s in range(0, len(rows), mb):
            chunk = [TokenizedPair(it.ids, c.ids, (), it.source) for it, c in zip(rows[s:s + mb], samples[s:s + mb])]
            batch = collate(chunk, list(range(len(chunk))), self.cfg.train.layout, self.pad_id).to(self.rt.device)
            with self.autocast():
                tokens = module.token_logps(batch).float()
            sums = tokens.new_zeros(2 * batch.num_pairs).index_add(0, batch.target_seq, tokens)
            out.append(sums[:batch.num_pairs].cpu())
        return torch.cat(out)

    def _kl(self, rows: list[PromptItem], samples, ref: torch.Tensor | None) -> float:
        """Mean over the samples of Σ_t (log π − log π_ref) on their tokens (PPO's `kl`); 0 without a reference.
        log π is the generation's own (temperature 1, no top-p) where the backend gives it."""
        if ref is None:
            return 0.0
        if all(c.logp is not None for c in samples):
            policy = torch.tensor([c.logp for c in samples], dtype=torch.float64)
        else:
            policy = self._sample_logps(self.policy, rows, samples).double()
        return (policy - ref.double()).mean().item()

    def reference_logps(self, batch, split: str):
        """The step's pairs' π_ref sums from `prepare`'s pass over the samples, where it made them."""
        if self.pair_reference is not None:
            return self.pair_reference.logps(batch, split)
        return super().reference_logps(batch, split)

    def updates(self, item_ids: list[int]) -> list[list[int]]:
        """One update over the step's kept pairs (none when every pair was dropped)."""
        return [list(range(len(self.pairs)))] if self.pairs else []

    def pairs_of(self, split: str) -> list[TokenizedPair]:
        """The step's pairs, which `DPO.forward` trains on (no weights: `self.weights` is None)."""
        return self.pairs

    # ----------------------------------------------------------------------------------- reports

    def describe(self) -> str:
        o, obj = self.cfg.online, self.cfg.objective
        beta = f"β by step {o.beta_schedule}" if o.beta_schedule else f"β={obj.beta}"
        return (f"online DPO: {o.samples} samples a prompt judged by {self.judge.name}, {o.pairing} pairs, objective "
                f"{obj.name} {beta}, reference {self.reference.name}")

    def summary(self) -> str:
        return (f"{len(self.train_set)} prompts from {self.cfg.data.train}; {self.cfg.online.samples} samples a prompt "
                f"of up to {self.cfg.online.max_new_tokens} tokens")

    def write_report(self, run_dir) -> None:
        return None

    def card(self, config: dict, base_model: str, contents: str) -> tuple[str, str]:
        title, how = super().card(config, base_model, contents)
        return title, how.replace("Trained with Direct Preference Optimization", "Trained with online DPO (pairs sampled "
                                  "from the policy and ranked by a judge at every step)")
