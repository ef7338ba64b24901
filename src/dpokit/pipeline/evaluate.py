"""`dpokit evaluate`: a policy against its reference on held-out prompts.

Both models sample `n` completions per prompt at temperature 1 without top-p (their own distributions),
and the judge scores every completion. Reported, with standard errors over prompts:

    reward      mean judge score of the policy's samples, and of the reference's
    win rate    P(r(x, y) > r(x, y')) + ½ P(r(x, y) = r(x, y')),  y ~ π(·|x), y' ~ π_ref(·|x): every policy
                sample against every reference sample of the same prompt, averaged per prompt, then over prompts
    KL          KL(π‖π_ref) = E_x E_{y~π(·|x)} [log π(y|x) − log π_ref(y|x)], estimated on the policy's own
                samples as the mean of the sequence log-ratios (summed over tokens): an unbiased estimate of
                the KL between the policies over sequences of at most `max_new_tokens` tokens
    accuracy    on held-out preference pairs, when given: the share with a larger implicit reward for the
                chosen completion, (log π − log π_ref)(y_w) > (log π − log π_ref)(y_l), as `dpokit train`
                reports it (rewards/accuracies)

Against the dataset (`against="chosen"`, `--against chosen`): the win rate compares the policy's samples with
each prompt's chosen completion from the held-out file instead of the reference's samples, as the DPO
paper's GPT-4 win rates against the TL;DR reference summaries and the dialogue data's chosen responses.

A pairwise judge (`--judge llm`, `llm_judge.py`) gives no rewards, only which of two completions is better:
the win rate is then the judge's, each policy sample against one opponent of its prompt (the reference's
sample of the same index, or the chosen completion), both orders asked; the mean rewards are not reported.

Best-of-N (`Evaluator.evaluate_best_of`) is the policy made of the reference and the judge: each of its
`n` samples per prompt is the judge's best of N fresh reference samples (the first on ties). It is
reported like a policy (same reward, win-rate and standard-error estimators, against the same reference
samples), except its KL, which is the analytic value (Stiennon et al. 2020; Gao et al. 2023)

    KL(π_BoN ‖ π_ref) = log N − (N − 1)/N

not an estimate: π_BoN's probabilities are not available to score samples with. It is an upper bound on
the true KL, approached when no single completion carries noticeable probability (Beirami et al. 2024).
The candidates are drawn in N rounds of `n` samples per prompt, round j seeded with `seed + BEST_OF_SEED
+ j`, so they are independent of the reference samples they are compared with (a candidate that is also
a comparison sample would bias the win rate up), best-of-N for a smaller N uses the first rounds of a
larger one, and a round drawn once serves every N.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from dpokit import models
from dpokit.data.records import Problems, read_preferences
from dpokit.data.tokenize import TokenizedPair, TokenizeSettings, tokenize_records
from dpokit.distributed import pick_device
from dpokit.errors import ConfigError, DataError
from dpokit.generation.backends import Completion
from dpokit.generation.jsonl import meta_path, read_jsonl, read_meta, write_jsonl
from dpokit.generation.judges import Judge, score_rows
from dpokit.generation.llm_judge import pairwise_win_rate
from dpokit.generation.prompts import Prompt
from dpokit.generation.sampling import PromptSamples, Sampler, SamplingSettings
from dpokit.logps import CompletionLogProbs, logps_table
from dpokit.rundir import default_reference
from dpokit.storage import json_text

# ------------------------------------------------------------------------------------------ estimators


@dataclass(frozen=True)
class Estimate:
    mean: float
    se: float  # standard error of the mean over prompts
    n: int  # prompts


def mean_over_prompts(values: Sequence[Sequence[float]]) -> Estimate:
    """Mean of per-prompt means (every prompt weighs the same) and its standard error over prompts."""
    per_prompt = [sum(v) / len(v) for v in values if len(v)]
    n = len(per_prompt)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    mean = sum(per_prompt) / n
    var = sum((m - mean) ** 2 for m in per_prompt) / (n - 1) if n > 1 else math.nan
    return Estimate(mean, math.sqrt(var / n) if n > 1 else math.nan, n)


def sequence_kl(policy_logps: Sequence[Sequence[float]], reference_logps: Sequence[Sequence[float]]) -> Estimate:
    """KL(π‖π_ref) ≈ mean over prompts x and samples y ~ π(·|x) of log π(y|x) − log π_ref(y|x).

    Inputs are summed sequence log-probs of the *policy's* samples, grouped by prompt. Each term can be
    negative; their expectation is the KL, which is not."""
    return mean_over_prompts([[p - r for p, r in zip(ps, rs)] for ps, rs in zip(policy_logps, reference_logps)])


def win_rate(policy_scores: Sequence[Sequence[float]], reference_scores: Sequence[Sequence[float]]) -> Estimate:
    """P(policy sample beats a reference sample of the same prompt), ties counted as half a win."""
    per_prompt = []
    for ps, rs in zip(policy_scores, reference_scores):
        if ps and rs:
            wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p in ps for r in rs)
            per_prompt.append([wins / (len(ps) * len(rs))])
    return mean_over_prompts(per_prompt)


def preference_accuracy(policy_chosen, policy_rejected, reference_chosen, reference_rejected) -> float:
    """Share of pairs where the implicit reward log π − log π_ref is larger for the chosen completion."""
    margin = (torch.as_tensor(policy_chosen) - torch.as_tensor(reference_chosen)) - (
        torch.as_tensor(policy_rejected) - torch.as_tensor(reference_rejected))
    return float((margin > 0).double().mean()) if margin.numel() else math.nan


def best_of_n_kl(n: int) -> float:
    """KL(π_BoN‖π_ref) = log N − (N − 1)/N: the analytic value for the judge's best of N reference samples
    (0 for N = 1), an upper bound on the true KL."""
    if n < 1:
        raise ConfigError(f"best-of-N needs N >= 1; got {n}")
    return math.log(n) - (n - 1) / n


def best_index(scores: Sequence[float]) -> int:
    """The judge's best candidate: the index of the highest score, the first of equal ones."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


