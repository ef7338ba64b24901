"""The workload: a deterministic synthetic preference set, the same pairs in the same order for every contender.

Token lengths are drawn from clipped log-normals like real preference sets (prompts 20-500 tokens, median ~160;
completions 10-300, median ~110; long tails), texts are built from a word list so tokenization is realistic.
`--warmup` short updates come first, then `--steps` timed updates: update k uses pairs [k*B, (k+1)*B).
A pair's lengths are (prompt, chosen, rejected) token counts, completions including their EOS.
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

from dpokit.generation.jsonl import write_jsonl

Lengths = tuple[int, int, int]  # (prompt, chosen, rejected) tokens of one pair

WORD_TEXT = """the of and to in is that it for on with as was be by this are from at or an have not but they which you
one all were can there their has more will if we about when what so some would up other into out than them only its
also time may these two most could like over then first any new such used people many after made well should see
make way use where because both each very through between during before under while same still world year day
water system number part place case point group problem fact hand question work state life child government
company area question house country study family night program book school story result change morning reason
research girl guy moment air teacher force education energy information development environment particular
important different possible available economic political national certain social financial approximately
infrastructure photosynthesis temperature measurement relationship understanding communication responsibility
organisation performance experience knowledge language history science mountain river ocean forest garden
kitchen window village city market price value cost budget report meeting project team manager customer product
service quality design model method process theory evidence analysis sample average difference increase decrease
growth rate level range degree percent example detail feature function answer explain describe compare suggest
consider improve reduce require provide include continue develop create produce remain become believe remember
quickly slowly carefully really simply clearly usually probably recently finally however therefore although
perhaps instead otherwise meanwhile nevertheless furthermore specifically accordingly consequently green blue
yellow small large early late simple complex strong weak quiet loud bright dark warm cold careful honest useful
helpful polite rude wrong right true false clear vague short long"""
WORDS = WORD_TEXT.split()


def length_plan(n_pairs: int, seed: int, scale: float = 1.0) -> list[Lengths]:
    """(prompt, chosen, rejected) token targets: clipped log-normals with long tails. Completions include EOS."""
    rng = random.Random(seed)
    plan = []
    for _ in range(n_pairs):
        p = min(500, max(20, round(rng.lognormvariate(math.log(160), 0.75))))
        c = min(300, max(10, round(rng.lognormvariate(math.log(110), 0.65))))
        r = min(300, max(10, round(rng.lognormvariate(math.log(110), 0.65))))
        plan.append((max(2, round(p * scale)), max(2, round(c * scale)), max(2, round(r * scale))))
    return plan


def generator_description(warmup_length_scale: float) -> str:
    return ("clipped log-normals: prompt median 160 tokens sigma 0.75 in [20, 500], completions median 110 sigma "
            "0.65 in [10, 300] (EOS included), word-list texts; warm-up pairs scaled by "
            f"{warmup_length_scale}")


class TextMaker:
    """Word-list texts of a target token length. Byte-level BPE pre-tokenizes at spaces and punctuation, so a
    text's token count is the sum of its pieces' counts (cached per piece); the result is checked afterwards."""

    def __init__(self, tokenizer, seed: int):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.cache: dict[str, int] = {}

    def count(self, piece: str) -> int:
        if piece not in self.cache:
            self.cache[piece] = len(self.tok(piece, add_special_tokens=False)["input_ids"])
        return self.cache[piece]

    def text(self, n_tokens: int, *, leading_space: bool, question: bool = False) -> str:
        pieces, total, words_in_sentence = [], 0, 0
        sentence_len = self.rng.randint(6, 18)
        while total < n_tokens:
            word = self.rng.choice(WORDS)
            if words_in_sentence == 0:
                word = word.capitalize()
            piece = (" " if pieces or leading_space else "") + word
            pieces.append(piece)
            total += self.count(piece)
            words_in_sentence += 1
            if words_in_sentence >= sentence_len and total < n_tokens - 1:
                end = self.rng.choice([".", ".", ".", ",", "?"] if question else [".", ".", ",", ";"])
                pieces.append(end)
                total += self.count(end)
                words_in_sentence = 0 if end in ".?" else words_in_sentence // 2
                sentence_len = self.rng.randint(6, 18)
        return "".join(pieces)


def make_pairs(tokenizer, plan: list[Lengths], seed: int) -> list[dict]:
    maker = TextMaker(tokenizer, seed)
    rows = []
    for p, c, r in plan:  # completions end with EOS, which the trainers append: the text is one token shorter
        rows.append({"prompt": maker.text(p, leading_space=False, question=True),
                     "chosen": maker.text(c - 1, leading_space=True),
                     "rejected": maker.text(r - 1, leading_space=True)})
    return rows


def tokenized_lengths(path: Path, tokenizer, max_length: int) -> list[Lengths]:
    """(prompt, chosen, rejected) token counts exactly as dpokit's trainer tokenizes the file (`data.*` defaults)."""
    from dpokit.config import DataSection
    from dpokit.data.dataset import prepare_data

    data = prepare_data(DataSection(train=str(path), max_length=max_length), tokenizer)
    if data.truncation.truncated:
        raise SystemExit(f"{data.truncation.truncated} benchmark pairs exceed max_length={max_length}; "
                         "raise --max-length")
    return [(len(x.prompt), len(x.chosen), len(x.rejected)) for x in data.train]


