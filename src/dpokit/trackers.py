"""Experiment trackers a run reports to (`output.report_to`): TensorBoard, Weights & Biases, MLflow, trackio.

Each tracker receives the same things: the run's config (as W&B config / MLflow params / trackio config),
the numeric metrics of every logged row at its step, the sample generations of `train.sample_every` as a
table, the config file and the data report as files (artifacts), and the exported model's path at the end.
A tracker's package is an optional dependency (`pip install dpokit[wandb]`); `missing_packages` names
those that are not installed so that the config check fails before any model loads.

The tracker run's id is kept in `<run>/trackers.json`, so `--resume` continues the same W&B, MLflow or
trackio run instead of starting a second one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

from dpokit.errors import ConfigError, DpokitError, first_line
from dpokit.fields import did_you_mean

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
# tracker → (module it imports, pip extra that installs it); tensorboard is a core dependency
PACKAGES = {"tensorboard": ("tensorboard", None), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"),
            "trackio": ("trackio", "trackio")}
IDS_FILE = "trackers.json"
SAMPLE_COLUMNS = ("step", "prompt", "completion", "score", "num_tokens", "logp")


def check_report_to(report_to: list[str], mlflow_tracking_uri: str | None = None) -> None:
    """Known names, each once, with its package installed: else one line naming the pip extra. MLflow's
    store must be one MLflow 3 opens for new runs (its file store is in maintenance mode)."""
    for name in report_to:
        if name not in TRACKERS:
            raise ConfigError(f"output.report_to: unknown tracker {name!r}{did_you_mean(name, TRACKERS)}; "
                              f"choose from {', '.join(TRACKERS)}")
    if len(set(report_to)) != len(report_to):
        raise ConfigError(f"output.report_to lists a tracker twice: {report_to}")
    missing = missing_packages(report_to)
    if missing:
        name = missing[0]
        module, extra = PACKAGES[name]
        raise ConfigError(f"output.report_to includes {name}, but the package {module} is not installed: "
                          f"pip install 'dpokit[{extra}]'")
    if "mlflow" in report_to:
        uri = mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes")
        if uri and _file_store(uri) and not allowed:
            where = "output.mlflow_tracking_uri" if mlflow_tracking_uri else "MLFLOW_TRACKING_URI"
            raise ConfigError(f"{where}={uri} is MLflow's file store, which MLflow 3 keeps in maintenance mode and "
                              "refuses new runs in: use sqlite:///PATH/mlflow.db (or a tracking server), or set "
                              "MLFLOW_ALLOW_FILE_STORE=true")


def _file_store(uri: str) -> bool:
    """Whether an MLflow tracking URI names its file store: `file:` or a plain path (no scheme)."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ("file" if ":" not in uri else uri.split(":", 1)[0])
    return scheme == "file"


