"""The KL estimate against the exact KL of a tiny model (every sequence enumerated), and the other
evaluation statistics against hand-computed values."""

import itertools
import math

import pytest
import torch

from dpokit.generation.backends import generate
from dpokit.generation.sampling import completion_logps
from dpokit.pipeline.evaluate import mean_over_prompts, preference_accuracy, sequence_kl, win_rate
from tests.helpers import tiny_llama

VOCAB, EOS, PAD = 4, 2, 0
PROMPT = (1, 3)
MAX_NEW = 3


def tiny_vocab_model(seed: int):
    # large initial weights so the two models' distributions differ clearly
    return tiny_llama(vocab_size=VOCAB, seed=seed, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, initializer_range=0.6,
                      bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)


def all_completions() -> list[tuple[int, ...]]:
    """Every completion of at most MAX_NEW tokens that generation can produce: cut at the first EOS (kept),
    or MAX_NEW tokens without one."""
    out = []
    for n in range(1, MAX_NEW + 1):
        for seq in itertools.product(range(VOCAB), repeat=n):
            if EOS in seq[:-1]:
                continue
            if n < MAX_NEW and seq[-1] != EOS:
                continue
            out.append(seq)
    return out


@torch.no_grad()
def exact_logp(model, completion: tuple[int, ...]) -> float:
    """log π(y|x) from one full forward pass and a log-softmax over the vocabulary (independent of dpokit)."""
    ids = torch.tensor([PROMPT + completion])
    logps = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(logps[len(PROMPT) - 1 + t, tok].item() for t, tok in enumerate(completion))


def test_kl_estimate_matches_exact_kl_over_all_sequences():
    policy, reference = tiny_vocab_model(0), tiny_vocab_model(1)
    support = all_completions()
    lp_pi = {y: exact_logp(policy, y) for y in support}
    lp_ref = {y: exact_logp(reference, y) for y in support}
    assert sum(math.exp(v) for v in lp_pi.values()) == pytest.approx(1.0, abs=1e-6)  # the support is complete
    exact = sum(math.exp(lp_pi[y]) * (lp_pi[y] - lp_ref[y]) for y in support)
    assert exact > 0.05  # the models differ enough for the test to mean something

    # the pipeline: sample from the policy at temperature 1, score both models, average the log-ratios
    groups, per_group = 80, 50
    drawn = generate(policy, [PROMPT] * (groups * per_group), temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW,
                     stop_ids=[EOS], pad_id=PAD, seed=0)
    ys = [c.ids for c in drawn]
    pi = completion_logps(policy, [PROMPT] * len(ys), ys, pad_id=PAD, batch_size=512)
    ref = completion_logps(reference, [PROMPT] * len(ys), ys, pad_id=PAD, batch_size=512)

    # scoring matches the exact log-probs sequence by sequence
    for y, a, b in list(zip(ys, pi, ref))[:200]:
        assert a == pytest.approx(lp_pi[y], abs=1e-4)
        assert b == pytest.approx(lp_ref[y], abs=1e-4)
    # samples come from π itself (no top-k or other processor): empirical frequencies match
    counts = {y: 0 for y in support}
    for y in ys:
        counts[y] += 1
    total_variation = 0.5 * sum(abs(counts[y] / len(ys) - math.exp(lp_pi[y])) for y in support)
    assert total_variation < 0.05

    est = sequence_kl([pi[g * per_group:(g + 1) * per_group] for g in range(groups)],
                      [ref[g * per_group:(g + 1) * per_group] for g in range(groups)])
    assert est.n == groups
    assert abs(est.mean - exact) < 4 * est.se, (est, exact)
    assert est.se < 0.25 * exact


def test_kl_of_a_model_against_itself_is_zero():
    model = tiny_vocab_model(0)
    drawn = generate(model, [PROMPT] * 64, temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW, stop_ids=[EOS],
                     pad_id=PAD, seed=3)
    ys = [c.ids for c in drawn]
    lp = completion_logps(model, [PROMPT] * len(ys), ys, pad_id=PAD)
    assert sequence_kl([lp], [lp]).mean == 0.0


def test_generation_cuts_at_eos_and_marks_unfinished_completions():
    model = tiny_vocab_model(0)
    drawn = generate(model, [PROMPT] * 200, temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW, stop_ids=[EOS],
                     pad_id=PAD, seed=1)
    for c in drawn:
        assert 1 <= len(c.ids) <= MAX_NEW
        assert EOS not in c.ids[:-1]
        assert c.finished == (c.ids[-1] == EOS)
    assert any(c.finished for c in drawn) and any(not c.finished for c in drawn)


def test_win_rate_counts_ties_as_half_and_weighs_prompts_equally():
    # prompt 1: 2 policy x 2 reference samples: wins (3>1, 3>2, 2>1) + tie (2=2) → 3.5 / 4
    # prompt 2: one comparison, a loss
    est = win_rate([[3.0, 2.0], [0.0]], [[1.0, 2.0], [1.0]])
    assert est.mean == pytest.approx((3.5 / 4 + 0.0) / 2)
    assert est.n == 2


def test_mean_over_prompts_and_its_standard_error():
    est = mean_over_prompts([[1.0, 3.0], [4.0], [6.0, 6.0, 6.0]])  # per-prompt means 2, 4, 6
    assert est.mean == pytest.approx(4.0)
    assert est.se == pytest.approx(math.sqrt(4.0 / 3))  # sample variance 4, over 3 prompts


