"""`make paper`'s report: the table's cells, the spread over seeds, the compute charged, the curves."""

import json

import pytest

from dpokit.experiments import paper_report as report
from dpokit.experiments.paper_runs import Run


def point(series, model, kl, reward, **kw):
    return {"series": series, "model": model, "label": model, "kl": kl, "reward": reward, **kw}


def test_each_cell_is_the_held_out_point_of_the_checkpoint_chosen_on_the_selection_openings():
    chosen = {"DPO": {"run": "b", "setting": "β 0.5", "tried": ["β 0.1", "β 0.5"],
                      "picks": {"2": "b/2", "5": "b/3", "10": "b/3"}}}
    points = [point("DPO", "b/2", 2.4, 0.40, afinn_reward=1.0), point("DPO", "b/3", 3.1, 0.35, afinn_reward=2.0),
              point("DPO", "b/final", 3.5, 0.60),  # the best held-out point, never chosen: it was not chosen there
              point("Best-of-N", "m", 0.82, 0.5, best_of=4), point("Best-of-N", "m", 1.84, 0.7, best_of=16)]
    rows = {r["series"]: r for r in report.seed_rows(points, chosen, {"DPO": 100.0})}
    dpo = rows["DPO"]["at_kl"]
    assert dpo["2"] == {"reward": 0.40, "kl": 2.4, "label": "b/2", "afinn": 1.0}  # reported with its held-out KL
    assert dpo["10"]["reward"] == 0.35 and rows["DPO"]["final_kl"] == 3.5 and rows["DPO"]["seconds"] == 100.0
    best = rows["Best-of-N"]["at_kl"]
    assert best["2"]["reward"] == 0.7 and best["5"]["reward"] == 0.7  # the largest N whose bound fits


def test_seeds_are_summarised_by_their_mean_and_range():
    def row(reward, kl):
        return {"series": "DPO", "setting": "β 0.1", "tried": ["β 0.1"], "final_kl": kl, "seconds": 10.0,
                "at_kl": {"2": None, "5": {"reward": reward, "kl": 4.0, "afinn": 1.0}, "10": None}}

    rows = report.aggregate([[row(0.3, 5.0)], [row(0.5, 7.0)], [row(0.7, 6.0)]])
    (dpo,) = rows
    assert dpo["at_kl"]["5"]["reward"] == pytest.approx({"mean": 0.5, "min": 0.3, "max": 0.7, "n": 3})
    assert dpo["at_kl"]["2"]["reward"] is None and dpo["final_kl"]["mean"] == pytest.approx(6.0)
    assert report.cell(dpo["at_kl"]["5"]["reward"]) == "0.500 [0.300, 0.700]"


def test_a_limit_only_some_seeds_reach_and_seeds_that_chose_differently_are_shown():
    def row(setting, reward):
        return {"series": "PPO", "setting": setting, "tried": ["β_KL 0.05", "β_KL 0.2"], "final_kl": 3.0,
                "seconds": 10.0, "at_kl": {"2": None if reward is None else {"reward": reward, "kl": 1.5, "afinn": 1.0},
                                           "5": None, "10": None}}

    (ppo,) = report.aggregate([[row("β_KL 0.2", 0.3)], [row("β_KL 0.05", None)], [row("β_KL 0.2", 0.5)]])
    assert report.cell(ppo["at_kl"]["2"]["reward"], seeds=ppo["seeds"]) == "0.400 [0.300, 0.500] (2 of 3 seeds)"
    assert report.cell(ppo["final_kl"], 2, seeds=ppo["seeds"]) == "3.00"  # every seed has one
    assert report.chosen_cell(ppo) == "2: β_KL 0.2 (seeds 0, 2); β_KL 0.05 (seed 1)"
    assert report.chosen_cell(report.aggregate([[row("β_KL 0.2", 0.3)]])[0]) == "2: β_KL 0.2"


def test_compute_is_charged_to_each_method():
    planned = [Run("DPO", "dpo-a", "train", "c", ()), Run("DPO", "dpo-b", "train", "c", ()),
               Run("PPO", "ppo-3", "ppo", "c", (), reward="model"),
               Run("PPO-GT", "ppo-gt", "ppo", "c", (), reward="judge"),
               Run("Online DPO-GT", "online-gt", "online", "c", (), reward="judge")]
    timings = {"sample train": 100.0, "label train": 10.0, "reward": 50.0, "dpo-a": 30.0, "dpo-b": 40.0,
               "ppo-3": 200.0, "ppo-gt": 300.0, "online-gt": 250.0, "frontier": 999.0}
    points = [{"series": "Best-of-N", "best_of": 4, "seconds_candidates": 20.0},
              {"series": "Best-of-N", "best_of": 16, "seconds_candidates": 80.0}]
    assert report.charged_seconds(planned, timings, points) == {
        "DPO": 110.0 + 30.0 + 40.0,  # the data once, then every configuration tried
        "PPO": 110.0 + 50.0 + 200.0,  # the data the reward model learned from, the reward model, PPO
        "PPO-GT": 300.0,  # the judge is its reward: no data, no reward model
        "Online DPO-GT": 250.0,
        "Best-of-N": 80.0,  # N = 16's candidates include N = 4's
    }


def test_ppo_curves_plot_each_ppo_runs_reward_and_kl(tmp_path):
    planned = [Run("DPO", "dpo-a", "train", "c", ()), Run("PPO-GT", "ppo-gt", "ppo", "c", ())]
    run = tmp_path / "runs" / "ppo-gt"
    run.mkdir(parents=True)
    rows = [{"step": 1, "reward": 0.1, "kl": 0.0}, {"eval/loss": 1.0, "step": 1}, {"step": 2, "reward": 0.3, "kl": 1.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = report.ppo_curves(tmp_path, planned)
    assert path == tmp_path / "ppo_curves.png" and path.stat().st_size > 1000
    assert report.ppo_curves(tmp_path, planned[:1]) is None  # no PPO run: no plot