def missing_packages(report_to: list[str]) -> list[str]:
    missing = []
    for name in report_to:
        module = PACKAGES[name][0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules counts as absent
            found = False
        if not found:
            missing.append(name)
    return missing


def flat_config(config: dict) -> dict[str, object]:
    """{section: {key: value}} → {"section.key": value}: the names the config and overrides use."""
    return {f"{s}.{k}": v for s, body in config.items() for k, v in body.items()}


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, *, resume_step: int = 0, **_):
        from torch.utils.tensorboard import SummaryWriter

        # hides the events of the steps after the checkpoint, logged again; the checkpoint's own step stays
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def start(self, config: dict, files: list[Path]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log_metrics(self, row: dict, step: int) -> None:
        for k, v in _numbers(row).items():
            self.writer.add_scalar(k, v, step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        lines = [f"**{_one_line(r['prompt'])}**\n\n{r['completion']}" for r in rows]
        self.writer.add_text("samples", "\n\n---\n\n".join(lines), step)

    def finish(self, model_dir: Path | None) -> None:
        if model_dir is not None:
            self.writer.add_text("model_dir", str(model_dir), 0)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """Weights & Biases: the run's files live under `<run>/wandb` (offline runs too: `wandb sync` them later).
    The mode is `output.wandb_mode`, else W&B's own (WANDB_MODE, then online)."""

    name = "wandb"

    def __init__(self, run_dir: Path, *, project: str, run_name: str, run_id: str | None, config: dict,
                 mode: str | None = None, **_):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow" if run_id else None,
                              dir=str(run_dir), config=config, mode=mode,
                              settings=wandb.Settings(console="off", silent=True))
        self.id = self.run.id

    def start(self, config: dict, files: list[Path]) -> None:
        artifact = self.wandb.Artifact(f"run-files-{self.id}", type="run-files")
        for f in files:
            artifact.add_file(str(f))
        self.run.log_artifact(artifact)

    def log_metrics(self, row: dict, step: int) -> None:
        self.run.log(_numbers(row), step=step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        self.run.log({"samples": _sample_table(self.wandb.Table, rows)}, step=step)

    def finish(self, model_dir: Path | None) -> None:
        if model_dir is not None:
            self.run.summary["model_dir"] = str(model_dir)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """MLflow through its client: metrics, the flattened config as params, files as artifacts, samples as a
    table artifact. The store is `output.mlflow_tracking_uri` (e.g. sqlite:///mlflow.db or a server), else
    MLflow's own default (MLFLOW_TRACKING_URI)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, *, project: str, run_name: str, run_id: str | None, config: dict,
                 tracking_uri: str | None = None, **_):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(project))
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            self.fresh = True
        else:
            self.client.update_run(run_id, status="RUNNING")
            self.fresh = False
        self.id = run_id

    def start(self, config: dict, files: list[Path]) -> None:
        from mlflow.entities import Param

        if self.fresh:  # params are immutable: a resumed run keeps the ones it started with
            params = [Param(k, str(v)[:6000]) for k, v in flat_config(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.id, params=params[i:i + 100])
        for f in files:
            self.client.log_artifact(self.id, str(f))

    def log_metrics(self, row: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in _numbers(row).items()]
        if metrics:
            self.client.log_batch(self.id, metrics=metrics)

    def log_samples(self, rows: list[dict], step: int) -> None:
        self.client.log_dict(self.id, [{c: r.get(c) for c in SAMPLE_COLUMNS} for r in rows],
                             f"samples/step-{step:07d}.json")

    def finish(self, model_dir: Path | None) -> None:
        if model_dir is not None:
            self.client.set_tag(self.id, "model_dir", str(model_dir))

    def close(self) -> None:
        self.client.set_terminated(self.id)


def _mlflow_key(name: str) -> str:
    """MLflow keys allow letters, digits, _ - . space / : only."""
    return "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in name)


def _sample_table(table: type, rows: list[dict]):
    """The samples as a W&B-style table (`wandb.Table`, `trackio.Table`: the same constructor)."""
    return table(columns=list(SAMPLE_COLUMNS), data=[[_cell(r.get(c)) for c in SAMPLE_COLUMNS] for r in rows])


class Trackio:
    """trackio (local-first, W&B-like API): logs to its local database (TRACKIO_DIR) or a Space."""

    name = "trackio"

    def __init__(self, run_dir: Path, *, project: str, run_name: str, run_id: str | None, config: dict, **_):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=project, name=run_id or run_name, config=flat_config(config),
                                resume="allow" if run_id else "never")
        self.id = self.run.name

    def start(self, config: dict, files: list[Path]) -> None:
        for f in files:
            self.run.log_artifact(f, name=f"{self.id}-{f.stem}", type="run-files")

    def log_metrics(self, row: dict, step: int) -> None:
        self.run.log(_numbers(row), step=step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        self.run.log({"samples": _sample_table(self.trackio.Table, rows)}, step=step)

    def finish(self, model_dir: Path | None) -> None:
        if model_dir is not None:
            self.run.log({"model_dir": str(model_dir)})

    def close(self) -> None:
        self.run.finish()


CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}


def open_trackers(output, run_dir: Path, config: dict, files: list[Path], *, resume_step: int = 0) -> list:
    """The trackers of `output.report_to` (the config's output section), each given the config and `files`
    (the config file, the data report); a resumed run (`resume_step` > 0) continues the tracker runs
    recorded in `<run>/trackers.json`."""
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text(encoding="utf-8")) if resume_step and ids_path.is_file() else {}
    run_name = output.run_name or Path(run_dir).resolve().name
    opened = []
    try:
        for name in output.report_to:
            try:
                opened.append(CLASSES[name](run_dir, project=output.project, run_name=run_name, run_id=ids.get(name),
                                            config=config, mode=output.wandb_mode,
                                            tracking_uri=output.mlflow_tracking_uri, resume_step=resume_step))
                opened[-1].start(config, files)
            except DpokitError:
                raise
            except Exception as e:  # the tracker's own refusal (a store it cannot open, a server it cannot reach)
                raise ConfigError(f"output.report_to: {name} could not start: {first_line(e)}") from e
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    ids = {t.name: t.id for t in opened if hasattr(t, "id")}
    if ids:
        ids_path.write_text(json.dumps(ids) + "\n", encoding="utf-8")
    return opened


def _cell(value):
    """A table cell: a conversation as text."""
    return _one_line(value) if isinstance(value, list) else value


def _one_line(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)

