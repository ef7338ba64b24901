"""Checkpoints that survive a crash at any moment and resume exactly.

A checkpoint directory holds the model as a loadable Hugging Face directory (`model/`: full weights,
or the LoRA adapter), the optimizer and scheduler states, the trainer state (step, data position, RNG
states) and a manifest of every file's size and SHA-256. It is written under a temporary name, every
file flushed to disk, then renamed: a checkpoint directory that exists was complete when written, and
the manifest tells whether it still is. Tensors go through `torch.save` and come back with
`torch.load(weights_only=True)`, which unpickles tensors and plain containers only.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from dpokit import storage
from dpokit.errors import TrainingError

PREFIX = "checkpoint-"
STATES = ("optimizer", "scheduler", "trainer_state")
RESUMABLE = tuple(f"{name}.pt" for name in STATES)  # an older checkpoint may keep only its model


def checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def step_of(ckpt: Path) -> int:
    return int(ckpt.name[len(PREFIX):])


def resumable(run_dir: Path) -> list[Path]:
    """Checkpoints that hold the full training state, oldest first (intact or not: see `verify`)."""
    return [c for c in checkpoints(run_dir) if (c / "trainer_state.pt").is_file()]


def latest(run_dir: Path) -> Path | None:
    found = resumable(run_dir)
    return found[-1] if found else None


def verify(ckpt: Path) -> str | None:
    """What is wrong with a resumable checkpoint, or None when its files match what was written."""
    return storage.check_manifest(ckpt, required=(*RESUMABLE, "model"))


def save(run_dir: Path, step: int, *, save_model: Callable[[Path], None], optimizer: dict, scheduler: dict,
         trainer: dict, keep: int, keep_models: int = 0) -> Path:
    """Write checkpoint `step` atomically; then keep the newest `keep` whole, and the model only (no
    optimizer or trainer state) of the `keep_models` before them, for evaluation along the run."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    with storage.atomic_dir(final) as tmp:
        save_model(tmp / "model")
        for name, state in zip(STATES, (optimizer, scheduler, trainer)):
            with open(tmp / f"{name}.pt", "wb") as f:  # Python's writes keep the errno of a failure
                torch.save(state, f)
        storage.write_manifest(tmp)
    older = checkpoints(run_dir)[:-keep]
    for i, old in enumerate(reversed(older)):
        if i < keep_models:
            for name in ("trainer_state.pt", "optimizer.pt", "scheduler.pt"):  # the resumable mark first
                (old / name).unlink(missing_ok=True)
        else:
            shutil.rmtree(old, ignore_errors=True)
    return final


def space_warning(run_dir: Path) -> str | None:
    """A warning when the disk may not hold the next checkpoint: the last one's size is the estimate
    (the new one is written in full before the oldest is removed)."""
    last = checkpoints(run_dir)
    need = storage.manifest_bytes(last[-1]) if last else None
    free = storage.free_bytes(Path(run_dir))
    if need is None or free is None or free >= need * 1.1:
        return None
    return (f"low disk space: {storage.human_bytes(free)} free for {run_dir}, and the last checkpoint took "
            f"{storage.human_bytes(need)}; the next one may not fit")


def load(ckpt: Path) -> dict:
    """The optimizer, scheduler and trainer states of a checkpoint (the model is loaded by the caller)."""
    return {name: torch.load(ckpt / f"{name}.pt", map_location="cpu", weights_only=True) for name in STATES}


def resume_point(run_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest intact resumable checkpoint. Damaged newer ones are named in a warning and set aside
    as `damaged-checkpoint-N` (kept for inspection, out of the way of the resumed run's own)."""
    damaged = []
    for ckpt in reversed(resumable(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            for bad, _ in damaged:
                _set_aside(bad)
            if damaged:
                warn("; ".join(f"{bad.name} is damaged ({why})" for bad, why in damaged)
                     + f": resuming from {ckpt.name}, the newest intact checkpoint; the damaged ones are kept as "
                       "damaged-checkpoint-*")
            return ckpt
        damaged.append((ckpt, problem))
    if damaged:
        raise TrainingError(f"no intact checkpoint in {run_dir} to resume from: "
                            + "; ".join(f"{bad.name}: {why}" for bad, why in damaged)
                            + ". Set output.overwrite=true to start over")
    return None


def _set_aside(ckpt: Path) -> None:
    target = ckpt.with_name(f"damaged-{ckpt.name}")
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"damaged-{ckpt.name}.{n}")
    os.replace(ckpt, target)


def clean_partial(run_dir: Path) -> None:
    """Remove checkpoints a killed run left half-written."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for pattern in (f".tmp-{PREFIX}*", f".old-{PREFIX}*"):
            for p in root.glob(pattern):
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