AGAINST = ("reference", "chosen")
NO_SCORE = Estimate(math.nan, math.nan, 0)  # what a pairwise judge reports for a mean reward

BEST_OF_SEED = 1_000_000  # round j of best-of-N candidates is sampled with seed + BEST_OF_SEED + j
# the reference's own samples, when evaluate draws them, are seeded apart from the policy's: with one seed the
# two would share their random numbers, prompt for prompt, and a policy sample and the reference sample it is
# compared with would not be independent (a biased win rate)
REFERENCE_SEED = 2_000_000


@dataclass
class CandidateRound:
    """One round of best-of-N candidates: `n` reference samples per held-out prompt and their scores."""

    completions: list[list[Completion]]
    texts: list[list[str]]
    scores: list[list[float]]
    seconds: float  # wall-clock of sampling and scoring the round


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class EvalResult:
    policy: str
    reference: str
    judge: str
    prompts: int
    samples_per_prompt: int
    reward_policy: Estimate
    reward_reference: Estimate
    win_rate: Estimate
    kl: Estimate
    preference_accuracy: float | None = None
    pairs: int = 0
    tokens_policy: float = math.nan  # mean completion length in tokens
    tokens_reference: float = math.nan
    kl_kind: str = "estimate"  # estimate: sequence log-ratios on the policy's samples; bound: best-of-N's log N − (N−1)/N
    against: str = "reference"  # the win rate's opponents: the reference's samples, or the held-out chosen completions
    reward_chosen: Estimate | None = None  # against chosen, a pointwise judge: mean reward of the chosen completions
    best_of: int | None = None  # N when the policy is the reference's best-of-N
    reward_candidates: Estimate | None = None  # best-of-N: mean reward of all its candidates (reference samples)
    seconds_candidates: float | None = None  # best-of-N: wall-clock of sampling and judging its N rounds
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out

    @classmethod
    def from_json(cls, data: dict) -> EvalResult:
        names = cls.__dataclass_fields__
        values = {k: Estimate(**v) if isinstance(v, dict) else v for k, v in data.items() if k in names}
        return cls(**values, extra={k: v for k, v in data.items() if k not in names})


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


