"""Experiment trackers (logger=csv|tensorboard|wandb|mlflow, das_cli/trackers.py): every cell of a 4-cell tiny run
is one tracker run holding its config, its step curve (as curve.csv has it) and its final scores (as metrics.json
has them), read back with each library's own reader; a failing tracker is one warning and loses no cell; a bad
name is a one-line error; `import das_cli.cli` imports no tracker library."""

import json
import logging
import math
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY

import das_cli
from das_cli import folder as layout

pytestmark = pytest.mark.usefixtures("one_thread")
GRID = ["model=tiny_gpt2", "layers=[0,1]", "positions=[s2,last]"] + TINY + ["train.epochs=2", "dataset.n_val=8", "eval.every_epoch=true"]


def tracked_run(folder: Path, logger: str, caplog) -> pd.DataFrame:
    """The 4-cell run with `logger`, no tracker failing; its table, read back from iia.csv."""
    with caplog.at_level(logging.WARNING, logger="das_cli.trackers"):
        das_cli.run(das_cli.compose(GRID + [f"logger={logger}"]), folder)
    assert not [r.getMessage() for r in caplog.records if r.name == "das_cli.trackers"]
    table = pd.read_csv(folder / "iia.csv")
    assert len(table) == 4 and ("error" not in table or table["error"].isna().all())
    return table


def curve(folder: Path, cell: str) -> pd.DataFrame:
    return pd.read_csv(layout.curve_file(folder, cell))


def metrics(folder: Path, cell: str) -> dict:
    return json.loads(layout.metrics_file(folder, cell).read_text())


def check_curve(points: dict[str, dict[int, float]], folder: Path, cell: str) -> None:
    """A tracker's curve of one cell ({name: {step: value}}) is curve.csv's."""
    expected = curve(folder, cell)
    assert points["train/loss"] == pytest.approx(dict(zip(expected["step"], expected["loss"])), rel=1e-6)
    assert points["train/lr"] == pytest.approx(dict(zip(expected["step"], expected["lr"])), rel=1e-6)
    assert set(points["train/penalty"]) == set(expected["step"])
    ends = expected.dropna(subset=["epoch_loss"])
    assert len(ends) == 2  # two epochs
    assert points["train/epoch_loss"] == pytest.approx(dict(zip(ends["step"], ends["epoch_loss"])), rel=1e-6)
    assert points["val/iia"] == pytest.approx(dict(zip(ends["step"], ends["val_iia"])))
    assert points["val/loss"] == pytest.approx(dict(zip(ends["step"], ends["val_loss"])), rel=1e-6)


def check_scores(scores: dict[str, float], folder: Path, cell: str) -> None:
    """A tracker's final scores of one cell are its metrics.json numbers."""
    row = metrics(folder, cell)
    for name in ("iia", "iia_lo", "iia_hi", "iia_val", "train_iia", "loss", "test_loss", "steps"):
        assert scores[name] == pytest.approx(row[name], rel=1e-6), name


def test_csv_logs_every_cell_as_it_trains_into_one_file(tmp_path, caplog):
    """logger=csv (with tensorboard: several trackers at once): one long CSV of every cell's steps and scores."""
    table = tracked_run(tmp_path, "[csv,tensorboard]", caplog)
    log = pd.read_csv(tmp_path / "tracker.csv")
    assert list(log.columns) == ["time", "job", "cell", "step", "name", "value"] and log["job"].isna().all()
    assert set(log["cell"]) == set(table["cell"])
    for cell in table["cell"]:
        mine = log[log["cell"] == cell]
        numbers = mine[mine["name"] != "error"]
        by_name = {name: dict(zip(part["step"], part["value"].astype(float))) for name, part in numbers.groupby("name")}
        check_curve(by_name, tmp_path, cell)
        last = int(metrics(tmp_path, cell)["steps"])
        check_scores({name: values[last] for name, values in by_name.items() if last in values}, tmp_path, cell)
    assert len(list((tmp_path / "tensorboard").iterdir())) == 4


