"""`train.sample_every`: what the policy generates for a fixed set of held-out prompts while it trains
(the original DPO code's `sample_during_eval`).

Every `sample_every` steps (and after the last) the policy generates one completion per prompt, greedy
at `sample_temperature` 0 or sampled, with `dpokit sample`'s code (`generation.sampling.Sampler`: the same
prompt encoding, stop tokens, seeding, and log-probs from the trainer's own `CompletionLogProbs`). The
rows go to `<run>/samples.jsonl` and to each tracker as a table; with `sample_judge`, each completion's
score too, and the mean as the metric `samples/score` (a cheap point of the reward curve during
training). The seed is fixed, so the generations of two steps differ only by what training changed.

The prompts: `train.sample_prompts` (a prompt file), else the held-out file's prompts when `data.eval`
is a JSON Lines / JSON file with a `prompt` field, else the held-out pairs' prompt tokens, decoded for
display. The first `sample_count` distinct ones are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpokit.errors import ConfigError, DataError
from dpokit.generation.backends import build_backend
from dpokit.generation.judges import checked_scores, configured_judge
from dpokit.generation.prompts import Prompt, as_model_input, read_prompts
from dpokit.generation.sampling import Sampler
from dpokit.generation.settings import SamplingSettings


@dataclass
class HeldOutPrompt:
    prompt: Prompt  # as a judge reads it and the tables show it
    ids: tuple[int, ...]


class TrainingSamples:
    def __init__(self, cfg, tokenizer, prompts: list[HeldOutPrompt], judge=None):
        t = cfg.train
        self.tokenizer, self.prompts, self.judge = tokenizer, prompts, judge
        self.backend_name = cfg.generation.backend
        self.settings = SamplingSettings(n=1, temperature=t.sample_temperature, top_p=t.sample_top_p,
                                         max_new_tokens=t.sample_max_new_tokens, seed=t.seed,
                                         batch_size=len(prompts)).check()

    @classmethod
    def from_config(cls, cfg, tokenizer, eval_set) -> TrainingSamples | None:
        """None when `train.sample_every` is 0. The judge loads here, before training starts."""
        t = cfg.train
        if not t.sample_every:
            return None
        prompts = held_out_prompts(cfg, tokenizer, eval_set)[:t.sample_count]
        judge = None
        if t.sample_judge is not None:
            judge = configured_judge(t.sample_judge, t.sample_judge_model, t.sample_judge_options, "train.sample_judge")
        return cls(cfg, tokenizer, prompts, judge)

    def generate(self, model, step: int) -> tuple[list[dict], dict]:
        """One completion per prompt from `model` (the policy's causal LM): the rows for samples.jsonl and
        the metrics (`samples/score` with a judge, `samples/num_tokens`). The model is left in eval mode."""
        import torch

        sampler = Sampler(model, self.tokenizer, self.settings, backend=build_backend(self.backend_name, model))
        ids = [p.ids for p in self.prompts]
        with torch.no_grad():
            completions = [cs[0] for cs in sampler.sample_ids(ids)]
            logps = sampler.completion_logps(ids, [[c] for c in completions])
        texts = [sampler.decode(c.ids) for c in completions]
        scores = (checked_scores(self.judge, [p.prompt for p in self.prompts], texts) if self.judge is not None
                  else None)
        rows = [{"step": step, "index": i, "prompt": p.prompt, "completion": text,
                 "score": None if scores is None else scores[i], "num_tokens": len(c.ids), "finished": c.finished,
                 "logp": logp}
                for i, (p, c, text, logp) in enumerate(zip(self.prompts, completions, texts, logps))]
        metrics = {"step": step, "samples/num_tokens": sum(r["num_tokens"] for r in rows) / max(1, len(rows))}
        if scores is not None:
            metrics["samples/score"] = sum(scores) / max(1, len(scores))
        return rows, metrics


def held_out_prompts(cfg, tokenizer, eval_set) -> list[HeldOutPrompt]:
    """The distinct prompts to generate for, in file order (see the module docstring)."""
    t, source = cfg.train, cfg.train.sample_prompts
    if source is None and cfg.data.eval is not None and Path(cfg.data.eval).suffix in (".jsonl", ".json"):
        try:
            prompts = read_prompts(cfg.data.eval)
        except DataError:  # rows without a `prompt` field (an implicit prompt): use the tokenized pairs
            prompts = None
        if prompts is not None:
            source = cfg.data.eval
    if source is not None:
        found, seen = [], set()
        for prompt in read_prompts(source):
            stored, ids = as_model_input(prompt, tokenizer, "auto")
            if tuple(ids) not in seen:
                seen.add(tuple(ids))
                found.append(HeldOutPrompt(stored, tuple(ids)))
            if len(found) == t.sample_count:
                break
        return found
    if not eval_set:
        raise ConfigError("train.sample_every needs held-out prompts: set train.sample_prompts (a prompt file), "
                          "data.eval or data.eval_fraction")
    found, seen = [], set()
    for pair in eval_set:
        if pair.prompt not in seen:
            seen.add(pair.prompt)
            found.append(HeldOutPrompt(tokenizer.decode(pair.prompt, skip_special_tokens=True), pair.prompt))
    return found
