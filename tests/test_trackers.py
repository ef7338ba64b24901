"""output.report_to and train.sample_every: one tiny run logs to W&B (offline), MLflow (SQLite store) and
trackio (local database), and each store is read back: metrics, config, files, samples, model path."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from dpokit.config_loader import config_from_dict, load_config, set_value
from dpokit.errors import ConfigError
from dpokit.trainer import train


def wandb_records(path):
    """Records of an offline W&B run file (`run-ID.wandb`): a LevelDB-style log of protobuf records in
    32 KiB blocks after a 7-byte header, each chunk with a 7-byte header (crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


@pytest.fixture
def tracked_run(tiny_config, tmp_path, monkeypatch, pairs_file):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.chdir(tmp_path)  # MLflow's artifact store defaults to ./mlruns
    cfg = tiny_config("output.report_to=[tensorboard, wandb, mlflow, trackio]", "output.wandb_mode=offline",
                      f"output.mlflow_tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "output.project=dpokit-test",
                      f"data.eval={pairs_file}", "train.sample_every=2", "train.sample_count=3",
                      "train.sample_max_new_tokens=5", "train.sample_judge=length")
    return cfg, train(cfg)


def test_every_tracker_receives_metrics_config_files_samples_and_model(tracked_run, tmp_path):
    cfg, result = tracked_run
    run_dir = result.run_dir
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in metrics if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]

    # samples.jsonl: steps 0, 2, 4, three prompts each, scored by the judge
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    assert {r["prompt"][0]["content"] for r in samples} == {"What is the capital of France?", "What is 2 plus 3?",
                                                           "Name a color."}
    assert all(r["score"] == len(r["completion"].split()) and r["num_tokens"] <= 5 for r in samples)
    assert [r["step"] for r in metrics if "samples/score" in r] == [0, 2, 4]

    # W&B, offline: history, config, the run files and sample tables as artifacts, the model path in the summary
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(wandb_file)
    history = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            if "_step" in items:
                history.setdefault(int(items["_step"]), {}).update(items)
    assert {s: history[s]["loss"] for s in losses} == pytest.approx(losses)
    assert history[4]["eval/rewards/accuracies"] == [r for r in metrics if "eval/loss" in r][-1]["eval/rewards/accuracies"]
    assert history[2]["samples/nrows"] == 3 and "samples/score" in history[2]
    (run_rec,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run_rec.config.update}
    assert config["train"]["lr"] == cfg.train.lr and config["model"]["name"] == cfg.model.name
    artifacts = {r.artifact.name: [m.path for m in r.artifact.manifest.contents] for r in records
                 if r.WhichOneof("record_type") == "artifact"}
    assert sorted(next(v for k, v in artifacts.items() if k.startswith("run-files"))) == ["config.yaml",
                                                                                         "data_report.json"]
    summary = {i.key or "/".join(i.nested_key): i.value_json for r in records
               if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert json.loads(summary["model_dir"]) == str(result.model_dir)

    # MLflow, SQLite store: metric history, params, artifacts, the model path as a tag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == pytest.approx([losses[s] for s in
                                                                                           sorted(losses)])
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["objective.beta"] == "0.1"
    assert run.data.tags["model_dir"] == str(result.model_dir) and run.info.status == "FINISHED"
    listed = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "samples")}
    assert {"config.yaml", "data_report.json", "samples/step-0000002.json"} <= listed
    report = json.loads((tmp_path / client.download_artifacts(run_id, "data_report.json")).read_text())
    assert report == json.loads((run_dir / "data_report.json").read_text())

    # trackio, local database: metrics by step, the sample tables, the config, the model path
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("dpokit-test", run_dir.name)
    assert {r["step"]: r["loss"] for r in logs if "loss" in r} == pytest.approx(losses)
    assert any(r.get("samples", {}).get("_type") == "trackio.table" for r in logs)
    assert any(r.get("model_dir") == str(result.model_dir) for r in logs)
    assert SQLiteStorage.get_run_config("dpokit-test", run_dir.name)["train.lr"] == cfg.train.lr

    assert any(f.name.startswith("events.out.tfevents") for f in (run_dir / "tensorboard").iterdir())


def test_missing_tracker_package_names_the_extra(tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'dpokit\[wandb\]'"):
        tiny_config("output.report_to=[wandb]")


def test_report_to_checks_names_and_reads_the_tensorboard_key(pairs_file):
    with pytest.raises(ConfigError, match="did you mean 'mlflow'"):
        load_config(None, [f"data.train={pairs_file}", "output.report_to=[mlfow]"])
    cfg = config_from_dict({"output": {"report_to": ["wandb"], "tensorboard": True}})
    assert cfg.output.report_to == ["tensorboard", "wandb"]
    set_value(cfg, "output.tensorboard", False)
    assert cfg.output.report_to == ["wandb"]


def test_mlflow_file_store_is_refused_before_anything_is_written(pairs_file, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    for uri in (f"file://{tmp_path}/mlruns", str(tmp_path / "mlruns")):
        with pytest.raises(ConfigError, match=r"MLflow's file store, .* use sqlite:///PATH/mlflow.db .* "
                                              r"MLFLOW_ALLOW_FILE_STORE=true"):
            load_config(None, [f"data.train={pairs_file}", f"output.dir={run}", "output.report_to=[mlflow]",
                               f"output.mlflow_tracking_uri={uri}"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    with pytest.raises(ConfigError, match="^MLFLOW_TRACKING_URI=file://"):
        load_config(None, [f"data.train={pairs_file}", "output.report_to=[mlflow]"])
    load_config(None, [f"data.train={pairs_file}", "output.report_to=[mlflow]",
                       f"output.mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    assert not run.exists()


def test_a_tracker_that_cannot_start_is_one_line_and_leaves_the_directory_as_it_was(tiny_config, tmp_path,
                                                                                      monkeypatch, capsys):
    from dpokit import trackers
    from dpokit.trainer import train

    class Refuses(trackers.TensorBoard):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("the store is in maintenance mode\nlots of advice")

    monkeypatch.setitem(trackers.CLASSES, "tensorboard", Refuses)
    cfg = tiny_config("output.report_to=[tensorboard]")
    with pytest.raises(ConfigError, match="^output.report_to: tensorboard could not start: the store is in "
                                          "maintenance mode$"):
        train(cfg)
    assert not Path(cfg.output.dir).exists()  # nothing to refuse or resume: the corrected command just runs