# ------------------------------------------------------------------------------------------ batch measures


def logical_tokens(batch: list[Lengths]) -> int:
    """2*prompt + chosen + rejected per pair: the two sequences a pair stands for, no padding."""
    return sum(2 * p + c + r for p, c, r in batch)


def padded_width(batch: list[Lengths]) -> int:
    """The longest sequence of the batch: the width of its padded rows."""
    return max(p + max(c, r) for p, c, r in batch)


def padding_overhead(batch: list[Lengths]) -> float:
    """Padded tokens over logical tokens."""
    return 2 * len(batch) * padded_width(batch) / logical_tokens(batch)


def percentiles(values: list[int]) -> dict:
    s = sorted(values)

    def pick(q: float) -> int:
        return s[min(len(s) - 1, int(q * len(s)))]

    return {"min": s[0], "p10": pick(0.10), "median": pick(0.5), "mean": round(statistics.fmean(s), 1),
            "p90": pick(0.90), "max": s[-1]}


def typical_batch(batch: int, scale: float = 1.0, samples: int = 1000) -> dict:
    """Padded width and padding overhead over many batches of the distribution, to show how typical the timed
    batches are."""
    plan = length_plan(batch * samples, 12345, scale)
    batches = [plan[k * batch:(k + 1) * batch] for k in range(samples)]
    ratios = [padding_overhead(b) for b in batches]
    q = statistics.quantiles(ratios, n=10)
    return {"batches": samples, "padded_width": percentiles([padded_width(b) for b in batches]),
            "padding_overhead": {"p10": round(q[0], 3), "median": round(statistics.median(ratios), 3),
                                 "p90": round(q[-1], 3)}}


# ------------------------------------------------------------------------------------------ the set


class Workload:
    """The benchmark set: `warmup` short updates, then `steps` timed updates of `batch` pairs, in this order.
    A contender that runs fewer updates (bf16 rows) gets the slice it needs, so every timed update u is the same
    batch for every contender and rows compare on the updates they share."""

    def __init__(self, args, tokenizer, tmp: Path):
        b = args.batch
        warm = length_plan(args.warmup * b, args.seed + 1000, args.length_scale * args.warmup_length_scale)
        timed = length_plan(args.steps * b, args.seed, args.length_scale)
        rows = make_pairs(tokenizer, warm, args.seed + 1000) + make_pairs(tokenizer, timed, args.seed)
        self.args, self.tokenizer, self.tmp, self.rows, self.batch = args, tokenizer, tmp, rows, b
        self.warmup, self.steps = args.warmup, args.steps
        self.path = self.slice_file(0, args.warmup + args.steps)
        self.lengths = tokenized_lengths(self.path, tokenizer, args.max_length)

    def slice_file(self, first: int, count: int) -> Path:
        """Updates [first, first + count) as their own pairs file."""
        path = self.tmp / f"pairs-{first}-{first + count}.jsonl"
        if not path.is_file():
            write_jsonl(path, self.rows[first * self.batch:(first + count) * self.batch])
        return path

    def update(self, u: int) -> list[Lengths]:
        return self.lengths[u * self.batch:(u + 1) * self.batch]

    def timed_pairs(self) -> list[Lengths]:
        return [x for u in range(self.warmup, self.warmup + self.steps) for x in self.update(u)]

    def sweep_rows(self, pairs: int, seq: int | None) -> list[dict] | None:
        """Pairs of a memory-sweep point: the first `pairs` of the first timed update (`seq` None; None when it has
        fewer), or `pairs` pairs whose prompt is a quarter of `seq` tokens and each completion the rest."""
        if seq is None:
            first_timed = self.rows[self.warmup * self.batch:(self.warmup + 1) * self.batch]
            return first_timed[:pairs] if pairs <= len(first_timed) else None
        n = max(8, round(seq * self.args.length_scale))
        return make_pairs(self.tokenizer, [(n // 4, n - n // 4, n - n // 4)] * pairs, self.args.seed + 2)

    def summary(self, flops) -> dict:
        """What the JSON records about the workload: length percentiles and, per update, the tokens, padded width
        and useful FLOPs (`flops`: a measure.Flops)."""
        timed = self.timed_pairs()
        return {
            "timed_pairs": len(timed), "warmup_pairs": self.warmup * self.batch, "pairs_per_update": self.batch,
            "updates": self.warmup + self.steps,
            "prompt_tokens": percentiles([p for p, _, _ in timed]),
            "chosen_tokens": percentiles([c for _, c, _ in timed]),
            "rejected_tokens": percentiles([r for _, _, r in timed]),
            "per_update": [{"update": u, "warmup": u < self.warmup,
                            "logical_tokens": logical_tokens(self.update(u)),
                            "tokens_each_prompt_once": sum(p + c + r for p, c, r in self.update(u)),
                            "padded_width": padded_width(self.update(u)),
                            "padding_overhead": round(padding_overhead(self.update(u)), 3),
                            "useful_flops": flops.useful(self.update(u))}
                           for u in range(self.warmup + self.steps)],
            "typical_batch": typical_batch(self.batch, self.args.length_scale),
            "generator": generator_description(self.args.warmup_length_scale),
        }
