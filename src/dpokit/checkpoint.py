"""Checkpoints that survive a crash at any moment and resume exactly.

A checkpoint directory holds the model as a loadable Hugging Face directory (`model/`: full weights,
or the LoRA adapter), the optimizer and scheduler states, and the trainer state (step, data
position, RNG states). It is written under a temporary name, every file flushed to disk, then
renamed: a checkpoint directory that exists is complete. Tensors go through `torch.save` and come
back with `torch.load(weights_only=True)`, which unpickles tensors and plain containers only.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

PREFIX = "checkpoint-"


def checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint a run can resume from (older ones may keep only their model)."""
    found = [c for c in checkpoints(run_dir) if (c / "trainer_state.pt").is_file()]
    return found[-1] if found else None


def save(run_dir: Path, step: int, *, save_model: Callable[[Path], None], optimizer: dict, scheduler: dict,
         trainer: dict, keep: int, keep_models: int = 0) -> Path:
    """Write checkpoint `step` atomically; then keep the newest `keep` whole, and the model only (no
    optimizer or trainer state) of the `keep_models` before them, for evaluation along the run."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(tmp / "model")
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save(scheduler, tmp / "scheduler.pt")
    torch.save(trainer, tmp / "trainer_state.pt")
    _fsync_tree(tmp)
    if final.exists():  # a checkpoint of this step from an earlier attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    older = checkpoints(run_dir)[:-keep]
    for i, old in enumerate(reversed(older)):
        if i < keep_models:
            for name in ("trainer_state.pt", "optimizer.pt", "scheduler.pt"):  # the resumable mark first
                (old / name).unlink(missing_ok=True)
        else:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(ckpt: Path) -> dict:
    """The optimizer, scheduler and trainer states of a checkpoint (the model is loaded by the caller)."""
    return {name: torch.load(ckpt / f"{name}.pt", map_location="cpu", weights_only=True)
            for name in ("optimizer", "scheduler", "trainer_state")}


def clean_partial(run_dir: Path) -> None:
    """Remove checkpoints a killed run left half-written."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
