"""`make paper`'s plan: every step is a real `dpokit` command, and compute is charged to the right method."""

import json
from pathlib import Path

import pytest

from dpokit.cli import build_parser
from dpokit.experiments import paper

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "paper"


def test_every_step_is_a_dpokit_command_with_the_settings_it_runs_with(tmp_path):
    steps, planned = paper.plan(tmp_path, CONFIGS, model="m", train_prompts=Path("train.jsonl"),
                                heldout_prompts=Path("held.jsonl"), betas=[0.1, 1.0], alphas=[0.1],
                                kl_coefs=[0.05, 0.2], best_of=[4, 16], max_new_tokens=16, eval_samples=2,
                                batch_size=64, margin=0.3)
    assert [r.series for r in planned] == ["DPO", "DPO", "Preferred-FT", "Unlikelihood", "PPO", "PPO", "PPO-GT"]
    commands = [step.command for step in steps]
    assert [c[0] for c in commands] == ["sample", "sample", "label", "label", "reward", "train", "train", "sft",
                                        "train", "ppo", "ppo", "ppo", "frontier"]
    parser = build_parser()
    for command in commands:
        parser.parse_args(command)  # exits on an unknown option
    dpo, ppo_rm, ppo_gt, frontier = commands[5], commands[9], commands[11], commands[12]
    assert "objective.beta=0.1" in dpo and f"data.train={tmp_path / 'pairs_train.jsonl'}" in dpo
    assert "ppo.kl_coef=0.05" in ppo_rm and "ppo.judge=reward-model" in ppo_rm
    assert "ppo.max_new_tokens=16" in ppo_rm  # rollouts as long as the evaluation's samples
    assert f"ppo.judge_model={tmp_path / 'runs' / 'reward' / 'model'}" in ppo_rm
    assert "ppo.judge=sentiment" in ppo_gt and not any(a.startswith("ppo.judge_model") for a in ppo_gt)
    assert frontier.count("--best-of") == 2 and "--checkpoints" in frontier
    assert f"PPO-GT={tmp_path / 'runs' / 'ppo-gt'}" in frontier
    for config in {c[1] for c in commands[4:12]}:
        assert Path(config).is_file()


def test_compute_is_charged_to_each_method():
    planned = [paper.Run("DPO", "dpo-a", "train", "c", ()), paper.Run("DPO", "dpo-b", "train", "c", ()),
               paper.Run("PPO", "ppo-3", "ppo", "c", (), needs_reward_model=True),
               paper.Run("PPO-GT", "ppo-gt", "ppo", "c", ())]
    timings = {"sample train": 100.0, "label train": 10.0, "reward": 50.0, "dpo-a": 30.0, "dpo-b": 40.0,
               "ppo-3": 200.0, "ppo-gt": 300.0, "frontier": 999.0}
    points = [{"series": "Best-of-N", "best_of": 4, "seconds_candidates": 20.0},
              {"series": "Best-of-N", "best_of": 16, "seconds_candidates": 80.0}]
    assert paper.charged_seconds(planned, timings, points) == {
        "DPO": 110.0 + 30.0 + 40.0,  # the data once, then each run of the sweep
        "PPO": 110.0 + 50.0 + 200.0,  # the data the reward model learned from, the reward model, PPO
        "PPO-GT": 300.0,  # the judge is its reward: no data, no reward model
        "Best-of-N": 80.0,  # N = 16's candidates include N = 4's
    }


def test_best_reward_at_matched_kl():
    points = [{"series": "DPO", "kl": 1.0, "reward": 0.2}, {"series": "DPO", "kl": 4.0, "reward": 0.5},
              {"series": "PPO", "kl": 6.0, "reward": 0.4}]
    assert paper.best_at_kl(points, "DPO", 2.0) == 0.2
    assert paper.best_at_kl(points, "DPO", 5.0) == 0.5
    assert paper.best_at_kl(points, "PPO", 5.0) is None
    assert paper.best_at_kl(points, "PPO", 10.0) == pytest.approx(0.4)


def test_ppo_curves_plot_each_ppo_runs_reward_and_kl(tmp_path):
    planned = [paper.Run("DPO", "dpo-a", "train", "c", ()), paper.Run("PPO-GT", "ppo-gt", "ppo", "c", ())]
    run = tmp_path / "runs" / "ppo-gt"
    run.mkdir(parents=True)
    rows = [{"step": 1, "reward": 0.1, "kl": 0.0}, {"eval/loss": 1.0, "step": 1}, {"step": 2, "reward": 0.3, "kl": 1.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = paper.ppo_curves(tmp_path, planned)
    assert path == tmp_path / "ppo_curves.png" and path.stat().st_size > 1000
    assert paper.ppo_curves(tmp_path, planned[:1]) is None  # no PPO run: no plot