def test_tensorboard_records_every_cell(tmp_path, caplog):
    pytest.importorskip("tensorboard", reason="logger=tensorboard needs the tensorboard package (das-cli[trackers])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    table = tracked_run(tmp_path, "tensorboard", caplog)
    runs = sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
    assert runs == sorted(table["cell"])
    for cell in runs:
        events = EventAccumulator(str(tmp_path / "tensorboard" / cell), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
        check_curve(scalars, tmp_path, cell)
        last = int(metrics(tmp_path, cell)["steps"])
        check_scores({tag: values[last] for tag, values in scalars.items() if last in values}, tmp_path, cell)
        config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
        assert f"id: {cell}" in config and "name: tiny_gpt2" in config
        start = plugin_data_pb2.HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
        assert start.session_start_info.hparams["cell.id"].string_value == cell  # the HParams tab: the cell's keys


def wandb_records(path: Path):
    """The records of an offline run's .wandb file: wandb's own protobuf Record messages, read from its
    LevelDB-style log (a 7-byte header, then 32 KiB blocks of chunks: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks, pos = chunks + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def key(item) -> str:
    """A history or summary item's name (wandb keeps it in `key` or, split, in `nested_key`)."""
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_records_every_cell(tmp_path, monkeypatch, caplog):
    pytest.importorskip("wandb", reason="logger=wandb needs the wandb package (das-cli[trackers])")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network; the runs' files go into the run folder
    monkeypatch.setenv("WANDB_SILENT", "true")
    table = tracked_run(tmp_path, "wandb", caplog)
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 4
    seen = set()
    for path in files:
        history: dict[str, dict[int, float]] = {}
        summary, config, run = {}, {}, None
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "history":
                for item in record.history.item:
                    history.setdefault(key(item), {})[record.history.step.num] = json.loads(item.value_json)
            elif kind == "summary":
                summary.update({key(item): json.loads(item.value_json) for item in record.summary.update})
        cell = run.display_name
        seen.add(cell)
        assert run.project == "das-cli" and run.run_group == tmp_path.name
        assert config["cell"]["id"] == cell and config["model"]["name"] == "tiny_gpt2" and config["train"]["epochs"] == 2
        check_curve(history, tmp_path, cell)
        check_scores(summary, tmp_path, cell)
    assert seen == set(table["cell"])


@pytest.mark.slow  # about 13 s: 7 of them MLflow creating its SQLite store's tables
def test_mlflow_records_every_cell(tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow", reason="logger=mlflow needs mlflow-skinny (das-cli[trackers])")
    pytest.importorskip("sqlalchemy", reason="the local MLflow store (sqlite) needs sqlalchemy (das-cli[trackers])")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: <run folder>/mlflow.db
    table = tracked_run(tmp_path, "mlflow", caplog)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tmp_path.name)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(table["cell"])
    for run in runs:
        cell = run.info.run_name
        assert run.info.status == "FINISHED" and run.data.tags["das-cli.cell"] == cell
        params = run.data.params
        assert params["cell.id"] == cell and params["model.name"] == "tiny_gpt2" and params["train.epochs"] == "2"
        assert params["cell.layer"] == str(metrics(tmp_path, cell)["layer"]) and params["layers"] == "[0, 1]"
        history = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
                   for name in ("train/loss", "train/penalty", "train/lr", "train/epoch_loss", "val/iia", "val/loss")}
        check_curve(history, tmp_path, cell)
        check_scores(run.data.metrics, tmp_path, cell)


def unimportable(module: str):
    def breaks(monkeypatch, tmp_path):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
        return []
    return breaks


def unwritable(monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("")
    return [f"logger.tensorboard.dir={tmp_path / 'a_file' / 'tensorboard'}"]  # under a file: not even root writes there


def raising_midway(monkeypatch, tmp_path):
    from das_cli import trackers

    def log(self, handle, step, metrics):
        if step == 2:
            raise RuntimeError("the tracker's server went away\nwith a second line")

    monkeypatch.setattr(trackers.CsvTracker, "log", log)
    return []


@pytest.mark.parametrize("logger, breaks, reason", [
    ("tensorboard", unimportable("tensorboard"), 'tensorboard is not installed (pip install "das-cli[trackers]"'),
    ("wandb", unimportable("wandb"), "wandb is not installed"),
    ("mlflow", unimportable("mlflow"), "mlflow-skinny is not installed"),
    ("tensorboard", unwritable, "NotADirectoryError"),
    ("csv", raising_midway, "RuntimeError: the tracker's server went away"),
], ids=["tensorboard-missing", "wandb-missing", "mlflow-missing", "tensorboard-unwritable", "csv-raises"])
def test_a_failing_tracker_is_one_warning_and_every_cell_is_written(tmp_path, monkeypatch, caplog, logger, breaks, reason):
    extra = breaks(monkeypatch, tmp_path)
    with caplog.at_level(logging.WARNING, logger="das_cli.trackers"):
        das_cli.run(das_cli.compose(["model=tiny_gpt2", "layers=[0,1]", "positions=[s2,last]", f"logger={logger}", *extra] + TINY),
                    tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.name == "das_cli.trackers"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"logger={logger}: ") and reason in warnings[0], warnings[0]
    table = pd.read_csv(tmp_path / "run" / "iia.csv")
    assert len(table) == 4 and ("error" not in table or table["error"].isna().all())
    for cell in table["cell"]:
        assert math.isfinite(metrics(tmp_path / "run", cell)["iia"]) and layout.curve_file(tmp_path / "run", cell).exists()


@pytest.mark.parametrize("overrides, message", [
    (["logger=foo"], "logger=foo: unknown logger; valid choices: csv, mlflow, none, tensorboard, wandb"),
    (["logger=[tensorboard,foo]"], "logger=foo: unknown logger; valid choices: csv, mlflow, none, tensorboard, wandb"),
    (["-m", "logger=csv,foo"], "logger=foo: unknown logger; valid choices: csv, mlflow, none, tensorboard, wandb"),
    (["logger=wandb", "logger.wandb.mode=sometimes"], "logger.wandb.mode=sometimes: valid choices: online, offline, disabled, null"),
    (["logger=csv", "logger.csv.paht=x"], "logger.csv.paht: unknown key"),
])
def test_a_bad_logger_is_a_one_line_error(overrides, message, capsys):
    from das_cli import cli

    with pytest.raises(SystemExit) as stop:
        cli.preflight(["model=tiny_gpt2", *overrides])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith(f"das-cli: error: {message}"), err


def test_every_logger_composes_several_at_once_and_none_is_the_default():
    from das_cli import config as C
    from das_cli.trackers import TRACKERS

    def chosen(*overrides):
        cfg = C.typed(C.compose(["model=tiny_gpt2", *overrides]))
        C.validate(cfg)
        return {name for name, options in cfg.logger.items() if options is not None}

    assert C.group_choices("logger") == sorted(TRACKERS + ("none",))
    assert chosen() == chosen("logger=none") == chosen("logger=[]") == set()
    for name in TRACKERS:
        assert chosen(f"logger={name}") == {name}
    assert chosen("logger=[tensorboard,mlflow]") == {"tensorboard", "mlflow"} == chosen("logger=[none,tensorboard,mlflow]")


def test_the_cli_imports_no_tracker_library():
    code = ("import sys, das_cli.cli, das_cli.trackers; "
            "print([m for m in ('wandb', 'mlflow', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
