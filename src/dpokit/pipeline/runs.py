"""What a model path says about the dpokit run it came from: base model (the reference), objective,
β and step. A run directory holds `config.yaml`, `model/` (the final policy) and
`checkpoints/checkpoint-NNNNNNN/model/`; checkpoints carry no tokenizer, so theirs is the base model's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from dpokit import checkpoint, models
from dpokit.errors import DpokitError, ModelError
from dpokit.rundir import RunDir

# series names for the frontier plot: a DPO-family run by its `objective.loss`, another by its method
METHOD_NAMES = {"sigmoid": "DPO", "ipo": "IPO", "hinge": "SLiC (hinge)", "robust": "rDPO", "simpo": "SimPO",
                "unlikelihood": "Unlikelihood", "sigmoid_norm": "DPO (length-normalised)", "exo_pair": "EXO",
                "nca_pair": "NCA", "bco_pair": "BCO", "sppo_hard": "SPPO (hard)", "aot": "AOT",
                "aot_unpaired": "AOT (unpaired)", "apo_zero": "APO-zero", "apo_down": "APO-down", "discopop": "DiscoPOP",
                "dpop": "DPOP", "orpo": "ORPO", "kto": "KTO", "sft": "SFT", "sft-chosen": "Preferred-FT", "ppo": "PPO"}


@dataclass(frozen=True)
class RunModel:
    """A model that belongs to a dpokit run: the final one (`step` from its metrics) or a checkpoint."""

    path: Path  # what load_model reads: <run>/model or <run>/checkpoints/checkpoint-N
    run_dir: Path
    base_model: str  # the run's reference: its reference.name when set, else model.name (its start)
    loss: str  # objective.loss for a DPO-family run, else its method (sft-chosen: Preferred-FT)
    beta: float
    step: int | None
    final: bool

    @property
    def method(self) -> str:
        return METHOD_NAMES.get(self.loss, self.loss)

    @property
    def uses_beta(self) -> bool:
        """Whether objective.beta shaped the run (DPO's family; not SFT, Unlikelihood or PPO)."""
        return self.loss not in ("unlikelihood", "orpo", "sft", "sft-chosen", "ppo", "reward")


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
    checkpoint passes, other names go through `models.resolve` (a missing path fails, a hub id passes)."""
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
