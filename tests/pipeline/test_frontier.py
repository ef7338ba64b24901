"""Best-of-N through the `dpokit evaluate` and `dpokit frontier` command lines, on a tiny model."""

import csv
import json
import math

import pytest

from dpokit.cli import main
from tests.helpers import write_jsonl

HELDOUT = ["We watched this comedy", "The soundtrack of the biopic", "I remember this film"]
JUDGE = ["--judge", "length", "--judge-option", "unit=chars"]
GEN = ["--max-new-tokens", "6", "--template", "none", "--batch-size", "16", "--n", "2"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("best_of") / "heldout.jsonl", [{"prompt": p} for p in HELDOUT])


def test_evaluate_best_of_writes_a_policy_shaped_result(prompts, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bon.json"
    assert main(["evaluate", "--best-of", "4", "--reference", tiny_model_dir, "--prompts", str(prompts), *GEN, *JUDGE,
                 "--out", str(out), "--samples-out", str(tmp_path / "bon.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "best-of-4" in printed and "bound log N" in printed
    result = json.loads(out.read_text())
    assert result["policy"] == "best-of-4" and result["best_of"] == 4 and result["kl_kind"] == "bound"
    assert result["prompts"] == len(HELDOUT) and result["samples_per_prompt"] == 2
    for key in ("reward_policy", "reward_reference", "win_rate", "kl", "reward_candidates"):
        assert set(result[key]) == {"mean", "se", "n"}
    assert result["kl"]["mean"] == pytest.approx(math.log(4) - 0.75)
    assert result["reward_policy"]["mean"] >= result["reward_candidates"]["mean"]
    assert result["seconds_candidates"] > 0
    assert 0 <= result["win_rate"]["mean"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "bon.jsonl").read_text().splitlines()]
    assert [len(r["candidate_scores"][0]) for r in rows] == [4] * len(HELDOUT)


def test_frontier_adds_a_best_of_n_series(prompts, tiny_model_dir, tmp_path):
    out = tmp_path / "frontier"
    assert main(["frontier", f"self={tiny_model_dir}", "--best-of", "4", "--best-of", "2", "--reference",
                 tiny_model_dir, "--prompts", str(prompts), *GEN, *JUDGE, "--out", str(out)]) == 0
    with open(out / "frontier.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["series"] for r in rows] == ["reference", "self", "Best-of-N", "Best-of-N"]
    assert [r["best_of"] for r in rows] == ["", "", "2", "4"]
    assert [r["kl_kind"] for r in rows] == ["", "estimate", "bound", "bound"]
    assert abs(float(rows[1]["kl"])) < 1e-5  # the reference against itself, up to fp32 rounding
    assert float(rows[2]["kl"]) == pytest.approx(math.log(2) - 0.5)
    assert float(rows[3]["kl"]) == pytest.approx(math.log(4) - 0.75)
    assert float(rows[3]["reward"]) >= float(rows[2]["reward"])  # best-of-4's candidates include best-of-2's
    assert (out / "frontier.png").stat().st_size > 10_000
    assert json.loads((out / "points" / "002.json").read_text())["best_of"] == 4


def test_frontier_of_best_of_n_alone_takes_the_reference_from_its_samples(prompts, tiny_model_dir, tmp_path):
    samples = tmp_path / "ref.jsonl"
    assert main(["sample", str(prompts), "--model", tiny_model_dir, "--out", str(samples), *GEN]) == 0
    out = tmp_path / "frontier"
    assert main(["frontier", "--best-of", "2", "--reference-samples", str(samples), *GEN, *JUDGE,
                 "--out", str(out)]) == 0
    with open(out / "frontier.csv") as f:
        assert [r["series"] for r in csv.DictReader(f)] == ["reference", "Best-of-N"]


@pytest.mark.parametrize("argv, message", [
    (["evaluate"], "--best-of N"),
    (["evaluate", "some/policy", "--best-of", "4"], "not both"),
    (["evaluate", "--best-of", "0"], "--best-of must be >= 1"),
    (["evaluate", "--best-of", "4"], "--reference"),
    (["frontier", "--out", "x"], "--best-of N"),
    (["frontier", "--best-of", "4", "--out", "x"], "--reference"),
])
def test_best_of_user_errors_are_one_line(argv, message, prompts, capsys):
    assert main([*argv, "--prompts", str(prompts), *JUDGE]) == 2
    assert message in capsys.readouterr().err


def test_the_legend_lies_outside_the_axes(tmp_path, monkeypatch):
    """No point is ever under the legend: it stands right of the plotting area."""
    from types import SimpleNamespace as NS

    import matplotlib.pyplot as plt

    from dpokit.pipeline.frontier import FrontierPoint, Target, plot_frontier

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    points = [FrontierPoint(Target(s, "final", f"/runs/{s}"), NS(kl=NS(mean=kl, se=0.1), reward_policy=NS(mean=r, se=0.01)))
              for s, kl, r in (("DPO", 8.2, 0.45), ("Preferred-FT", 8.4, 0.23), ("Unlikelihood", 8.6, 0.21))]
    plot_frontier(points, {"reward": 0.15}, tmp_path / "f.png")
    (fig,) = kept
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