class Evaluator:
    """The reference side of an evaluation, prepared once: the reference model, its samples on the held-out
    prompts and their scores, and its log-probs on the held-out pairs. `evaluate(policy)` then costs one
    round of policy sampling, one reference pass over those samples and the policy's pass over the pairs."""

    def __init__(self, reference: str, judge: Judge, settings: SamplingSettings, *,
                 prompts: Sequence[Prompt] | None = None, reference_samples: str | Path | None = None,
                 pairs: str | Path | None = None, device: str = "auto", dtype: str = "float32", progress: bool = True,
                 against: str = "reference", chosen: Sequence[str] | None = None, also: Sequence[Judge] = ()):
        """`also`: more judges, each scoring every evaluated sample beside `judge` (reported, never optimised:
        a second judge shows whether a gain is the optimised judge's quirks)."""
        if against not in AGAINST:
            raise ConfigError(f"against must be one of {', '.join(AGAINST)}; got {against!r}")
        if (against == "chosen") != (chosen is not None):
            raise ConfigError("a win rate against the chosen completions needs them (one per prompt), and only then")
        if (settings.temperature, settings.top_p) != (1.0, 1.0):
            raise ConfigError(f"evaluation samples at temperature 1 without top-p (the KL estimate needs samples of "
                              f"π itself), not at temperature {settings.temperature}, top-p {settings.top_p}")
        self.reference_name, self.judge, self.settings = reference, judge, settings.check()
        self.device, self.dtype, self.progress = pick_device(device), dtype, progress
        ref_rows, self.reference_seed = None, None
        if reference_samples is not None:
            ref_rows = self._read_reference_samples(reference_samples)
        elif prompts is None:
            raise ConfigError("evaluate needs held-out prompts (--prompts) or reference samples (--reference-samples)")
        self.reference = Sampler.load(reference, self.settings, device=str(self.device), dtype=dtype)
        self.tokenizer = self.reference.tokenizer
        if ref_rows is None:
            self.echo(f"sampling the reference {reference} on {len(prompts)} prompts")
            own = Sampler(self.reference.model, self.tokenizer, replace(self.settings,
                                                                        seed=self.settings.seed + REFERENCE_SEED))
            drawn = own.draw(list(prompts))
            ref_rows = [d.row(i) for i, d in enumerate(drawn)]
        elif prompts is not None:
            stored = [self.reference.encode(p)[0] for p in prompts]
            if stored != [r["prompt"] for r in ref_rows]:
                raise DataError(f"{reference_samples}: its prompts are not those of --prompts")
        self.prompts = [r["prompt"] for r in ref_rows]
        self.reference_rows = ref_rows
        self.against, self.pairwise = against, bool(getattr(judge, "pairwise", False))
        self.reference_scores = None if self.pairwise else score_rows(judge, ref_rows)
        if any(getattr(j, "pairwise", False) for j in also):
            raise ConfigError("--also-judge reports mean rewards: the llm judge needs --judge-option mode=score there")
        self.also = {j.name: (j, score_rows(j, ref_rows)) for j in also}
        self.chosen, self.chosen_scores = None, None
        if chosen is not None:
            if len(chosen) != len(self.prompts):
                raise DataError(f"{len(chosen)} chosen completions for {len(self.prompts)} prompts")
            self.chosen = list(chosen)
            if not self.pairwise:
                self.chosen_scores = score_rows(judge, [{"prompt": p, "completions": [c]}
                                                        for p, c in zip(self.prompts, self.chosen)])
        self.rounds: list[CandidateRound] = []  # best-of-N candidates, drawn on demand
        self.pairs: list[TokenizedPair] = []
        if pairs is not None:
            self.pairs = read_pairs(pairs, self.tokenizer)
            self.pairs_reference = pair_logps(self.reference.scorer, self.pairs, self.reference.pad_id,
                                              settings.batch_size)

    def _read_reference_samples(self, path: str | Path) -> list[dict]:
        meta = read_meta(path)
        if meta is None:
            raise DataError(f"{path}: no {meta_path(path).name} beside it; reference samples must come from "
                            "`dpokit sample`")
        if meta.get("temperature") != 1.0 or meta.get("top_p") != 1.0:
            raise DataError(f"{path} was sampled at temperature {meta.get('temperature')}, top-p {meta.get('top_p')}; "
                            "evaluation compares samples drawn at temperature 1 without top-p")
        if models.model_dir(meta["model"]) != models.model_dir(self.reference_name):
            raise DataError(f"{path} holds samples of {meta['model']}, not of the reference {self.reference_name}")
        rows = read_jsonl(path)
        if len(rows) != meta.get("num_prompts"):
            raise DataError(f"{path} is incomplete ({len(rows)} of {meta.get('num_prompts')} prompts): rerun "
                            "`dpokit sample` with the same arguments to finish it")
        self.reference_seed = (path, meta.get("seed"))
        rows.sort(key=lambda r: r["index"])
        # the policy's samples are drawn the same way as the reference's
        self.settings = replace(self.settings, max_new_tokens=meta["max_new_tokens"], template=meta["template"])
        return rows

    def echo(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)

    def evaluate(self, policy: str, *, samples_out: str | Path | None = None) -> EvalResult:
        s = self.settings
        if self.reference_seed is not None and self.reference_seed[1] == s.seed:
            raise DataError(f"{self.reference_seed[0]} was sampled with seed {s.seed}, the evaluation's own: the "
                            "policy's samples would share the reference's random numbers and not be independent of "
                            "them; evaluate with another --seed")
        model = models.load_for_generation(policy, dtype=self.dtype, device=self.device)
        sampler = Sampler(model, self.tokenizer, s)
        drawn = self._draw(sampler)
        policy_scores = None if self.pairwise else score_rows(self.judge, [d.row(i) for i, d in enumerate(drawn)])
        flat_prompts = [d.prompt_ids for d in drawn for _ in d.completions]
        flat = [c.ids for d in drawn for c in d.completions]
        ref_flat = iter(self.reference.logps(flat_prompts, flat))
        ref_logps = [[next(ref_flat) for _ in d.completions] for d in drawn]
        result = EvalResult(
            policy=policy, reference=self.reference_name, judge=self.judge.name, prompts=len(drawn),
            samples_per_prompt=s.n,
            reward_policy=self._mean_reward(policy_scores), reward_reference=self._mean_reward(self.reference_scores),
            win_rate=self._win_rate([d.texts for d in drawn], policy_scores),
            against=self.against, reward_chosen=self._mean_reward(self.chosen_scores) if self.chosen_scores else None,
            kl=sequence_kl([d.logps for d in drawn], ref_logps),
            tokens_policy=_mean(len(c.ids) for d in drawn for c in d.completions),
            tokens_reference=_mean(n for r in self.reference_rows for n in r["num_tokens"]),
        )
        self._also(result, [{"prompt": d.prompt, "completions": d.texts} for d in drawn])
        if self.pairs:
            lp = pair_logps(sampler.scorer, self.pairs, sampler.pad_id, s.batch_size)
            result.preference_accuracy = preference_accuracy(lp[0], lp[1], *self.pairs_reference)
            result.pairs = len(self.pairs)
        if samples_out is not None:
            write_jsonl(samples_out, [{**d.row(i), "scores": sc, "reference_logps": rl} for i, (d, sc, rl)
                                      in enumerate(zip(drawn, policy_scores or [None] * len(drawn), ref_logps))])
        del model, sampler
        return result

    def _also(self, result: EvalResult, rows: list[dict]) -> None:
        """Each second judge's mean reward of the policy's samples and of the reference's, and its win rate."""
        if self.also:
            result.extra["also"] = {
                name: {"reward_policy": asdict(mean_over_prompts(policy := score_rows(judge, rows))),
                       "reward_reference": asdict(mean_over_prompts(reference)),
                       "win_rate": asdict(win_rate(policy, reference))}
                for name, (judge, reference) in self.also.items()}

    def _mean_reward(self, scores: list[list[float]] | None) -> Estimate:
        return NO_SCORE if scores is None else mean_over_prompts(scores)

    def _win_rate(self, texts: list[list[str]], scores: list[list[float]] | None) -> Estimate:
        """Win rate of the samples `texts` (their `scores` from a pointwise judge) against the opponents:
        the reference's samples or the chosen completions."""
        if self.pairwise:
            opponents = ([[c] for c in self.chosen] if self.chosen is not None
                         else [r["completions"] for r in self.reference_rows])
            return mean_over_prompts(pairwise_win_rate(self.judge, self.prompts, texts, opponents))
        return win_rate(scores, self.chosen_scores if self.chosen is not None else self.reference_scores)

    def _draw(self, sampler: Sampler) -> list[PromptSamples]:
        from tqdm.auto import tqdm

        with tqdm(total=len(self.prompts) * self.settings.n, desc="evaluate", unit="sample",
                  disable=not self.progress, dynamic_ncols=True, leave=False) as bar:
            return sampler.draw(self.prompts, on_batch=bar.update)


    def evaluate_best_of(self, n: int, *, samples_out: str | Path | None = None) -> EvalResult:
        """The reference's best-of-`n` as a policy: each of `settings.n` samples per prompt is the judge's
        best of `n` candidates (rounds 0..n-1, see the module docstring), scored against the reference's
        samples like a policy; the KL is the analytic `best_of_n_kl(n)`."""
        if self.pairwise:
            raise ConfigError("best-of-N picks each candidate by its score: a pairwise judge gives none (the llm judge "
                              "scores with --judge-option mode=score)")
        kl = best_of_n_kl(n)
        rounds = self.candidates(n)
        k = self.settings.n
        picks = [[best_index([r.scores[i][s] for r in rounds]) for s in range(k)] for i in range(len(self.prompts))]
        scores = [[rounds[j].scores[i][s] for s, j in enumerate(row)] for i, row in enumerate(picks)]
        chosen = [[rounds[j].completions[i][s] for s, j in enumerate(row)] for i, row in enumerate(picks)]
        result = EvalResult(
            policy=f"best-of-{n}", reference=self.reference_name, judge=self.judge.name, prompts=len(self.prompts),
            samples_per_prompt=k,
            reward_policy=mean_over_prompts(scores), reward_reference=mean_over_prompts(self.reference_scores),
            win_rate=self._win_rate([], scores), against=self.against,
            reward_chosen=self._mean_reward(self.chosen_scores) if self.chosen_scores else None,
            kl=Estimate(kl, 0.0, len(self.prompts)),  # analytic: no sampling error
            tokens_policy=_mean(len(c.ids) for cs in chosen for c in cs),
            tokens_reference=_mean(t for r in self.reference_rows for t in r["num_tokens"]),
            kl_kind="bound", best_of=n,
            reward_candidates=mean_over_prompts([[sc for r in rounds for sc in r.scores[i]]
                                                 for i in range(len(self.prompts))]),
            seconds_candidates=sum(r.seconds for r in rounds),
        )
        self._also(result, [{"prompt": self.prompts[i], "completions": [rounds[j].texts[i][s] for s, j in
                                                                        enumerate(row)]} for i, row in enumerate(picks)])
        if samples_out is not None:
            write_jsonl(samples_out, [
                {"index": i, "prompt": self.prompts[i], "best_of": n,
                 "completions": [rounds[j].texts[i][s] for s, j in enumerate(row)], "scores": scores[i],
                 "num_tokens": [len(c.ids) for c in chosen[i]], "finished": [c.finished for c in chosen[i]],
                 "picked_round": row, "candidate_scores": [[r.scores[i][s] for r in rounds] for s in range(k)]}
                for i, row in enumerate(picks)])
        return result

    def candidates(self, rounds: int) -> list[CandidateRound]:
        """Rounds 0..rounds-1 of best-of-N candidates, drawing the ones not drawn yet: round j samples `n`
        completions per prompt from the reference with seed `seed + BEST_OF_SEED + j`, in generation batches
        of `batch_size` sequences, and the judge scores them. Costs `n` reference samples per prompt a round."""
        from tqdm.auto import tqdm

        todo = range(len(self.rounds), rounds)
        if not todo:
            return self.rounds[:rounds]
        s = self.settings
        prompt_ids = [self.reference.encode(p)[1] for p in self.prompts]
        self.echo(f"sampling {len(todo)} rounds of best-of-N candidates from the reference ({s.n} per prompt each)")
        with tqdm(total=len(todo) * len(prompt_ids) * s.n, desc="best-of-N", unit="sample",
                  disable=not self.progress, dynamic_ncols=True, leave=False) as bar:
            for j in todo:
                started = time.perf_counter()
                sampler = Sampler(self.reference.model, self.tokenizer, replace(s, seed=s.seed + BEST_OF_SEED + j))
                drawn = sampler.sample_ids(prompt_ids, on_batch=bar.update)
                texts = [[sampler.decode(c.ids) for c in cs] for cs in drawn]
                scores = score_rows(self.judge, [{"prompt": p, "completions": t} for p, t in zip(self.prompts, texts)])
                self.rounds.append(CandidateRound(drawn, texts, scores, time.perf_counter() - started))
        return self.rounds[:rounds]


