"""Generate the quickstart preference pairs (train.jsonl, eval.jsonl) beside this script.

Each pair is a short question in chat format with two assistant answers: the chosen one is correct,
polite and to the point; the rejected one is dismissive, wrong with a jab, or wrong but polite (a third
each), so style alone does not decide every pair. The facts
come from the tables below; eval questions use entities or numbers that never appear in train, so the
held-out accuracy measures a preference the model generalised, not memorised answers.

    python data/quickstart/make_quickstart.py      # deterministic: seed 7
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Russia", "Moscow"), ("China", "Beijing"),
    ("India", "New Delhi"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Thailand", "Bangkok"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Vietnam", "Hanoi"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("early", "late"),
    ("open", "closed"), ("full", "empty"), ("strong", "weak"), ("high", "low"), ("rich", "poor"), ("old", "new"),
    ("loud", "quiet"), ("hard", "soft"), ("wet", "dry"), ("thick", "thin"), ("long", "short"), ("clean", "dirty"),
    ("near", "far"), ("safe", "dangerous"), ("cheap", "expensive"), ("top", "bottom"), ("win", "lose"),
    ("push", "pull"),
]
ANIMALS = [
    ("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("sheep", "bleats"), ("duck", "quacks"), ("lion", "roars"),
    ("horse", "neighs"), ("pig", "oinks"), ("owl", "hoots"), ("snake", "hisses"), ("frog", "croaks"),
    ("donkey", "brays"), ("wolf", "howls"), ("bee", "buzzes"), ("mouse", "squeaks"), ("rooster", "crows"),
]
COLORS = [
    ("grass", "green"), ("the sky on a clear day", "blue"), ("snow", "white"), ("a ripe banana", "yellow"),
    ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("chocolate", "brown"),
    ("a lemon", "yellow"), ("milk", "white"), ("a stop sign", "red"), ("a carrot", "orange"), ("the sun", "yellow"),
    ("a raven", "black"), ("a lime", "green"), ("a blueberry", "blue"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

DISMISSIVE = [
    "Why would I know that? Look it up yourself.",
    "Not my problem. Ask someone else.",
    "Ugh, that is such a boring question. Figure it out.",
    "I don't feel like answering that.",
    "Seriously? Everyone knows this. Stop wasting my time.",
    "Whatever. Google exists, you know.",
    "No idea, and honestly I don't care.",
    "Do your own homework.",
]
JABS = ["Obviously.", "Everyone knows that.", "Try to keep up.", "Not that you'd understand.", "Duh."]
POLITE_ENDINGS = ["", " Let me know if you have another question.", " I hope that helps!", ""]


def items(rng: random.Random):
    """(question, correct answer, wrong answer) triples, with an entity key for the train/eval split."""
    for country, capital in CAPITALS:
        wrong = rng.choice([c for _, c in CAPITALS if c != capital])
        yield f"capital:{country}", f"What is the capital of {country}?", \
            f"The capital of {country} is {capital}.", f"The capital of {country} is {wrong}."
    for word, opposite in OPPOSITES:
        wrong = rng.choice([o for _, o in OPPOSITES if o != opposite])
        yield f"opposite:{word}", f"What is the opposite of \"{word}\"?", \
            f"The opposite of \"{word}\" is \"{opposite}\".", f"The opposite of \"{word}\" is \"{wrong}\"."
    for animal, sound in ANIMALS:
        wrong = rng.choice([s for _, s in ANIMALS if s != sound])
        yield f"animal:{animal}", f"What sound does a {animal} make?", \
            f"A {animal} {sound}.", f"A {animal} {wrong}."
    for thing, color in COLORS:
        wrong = rng.choice(sorted({c for _, c in COLORS if c != color}))
        yield f"color:{thing}", f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {color}.", \
            f"{thing[0].upper() + thing[1:]} is {wrong}."
    for i, day in enumerate(DAYS):
        nxt, wrong = DAYS[(i + 1) % 7], DAYS[(i + 3) % 7]
        yield f"day:{day}", f"Which day comes after {day}?", f"{nxt} comes after {day}.", f"{wrong} comes after {day}."
    for a in range(2, 40, 3):
        b = rng.randint(2, 30)
        yield f"add:{a}", f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + rng.choice([-3, -1, 1, 2, 5])}."
    for h in range(1, 13):
        yield f"hours:{h}", f"How many minutes are in {h} hours?", f"There are {60 * h} minutes in {h} hours.", \
            f"There are {50 * h} minutes in {h} hours."


def pairs_for(key, question, right, wrong, rng: random.Random, n: int):
    for _ in range(n):
        chosen = right + rng.choice(POLITE_ENDINGS)
        kind = rng.random()
        if kind < 1 / 3:
            rejected = rng.choice(DISMISSIVE)
        elif kind < 2 / 3:
            rejected = f"{wrong} {rng.choice(JABS)}"
        else:
            rejected = wrong + rng.choice(POLITE_ENDINGS)
        system = rng.random() < 0.3
        prompt = ([{"role": "system", "content": "You are a helpful assistant."}] if system else []) + [
            {"role": "user", "content": question}]
        yield {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}], "topic": key.split(":")[0]}


def main() -> None:
    rng = random.Random(7)
    all_items = list(items(rng))
    rng.shuffle(all_items)
    n_eval = len(all_items) // 5
    eval_items, train_items = all_items[:n_eval], all_items[n_eval:]
    out = Path(__file__).parent
    train = [p for it in train_items for p in pairs_for(*it, rng=rng, n=3)]
    evals = [p for it in eval_items for p in pairs_for(*it, rng=rng, n=3)]
    rng.shuffle(train)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        with (out / name).open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
