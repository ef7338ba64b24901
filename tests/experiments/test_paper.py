"""`make paper`'s plan: every step is a real `dpokit` command, settings are chosen on the selection openings
alone, seeds shift every seed and finished seeds are reused (the report: test_paper_report.py)."""

import json
from pathlib import Path

import pytest
import yaml

from dpokit.cli import build_parser
from dpokit.experiments import paper
from dpokit.experiments.paper_runs import Run

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "paper"


def plan(tmp_path, **kw):
    args = dict(model="m", train_prompts=Path("train.jsonl"), select_prompts=Path("select.jsonl"),
                heldout_prompts=Path("held.jsonl"), dpo=[(0.05, 1e-4), (0.1, 3e-5)], alphas=[0.1],
                kl_coefs=[0.05, 0.2], online_betas=[0.1, 0.5], best_of=[4, 16], max_new_tokens=16, eval_samples=2,
                select_samples=1, batch_size=64, margin=0.3)
    return paper.plan(tmp_path, CONFIGS, **{**args, **kw})


def test_every_step_is_a_dpokit_command_with_the_settings_it_runs_with(tmp_path):
    steps, planned = plan(tmp_path)
    assert [r.series for r in planned] == ["DPO", "DPO", "Preferred-FT", "Unlikelihood", "PPO", "PPO", "PPO-GT",
                                           "Online DPO", "Online DPO", "Iterative DPO", "Iterative DPO",
                                           "Online DPO-GT", "Iterative DPO-GT"]
    commands = {key: step.command() if callable(step.command) else step.command for key, step in steps}
    assert [c[0] for c in commands.values()] == [
        "sample", "sample", "sample", "label", "label", "reward", "train", "train", "sft", "train", "ppo", "ppo",
        "ppo", "online", "online", "iterate", "iterate", "online", "iterate", "frontier", "frontier"]
    parser = build_parser()
    for command in commands.values():
        parser.parse_args(command)  # exits on an unknown option
    dpo = commands["dpo-beta0.1-lr3e-05"]
    assert "objective.beta=0.1" in dpo and "train.lr=3e-05" in dpo and "train.seed=42" in dpo
    assert f"data.train={tmp_path / 'pairs_train.jsonl'}" in dpo
    # the sweep's runs read one cache of reference log-probs, a seed's own
    assert all(f"reference.cache_dir={tmp_path / 'reference-logps'}" in commands[r.name]
               for r in planned if r.series == "DPO")
    assert yaml.safe_load(Path(dpo[1]).read_text())["reference"]["strategy"] == "precomputed"
    ppo_rm, ppo_gt = commands["ppo-kl0.05"], commands["ppo-gt"]
    assert "ppo.kl_coef=0.05" in ppo_rm and "ppo.judge=reward-model" in ppo_rm
    assert "ppo.max_new_tokens=16" in ppo_rm  # rollouts as long as the evaluation's samples
    assert f"ppo.judge_model={tmp_path / 'runs' / 'reward' / 'model'}" in ppo_rm
    assert "ppo.judge=sentiment" in ppo_gt and not any(a.startswith("ppo.judge_model") for a in ppo_gt)
    assert "ppo.kl_coef=0.05" in ppo_gt  # the first of the sweep, as the online methods' GT runs
    online_rm, iterate_gt = commands["online-rm-beta0.5"], commands["iterate-gt-beta0.1"]
    assert "online.judge=reward-model" in online_rm and "data.train=train.jsonl" in online_rm
    assert "objective.beta=0.5" in online_rm and "objective.beta=0.5" in commands["iterate-rm-beta0.5"]
    assert "online.judge=sentiment" in iterate_gt and "online.max_new_tokens=16" in iterate_gt
    assert "objective.beta=0.1" in iterate_gt and "online-gt-beta0.5" not in commands
    tried = {s: sum(r.series == s for r in planned) for s in ("PPO", "Online DPO", "Iterative DPO", "PPO-GT",
                                                               "Online DPO-GT", "Iterative DPO-GT")}
    assert tried == {"PPO": 2, "Online DPO": 2, "Iterative DPO": 2, "PPO-GT": 1, "Online DPO-GT": 1,
                     "Iterative DPO-GT": 1}
    select, final = commands["select"], commands["frontier"]
    assert "--reference-samples" in select and str(tmp_path / "samples_select.jsonl") in select
    assert "--best-of" not in select and "--also-judge" not in select
    assert final.count("--best-of") == 2 and "--checkpoints" in final and "afinn" in final
    assert str(tmp_path / "samples_heldout.jsonl") in final
    for config in {c[1] for key, c in commands.items() if c[0] not in ("sample", "label", "frontier")}:
        assert Path(config).is_file()


def test_a_seed_shifts_every_sampling_seed_and_the_training_seed(tmp_path):
    first = dict(plan(tmp_path)[0])
    second = dict(plan(tmp_path, seed=2)[0])
    assert "--seed" in first["sample train"].command
    seed_of = lambda c: int(c[c.index("--seed") + 1])  # noqa: E731
    assert seed_of(second["sample train"].command) == seed_of(first["sample train"].command) + 200
    assert "train.seed=44" in second["ppo-gt"].command and "train.seed=42" in first["ppo-gt"].command


