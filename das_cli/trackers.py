"""Experiment trackers: `logger=csv|tensorboard|wandb|mlflow` (conf/logger/*.yaml), several at once with
`logger=[tensorboard,mlflow]`; `logger=none` (the default) tracks nothing.

Each cell of a run is one tracker run: its config (the run's, flattened, and the cell's own keys), its curve as it
trains (per step `train/loss`, `train/penalty`, `train/lr`; at each epoch's end `train/epoch_loss` and, with
eval.every_epoch, `val/iia`, `val/loss`: curve.csv's columns) and its final scores (the numbers of the row in
cells/<id>/metrics.json, under their iia.csv names). The cells of one run folder, or of every job of a multirun,
are grouped under that folder's name: MLflow's experiment, W&B's group, TensorBoard's and the csv's folder.

Tracking never costs a cell: a tracker that fails (its library not installed, a folder it cannot write, any error
of the library) is one warning naming it and why, and is off for the rest of the run; the cells are trained and
written as before. The libraries are imported when a run with a tracker starts, never by `import das_cli.cli`.
"""

from __future__ import annotations

import atexit
import csv
import importlib
import io
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

TRACKERS = ("csv", "tensorboard", "wandb", "mlflow")  # conf/logger/<name>.yaml; conf/logger/none.yaml selects none
INSTALL = 'pip install "das-cli[trackers]"'
CSV_COLUMNS = ("time", "job", "cell", "step", "name", "value")
IDENTITY = ("layer", "seed", "cell_seed", "model_layers")  # numbers of a row that name the cell (its params), not scores


@dataclass
class Group:
    """Where the cells of a run are tracked: the group's name and folder (the run folder; in a multirun the sweep
    folder, shared by its jobs), and in a multirun this job's number and its values of the swept keys."""

    name: str
    root: Path
    job: str | None = None
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, folder: Path) -> "Group":
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            if hc.mode.name == "MULTIRUN" and Path(hc.runtime.output_dir).resolve() == Path(folder).resolve():
                root = Path(hc.sweep.dir)
                swept = swept_keys(root)
                overrides = [o for o in hc.overrides.task if swept is None or o.lstrip("+~").partition("=")[0] in swept]
                return cls(folder_label(root), root, str(hc.job.num), overrides)
        return cls(folder_label(Path(folder)), Path(folder))

    def run_name(self, cell_id: str) -> str:
        """The cell's id; in a multirun followed by the job's overrides (cells of two jobs may share an id)."""
        if self.job is None:
            return cell_id
        return f"{cell_id} ({' '.join(self.overrides) or 'job ' + self.job})"


