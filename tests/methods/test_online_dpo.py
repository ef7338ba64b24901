"""Online DPO: pairs sampled from the current policy and ranked by a judge at every step."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dpokit.config_loader import load_config
from dpokit.errors import ConfigError
from dpokit.metrics import read_metrics
from dpokit.trainer import train
from tests.helpers import crash_then_resume, write_jsonl

PROMPTS = ["The movie was", "I think that", "This film is", "My review:"]


@pytest.fixture
def online_config(tmp_path, peaked_model_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 2])

    def make(*overrides: str):
        base = [f"model.name={peaked_model_dir}", f"data.train={prompts}", f"output.dir={tmp_path / 'run'}",
                "online.judge=length", "online.samples=4", "online.max_new_tokens=8", "online.template=none",
                "train.batch_size=8", "train.micro_batch_size=4", "train.lr=1e-3", "train.schedule=constant",
                "train.epochs=1000", "train.max_steps=4", "checkpoint.every=0", "output.report_to=[]",
                "train.precision=fp32", "objective.beta=0.1"]
        return load_config(None, base + list(overrides))

    return make


@pytest.mark.parametrize("layout", ["prefix_shared", "padded"])
def test_one_reference_pass_gives_the_kl_and_the_pairs_reference_sums(online_config, peaked_model_dir, layout):
    """`prepare` asks the reference once, over the step's samples: the pairs' π_ref sums the update reads are
    the reference's own on the pair batch, and the KL (log π from the generation) is the policy's forward
    pass's, after an update has moved the policy away from the reference."""
    from dpokit import models
    from dpokit.data.layouts import collate
    from dpokit.distributed import Runtime
    from dpokit.methods.online_dpo import OnlineDPO

    cfg = online_config(f"train.layout={layout}")
    method = OnlineDPO(cfg, Runtime(), models.load_tokenizer(peaked_model_dir))
    policy = method.build(precision="fp32", autocast=contextlib.nullcontext, resume_from=None, echo=print)
    with torch.no_grad():  # move the policy off the reference, so that the KL is not 0 by construction
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    drawn, generate = [], method.sampler.generate
    method.sampler.generate = lambda *a, **k: drawn.extend(generate(*a, **k)) or drawn
    stats = method.prepare(policy, list(range(4)), step=0)
    assert method.pairs and method.pair_reference is not None
    batch = collate(method.pairs, list(range(len(method.pairs))), layout, method.tokenizer.pad_token_id)
    table, own = method.reference_logps(batch, "train"), method.reference.logps(batch, "train")
    torch.testing.assert_close(table.chosen, own.chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(table.rejected, own.rejected, atol=1e-4, rtol=0)
    with torch.no_grad():
        gap = policy(batch).chosen - own.chosen  # the chosen samples' log π − log π_ref
    assert gap.abs().max() > 0.05
    rows = [method.train_set[i] for i in range(4) for _ in range(4)]  # online.samples=4 a prompt
    expected = (method._sample_logps(policy, rows, drawn) - method._sample_reference_logps(rows, drawn)).mean()
    assert abs(stats["kl"]) > 0.01 and stats["kl"] == pytest.approx(expected.item(), abs=1e-4)


@pytest.mark.slow  # 40 steps of sampling and training
def test_online_dpo_raises_the_judges_reward(online_config):
    """The `length` judge (words, at most 8 here): over 40 steps of 8 prompts × 4 samples the mean reward of
    the last five steps is clearly above that of the first five (PPO's test asks the same of PPO), with every
    step's metrics logged."""
    result = train(online_config("train.max_steps=40", "train.lr=3e-3"), method="online_dpo")
    rows = [r for r in read_metrics(result.run_dir) if "reward" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    for key in ("reward", "kl", "pairs_kept", "dropped/tie", "dropped/below_margin", "eos_fraction", "lr"):
        assert key in rows[0], key
    first, last = (sum(r["reward"] for r in rs) / 5 for rs in (rows[:5], rows[-5:]))
    # measured 5.59 → 6.58 (AMD EPYC, fp32; with train.seed 0 and 3: +0.90, +0.95); the difference of two
    # 5-step means has a standard error near 0.17
    assert last > first + 0.5, (first, last)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first samples come from the reference itself
    assert rows[-1]["kl"] > 0.1


def test_ties_are_dropped_and_counted_and_a_step_without_pairs_makes_no_update(online_config):
    """A constant judge ties every pair: every step drops them all, trains on nothing and leaves the weights."""
    result = train(online_config("online.judge=keywords", "online.judge_options=[words=zzzqqq]", "train.max_steps=2"),
                   method="online_dpo")
    rows = [r for r in read_metrics(result.run_dir) if "reward" in r]
    assert [r["pairs_kept"] for r in rows] == [0, 0] and all(r["dropped/tie"] == 8 for r in rows)
    assert all(r["pairs"] == 0 and "loss" not in r for r in rows)


@pytest.mark.parametrize("schedule", [[], ["online.beta_schedule=[0.1, 0.3, 0.05]"]])
def test_online_dpo_resumes_exactly(online_config, monkeypatch, schedule):
    """A crash at step 3 resumed: every step's metrics as the straight run's (β by step a function of the step)."""
    cfg = online_config("train.max_steps=5", "checkpoint.every=1", *schedule)
    straight = [r for r in read_metrics(train(cfg, method="online_dpo").run_dir) if "reward" in r]
    resumed_cfg = online_config("train.max_steps=5", "checkpoint.every=1", "output.overwrite=true", *schedule)
    crash_then_resume(resumed_cfg, monkeypatch, at_step=3, method="online_dpo")
    resumed = [r for r in read_metrics(resumed_cfg.output.dir) if "reward" in r]
    for a, b in zip(straight, resumed, strict=True):
        assert (a["reward"], a["pairs_kept"], a["beta"]) == (b["reward"], b["pairs_kept"], b["beta"])
        assert a.get("loss") == pytest.approx(b.get("loss"), abs=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ([], None),
    (["online.judge=null"], "dpokit online needs a judge"),
    (["online.judge=llm", "online.judge_options=[url=http://127.0.0.1:9/v1, model=m]"], None),  # pairwise ranks
    (["online.judge=llm", "online.judge_options=[url=http://127.0.0.1:9/v1, modle=score]"], "unknown option"),
    (["objective.loss=kto"], "objective.loss=kto trains on single completions"),
    (["reference.strategy=precomputed"], "does not apply to dpokit online"),
    (["online.beta_schedule=[0.1, 0.5]"], None),
    (["online.beta_schedule=[0.1, 0]"], "online.beta_schedule: every β must be > 0, not 0"),
    (["online.beta_schedule=[0.1]", "objective.loss=orpo"], "objective.loss=orpo has no β to schedule"),
])
def test_its_checks_run_before_anything_loads(online_config, overrides, message):
    from dpokit.methods.online_dpo import OnlineDPO

    cfg = online_config(*overrides)
    if message is None:
        OnlineDPO.check(cfg)
        return
    with pytest.raises(ConfigError, match=message):
        OnlineDPO.check(cfg)


def test_the_beta_schedule_gives_each_step_its_share_of_the_run():
    """[b0, ..., b(n-1)] over T steps: step s uses b(min(n-1, s*n // T)), TRL's per-epoch list over steps."""
    from dpokit.methods.online_dpo import scheduled_beta

    assert [scheduled_beta([0.5, 0.2], s, 4) for s in range(4)] == [0.5, 0.5, 0.2, 0.2]
    assert [scheduled_beta([0.3, 0.2, 0.1], s, 7) for s in range(7)] == [0.3, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1]
    assert [scheduled_beta([0.4], s, 3) for s in range(3)] == [0.4] * 3
    assert [scheduled_beta([0.1, 0.2, 0.3, 0.4], s, 2) for s in range(2)] == [0.1, 0.3]  # more values than steps
    assert scheduled_beta([0.5, 0.2], 9, 4) == 0.2  # past the end: the last value


def test_a_scheduled_run_trains_and_logs_with_each_steps_beta(online_config, tmp_path):
    """β by step [0.5, 0.2] over 2 steps, objective.beta 0.1 unused: step 1 is the step of a run at
    objective.beta=0.5 (same loss and rewards), so both reach step 2 with the same weights, samples and pair;
    there the rewards are 0.2/0.5 of that run's and the loss is DPO's −log σ(0.2 h) by hand."""
    import torch

    from dpokit.objectives.losses import sigmoid

    one_pair = ("train.batch_size=1", "train.micro_batch_size=1", "train.max_steps=2")
    scheduled = train(online_config(*one_pair, "online.beta_schedule=[0.5, 0.2]"), method="online_dpo")
    constant = train(online_config(*one_pair, "objective.beta=0.5", f"output.dir={tmp_path / 'constant'}"),
                     method="online_dpo")
    a, b = ([r for r in read_metrics(res.run_dir) if "reward" in r] for res in (scheduled, constant))
    assert [r["beta"] for r in a] == [0.5, 0.2] and [r["beta"] for r in b] == [0.5, 0.5]
    assert all(r["pairs_kept"] == 1 for r in a + b)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert a[0][key] == pytest.approx(b[0][key], abs=1e-6), key
    assert (a[1]["reward"], a[1]["logps/chosen"]) == pytest.approx((b[1]["reward"], b[1]["logps/chosen"]), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert a[1][key] == pytest.approx(0.4 * b[1][key], rel=1e-4, abs=1e-7), key
    h = torch.tensor([b[1]["rewards/margins"] / 0.5], dtype=torch.float64)
    zero = torch.zeros_like(h)
    assert a[1]["loss"] == pytest.approx(sigmoid(h, zero, zero, zero, beta=0.2).losses.item(), rel=1e-4)


class LongerWins:
    """A pairwise judge (the llm judge's interface): the longer completion is better, equal lengths tie."""

    name, pairwise = "longer-wins", True

    def __init__(self):
        self.compared = 0

    def compare(self, prompts, firsts, seconds):
        self.compared += len(firsts)
        return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(firsts, seconds)]


def test_a_pairwise_judge_ranks_each_prompts_samples_by_their_comparisons(online_config, monkeypatch):
    """The llm judge in its pairwise mode: each prompt's K samples compared pair by pair (K(K−1)/2), each
    ranked by its mean win probability; best against worst trains, and a step logs no mean reward (½ by
    construction)."""
    from dpokit.methods import online_dpo

    judge = LongerWins()
    monkeypatch.setattr(online_dpo, "configured_judge", lambda *a, **k: judge)
    seen = []
    real = online_dpo.preference_pairs

    def spy(scores, **kw):
        pairs, counts = real(scores, **kw)
        seen.append((scores, kw["texts"], pairs))
        return pairs, counts

    monkeypatch.setattr(online_dpo, "preference_pairs", spy)
    result = train(online_config("train.max_steps=1"), method="online_dpo")
    rows = [r for r in read_metrics(result.run_dir) if "kl" in r]
    assert judge.compared == 8 * 6  # 8 prompts × C(4, 2)
    assert len(seen) == 8 and "reward" not in rows[0]
    for scores, texts, pairs in seen:
        assert sum(scores) == pytest.approx(4 * 0.5)  # each comparison's win shared between its two samples
        for chosen, rejected in pairs:
            assert len(texts[chosen]) > len(texts[rejected])
    assert rows[0]["pairs_kept"] == sum(len(p) for _, _, p in seen) > 0


def test_round_robin_scores_are_mean_win_probabilities():
    from dpokit.generation.llm_judge import round_robin_scores

    judge = LongerWins()
    scores = round_robin_scores(judge, ["p", "q", "r"], [["a", "bbb", "cc"], ["x", "y"], ["only"]])
    assert scores == [[0.0, 1.0, 0.5], [0.5, 0.5], [0.0]]  # a single sample has no comparison
    assert judge.compared == 3 + 1