def test_preference_accuracy_uses_implicit_reward_margins():
    # margins: (0 - 0) - (-1 - 0) = 1 > 0; (1 - 0) - (2 - 0) = -1; a tie counts as wrong, as in training
    acc = preference_accuracy([0.0, 1.0, 0.5], [-1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert acc == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------ best-of-N

HELDOUT = ["We watched this comedy", "The soundtrack of the biopic", "I remember this film", "So, this western"]


def test_best_of_n_kl_is_the_analytic_bound():
    from dpokit.pipeline.evaluate import best_of_n_kl

    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    assert best_of_n_kl(2) < best_of_n_kl(4) < math.log(4)  # grows with N, below log N
    with pytest.raises(Exception, match="N >= 1"):
        best_of_n_kl(0)


def test_best_index_is_the_first_of_the_highest_scores():
    from dpokit.pipeline.evaluate import best_index

    assert best_index([0.1, 0.7, 0.3]) == 1
    assert best_index([2.0, 5.0, 5.0, 1.0]) == 1
    assert best_index([-1.0]) == 0


@pytest.fixture(scope="module")
def best_of_evaluator(tiny_model_dir):
    from dpokit.generation.judges import build_judge
    from dpokit.generation.settings import SamplingSettings
    from dpokit.pipeline.evaluate import Evaluator

    settings = SamplingSettings(n=2, max_new_tokens=6, template="none", batch_size=16, seed=3)
    judge = build_judge("length", options={"unit": "chars"})  # deterministic: characters of the completion
    return Evaluator(tiny_model_dir, judge, settings, prompts=HELDOUT, device="cpu", progress=False)


def test_best_of_n_keeps_the_judges_argmax_of_its_candidates(best_of_evaluator, tmp_path):
    from dpokit.generation.jsonl import read_jsonl

    ev = best_of_evaluator
    result = ev.evaluate_best_of(4, samples_out=tmp_path / "bon.jsonl")
    rows = read_jsonl(tmp_path / "bon.jsonl")
    rounds = ev.candidates(4)
    assert len(rows) == len(HELDOUT) and result.samples_per_prompt == 2 and result.best_of == 4
    for i, row in enumerate(rows):
        for s, (text, score, j) in enumerate(zip(row["completions"], row["scores"], row["picked_round"])):
            candidates = [r.texts[i][s] for r in rounds]
            scores = [len(c) for c in candidates]  # the judge recomputed by hand
            assert row["candidate_scores"][s] == scores
            assert score == max(scores) and j == scores.index(max(scores)) and text == candidates[j]
    # the candidates are fresh draws, not the reference samples the win rate compares with
    assert [r.texts[i] for r in rounds[:1] for i in range(len(HELDOUT))] != [r["completions"] for r in ev.reference_rows]


def test_best_of_n_reward_is_at_least_the_reward_of_its_candidates(best_of_evaluator):
    ev = best_of_evaluator
    one, four = ev.evaluate_best_of(1), ev.evaluate_best_of(4)
    assert one.kl.mean == 0.0 and one.kl_kind == "bound" and four.kl.mean == pytest.approx(math.log(4) - 0.75)
    # best-of-1 is a plain reference sample: its reward is that of its candidates
    assert one.reward_policy.mean == pytest.approx(one.reward_candidates.mean)
    # on the same draws (rounds 0..3), the best of 4 scores at least their mean, prompt by prompt
    rounds = ev.candidates(4)
    for i in range(len(HELDOUT)):
        for s in range(2):
            assert max(r.scores[i][s] for r in rounds) >= rounds[0].scores[i][s]
    assert four.reward_policy.mean >= four.reward_candidates.mean
    assert four.reward_policy.mean >= one.reward_policy.mean  # best-of-4's candidates include best-of-1's
    assert four.reward_policy.mean > four.reward_reference.mean  # lengths vary: picking the longest pays
    assert 0.5 < four.win_rate.mean <= 1.0
    assert len(ev.rounds) == 4  # rounds are drawn once and shared between N


def test_the_policys_samples_are_drawn_independently_of_the_references(best_of_evaluator, tmp_path, tiny_model_dir):
    from dpokit.errors import DataError
    from dpokit.generation.jsonl import read_jsonl
    from dpokit.generation.settings import SamplingSettings
    from dpokit.pipeline.evaluate import Evaluator

    # the reference evaluated as the policy: with one seed for both, its samples would be the reference's own
    best_of_evaluator.evaluate(tiny_model_dir, samples_out=tmp_path / "policy.jsonl")
    drawn = [r["completions"] for r in read_jsonl(tmp_path / "policy.jsonl")]
    assert drawn != [r["completions"] for r in best_of_evaluator.reference_rows]
    # reference samples from a file drawn with the evaluation's own seed are refused when a policy is sampled
    from dpokit.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in HELDOUT), encoding="utf-8")
    samples = tmp_path / "ref.jsonl"
    assert main(["sample", str(prompts), "--model", tiny_model_dir, "--out", str(samples), "--n", "2",
                 "--max-new-tokens", "6", "--template", "none", "--seed", "3"]) == 0
    settings = SamplingSettings(n=2, max_new_tokens=6, template="none", batch_size=16, seed=3)
    ev = Evaluator(tiny_model_dir, best_of_evaluator.judge, settings, reference_samples=samples, device="cpu",
                   progress=False)
    with pytest.raises(DataError, match="was sampled with seed 3, the evaluation's own"):
        ev.evaluate(tiny_model_dir)