def swept_keys(root: Path) -> set[str] | None:
    """The keys a multirun sweeps (`train.lr=0.01,0.02`), from the command Hydra saved in its multirun.yaml;
    None when it cannot be read (then a job is named by all its overrides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        task = list(OmegaConf.load(root / "multirun.yaml").hydra.overrides.task)
        return {o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()}
    except Exception:  # noqa: BLE001 - only the run names are less short
        return None


def folder_label(folder: Path) -> str:
    """A folder's name; Hydra's default time-stamped folders (outputs/<date>/<time>) get their date too."""
    folder = folder.resolve()
    return f"{folder.parent.name}_{folder.name}" if re.fullmatch(r"\d\d-\d\d-\d\d", folder.name) else folder.name


@dataclass
class CellRun:
    """What a tracker run of one cell is opened with."""

    cell_id: str
    name: str
    group: Group
    config: dict  # the run's config (nested), with the cell's keys under "cell" and a multirun's job under "job"
    params: dict[str, str]  # the same, flattened to dotted keys
    hparams: dict[str, Any]  # the keys that tell the cells of a group apart: the cell's and the job's overrides


class Tracking:
    """The trackers of one run: started once (each library imported, each failure a warning), then one
    `CellTrack` per cell, fed by training (train.fit_cells) and closed when the cell is written (runner.py)."""

    def __init__(self, trackers: list, group: Group, config: dict) -> None:
        self.trackers, self.group, self.config = trackers, group, config
        self.cells: dict[str, CellTrack] = {}
        self.quiet = False
        if trackers:
            atexit.register(self.close_open)  # a run stopped mid-cell: its open tracker runs end, marked as stopped

    @classmethod
    def start(cls, cfg: DictConfig, folder: Path) -> "Tracking":
        chosen = [name for name in TRACKERS if cfg.get("logger") is not None and cfg.logger.get(name) is not None]
        group = Group.of(Path(folder)) if chosen else Group("", Path(folder))
        trackers = []
        for name in chosen:
            try:
                trackers.append(BACKENDS[name](cfg.logger[name], group))
            except Exception as e:  # noqa: BLE001 - a tracker never stops a run
                warn(name, e)
        config = OmegaConf.to_container(cfg, resolve=True) if trackers else {}
        if isinstance(config, dict):
            config.pop("hydra", None)
        return cls(trackers, group, config)

    def cell(self, cell) -> "CellTrack | None":
        """The cell's tracker runs (opened at its first point); None without a working tracker."""
        if not self.trackers:
            return None
        if cell.id not in self.cells:
            self.cells[cell.id] = CellTrack(self, self.cell_run(cell))
        return self.cells[cell.id]

    def cell_run(self, cell) -> CellRun:
        keys = {"id": cell.id, "stream": cell.stream, "layer": cell.layer, "position": cell.position_label,
                "heads": cell.heads_label, "seed": cell.run_seed(int(self.config.get("seed", 0)))}
        config = {**self.config, "cell": keys}
        hparams = {f"cell.{k}": v for k, v in keys.items()}
        if self.group.job is not None:
            config["job"] = {"num": self.group.job, "overrides": self.group.overrides}
            hparams.update(dict(o.partition("=")[::2] for o in self.group.overrides))
        return CellRun(cell.id, self.group.run_name(cell.id), self.group, config, flatten(config), hparams)

    def finished(self, cell, row: dict) -> None:
        """The cell is written: its scores to every tracker, and its runs closed."""
        track = self.cell(cell)
        if track is not None:
            scores = {k: float(v) for k, v in row.items() if _number(v) and k not in IDENTITY}
            track.close(scores, None, int(row.get("steps") or 0))
        self.cells.pop(cell.id, None)

    def failed(self, cell, error: str) -> None:
        track = self.cell(cell)
        if track is not None:
            track.close({}, error, 0)
        self.cells.pop(cell.id, None)

    def call(self, tracker, work: Callable[[], None]) -> None:
        """`work` of one tracker; its failure turns the tracker off for the rest of the run (one warning)."""
        if tracker not in self.trackers:
            return
        try:
            work()
        except Exception as e:  # noqa: BLE001 - any error of a tracker's library is a warning, never a lost cell
            self.trackers.remove(tracker)
            if not self.quiet:
                warn(tracker.name, e)

    def close_open(self) -> None:
        """At exit, the runs of cells not written (a stopped run), quietly: the libraries may be shut down already."""
        self.quiet = True
        for track in list(self.cells.values()):
            track.close({}, "stopped before the cell was written", 0)
        self.cells.clear()


class CellTrack:
    """One cell's tracker runs: opened at its first curve point (or its end), sent its curve as it trains
    (`curve`, after every training step), closed with its scores."""

    def __init__(self, tracking: Tracking, run: CellRun) -> None:
        self.tracking, self.run = tracking, run
        self.handles: dict[Any, Any] = {}
        self.steps: list[tuple] | None = None
        self.sent = 0  # points of `steps` sent
        self.last_step = 0  # the last step sent (a cell retrained from the start, e.g. after its bundle failed, sends only later steps)

    def handle(self, tracker) -> Any:
        if tracker not in self.handles:
            self.handles[tracker] = tracker.open(self.run)
        return self.handles[tracker]

    def each(self, work: Callable[[Any, Any], None]) -> None:
        for tracker in list(self.tracking.trackers):
            self.tracking.call(tracker, lambda: work(tracker, self.handle(tracker)))

    def curve(self, steps: list[tuple], validation: list[tuple], per_epoch: int) -> None:
        """The training's curve so far (train.TrainingState's: (step, epoch, loss, penalty, lr) per step and
        (epoch, val IIA, val loss) per epoch); sends the points not sent yet."""
        if steps is not self.steps:
            self.steps, self.sent = steps, 0
        scored = {epoch: (iia, loss) for epoch, iia, loss in validation}
        for k in range(self.sent, len(steps)):
            step, epoch, loss, penalty, rate = steps[k]
            if step <= self.last_step:
                continue
            metrics = {"train/loss": loss, "train/penalty": penalty, "train/lr": rate}
            if per_epoch and step % per_epoch == 0:  # the epoch's last step
                losses = [point[2] for point in steps[max(0, k - per_epoch + 1) : k + 1] if point[1] == epoch]
                metrics["train/epoch_loss"] = sum(losses) / len(losses)
                if epoch in scored:
                    metrics["val/iia"], metrics["val/loss"] = scored[epoch]
            metrics = {name: float(value) for name, value in metrics.items() if _number(value)}
            self.each(lambda tracker, handle: tracker.log(handle, step, metrics))
            self.last_step = step
        self.sent = len(steps)

    def close(self, scores: dict[str, float], error: str | None, step: int) -> None:
        self.each(lambda tracker, handle: tracker.close(handle, max(step, self.last_step), scores, error))
        self.handles.clear()


