"""dpokit iterate: rounds of sampling the latest policy, judging, pairing and DPO, each a run directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpokit.config_loader import load_config
from dpokit.errors import ConfigError
from dpokit.pipeline.iterate import iterate
from tests.helpers import write_jsonl

PROMPTS = ["The movie was", "I think that", "This film is", "My review:"]


@pytest.fixture
def iterate_config(tmp_path, peaked_model_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 8])

    def make(*overrides: str, out: str = "run"):
        base = [f"model.name={peaked_model_dir}", f"data.train={prompts}", f"output.dir={tmp_path / out}",
                "online.judge=length", "online.samples=4", "online.max_new_tokens=8", "online.template=none",
                "iterate.rounds=4", "iterate.reference=previous", "train.batch_size=4", "train.micro_batch_size=4",
                "train.lr=5e-3", "train.schedule=constant", "train.epochs=3", "checkpoint.every=0",
                "output.report_to=[]", "train.precision=fp32"]
        return load_config(None, base + list(overrides))

    return make


@pytest.mark.slow  # four rounds of sampling and training
def test_rounds_raise_the_judges_reward_each_from_the_latest_policy(iterate_config, tmp_path):
    import dpokit

    rounds = dpokit.iterate(iterate_config())  # from Python, as `dpokit iterate` runs it
    assert [r.index for r in rounds] == [1, 2, 3, 4] and all(r.pairs > 0 for r in rounds)
    assert rounds[0].policy_from == rounds[0].reference  # round 1: the start model, against itself
    for before, after in zip(rounds, rounds[1:]):  # each round samples, and is judged against, the last policy
        assert after.policy_from == after.reference == str(before.run_dir / "model")
    assert rounds[-1].mean_score > rounds[0].mean_score + 0.4  # measured 5.56 → 6.23 (AMD EPYC, fp32)


def test_finished_rounds_are_never_redone_and_a_crashed_round_resumes_exactly(iterate_config, monkeypatch):
    from safetensors.torch import load_file

    from dpokit.trainer import Trainer

    overrides = ("iterate.rounds=2", "iterate.reference=start", "checkpoint.every=1", "train.epochs=1")
    straight = iterate(iterate_config(*overrides, out="straight"), echo=lambda _: None)
    cfg = iterate_config(*overrides)
    real_step, calls = Trainer.train_step, []

    def crash_in_round_two(self, ids):
        calls.append(self.run_dir.name)
        if self.run_dir.name == "round-2" and self.step == 3:
            raise RuntimeError("simulated crash")
        return real_step(self, ids)

    monkeypatch.setattr(Trainer, "train_step", crash_in_round_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        iterate(cfg, echo=lambda _: None)
    round_one = (Path(cfg.output.dir) / "round-1" / "pairs.jsonl").stat()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    rounds = iterate(cfg, resume=True, echo=lambda _: None)
    assert [r.resumed for r in rounds] == [True, False]
    assert (rounds[0].run_dir / "pairs.jsonl").stat().st_mtime_ns == round_one.st_mtime_ns  # round 1 untouched
    assert rounds[1].reference == straight[1].reference == cfg.model.name  # iterate.reference=start
    for a, b in zip(straight, rounds):
        assert (a.mean_score, a.pairs) == (b.mean_score, b.pairs)
        want, got = (load_file(str(r.run_dir / "model" / "model.safetensors")) for r in (a, b))
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_its_checks_run_before_anything_loads(iterate_config):
    from dpokit.pipeline.iterate import check

    with pytest.raises(ConfigError, match="dpokit iterate needs a judge"):
        check(iterate_config("online.judge=null"))
    with pytest.raises(ConfigError, match="leave reference.name unset"):
        check(iterate_config(f"reference.name={iterate_config().model.name}"))


def test_each_round_samples_its_own_slice_of_the_prompts_wrapping_at_the_end(iterate_config, tmp_path):
    from dpokit.generation.prompts import read_prompts
    from dpokit.pipeline.iterate import round_prompts

    cfg = iterate_config("iterate.prompts_per_round=12")  # 32 prompts: 0-11, 12-23, 24-31 + 0-3
    seen = [read_prompts(round_prompts(cfg, r, tmp_path / f"round-{r}")) for r in (1, 2, 3)]
    every = (PROMPTS * 8)
    assert seen[0] == every[:12] and seen[1] == every[12:24] and seen[2] == every[24:] + every[:4]
    assert round_prompts(iterate_config(), 1, tmp_path) == str(tmp_path / "prompts.jsonl")  # 0: all of data.train


def test_a_missing_eos_penalty_lowers_the_cut_samples_scores_before_pairing(iterate_config, monkeypatch):
    import dpokit.trainer
    from dpokit.generation.jsonl import read_jsonl

    monkeypatch.setattr(dpokit.trainer, "train", lambda *a, **k: None)  # the round's labelling is what is tested
    cfg = iterate_config("iterate.rounds=1", "online.missing_eos_penalty=100", "online.pairing=all-pairs")
    (r,) = iterate(cfg)
    scored = {(row["prompt"], text): (score, done) for row in read_jsonl(r.run_dir / "scored.jsonl")
              for text, score, done in zip(row["completions"], row["scores"], row["finished"])}
    assert not all(done for _, done in scored.values())  # 8 tokens: samples are cut
    pairs = read_jsonl(r.run_dir / "pairs.jsonl")
    assert pairs
    for p in pairs:
        for side in ("chosen", "rejected"):
            score, done = scored[(p["prompt"], p[side])]
            assert p[f"score_{side}"] == pytest.approx(score if done else score - 100)