def read_pairs(path: str | Path, tokenizer) -> list[TokenizedPair]:
    """Held-out preference pairs tokenized exactly as `dpokit train` does (default length limits)."""
    read = read_preferences(str(path), problems=Problems("raise"))
    pairs, _ = tokenize_records(read.records, tokenizer, TokenizeSettings(), Problems("raise"))
    return pairs


def read_chosen(path: str | Path) -> list[str]:
    """Each row's chosen completion, in order, from a .jsonl / .json preference file (a string, or the last
    message's content of a list): the opponents of a win rate against the chosen completions."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: the chosen completions are read from a .jsonl or .json preference file")
    rows = read_jsonl(path) if path.suffix == ".jsonl" else json.loads(path.read_text(encoding="utf-8"))
    chosen = []
    for i, row in enumerate(rows, 1):
        c = row.get("chosen") if isinstance(row, dict) else None
        if isinstance(c, list) and c and isinstance(c[-1], dict):
            c = c[-1].get("content")
        if not isinstance(c, str):
            raise DataError(f"{path}: row {i} has no 'chosen' completion (a string or messages) to compare with")
        chosen.append(c)
    return chosen


def pair_logps(scorer: CompletionLogProbs, pairs: Sequence[TokenizedPair], pad_id: int,
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of every pair's chosen and rejected completion (padded batches)."""
    table = logps_table(scorer, pairs, pad_id=pad_id, batch_pairs=max(1, batch_size // 2))
    return table[:, 0], table[:, 1]


def resolve_reference(policy: str, reference: str | None) -> str:
    return reference if reference is not None else default_reference(policy)


# ------------------------------------------------------------------------------------------ report


def format_estimate(e: Estimate, digits: int = 3) -> str:
    if math.isnan(e.mean):
        return "—"
    if math.isnan(e.se):
        return f"{e.mean:.{digits}f}"
    return f"{e.mean:.{digits}f} ± {e.se:.{digits}f}"


def result_table(result: EvalResult, *, title: str | None = None):
    """reference | policy columns: mean reward, win rate, KL, held-out accuracy, completion length."""
    from rich.table import Table

    bon = result.best_of
    if bon is None:
        title = title or (f"policy vs reference on {result.prompts} held-out prompts "
                          f"({result.samples_per_prompt} samples each, judge: {result.judge})")
    else:
        title = title or (f"best-of-{bon} of the reference vs the reference on {result.prompts} held-out prompts "
                          f"({result.samples_per_prompt} samples each, each the judge's best of {bon}; judge: "
                          f"{result.judge})")
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("reference (before)", justify="right")
    table.add_column("policy (after)" if bon is None else f"best-of-{bon}", justify="right")
    table.add_row("mean reward", format_estimate(result.reward_reference), format_estimate(result.reward_policy))
    if result.reward_candidates is not None:
        table.add_row(f"mean reward of the candidates ({bon * result.samples_per_prompt} per prompt)",
                      format_estimate(result.reward_candidates), "—")
    if result.reward_chosen is not None:
        table.add_row("mean reward of the chosen completions", format_estimate(result.reward_chosen), "—")
    if result.against == "chosen":
        table.add_row("win rate vs the chosen completions", "—", format_estimate(result.win_rate))
    else:
        table.add_row("win rate vs reference", "0.500", format_estimate(result.win_rate))
    if result.kl_kind == "bound":
        table.add_row("KL, nats: bound log N − (N−1)/N", "0", f"{result.kl.mean:.2f}")
        if result.seconds_candidates is not None:
            table.add_row("seconds to sample and judge them", "—", f"{result.seconds_candidates:.1f}")
    else:
        table.add_row("KL(π‖π_ref), nats", "0", format_estimate(result.kl, 2))
    if result.preference_accuracy is not None:
        table.add_row(f"held-out preference accuracy ({result.pairs} pairs)", "—", f"{result.preference_accuracy:.3f}")
    for name, also in result.extra.get("also", {}).items():  # judges that report, not optimise
        table.add_row(f"mean reward ({name}, not optimised)", format_estimate(Estimate(**also["reward_reference"])),
                      format_estimate(Estimate(**also["reward_policy"])))
        table.add_row(f"win rate vs reference ({name})", "0.500", format_estimate(Estimate(**also["win_rate"])))
    table.add_row("completion tokens", f"{result.tokens_reference:.1f}", f"{result.tokens_policy:.1f}")
    return table


def print_result(result: EvalResult, *, title: str | None = None) -> None:
    from rich.console import Console

    Console().print(result_table(result, title=title))


def write_result(result: EvalResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json_text(result.to_json(), indent=2) + "\n", encoding="utf-8")
    return path
