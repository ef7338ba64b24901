"""The experiments' step runner: a step that failed or ran after a changed one is never reused; the demo's
seeds."""

from pathlib import Path

from dpokit.experiments.demo import Step, run_steps, steps


def counted_steps(ran: list[str], commands: dict[str, list[str]], fail: str | None = None) -> list[Step]:
    def run(name):
        ran.append(name)
        return 1 if name == fail else 0

    return [Step(name, command, lambda name=name: run(name)) for name, command in commands.items()]


def test_resuming_skips_the_steps_that_finished_with_the_same_command_and_settings(tmp_path):
    commands = {"sample": ["sample", "a"], "train": ["train", "b"], "evaluate": ["evaluate", "c"]}
    ran = []
    code, _ = run_steps(counted_steps(ran, commands, fail="evaluate"), "t", records=tmp_path, settings={"seed": 0})
    assert code == 1 and ran == ["sample", "train", "evaluate"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-01.json", "step-02.json"]  # not the failed one

    ran.clear()
    code, seconds = run_steps(counted_steps(ran, commands), "t", records=tmp_path, reuse=True, settings={"seed": 0})
    assert code == 0 and ran == ["evaluate"] and len(seconds) == 3

    ran.clear()  # other settings: nothing is reused
    run_steps(counted_steps(ran, commands), "t", records=tmp_path, reuse=True, settings={"seed": 1})
    assert ran == ["sample", "train", "evaluate"]

    ran.clear()  # a changed step runs, and so does every step after it, though its record matches
    changed = {**commands, "train": ["train", "b", "train.lr=1e-5"]}
    run_steps(counted_steps(ran, changed), "t", records=tmp_path, reuse=True, settings={"seed": 1})
    assert ran == ["train", "evaluate"]


def test_a_run_that_starts_over_drops_the_records_it_does_not_reach(tmp_path):
    commands = {"sample": ["sample"], "train": ["train"], "evaluate": ["evaluate"]}
    ran = []
    run_steps(counted_steps(ran, commands), "t", records=tmp_path)
    run_steps(counted_steps(ran, commands, fail="sample"), "t", records=tmp_path)  # not resumed; stops at once
    ran.clear()
    run_steps(counted_steps(ran, commands), "t", records=tmp_path, reuse=True)
    assert ran == ["sample", "train", "evaluate"]  # the first run's records of train and evaluate are gone


def test_a_demo_seed_shifts_every_sampling_seed_and_the_training_seed(tmp_path):
    def plan(seed):
        kw = dict(model="m", train_prompts=Path("t.jsonl"), heldout_prompts=Path("h.jsonl"), max_new_tokens=16,
                  eval_samples=2, batch_size=128, margin=0.3)
        return [s.command for s in steps(tmp_path, "c.yaml", seed=seed, **kw)]

    def flag(command, name):
        return command[command.index(name) + 1]

    published, other = plan(0), plan(1)
    assert [flag(c, "--seed") for c in (published[0], published[1], published[5])] == ["0", "1", "2"]
    assert [flag(c, "--seed") for c in (other[0], other[1], other[5])] == ["100", "101", "102"]
    assert not any(a.startswith("train.seed") for a in published[4]) and "train.seed=43" in other[4]
