"""`dpokit label`: scored completions of each prompt → preference pairs in the format `dpokit train` reads.

    all-pairs       every two completions of a prompt, the higher-scored one chosen: n completions give
                    n(n-1)/2 candidate pairs (the DPO paper's 4 samples → 6 pairs).
    best-vs-worst   one pair per prompt: the highest-scored completion against the lowest.

A candidate pair is dropped, and counted by reason, when a completion is empty (`empty`: the model
stopped at once; `dpokit train` refuses empty completions), its two completions are the same text
(`identical`), score the same (`tie`), or differ by less than `margin` (`below_margin`). A prompt with
fewer than two completions has nothing to pair and is counted as skipped (`too_few`); when no prompt
has two, or every candidate is dropped, labelling stops with an error instead of writing an empty file
(the scores, when asked for, are written first).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dpokit.errors import DataError
from dpokit.generation.jsonl import read_jsonl, write_jsonl, write_meta
from dpokit.generation.settings import PairingSettings


@dataclass
class PairCounts:
    prompts: int = 0
    candidates: int = 0
    pairs: int = 0
    too_few: int = 0  # prompts with fewer than two completions: skipped, nothing to pair
    dropped: dict[str, int] = field(default_factory=lambda: {"empty": 0, "identical": 0, "tie": 0, "below_margin": 0})

    def add(self, other: PairCounts) -> None:
        self.prompts += other.prompts
        self.candidates += other.candidates
        self.pairs += other.pairs
        self.too_few += other.too_few
        for k, v in other.dropped.items():
            self.dropped[k] = self.dropped.get(k, 0) + v

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in self.dropped.items() if v)
        skipped = f"{self.too_few} with fewer than two completions skipped, " if self.too_few else ""
        return (f"{self.pairs} pairs from {self.prompts} prompts ({skipped}{self.candidates} candidates, {dropped} dropped"
                + (f": {reasons})" if reasons else ")"))


def preference_pairs(scores: Sequence[float], *, mode: str = "all-pairs", margin: float = 0.0,
                     texts: Sequence[str] | None = None) -> tuple[list[tuple[int, int]], PairCounts]:
    """(chosen, rejected) index pairs from one prompt's completion scores, and what was dropped and why."""
    PairingSettings(mode, margin).check()
    n = len(scores)
    if mode == "all-pairs":
        candidates = list(itertools.combinations(range(n), 2))
    else:
        candidates = []
        if n >= 2:
            best = max(range(n), key=lambda i: scores[i])
            worst = min((i for i in range(n) if i != best), key=lambda i: scores[i])
            candidates = [(best, worst)]
    counts = PairCounts(prompts=1, candidates=len(candidates), too_few=int(n < 2))
    pairs = []
    for i, j in candidates:
        if texts is not None and not (texts[i].strip() and texts[j].strip()):
            counts.dropped["empty"] += 1
            continue
        if i == j or (texts is not None and texts[i] == texts[j]):
            counts.dropped["identical"] += 1
            continue
        gap = abs(scores[i] - scores[j])
        if gap == 0:
            counts.dropped["tie"] += 1
        elif gap < margin:
            counts.dropped["below_margin"] += 1
        else:
            pairs.append((i, j) if scores[i] > scores[j] else (j, i))
    counts.pairs = len(pairs)
    return pairs, counts


def completion_as_record(prompt, completion: str):
    """A completion in the dataset format matching its prompt: a string, or one assistant message."""
    return [{"role": "assistant", "content": completion}] if isinstance(prompt, list) else completion


def label_rows(rows: Sequence[dict], scores: Sequence[Sequence[float]], *, mode: str = "all-pairs",
               margin: float = 0.0) -> tuple[list[dict], PairCounts]:
    """Sample rows (prompt, completions) with their scores → training rows (prompt, chosen, rejected,
    plus the two scores for inspection) and the counts."""
    total = PairCounts()
    out = []
    for row, row_scores in zip(rows, scores):
        completions = row["completions"]
        pairs, counts = preference_pairs(row_scores, mode=mode, margin=margin, texts=completions)
        total.add(counts)
        for i, j in pairs:
            out.append({"prompt": row["prompt"], "chosen": completion_as_record(row["prompt"], completions[i]),
                        "rejected": completion_as_record(row["prompt"], completions[j]),
                        "score_chosen": row_scores[i], "score_rejected": row_scores[j]})
    return out, total


