"""Checkpoint files: atomic directories, retention, state round trip without pickle."""

import random

import torch

from dpokit import checkpoint


def save(run, step, keep=2, keep_models=0):
    def model(d):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"w")

    return checkpoint.save(run, step, save_model=model, optimizer={"state": {0: {"exp_avg": torch.ones(2)}}},
                           scheduler={"last_epoch": step}, trainer={"step": step, "rng": checkpoint.rng_state()},
                           keep=keep, keep_models=keep_models)


def test_retention_keeps_whole_and_model_only_checkpoints(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep=1, keep_models=2)
    names = [c.name for c in checkpoint.checkpoints(tmp_path)]
    assert names == ["checkpoint-0000003", "checkpoint-0000004", "checkpoint-0000005"]
    assert checkpoint.latest(tmp_path).name == "checkpoint-0000005"
    for c in checkpoint.checkpoints(tmp_path)[:2]:
        assert (c / "model" / "model.safetensors").is_file() and not (c / "optimizer.pt").exists()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_state_round_trips_with_weights_only_loading(tmp_path):
    random.seed(3)
    torch.manual_seed(3)
    ckpt = save(tmp_path, 7)
    expected = (torch.rand(3), random.random())
    state = checkpoint.load(ckpt)
    assert state["trainer_state"]["step"] == 7 and state["scheduler"]["last_epoch"] == 7
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], torch.ones(2))
    checkpoint.set_rng_state(state["trainer_state"]["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_half_written_checkpoints_are_ignored_and_cleaned(tmp_path):
    save(tmp_path, 1)
    partial = tmp_path / "checkpoints" / ".tmp-checkpoint-0000002"
    partial.mkdir()
    assert checkpoint.latest(tmp_path).name == "checkpoint-0000001"
    checkpoint.clean_partial(tmp_path)
    assert not partial.exists()
