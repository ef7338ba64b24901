"""sample → label → train → evaluate → frontier through the `dpokit` command line, on a tiny model."""

import csv
import json

import pytest

from dpokit.cli import main
from tests.helpers import write_jsonl

TRAIN = ["This movie was", "I rented the sequel because", "The plot", "Honestly, I", "The acting in this film",
         "My wife and I saw the musical", "So, this western", "The ending of the film"]
HELDOUT = ["We watched this comedy", "The soundtrack of the biopic", "I remember this film"]
JUDGE = ["--judge", "length", "--judge-option", "unit=chars"]
GEN = ["--max-new-tokens", "6", "--template", "none", "--batch-size", "16"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("pipeline")
    write_jsonl(d / "train_prompts.jsonl", [{"prompt": p} for p in TRAIN])
    write_jsonl(d / "heldout_prompts.jsonl", [{"prompt": p} for p in HELDOUT])
    run = d / "run"
    steps = [
        ["sample", str(d / "train_prompts.jsonl"), "--model", tiny_model_dir, "--out", str(d / "samples.jsonl"),
         "--n", "4", *GEN],
        ["sample", str(d / "heldout_prompts.jsonl"), "--model", tiny_model_dir, "--out",
         str(d / "ref_samples.jsonl"), "--n", "4", "--seed", "1", *GEN],
        ["label", str(d / "samples.jsonl"), "--out", str(d / "pairs.jsonl"), *JUDGE],
        ["label", str(d / "ref_samples.jsonl"), "--out", str(d / "heldout_pairs.jsonl"), "--mode", "best-vs-worst",
         *JUDGE],
        ["train", f"model.name={tiny_model_dir}", f"data.train={d / 'pairs.jsonl'}",
         f"data.eval={d / 'heldout_pairs.jsonl'}", f"output.dir={run}", "train.batch_size=8",
         "train.micro_batch_size=8", "train.max_steps=3", "train.lr=3e-3", "checkpoint.every=1", "checkpoint.keep=5",
         "train.layout=prefix_shared", "reference.strategy=precomputed", f"reference.cache_dir={d / 'refcache'}",
         "output.tensorboard=false"],
        ["evaluate", str(run), "--reference-samples", str(d / "ref_samples.jsonl"), "--pairs",
         str(d / "heldout_pairs.jsonl"), "--n", "2", "--out", str(d / "eval.json"), *JUDGE],
        ["frontier", str(run), "--checkpoints", "--reference-samples", str(d / "ref_samples.jsonl"), "--n", "2",
         "--out", str(d / "frontier"), *JUDGE],
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    return d


def test_label_writes_all_pairs_the_trainer_used(pipeline):
    meta = json.loads((pipeline / "pairs.jsonl.meta.json").read_text())["counts"]
    assert meta["prompts"] == len(TRAIN) and meta["candidates"] == 6 * len(TRAIN)
    assert meta["pairs"] + sum(meta["dropped"].values()) == meta["candidates"]
    report = json.loads((pipeline / "run" / "data_report.json").read_text())
    assert report["train_pairs"] == meta["pairs"]
    assert report["eval_pairs"] == json.loads((pipeline / "heldout_pairs.jsonl.meta.json").read_text())["counts"]["pairs"]


def test_evaluate_reports_reward_win_rate_kl_and_accuracy(pipeline):
    result = json.loads((pipeline / "eval.json").read_text())
    assert result["reference"].endswith("tiny-llama0") or "tiny" in result["reference"]
    assert result["prompts"] == len(HELDOUT) and result["samples_per_prompt"] == 2
    for key in ("reward_policy", "reward_reference", "win_rate", "kl"):
        assert set(result[key]) == {"mean", "se", "n"}
    assert 0 <= result["win_rate"]["mean"] <= 1
    assert result["kl"]["mean"] > -0.5  # an estimate of a non-negative quantity, near 0 after 3 tiny steps
    assert 0 <= result["preference_accuracy"] <= 1 and result["pairs"] > 0


def test_frontier_has_a_point_per_checkpoint_and_a_plot(pipeline):
    with open(pipeline / "frontier" / "frontier.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["series"] for r in rows] == ["reference", "DPO", "DPO", "DPO"]
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
    assert float(rows[0]["kl"]) == 0.0
    assert (pipeline / "frontier" / "frontier.png").stat().st_size > 10_000


def test_evaluating_the_reference_itself_gives_zero_kl(pipeline, tiny_model_dir, capsys):
    assert main(["evaluate", tiny_model_dir, "--reference", tiny_model_dir, "--prompts",
                 str(pipeline / "heldout_prompts.jsonl"), "--n", "2", *GEN, *JUDGE]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the policy's log-probs are recorded while sampling, the reference's recomputed: equal up to fp32 rounding
    assert abs(result["kl"]["mean"]) < 1e-5


def test_user_errors_are_one_line(pipeline, capsys):
    assert main(["evaluate", str(pipeline / "run"), "--judge", "length"]) == 2
    assert "--prompts" in capsys.readouterr().err
    assert main(["label", str(pipeline / "samples.jsonl"), "--out", str(pipeline / "x.jsonl"), "--judge", "vader"]) == 2


def test_a_second_judge_reports_beside_the_first(pipeline, tiny_model_dir, capsys):
    """--also-judge: each point's mean reward and win rate by another judge, in the result, the CSV and the table."""
    out = pipeline / "frontier-also"
    assert main(["frontier", str(pipeline / "run"), "--prompts", str(pipeline / "heldout_prompts.jsonl"), "--n", "2",
                 *GEN, *JUDGE, "--also-judge", "afinn", "--also-judge", "length", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "frontier.csv").open()))
    assert {"afinn_reward", "afinn_win_rate", "length_reward"} <= set(rows[0])
    assert rows[0]["series"] == "reference" and float(rows[0]["afinn_win_rate"]) == 0.5
    point = json.loads(sorted((out / "points").glob("*.json"))[-1].read_text())
    assert set(point["also"]) == {"afinn", "length"}
    assert point["also"]["length"]["reward_policy"]["mean"] > 0  # words, where the judge counts characters
    assert 0.0 <= point["also"]["afinn"]["win_rate"]["mean"] <= 1.0
    assert "afinn" in capsys.readouterr().out  # its column in the printed table