@dataclass
class LabelSummary:
    pairs_path: Path
    counts: PairCounts
    mean_score: float


def label_file(samples: str | Path, out: str | Path, judge=None, *, mode: str = "all-pairs", margin: float = 0.0,
               scored_out: str | Path | None = None, batch_size: int = 256,
               missing_eos_penalty: float = 0.0) -> LabelSummary:
    """Score the completions of a `dpokit sample` file with `judge` (or use the `scores` its rows already
    hold when `judge` is None) and write the preference pairs to `out`. A completion the sampler cut at its
    token budget (`finished` false) ranks by its score less `missing_eos_penalty` (online DPO's and PPO's EOS
    trick); `scored_out` keeps the judge's own scores."""
    from dpokit.generation.judges import score_rows

    rows = read_jsonl(samples)
    if not rows:
        raise DataError(f"{samples}: no sample rows")
    for i, r in enumerate(rows, 1):
        if "prompt" not in r or not isinstance(r.get("completions"), list):
            raise DataError(f"{samples}:{i}: a sample row needs 'prompt' and a list of 'completions'")
    if all(len(r["completions"]) < 2 for r in rows):  # checked before scoring: a judge may be slow
        raise DataError(f"{samples}: no prompt has two or more completions, and a preference pair needs two; "
                        f"sample at least two per prompt (`dpokit sample --n 2` or more)")
    if judge is None:
        missing = next((i for i, r in enumerate(rows, 1) if len(r.get("scores", [])) != len(r["completions"])), None)
        if missing is not None:
            raise DataError(f"{samples}:{missing}: no 'scores' for its completions; name a judge with --judge")
        scores = [[float(s) for s in r["scores"]] for r in rows]
    else:
        scores = score_rows(judge, rows, batch_size=batch_size)
    if scored_out is not None:  # first: the judge's work is kept even when no pair comes of it
        write_jsonl(scored_out, [{**r, "scores": s, "judge": getattr(judge, "name", r.get("judge"))}
                                 for r, s in zip(rows, scores)])
    ranked = scores
    if missing_eos_penalty:
        ranked = [penalize_unfinished(r, s, missing_eos_penalty, f"{samples}:{i}") for i, (r, s) in
                  enumerate(zip(rows, scores), 1)]
    pairs, counts = label_rows(rows, ranked, mode=mode, margin=margin)
    if not pairs:
        hint = f" (--margin {margin:g} or less)" if counts.dropped["below_margin"] else ""
        raise DataError(f"{samples}: no preference pair: {counts.summary()}; a pair needs two different, "
                        f"non-empty completions of one prompt with different scores{hint}")
    write_jsonl(out, pairs)
    meta = {"samples": str(samples), "judge": getattr(judge, "name", "scores in the samples"), "mode": mode,
            "margin": margin, **({"missing_eos_penalty": missing_eos_penalty} if missing_eos_penalty else {}),
            "counts": counts.to_json()}
    write_meta(out, meta)
    flat = [s for row in scores for s in row]
    return LabelSummary(Path(out), counts, sum(flat) / max(1, len(flat)))


def penalize_unfinished(row: dict, scores: list[float], penalty: float, where: str) -> list[float]:
    """`scores` less `penalty` for each completion of the sample row that did not finish (no stop token)."""
    finished = row.get("finished")
    if not isinstance(finished, list) or len(finished) != len(scores):
        raise DataError(f"{where}: a missing-EOS penalty needs the row's 'finished' flags (one a completion, "
                        "as `dpokit sample` writes them)")
    return [s if done else s - penalty for s, done in zip(scores, finished)]