# ---- the trackers: open(run) -> handle, log(handle, step, metrics), close(handle, step, scores, error) ----

class CsvTracker:
    """One CSV for the run (a multirun: all its jobs), one line per number, appended as it comes."""

    name = "csv"

    def __init__(self, options: DictConfig, group: Group) -> None:
        self.path = Path(options.path) if options.path else group.root / "tracker.csv"
        self.job = group.job or ""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # the header once, by whichever job comes first
            with open(self.path, "x", encoding="utf-8", newline="") as f:
                f.write(",".join(CSV_COLUMNS) + "\n")
        except FileExistsError:
            pass

    def open(self, run: CellRun) -> str:
        return run.cell_id

    def log(self, cell_id: str, step: int, metrics: dict[str, float]) -> None:
        self.append(cell_id, step, metrics)

    def close(self, cell_id: str, step: int, scores: dict[str, float], error: str | None) -> None:
        self.append(cell_id, step, {**scores, **({"error": error} if error else {})})

    def append(self, cell_id: str, step: int, values: dict[str, Any]) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        for name, value in values.items():
            writer.writerow([now, self.job, cell_id, step, name, repr(value) if isinstance(value, float) else value])
        with open(self.path, "a", encoding="utf-8", newline="") as f:  # one write: lines of parallel jobs stay whole
            f.write(text.getvalue())


class TensorboardTracker:
    """TensorBoard event files, one folder per cell: <dir>/<cell> (a multirun: <dir>/<job>/<cell>)."""

    name = "tensorboard"

    def __init__(self, options: DictConfig, group: Group) -> None:
        library("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer, self.hparams = SummaryWriter, hparams
        self.root = Path(options.dir) if options.dir else group.root / "tensorboard"

    def open(self, run: CellRun):
        folder = self.root / (run.group.job or "") / run.cell_id
        writer = self.writer(log_dir=str(folder), flush_secs=10)
        text = OmegaConf.to_yaml(OmegaConf.create(run.config))
        writer.add_text("config", "    " + text.replace("\n", "\n    "))  # markdown: a code block
        return writer, run

    def log(self, handle, step: int, metrics: dict[str, float]) -> None:
        writer, _ = handle
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)

    def close(self, handle, step: int, scores: dict[str, float], error: str | None) -> None:
        writer, run = handle
        for name, value in scores.items():
            writer.add_scalar(name, value, step)
        if scores:  # the HParams tab: the cell's keys against its scores
            for summary in self.hparams({k: _hparam(v) for k, v in run.hparams.items()}, scores):
                writer.file_writer.add_summary(summary)
        if error:
            writer.add_text("error", error, step)
        writer.close()