def test_the_final_frontier_evaluates_only_the_configurations_chosen_on_the_selection_openings(tmp_path):
    steps, planned = plan(tmp_path)
    (tmp_path / "select").mkdir()
    chosen = {r.series: {"run": r.name} for r in reversed(planned) if r.name != "dpo-beta0.05-lr0.0001"}
    (tmp_path / "select" / "selection.json").write_text(json.dumps(chosen))
    final = dict(steps)["frontier"].command()
    assert f"DPO={tmp_path / 'runs' / 'dpo-beta0.1-lr3e-05'}" in final
    assert not any("dpo-beta0.05" in a for a in final)
    assert f"Iterative DPO={tmp_path / 'runs' / 'iterate-rm-beta0.1' / 'round-1'}" in final


def point(series, model, kl, reward, **kw):
    return {"series": series, "model": model, "label": model, "kl": kl, "reward": reward, **kw}


def test_the_configuration_and_its_checkpoints_are_chosen_on_the_selection_points():
    planned = [Run("DPO", "a", "train", "c", (), setting="β 0.1"),
               Run("DPO", "b", "train", "c", (), setting="β 0.5"),
               Run("PPO", "p", "ppo", "c", (), setting="β_KL 0.05")]
    points = [point("a", "a/1", 1.0, 0.3), point("a", "a/2", 4.0, 0.5), point("a", "a/3", 12.0, 0.9),
              point("b", "b/1", 0.5, 0.25), point("b", "b/2", 1.5, 0.45), point("b", "b/3", 3.0, 0.55),
              point("p", "p/1", 6.0, 0.4)]
    chosen = paper.choose(points, planned, reference_reward=0.1)
    # a: (0.3 + 0.5 + 0.5) / 3 = 0.433; b: (0.45 + 0.55 + 0.55) / 3 = 0.517 — a's 0.9 lies past every limit
    assert chosen["DPO"]["run"] == "b" and chosen["DPO"]["tried"] == ["β 0.1", "β 0.5"]
    assert chosen["DPO"]["scores"]["β 0.1"] == pytest.approx(1.3 / 3)
    assert chosen["DPO"]["picks"] == {"2": "b/2", "5": "b/3", "10": "b/3"}
    assert chosen["PPO"]["picks"] == {"2": None, "5": None, "10": "p/1"}  # no point within 2 or 5 nats


def test_resume_reads_the_seeds_that_finished_with_the_same_settings(tmp_path, capsys):
    """`--seeds 2 --resume` after both seeds finished runs nothing: it reads their comparison.json (seed 0 is
    OUT itself, the one-seed run) and summarises them; a seed whose settings differ is not read."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "dpo.yaml").write_text("objective: {beta: 0.1}\n")
    argv = ["--configs", str(configs), "--train-prompts", "t.jsonl", "--heldout-prompts", "h.jsonl",
            "--select-prompts", "s.jsonl", "--out", str(tmp_path / "out"), "--seeds", "2", "--resume"]
    args = paper.build_parser().parse_args(argv)

    def finish(where, seed, reward, settings=None):
        where.mkdir(parents=True, exist_ok=True)
        row = {"series": "DPO", "setting": "β 0.1", "tried": ["β 0.1"], "final_kl": 5.0, "seconds": 10.0,
               "at_kl": {"2": None, "5": {"reward": reward, "kl": 4.0, "afinn": 1.0}, "10": None}}
        (where / "comparison.json").write_text(json.dumps({
            "rows": [row], "reference": {"sentiment": 0.1, "afinn": 0.5}, "total_seconds": 60.0,
            "settings": settings or paper.seed_settings(args, seed)}))

    finish(tmp_path / "out", 0, 0.3)
    finish(tmp_path / "out" / "seed-1", 1, 0.5)
    assert paper.main(argv) == 0
    summary = json.loads((tmp_path / "out" / "seeds.json").read_text())
    assert summary["total_seconds"] == 120.0 and summary["rows"][0]["at_kl"]["5"]["reward"]["mean"] == 0.4
    assert "seed 1: finished" in capsys.readouterr().out

    assert paper.finished_seed(tmp_path / "out" / "seed-1", paper.seed_settings(args, 0)) is None  # not seed 0's
    (configs / "dpo.yaml").write_text("objective: {beta: 0.5}\n")  # a config changed: seed 0 no longer matches
    assert paper.finished_seed(tmp_path / "out", paper.seed_settings(args, 0)) is None


def test_a_finished_seed_keeps_its_results_and_drops_its_weights(tmp_path):
    run = tmp_path / "runs" / "dpo"
    for name, size in [("model/model.safetensors", 300), ("checkpoints/checkpoint-0000012/model/model.safetensors", 300),
                       ("checkpoints/checkpoint-0000012/optimizer.pt", 600), ("model/config.json", 10),
                       ("metrics.jsonl", 10), ("run.json", 10)]:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(b"x" * size)
    assert paper.drop_weights(tmp_path) == 1200
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()) == [
        "metrics.jsonl", "model/config.json", "run.json"]
    assert paper.drop_weights(tmp_path / "nothing-here") == 0


def test_keeping_the_weights_does_not_change_what_a_seed_is():
    argv = ["--configs", str(CONFIGS), "--train-prompts", "t.jsonl", "--heldout-prompts", "h.jsonl",
            "--select-prompts", "s.jsonl"]
    parser = paper.build_parser()
    assert paper.seed_settings(parser.parse_args(argv), 0) == paper.seed_settings(
        parser.parse_args([*argv, "--keep-weights", "--resume", "--seeds", "3"]), 0)
    assert paper.seed_settings(parser.parse_args(argv), 0) != paper.seed_settings(parser.parse_args(argv), 1)
