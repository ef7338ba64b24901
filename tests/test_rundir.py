"""A run never loses work: finished runs are not restarted by --resume, one process per run directory,
damaged checkpoints are skipped for intact ones, a full disk is one line and leaves nothing half-written,
and a run that cannot start writes nothing."""

import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit import checkpoint, storage
from dpokit.errors import ConfigError, ModelError, RunLockedError, TrainingError
from dpokit.rundir import RunDir
from dpokit.trainer import train
from tests.helpers import launch, wait_for


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def test_resume_never_deletes_a_finished_run(tiny_config):
    """Issue 13, case 1: a finished 1-step run without checkpoints, then --resume with 1 and with 2 steps."""
    first = train(tiny_config("train.max_steps=1"))
    run = first.run_dir
    before = snapshot(run)
    again = train(tiny_config("train.max_steps=1"), resume=True)
    assert again.already_finished and again.steps == 1 and again.model_dir == run / "model"
    assert snapshot(run) == before
    with pytest.raises(TrainingError, match=r"finished at step 1 without a checkpoint.*output\.overwrite=true"):
        train(tiny_config("train.max_steps=2"), resume=True)
    assert snapshot(run) == before
    started_over = train(tiny_config("train.max_steps=2", "output.overwrite=true"), resume=True)
    assert started_over.steps == 2


def test_resume_extends_a_finished_run_from_its_checkpoint(tiny_config):
    train(tiny_config("train.max_steps=2", "checkpoint.every=2"))
    result = train(tiny_config("train.max_steps=3", "checkpoint.every=2"), resume=True)
    assert result.steps == 3 and not result.already_finished


def test_resume_in_an_empty_directory_starts_the_run(tiny_config):
    assert train(tiny_config("train.max_steps=1"), resume=True).steps == 1


@pytest.mark.slow
def test_a_second_process_on_the_same_run_directory_stops_at_once(tiny_config, tmp_path):
    cfg = tiny_config("train.max_steps=400", "train.epochs=100", f"output.dir={tmp_path / 'r'}")
    first = launch(cfg)
    metrics = tmp_path / "r" / "metrics.jsonl"
    assert wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, first)
    second = launch(cfg, "--resume")
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2
    assert out.strip().splitlines()[-1] == (f"error: {tmp_path / 'r'} is in use by another dpokit process "
                                            f"(PID {first.pid}): wait for it to end or choose another output.dir")
    rows = metrics.read_text().splitlines()
    first.send_signal(signal.SIGKILL)  # the kernel releases the lock with the process
    first.wait()
    RunDir(tmp_path / "r").lock()
    assert len({row for row in rows}) == len(rows)  # no step logged twice


def test_the_lock_names_its_holder_in_process(tmp_path):
    a = RunDir(tmp_path / "r")
    a.lock()
    with pytest.raises(RunLockedError, match=rf"PID {os.getpid()}"):
        RunDir(tmp_path / "r").lock()
    a.release()
    assert not (tmp_path / "r").exists()  # created, never written: removed again
    RunDir(tmp_path / "r").lock()


