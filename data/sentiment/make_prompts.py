"""Generate the movie-review openings of the sentiment experiment (prompts_train.jsonl, prompts_heldout.jsonl).

The DPO paper (Rafailov et al. 2023, §6.1) prompts its models with the first 2-8 tokens of IMDb reviews.
These openings are written for dpokit instead, from the templates and word lists below: the ways a
review begins (a verdict about to be given, a viewing, an aspect of the film, the reviewer's situation),
filled with film types, people, occasions and aspects. Every opening has 2-8 words and is neutral for
the judge (VADER compound score exactly 0), so the sentiment of a review comes from its completion
alone. The first 320 of a seeded random order are the demo's openings: 256 training prompts, 64 held-out
prompts. Every other neutral opening (1,893) goes to the training side of `make paper`: its first 64 are
prompts_select.jsonl, the split on which `make paper` chooses each method's settings (never the held-out
openings), the rest prompts_more.jsonl, for runs with more compute than `make paper`'s budget. No opening
appears in two files.

    python data/sentiment/make_prompts.py      # deterministic: seed 2023
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

SEED = 2023
TOTAL, HELDOUT, SELECT = 320, 64, 64

FILMS = ["this movie", "this film", "the film", "this picture", "the sequel", "this remake", "this documentary",
         "the new thriller", "this comedy", "this western", "the musical", "this horror movie", "this adaptation",
         "the second season", "this animated feature", "this war drama", "this romantic comedy", "the TV movie",
         "this crime drama", "the biopic", "this science fiction film", "the director's latest", "this silent film",
         "this family movie", "the original", "this mystery", "this short film", "the miniseries"]
PEOPLE = ["My wife and I", "My brother and I", "My friends and I", "My parents and I", "My daughter and I",
          "We", "Our film club"]
OCCASIONS = ["last night", "on Sunday", "at a festival", "on cable", "in theaters", "on DVD", "on a plane",
             "this weekend", "in school", "years ago"]
ASPECTS = ["acting", "script", "soundtrack", "cinematography", "dialogue", "special effects", "casting", "pacing",
           "lead actress", "lead actor", "villain", "plot", "ending", "opening scene", "score", "editing",
           "costumes", "direction", "story", "humor"]
TEMPLATES = [
    "{Film}", "Honestly, I", "I think", "Last night I", "{Film} is", "{Film} was", "{Film} starts with", "{Film} tells the story of", "{Film} reminded me",
    "I watched {film} {occasion} and", "I saw {film} {occasion}", "I rented {film} because",
    "{People} watched {film} {occasion}", "{People} saw {film}", "When I first saw {film}",
    "I went to see {film}", "The {aspect} of {film}", "The {aspect} in {film} is", "As for the {aspect},",
    "First of all, the {aspect}", "Let me talk about the {aspect}", "To be honest,", "I have to say",
    "After watching {film}, I", "I did not know", "Having read the book, I", "My review of {film}:",
    "I remember {film}", "So, {film}", "Well, {film}", "What can I say about {film}?", "In {film}, the {aspect}",
    "Going into {film}, I", "Without giving anything away,", "Compared to the original, {film}",
]


def openings() -> list[tuple[str, str]]:
    """(template, opening) for every filled template, without duplicates, in template order."""
    seen, out = set(), []
    for template in TEMPLATES:
        slots = {
            "film": FILMS, "Film": [f[0].upper() + f[1:] for f in FILMS], "People": PEOPLE,
            "occasion": OCCASIONS, "aspect": ASPECTS,
        }
        names = [n for n in slots if "{" + n + "}" in template]
        for values in itertools.product(*(slots[n] for n in names)):
            text = template.format(**dict(zip(names, values)))
            if text not in seen:
                seen.add(text)
                out.append((template, text))
    return out


def main() -> None:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    pool = [(tp, t) for tp, t in openings() if 2 <= len(t.split()) <= 8 and vader.polarity_scores(t)["compound"] == 0.0]
    rng = random.Random(SEED)
    # an even spread over templates: draw round-robin from each template's shuffled openings
    by_template: dict[str, list[str]] = {}
    for template, text in pool:
        by_template.setdefault(template, []).append(text)
    for group in by_template.values():
        rng.shuffle(group)
    spread = [t for group in itertools.zip_longest(*by_template.values()) for t in group if t is not None]
    chosen = spread[:TOTAL]
    rng.shuffle(chosen)
    rest = spread[TOTAL:]
    rng.shuffle(rest)  # after the demo's shuffle: the demo's files stay as they were
    here = Path(__file__).parent
    for name, rows in (("prompts_train.jsonl", chosen[:TOTAL - HELDOUT]), ("prompts_heldout.jsonl", chosen[TOTAL - HELDOUT:]),
                       ("prompts_select.jsonl", rest[:SELECT]), ("prompts_more.jsonl", rest[SELECT:])):
        (here / name).write_text("".join(json.dumps({"prompt": t}) + "\n" for t in rows), encoding="utf-8")
        print(f"{here / name}: {len(rows)} openings")


if __name__ == "__main__":
    main()
