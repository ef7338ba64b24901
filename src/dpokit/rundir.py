"""A run directory holds a finished run, a resumable run, or nothing, and one process at a time.

Nothing in it is deleted unless `output.overwrite=true`, and nothing is written to it before the model
and the data have loaded: a run that fails to start leaves the directory as it found it. The lock is an
OS file lock (`flock`), so the kernel releases it when its process exits, however it exits.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from dpokit import checkpoint, models
from dpokit.errors import ConfigError, DpokitError, ModelError, RunLockedError, TrainingError
from dpokit.storage import disk_errors

LOCK = ".lock"
CONFIG = "config.yaml"
MODEL = "model"
METRICS = "metrics.jsonl"
FINAL_METRICS = "dpokit_metrics.json"  # in model/: the exported model's metrics, its `step` among them
RUN_INFO = "run.json"  # {"method": ...}: which trainer made the run (dpo, sft, ...)
RUN_FILES = ("checkpoints", "tensorboard", MODEL, METRICS, CONFIG, RUN_INFO, "data_report.json", "skipped_rows.jsonl",
             "samples.jsonl", "trackers.json", "wandb")


@dataclass
class Start:
    """How a run starts in its directory: from `checkpoint`, from scratch, or not at all (`finished`)."""

    checkpoint: Path | None = None
    finished_step: int | None = None  # the run is done: nothing left to do

    @property
    def fresh(self) -> bool:
        return self.checkpoint is None and self.finished_step is None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"output.dir {self.path} is a file, not a directory: choose another output.dir")
        self._lock_fd: int | None = None
        self._created = False

    # ------------------------------------------------------------------------------------------ lock

    def lock(self) -> None:
        """Take the directory for this process, or stop at once naming the process that holds it."""
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{self.path} is in use by another dpokit process (PID {holder}): wait for it to "
                                 "end or choose another output.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        """Let go of the lock; a directory this process created and never wrote to is removed again."""
        if self._lock_fd is None:
            return
        if self._created and [p.name for p in self.path.iterdir()] == [LOCK]:
            (self.path / LOCK).unlink()
            self.path.rmdir()
        os.close(self._lock_fd)
        self._lock_fd = None

    # ------------------------------------------------------------------------------------------ state

    @property
    def used(self) -> bool:
        """Whether the directory holds (part of) a run."""
        return (any((self.path / name).exists() for name in (METRICS, MODEL))
                or bool(checkpoint.checkpoints(self.path)))

    def finished_step(self) -> int | None:
        """The step at which the run finished and exported its model, or None."""
        try:
            return int(json.loads((self.path / MODEL / FINAL_METRICS).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def method(self) -> str | None:
        """The method that made the run; None for a new directory (or one from before it was recorded)."""
        try:
            return json.loads((self.path / RUN_INFO).read_text())["method"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def saved_config(self) -> dict | None:
        path = self.path / CONFIG
        return yaml.safe_load(path.read_text()) if path.is_file() else None

    def refuse_reuse(self, *, resume: bool, overwrite: bool) -> None:
        """A new run never replaces an earlier one unasked (checked before anything loads)."""
        if not resume and not overwrite and self.used:
            raise ConfigError(f"{self.path} already holds a run: continue it with --resume, or set "
                              "output.overwrite=true to start over")

    def plan(self, *, resume: bool, overwrite: bool, total_steps: int, warn) -> Start:
        """Decide how the run starts, before anything is written. Refuses whatever would lose work."""
        if not resume:
            self.refuse_reuse(resume=False, overwrite=overwrite)
            return Start()
        checkpoint.clean_partial(self.path)  # half-written by a killed run: never complete, never used
        done = self.finished_step()
        if done is not None and done >= total_steps:
            return Start(finished_step=done)
        ckpt = checkpoint.resume_point(self.path, warn)
        if ckpt is not None or not self.used or overwrite:
            return Start(checkpoint=ckpt)
        why = (f"it finished at step {done} without a checkpoint to continue from" if done is not None
               else "it holds no checkpoint")
        raise TrainingError(f"cannot resume {self.path}: {why} (checkpoint.every=0 writes none until a signal). "
                            "Set output.overwrite=true to start over")

    def check_method(self, method: str, *, command) -> None:
        """A run continues with the method that began it (`dpokit sft --resume` on a DPO run is a mistake);
        `command(method)` names the command that runs a method."""
        began = self.method()
        if began is not None and began != method:
            raise ConfigError(f"{self.path} holds a {began} run; continue it with `dpokit {command(began)} --resume`, "
                              f"or set output.overwrite=true to start a {method} run there")

    def unstart(self) -> None:
        """Undo a fresh start that failed before its first step (a tracker that cannot start): what `start`
        and the run's reports wrote is removed, so the corrected command runs without --resume or overwrite."""
        self._clear(ignore_errors=True)  # on the way out of a failure: the failure is the error to show

    def _clear(self, *, ignore_errors: bool = False) -> None:
        """Remove every file a run writes (RUN_FILES); the directory, its lock and other files stay."""
        for name in RUN_FILES:
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=ignore_errors)
            else:
                p.unlink(missing_ok=True)

    def start(self, start: Start, config: dict, method: str) -> None:
        """Write the run's config; a fresh start first clears what an earlier run left (only reached when
        the directory was empty or output.overwrite=true)."""
        if start.fresh:
            self._clear()
        self.path.mkdir(parents=True, exist_ok=True)
        with disk_errors(self.path / CONFIG):
            (self.path / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
            (self.path / RUN_INFO).write_text(json.dumps({"method": method}) + "\n")


# ------------------------------------------------------------------------------------------ what a model path says
# What a model path says about the dpokit run it came from: base model (the reference), objective, β and step.
# A run directory holds `config.yaml`, `model/` (the final policy) and `checkpoints/checkpoint-NNNNNNN/model/`;
# checkpoints carry no tokenizer, so theirs is the base model's.

@dataclass(frozen=True)
class RunModel:
    """A model that belongs to a dpokit run: the final one (`step` from its metrics) or a checkpoint."""

    path: Path  # what load_model reads: <run>/model or <run>/checkpoints/checkpoint-N
    run_dir: Path
    base_model: str  # the run's reference: its reference.name when set, else model.name (its start)
    loss: str  # objective.loss for a DPO-family run (several: joined by +), else its method (sft-chosen: Preferred-FT)
    beta: float
    step: int | None
    final: bool


def run_model(path: str | Path) -> RunModel | None:
    """The run behind a run directory, its `model/`, or one of its checkpoints; None for other models."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        return None
    # (candidate run dir, model path, checkpoint dir or None)
    layouts = [(p, p / "model", None), (p.parent, p, None)]
    for ckpt in (p, p.parent):
        if ckpt.name.startswith(checkpoint.PREFIX) and ckpt.parent.name == "checkpoints":
            layouts.insert(0, (ckpt.parent.parent, ckpt, ckpt))
    for run_dir, model_path, ckpt in layouts:
        cfg_file = run_dir / "config.yaml"
        if not cfg_file.is_file() or not model_path.exists():
            continue
        if ckpt is None and model_path != run_dir / "model":
            continue
        cfg = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
        obj = cfg.get("objective", {})
        method = RunDir(run_dir).method() or "dpo"
        kind = obj.get("loss", "sigmoid") if method == "dpo" else method
        if isinstance(kind, list):  # several objectives summed: their names joined
            kind = "+".join(kind)
        if method == "sft" and cfg.get("data", {}).get("use") == "chosen":
            kind = "sft-chosen"
        if ckpt is not None:
            step = int(ckpt.name[len(checkpoint.PREFIX):])
        else:
            metrics = model_path / "dpokit_metrics.json"
            step = json.loads(metrics.read_text()).get("step") if metrics.is_file() else None
        reference = (cfg.get("reference") or {}).get("name") or cfg.get("model", {}).get("name", "")
        return RunModel(model_path, run_dir, reference, kind,
                        float(obj.get("beta", 0.0)), step, ckpt is None)
    return None


def run_models(run_dir: str | Path, *, checkpoints: bool) -> list[RunModel]:
    """A run's final model, preceded by its checkpoints (step order) when asked; a checkpoint at the
    final step is left out as a duplicate of the final model."""
    final = run_model(Path(run_dir) / "model") if (Path(run_dir) / "model").exists() else None
    found = [run_model(c) for c in checkpoint.checkpoints(Path(run_dir))] if checkpoints else []
    found = [m for m in found if m is not None and (final is None or m.step != final.step)]
    if final is not None:
        found.append(final)
    if not found:
        raise DpokitError(f"{run_dir}: no final model or checkpoint to evaluate (is it a dpokit run directory?)")
    return found


def check_model(name: str) -> None:
    """Stop at once on a model that is not there, before anything loads or samples: a dpokit run or
    checkpoint passes, other names go through `models.resolve` (a missing path fails, a hub id passes). A
    reward model is refused: where this is asked, a model that generates is needed."""
    wrong = models.reward_model_error(name)
    if wrong:
        raise ModelError(wrong)
    if run_model(name) is None:
        models.resolve(name)


def default_reference(policy: str) -> str:
    """The reference of a dpokit run's policy: the model the run started from, or its `reference.name`."""
    info = run_model(policy)
    if info is None or not info.base_model:
        if not Path(policy).expanduser().exists():  # a hub id, or a run path with a typo
            raise DpokitError(f"{policy}: no such run or checkpoint; for a hub model, name its reference with "
                              "--reference")
        raise DpokitError(f"{policy} is not a dpokit run or checkpoint: name its reference with --reference")
    return info.base_model


def load_tokenizer_for(name: str, *, fallback: str | None = None):
    """The model's own tokenizer, else (a checkpoint) the tokenizer of its run's base model or `fallback`."""
    try:
        return models.load_tokenizer(name)
    except (OSError, ValueError, ModelError):
        info = run_model(name)
        other = info.base_model if info is not None and info.base_model else fallback
        if other is None:
            raise
        return models.load_tokenizer(other)