def test_resume_skips_damaged_checkpoints_for_the_newest_intact_one(tiny_config, capsys):
    """Issue 13, case 3: checkpoint 4 truncated, checkpoint 3 without its optimizer state: resume from 2."""
    cfg = tiny_config("train.max_steps=4", "checkpoint.every=1", "checkpoint.keep=4")
    straight = train(cfg)
    expected = weights(straight.model_dir)
    run = straight.run_dir
    shutil.rmtree(run / "model")  # as if killed after the last checkpoint, before the export
    ckpts = checkpoint.checkpoints(run)
    safetensors = ckpts[3] / "model" / "model.safetensors"
    with open(safetensors, "r+b") as f:
        f.truncate(safetensors.stat().st_size // 2)
    (ckpts[2] / "optimizer.pt").unlink()
    capsys.readouterr()
    resumed = train(cfg, resume=True)
    out = capsys.readouterr().out
    assert ("checkpoint-0000004 is damaged (model/model.safetensors has" in out
            and "checkpoint-0000003 is damaged (optimizer.pt is missing)" in out
            and "resuming from checkpoint-0000002" in out), out
    got = weights(resumed.model_dir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert (run / "checkpoints" / "damaged-checkpoint-0000004").is_dir()  # kept for inspection


def test_no_intact_checkpoint_is_a_clear_error(tiny_config):
    cfg = tiny_config("train.max_steps=2", "checkpoint.every=1", "checkpoint.keep=2")
    run = train(cfg).run_dir
    shutil.rmtree(run / "model")
    for ckpt in checkpoint.checkpoints(run):
        (ckpt / "scheduler.pt").write_bytes(b"flipped")
    with pytest.raises(TrainingError, match=r"no intact checkpoint .*checkpoint-0000002: scheduler\.pt has 7 bytes"):
        train(cfg, resume=True)


def test_checkpoint_manifest_catches_a_flipped_byte(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.bin").write_bytes(b"abcdef")
    assert storage.write_manifest(root) == 6 and storage.check_manifest(root) is None
    (root / "a.bin").write_bytes(b"abcdeF")
    assert storage.check_manifest(root) == "a.bin does not match its checksum"


def _ignore_sigxfsz_and_limit(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.slow
def test_a_failed_checkpoint_write_is_one_line_and_leaves_nothing_behind(tiny_config, tmp_path):
    """A file-size limit stands in for a full disk: the optimizer state (~13 MB) does not fit in 8 MB."""
    cfg = tiny_config("checkpoint.every=1", f"output.dir={tmp_path / 'r'}")
    proc = launch(cfg, preexec_fn=_ignore_sigxfsz_and_limit(8_000_000))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {tmp_path / 'r' / 'checkpoints' / 'checkpoint-0000001'}: "
                           "File too large (") and last.endswith(" free there)"), out
    assert "Traceback" not in out
    assert not [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()]


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs: a real 'No space left on device' (needs root, as CI runs; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_keeps_earlier_checkpoints_and_warns_first(tiny_config, small_disk):
    """Each checkpoint takes ~19 MB: the first fits, the second runs out of space."""
    cfg = tiny_config("checkpoint.every=1", "checkpoint.keep=3", f"output.dir={small_disk / 'r'}")
    proc = launch(cfg)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert "low disk space:" in out and "the next one may not fit" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {small_disk / 'r' / 'checkpoints'}/checkpoint-000000")
    assert "No space left on device" in last and "Traceback" not in out
    ckpts = checkpoint.checkpoints(small_disk / "r")
    assert ckpts and all(checkpoint.verify(c) is None for c in ckpts)
    assert not list((small_disk / "r" / "checkpoints").glob(".tmp-*"))


def test_output_dir_that_is_a_file_is_a_config_error(tiny_config, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        train(tiny_config(f"output.dir={tmp_path / 'file'}"))


def test_an_unreachable_hub_id_fails_at_once_and_writes_nothing(tiny_config, tmp_path):
    """No network here: one line naming the model and how to use a local copy, and no run directory."""
    with pytest.raises(ModelError, match=r"^dpokit-tests/no-such-model: not a local path, and the hub "):
        train(tiny_config("model.name=dpokit-tests/no-such-model", f"output.dir={tmp_path / 'r'}"))
    assert not (tmp_path / "r").exists()


def test_bad_data_in_an_existing_empty_directory_writes_nothing(tiny_config, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n')
    with pytest.raises(Exception, match="bad.jsonl"):
        train(tiny_config(f"data.train={tmp_path / 'bad.jsonl'}", f"output.dir={tmp_path / 'r'}"))
    assert [p.name for p in (tmp_path / "r").iterdir()] == [".lock"]


def test_a_run_continues_only_with_the_method_that_began_it(tiny_config):
    from dpokit.methods.sft import SFT
    from dpokit.rundir import run_model

    cfg = tiny_config("train.max_steps=2", "checkpoint.every=1", "data.use=chosen")
    run = train(cfg, method=SFT).run_dir
    assert RunDir(run).method() == "sft"
    from dpokit.pipeline.frontier import series_name

    assert series_name(run_model(run)) == "Preferred-FT"  # the frontier's series for SFT on the chosen side
    with pytest.raises(ConfigError, match=r"holds a sft run; continue it with `dpokit sft --resume`"):
        train(tiny_config("train.max_steps=3", "checkpoint.every=1"), resume=True)
