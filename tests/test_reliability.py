"""Crashes, signals and numerics: a killed run resumes to the same weights, a signal leaves a checkpoint,
non-finite steps are skipped, counted and stop the run, and NaN weights are never written."""

import json
import math
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit import checkpoint
from dpokit.errors import TrainingError
from dpokit.export import save_pretrained
from dpokit.metrics import read_metrics
from dpokit.objectives import losses as objectives_mod
from dpokit.trainer import train
from tests.helpers import launch, tiny_llama, wait_for


def final_weights(run_dir):
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_at_several_points_resumes_to_the_same_weights(tiny_config, tmp_path):
    common = ("train.max_steps=8", "train.epochs=2", "checkpoint.every=1", "checkpoint.keep=2")
    straight = launch(tiny_config(*common, f"output.dir={tmp_path / 'straight'}"))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    cfg = tiny_config(*common, f"output.dir={tmp_path / 'killed'}")
    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    kill_points = [
        ("while writing checkpoint 2", lambda: (ckpts / ".tmp-checkpoint-0000002").exists()),
        ("mid-step after checkpoint 4", lambda: (ckpts / "checkpoint-0000004").exists()),
        ("mid-step after checkpoint 6", lambda: (ckpts / "checkpoint-0000006").exists()),
    ]
    killed_at = []
    for i, (label, when) in enumerate(kill_points):
        proc = launch(cfg, *(["--resume"] if i else []))
        if wait_for(when, proc):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at.append(label)
            assert proc.returncode == -signal.SIGKILL
        else:  # it ended before the kill point: it must have ended well
            out, _ = proc.communicate()
            assert proc.returncode == 0, out
        latest = checkpoint.latest(run)
        if latest is not None:  # whatever survived the kill is complete
            assert (latest / "trainer_state.pt").is_file() and (latest / "model" / "model.safetensors").is_file()
    assert len(killed_at) >= 2, killed_at  # the kills really happened mid-run
    final = launch(cfg, "--resume")
    assert final.wait(timeout=300) == 0, final.stdout.read()

    a, b = final_weights(tmp_path / "straight"), final_weights(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 9))


@pytest.mark.slow
def test_sigint_finishes_the_step_writes_a_checkpoint_and_exits(tiny_config, tmp_path):
    cfg = tiny_config("train.max_steps=400", "train.epochs=100", "checkpoint.every=0", f"output.dir={tmp_path / 'r'}")
    proc = launch(cfg)
    assert wait_for(lambda: (tmp_path / "r" / "metrics.jsonl").is_file()
                    and len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    latest = checkpoint.latest(tmp_path / "r")
    assert latest is not None, out
    steps = [r["step"] for r in read_metrics(tmp_path / "r") if "loss" in r]
    assert int(latest.name.split("-")[1]) == steps[-1] < 400  # the checkpoint is of the last finished step
    assert "continue with --resume" in out


@pytest.mark.slow
def test_second_signal_exits_at_once(tiny_config, tmp_path):
    cfg = tiny_config("train.max_steps=400", "train.epochs=100", "checkpoint.every=0", f"output.dir={tmp_path / 'r'}")
    proc = launch(cfg)
    metrics = tmp_path / "r" / "metrics.jsonl"
    assert wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, proc)  # the loop is running
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tiny_config, monkeypatch):
    from dpokit.trainer import Trainer

    poisoned, current = {2, 4, 5}, {"step": 0}
    real_sigmoid, real_step = objectives_mod.sigmoid, Trainer.train_step

    def sigmoid(*args, **kwargs):  # NaN loss on the poisoned steps' batches
        out = real_sigmoid(*args, **kwargs)
        if current["step"] in poisoned:
            out.losses = out.losses * float("nan")
        return out

    def train_step(self, ids):
        current["step"] = self.step + 1
        return real_step(self, ids)

    monkeypatch.setattr(objectives_mod, "sigmoid", sigmoid)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    cfg = tiny_config("train.max_steps=8", "train.epochs=2", "train.max_nonfinite_steps=3", "checkpoint.every=1")
    with pytest.raises(TrainingError, match=r"stopped after 3 steps with a non-finite loss.*step 5 .*pairs\.jsonl:\d+"):
        train(cfg)
    rows = {r["step"]: r for r in read_metrics(cfg.output.dir) if "loss" in r}
    # a non-finite value is written as null: metrics.jsonl stays strict JSON that every reader reads
    assert rows[2]["loss"] is None and rows[2]["nonfinite_steps"] == 1
    json.loads((Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()[1], parse_constant=_refuse)
    assert math.isfinite(rows[3]["loss"]) and rows[3]["nonfinite_steps"] == 1
    assert rows[4]["nonfinite_steps"] == 2 and 5 not in rows
    # the skipped step 4 left the weights as step 3 made them; nothing written holds NaN
    run = Path(cfg.output.dir)
    assert [c.name for c in checkpoint.checkpoints(run)] == ["checkpoint-0000003", "checkpoint-0000004"]
    w3, w4 = (load_file(str(c / "model" / "model.safetensors")) for c in checkpoint.checkpoints(run))
    assert all(torch.equal(w3[k], w4[k]) for k in w3)
    assert all(torch.isfinite(v).all() for v in w4.values())


def test_nan_weights_are_never_written(tmp_path):
    model = tiny_llama(vocab_size=64)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="refusing to write weights with NaN"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def _refuse(name: str):
    raise AssertionError(f"{name} in a JSON file dpokit wrote")