class WandbTracker:
    """Weights & Biases: one run per cell in the project, grouped by the run (a multirun: the sweep) folder."""

    name = "wandb"

    def __init__(self, options: DictConfig, group: Group) -> None:
        self.wandb = library("wandb", "wandb")
        self.options = options
        self.dir = Path(options.dir) if options.dir else group.root
        self.dir.mkdir(parents=True, exist_ok=True)
        mode = options.mode or os.environ.get("WANDB_MODE", "online")
        if mode not in ("offline", "disabled", "dryrun"):
            self.wandb.login()  # now, not at the first cell: no API key is an error here (a terminal asks for one)

    def open(self, run: CellRun):
        o, settings = self.options, self.wandb.Settings(silent=True, console="off", x_save_requirements=False)
        return self.wandb.init(project=o.project, entity=o.entity, mode=o.mode, dir=str(self.dir), group=run.group.name,
                               name=run.name, config=run.config, reinit="create_new", settings=settings)

    def log(self, handle, step: int, metrics: dict[str, float]) -> None:
        handle.log(metrics, step=step)

    def close(self, handle, step: int, scores: dict[str, float], error: str | None) -> None:
        handle.summary.update({**scores, **({"error": error} if error else {})})
        handle.finish(exit_code=1 if error else 0)


class MlflowTracker:
    """MLflow: one run per cell in an experiment named after the run (a multirun: the sweep) folder. A cell's points
    go in one batch every FLUSH_S seconds (a local store takes ~20 ms a call: one per step would slow training)."""

    name = "mlflow"
    FLUSH_S = 5.0

    def __init__(self, options: DictConfig, group: Group) -> None:
        library("mlflow", "mlflow-skinny")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        for quiet in ("alembic", "mlflow.store.db.utils"):  # the store's set-up, logged line by line at INFO
            logging.getLogger(quiet).setLevel(logging.WARNING)
        self.metric, self.param = Metric, Param
        uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(group.root / 'mlflow.db').resolve()}"
        if uri.startswith("sqlite:"):
            library("sqlalchemy", "sqlalchemy")
            group.root.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment = self.experiment_id(options.experiment or group.name)

    def experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another job of the multirun made it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def open(self, run: CellRun) -> dict:
        tags = {"das-cli.cell": run.cell_id, **({"das-cli.job": run.group.job} if run.group.job is not None else {})}
        run_id = self.client.create_run(self.experiment, run_name=run.name, tags=tags).info.run_id
        params = [self.param(k, v[:6000]) for k, v in run.params.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=params[start : start + 100])
        return {"id": run_id, "pending": [], "sent": time.monotonic()}

    def log(self, handle: dict, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        handle["pending"] += [self.metric(k, v, now, step) for k, v in metrics.items()]
        if time.monotonic() - handle["sent"] >= self.FLUSH_S:
            self.flush(handle)

    def flush(self, handle: dict) -> None:
        pending, handle["pending"], handle["sent"] = handle["pending"], [], time.monotonic()
        for start in range(0, len(pending), 1000):  # at most 1000 metrics a batch
            self.client.log_batch(handle["id"], metrics=pending[start : start + 1000])

    def close(self, handle: dict, step: int, scores: dict[str, float], error: str | None) -> None:
        now = int(time.time() * 1000)
        handle["pending"] += [self.metric(k, v, now, step) for k, v in scores.items()]
        self.flush(handle)
        if error:
            self.client.set_tag(handle["id"], "error", error[:5000])
        self.client.set_terminated(handle["id"], "FAILED" if error else "FINISHED")


BACKENDS: dict[str, type] = {"csv": CsvTracker, "tensorboard": TensorboardTracker, "wandb": WandbTracker,
                             "mlflow": MlflowTracker}


# ---- helpers ----

class TrackerUnavailable(ImportError):
    """A tracker's library is not installed."""


def library(module: str, package: str):
    """`import module`, or a one-line reason naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TrackerUnavailable(f"{package} is not installed ({INSTALL}; {_first_line(e)})") from None


def warn(name: str, error: BaseException) -> None:
    """One line: the tracker, why it stopped, and that the run goes on."""
    reason = _first_line(error) if isinstance(error, TrackerUnavailable) else f"{type(error).__name__}: {_first_line(error)}"
    log.warning("logger=%s: %s; this tracker is off for the rest of the run (the cells are written as before)", name, reason)


def _first_line(error: BaseException) -> str:
    line = (str(error).strip().splitlines() or [""])[0]
    return line if len(line) <= 300 else line[:297] + "..."


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _hparam(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b": "value"}; lists and null as JSON."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out
