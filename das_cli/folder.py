"""The run folder: where every file of a sweep lives, what decides a cell's numbers (its fingerprint),
reading a finished cell back with checks, and the lock a process holds while it trains a cell.

    <folder>/run.json                          {"fingerprint": ..., "versions": ...}: the configuration of the
                                               folder's cells; Python's and the packages' versions of its last run
    <folder>/grid.json | grid.shard<i>of<n>.json  the ids of the cells a job means to run (before training)
    <folder>/prescan.csv | prescan.shard<i>of<n>.csv  with search.prescan: each of the job's cells' first-order
                                               score, from before any training (prescan.py)
    <folder>/halving.csv | halving.shard<i>of<n>.csv  with search=halving: each rung's scores of the cells and
                                               which went on, written before the stopped cells (halving.py)
    <folder>/cells/<id>/metrics.json           the cell's row, its fingerprint and its subspace's checksum;
                                               written last, so it marks the cell finished
    <folder>/cells/<id>/subspace.safetensors   the learned tensors (output.save_subspaces)
    <folder>/cells/<id>/head_importance.png
    <folder>/cells/<id>/.lock                  locked (fcntl) by the process training the cell
    <folder>/cells/<id>/checkpoint.pt          the training state of a cell stopped mid-way (SIGTERM, Ctrl-C,
                                               SLURM's signal) with the cell's fingerprint; removed when it ends
    <folder>/iia.csv, iia_seeds.csv, head_importance.csv, pivot_*.csv, heatmap_*.png
                                               tables of every finished cell on disk
    <folder>/transfer.csv, transfer.png        with from_run evaluations: test IIA by trained-on x tested-on dataset
    <folder>/report.html                       one self-contained page of all the above (html_report.py)
    <folder>/control/                          with analysis.control: the cells trained and scored under the
                                               control (a run folder of its own: run.json, grid, cells/); the
                                               tables above join them to the run's cells (controls.py)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import DasError, non_finite
from .files import atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CELLS = "cells"
METRICS = "metrics.json"
SUBSPACE = "subspace.safetensors"
LOCK = ".lock"
CHECKPOINT = "checkpoint.pt"
CURVE = "curve.csv"
CURVE_PLOT = "curve.png"
TABLE = "iia.csv"
SEEDS_TABLE = "iia_seeds.csv"
HEADS_TABLE = "head_importance.csv"
TRANSFER_TABLE = "transfer.csv"
TRANSFER_PLOT = "transfer.png"
CONTROL = "control"
RECORD_KEYS = ("fingerprint", "subspace", "artefact")  # in metrics.json next to the row; not table columns


# --- paths -------------------------------------------------------------------------------------

def run_file(folder: Path) -> Path:
    return Path(folder) / RUN_FILE


def cell_dir(folder: Path, cell_id: str) -> Path:
    return Path(folder) / CELLS / cell_id


def metrics_file(folder: Path, cell_id: str) -> Path:
    return cell_dir(folder, cell_id) / METRICS


def subspace_file(folder: Path, cell_id: str) -> Path:
    return cell_dir(folder, cell_id) / SUBSPACE


def checkpoint_file(folder: Path, cell_id: str) -> Path:
    return cell_dir(folder, cell_id) / CHECKPOINT


def curve_file(folder: Path, cell_id: str) -> Path:
    return cell_dir(folder, cell_id) / CURVE


def curve_plot_file(folder: Path, cell_id: str) -> Path:
    return cell_dir(folder, cell_id) / CURVE_PLOT


def head_plot_file(folder: Path, cell_id: str) -> Path:
    return cell_dir(folder, cell_id) / "head_importance.png"


def grid_file(folder: Path, shard: int, num_shards: int) -> Path:
    return Path(folder) / ("grid.json" if num_shards == 1 else f"grid.shard{shard}of{num_shards}.json")


def prescan_file(folder: Path, shard: int, num_shards: int) -> Path:
    """The first-order prescan's scores of one job's cells (prescan.py)."""
    return Path(folder) / ("prescan.csv" if num_shards == 1 else f"prescan.shard{shard}of{num_shards}.csv")


def prescan_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("prescan*.csv"))


def halving_file(folder: Path, shard: int, num_shards: int) -> Path:
    """Successive halving's rung scores and decisions for one job's cells (halving.py)."""
    return Path(folder) / ("halving.csv" if num_shards == 1 else f"halving.shard{shard}of{num_shards}.csv")


def grid_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("grid*.json"))


def grid_ids(folder: Path) -> list[str]:
    """The cell ids the job(s) that ran in this folder meant to run, in grid order (unreadable grid files skipped)."""
    ids: list[str] = []
    for path in grid_files(folder):
        try:
            ids += json.loads(path.read_text()).get("cells", [])
        except (OSError, ValueError, AttributeError):
            continue
    return list(dict.fromkeys(ids))


def table_file(folder: Path, name: str = TABLE) -> Path:
    return Path(folder) / name


def pivot_file(folder: Path, name: str) -> Path:
    return Path(folder) / f"pivot_{name}.csv"


def heatmap_file(folder: Path, name: str) -> Path:
    return Path(folder) / f"heatmap_{name}.png"


def cell_ids(folder: Path) -> list[str]:
    """Ids of the cells with a metrics.json directly under folder/cells/."""
    return sorted(p.parent.name for p in (Path(folder) / CELLS).glob(f"*/{METRICS}"))


def cell_folders(folder: Path) -> list[str]:
    """Ids of every folder under folder/cells/, finished (with a metrics.json) or not."""
    cells = Path(folder) / CELLS
    return sorted(p.name for p in cells.iterdir() if p.is_dir()) if cells.is_dir() else []


def control_folder(folder: Path) -> Path:
    return Path(folder) / CONTROL


def metrics_files_under(folder: Path) -> list[Path]:
    """Every cells/<id>/metrics.json under `folder`, at any depth (multirun job folders, shards), but a control's
    (those are joined to their run's cells, never tabled as cells of their own)."""
    found = (p for p in Path(folder).rglob(METRICS) if p.parent.parent.name == CELLS and job_of(p).name != CONTROL)
    return sorted(found, key=natural_order)


def job_of(metrics: Path) -> Path:
    """The job folder (the one holding cells/) of a metrics.json."""
    return metrics.parent.parent.parent


def natural_order(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def make_folder(folder: str | os.PathLike, key: str = "hydra.run.dir") -> Path:
    """Create the output folder (and check it takes files), or fail on one line naming `key`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".das-cli-probe.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else (e.strerror or str(e))
        raise DasError(f"{key}={folder}: cannot write the output folder there ({why}); choose another {key}") from None
    return folder


# --- fingerprints ------------------------------------------------------------------------------

def run_fingerprint(config_parts: dict, data: str, device: str, eval_batch_size: int) -> dict:
    """What decides the numbers of every cell of a run, the seed aside (each cell adds its own):
    the config parts (config.fingerprint), the pairs' content hash, the device type, eval.batch_size."""
    parts = {k: v for k, v in config_parts.items() if k != "seed"}
    parts.update(data=data, device=device, eval={"batch_size": int(eval_batch_size)})
    return json.loads(json.dumps(parts, default=str))


def cell_fingerprint(run: dict, seed: int) -> dict:
    return {**run, "seed": int(seed)}


def without_seed(fingerprint: dict) -> dict:
    return {k: v for k, v in fingerprint.items() if k != "seed"}


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}; lists stay values."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, object] = {}
    for key, item in value.items():
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_keys(*fingerprints: dict) -> list[str]:
    """The dotted keys whose values differ between the fingerprints."""
    flat = [flatten(f) for f in fingerprints]
    keys = dict.fromkeys(k for f in flat for k in f)
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def config_key(fingerprint: dict) -> str:
    """A stable text for grouping cells of one configuration (the seed aside)."""
    return json.dumps(without_seed(fingerprint), sort_keys=True)


def data_hash(pair_sets: dict, file: Path | None = None) -> str:
    """sha256 of the tokenised pairs (every tensor and label of every group), plus the data file's bytes."""
    digest = hashlib.sha256()
    if file is not None:
        digest.update(Path(file).read_bytes())
    for name, pairs in sorted(pair_sets.items()):
        digest.update(name.encode())
        for group in pairs.groups:
            for f in fields(group):
                digest.update(f.name.encode())
                _hash_value(digest, getattr(group, f.name))
    return digest.hexdigest()


def _hash_value(digest, value: object) -> None:
    if hasattr(value, "numpy"):  # a tensor
        digest.update(f"{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value):
            digest.update(str(key).encode())
            _hash_value(digest, value[key])
    else:
        digest.update(json.dumps(value, default=str).encode())


def read_run_fingerprint(folder: Path) -> dict | None:
    """run.json's fingerprint; None when it is absent or damaged (then the cells' own fingerprints rule)."""
    path = run_file(folder)
    try:
        fingerprint = json.loads(path.read_text()).get("fingerprint")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        log.warning("%s is damaged; it is written again from this run's configuration", path)
        return None
    return fingerprint if isinstance(fingerprint, dict) else None


def check_resume(folder: Path, run: dict) -> None:
    """A folder holds the cells of one configuration: refuse (one line, naming the changed keys) when
    run.json or any finished cell on disk has another fingerprint; then (re)write run.json."""
    previous = read_run_fingerprint(folder)
    others = [without_seed(previous)] if previous is not None else []
    for cell_id in cell_ids(folder):
        stored = read_cell(folder, cell_id, verify=False)
        if not stored.damaged:
            others.append(without_seed(stored.fingerprint))
    changed = list(dict.fromkeys(k for other in others for k in changed_keys(other, run)))
    if changed:
        raise DasError(
            f"output folder {folder} holds cells from another configuration (changed: {', '.join(changed)}); "
            "choose a new folder with hydra.run.dir=..."
        )
    atomic_write_json(run_file(folder), {"fingerprint": run, "versions": package_versions()})


VERSIONED = ("das-cli", "torch", "transformers", "hydra-core", "numpy", "pandas", "safetensors")


def package_versions() -> dict[str, str]:
    """Python's and the installed packages' versions (VERSIONED), recorded in run.json for the report page."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# --- cells on disk -----------------------------------------------------------------------------

@dataclass
class StoredCell:
    """A cell's metrics.json as read back: its row, or why it cannot be trusted (`problem`)."""

    id: str
    row: dict | None = None
    fingerprint: dict | None = None
    subspace: dict | None = None  # {"tensors": [names], "sha256": hex | None (not saved)}
    problem: str = ""
    artefact: dict | None = None  # what using the cell alone needs (artefacts.describe); None in older folders

    @property
    def damaged(self) -> bool:
        return self.row is None

    @property
    def failed(self) -> bool:
        return not self.damaged and is_error(self.row.get("error"))


def read_cell(folder: Path, cell_id: str, verify: bool = True) -> StoredCell | None:
    """The cell as stored under folder/cells/<id>/; None when it has no metrics.json.

    Damaged (with a `problem`): metrics.json unreadable, not JSON, not a row of this cell, without a
    fingerprint; or (with `verify`) its subspace file missing or not the one written with it.
    """
    path = metrics_file(folder, cell_id)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return StoredCell(cell_id, problem=f"{METRICS} is not readable JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if not isinstance(data, dict) or data.get("cell") != cell_id or "iia" not in data:
        return StoredCell(cell_id, problem=f"{METRICS} is not the row of cell {cell_id}")
    fingerprint, subspace = data.pop("fingerprint", None), data.pop("subspace", None)
    artefact = data.pop("artefact", None)
    if not isinstance(fingerprint, dict):
        return StoredCell(cell_id, problem=f"{METRICS} has no configuration fingerprint")
    stored = StoredCell(cell_id, data, fingerprint, subspace if isinstance(subspace, dict) else None,
                        artefact=artefact if isinstance(artefact, dict) else None)
    if verify and stored.subspace and stored.subspace.get("sha256"):
        problem = _subspace_problem(subspace_file(folder, cell_id), stored.subspace["sha256"])
        if problem:
            return StoredCell(cell_id, problem=problem, fingerprint=fingerprint)
    return stored


def _subspace_problem(path: Path, sha256: str) -> str:
    try:
        actual = sha256_of(path)
    except FileNotFoundError:
        return f"{SUBSPACE} is missing"
    except OSError as e:
        return f"{SUBSPACE} is not readable ({e.strerror})"
    return "" if actual == sha256 else f"{SUBSPACE} is not the file written with the cell (truncated or replaced)"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_error(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) != ""


def cells_on_disk(folder: Path) -> set[tuple[str, int]]:
    """Every cell's metrics.json in the folder, with its modification time."""
    out = set()
    for path in Path(folder).glob(f"{CELLS}/*/{METRICS}"):
        try:
            out.add((path.parent.name, path.stat().st_mtime_ns))
        except FileNotFoundError:
            pass
    return out


def count_finished(folder: Path) -> int:
    """Cells under folder/cells/ finished without error (not checked against a configuration)."""
    stored = (read_cell(folder, cell_id, verify=False) for cell_id in cell_ids(folder))
    return sum(1 for cell in stored if cell and not cell.damaged and not cell.failed)


def save_cell(folder: Path, cell_id: str, row: dict, fingerprint: dict, tensors: dict, save_subspace: bool,
              artefact: dict | None = None, curve=None) -> None:
    """The training curve and the subspace first, then metrics.json (row + fingerprint + the subspace's checksum
    + `artefact`), each atomically. The artefact description also goes into the safetensors metadata (as JSON
    under "artefact")."""
    if curve is not None and curve.steps:  # train.Curve
        atomic_write_text(curve_file(folder, cell_id), curve_csv(curve.steps, curve.validation))
    record = {"tensors": sorted(tensors), "sha256": None}
    if save_subspace and tensors:
        from safetensors.torch import save_file

        metadata = {"artefact": json.dumps(artefact)} if artefact else None
        path = atomic_write(subspace_file(folder, cell_id), lambda tmp: _save_safetensors(save_file, tensors, tmp, metadata))
        record["sha256"] = sha256_of(path)
    extra = {"artefact": artefact} if artefact else {}
    atomic_write_json(metrics_file(folder, cell_id), {**row, "fingerprint": fingerprint, "subspace": record, **extra})
    checkpoint_file(folder, cell_id).unlink(missing_ok=True)  # the cell has ended: its mid-way state is spent


CURVE_COLUMNS = ("step", "epoch", "loss", "penalty", "lr", "epoch_loss", "val_iia", "val_loss")


def curve_csv(curve: list[tuple], validation: list[tuple] | None = None) -> str:
    """curve.csv: one line per training step (step, epoch, cross-entropy, penalty, learning rate); on each epoch's
    last step `epoch_loss`, the epoch's mean cross-entropy, and with eval.every_epoch the validation IIA and loss."""
    scored = {epoch: (iia, loss) for epoch, iia, loss in validation or []}
    lines = [",".join(CURVE_COLUMNS)]
    for k, (step, epoch, loss, penalty, rate) in enumerate(curve):
        last = k + 1 == len(curve) or curve[k + 1][1] != epoch
        losses = [point[2] for point in curve if point[1] == epoch]
        ends = [repr(sum(losses) / len(losses)), *(map(repr, scored[epoch]) if epoch in scored else ("", ""))] if last else ["", "", ""]
        lines.append(",".join([str(step), str(epoch), repr(loss), repr(penalty), repr(rate), *ends]))
    return "\n".join(lines) + "\n"


def _save_safetensors(save_file: Callable, tensors: dict, path: str, metadata: dict | None) -> None:
    """safetensors' save_file, its I/O errors (a full disk) raised as the OSError they are (it raises its own type)."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from None


class CellStore:
    """The finished cells of one run in its folder: which to reuse, saving new ones, the per-cell locks."""

    def __init__(self, folder: Path, run: dict, run_seed: int, save_subspaces: bool) -> None:
        self.folder, self.run, self.run_seed, self.save_subspaces = Path(folder), run, run_seed, save_subspaces
        self.warned: set[str] = set()
        self.in_flight: list[Checkpoint] = []  # the checkpoints this process handed out (saved if a stop came mid-cell)

    def fingerprint(self, cell) -> dict:
        return cell_fingerprint(self.run, cell.run_seed(self.run_seed))

    def finished(self, cell) -> dict | None:
        """The row of a cell finished on disk with this run's fingerprint and its subspace; None: (re)train it."""
        stored = read_cell(self.folder, cell.id)
        if stored is None or stored.failed:
            return None
        problem = stored.problem
        if not problem and stored.fingerprint != self.fingerprint(cell):
            problem = f"{METRICS} comes from another configuration (changed: {', '.join(changed_keys(stored.fingerprint, self.fingerprint(cell)))})"
        if not problem and self.save_subspaces and (stored.subspace or {}).get("tensors") and not stored.subspace.get("sha256"):
            problem = f"no {SUBSPACE} was saved with it"
        if problem:
            if cell.id not in self.warned:
                self.warned.add(cell.id)
                log.warning("cell %s is damaged (%s); training it again", cell.id, problem)
            return None
        return stored.row

    def save(self, cell, row: dict, tensors: dict, artefact: dict | None = None, curve=None) -> None:
        save_cell(self.folder, cell.id, row, self.fingerprint(cell), tensors, self.save_subspaces, artefact, curve)
        for checkpoint in self.in_flight:
            if checkpoint.cell_id == cell.id:
                checkpoint.release()

    def keep_trained(self) -> None:
        """On a stop of the job: every cell trained in this process but not yet written is checkpointed at its
        last step."""
        for checkpoint in self.in_flight:
            if checkpoint.held is not None and not metrics_file(self.folder, checkpoint.cell_id).exists():
                checkpoint.save_held()

    def lock(self, cell) -> "CellLock":
        return CellLock(cell_dir(self.folder, cell.id) / LOCK)

    def claim(self, cell, locks: ExitStack) -> tuple[bool, dict | None]:
        """Take the cell's lock for as long as `locks` is open. (True, None): this process runs the cell;
        (False, its row): it is finished (another process may have finished it since we looked);
        (False, None): another live process holds it (that one trains it)."""
        lock = self.lock(cell)
        if not locks.enter_context(lock.held()):
            log.warning("cell %s is being trained by %s; skipped here", cell.id, lock.holder())
            return False, None
        done = self.finished(cell)
        return done is None, done

    def locked(self, cell, work: Callable) -> dict | None:
        """`work(cell)` under the cell's lock; its finished row when it is done, None when another process holds it."""
        with ExitStack() as locks:
            mine, done = self.claim(cell, locks)
            return work(cell) if mine else done

    def checkpoint(self, cell) -> "Checkpoint":
        checkpoint = Checkpoint(checkpoint_file(self.folder, cell.id), cell.id, self.fingerprint(cell))
        self.in_flight.append(checkpoint)
        return checkpoint


# --- a cell stopped mid-way ----------------------------------------------------------------------

class Checkpoint:
    """A cell's training state saved when the job is stopped mid-cell (torch.save, atomically), and read
    back by the rerun when it was written with the same cell fingerprint. `saved` is (step, total steps)
    once this process has saved one.

    A finished training is `hold`-ed until its cell is written: a stop in between (the cell's evaluation,
    its bundle's) saves it at its last step (`save_held`), so the rerun evaluates it without training again."""

    def __init__(self, path: Path, cell_id: str, fingerprint: dict) -> None:
        self.path, self.cell_id, self.fingerprint = Path(path), cell_id, fingerprint
        self.saved: tuple[int, int] | None = None
        self.held: tuple[Callable[[], dict], int, int] | None = None

    def hold(self, state: Callable[[], dict], step: int, total: int) -> None:
        """Keep `state()` (the finished training's state) for `save_held`."""
        self.held = (state, step, total)

    def release(self) -> None:
        self.held = None

    def save_held(self) -> None:
        if self.held is not None:
            state, step, total = self.held
            self.save(state(), step, total)
            self.held = None

    def save(self, state: dict, step: int, total: int) -> None:
        import torch

        record = {"fingerprint": json.dumps(self.fingerprint, sort_keys=True), "step": step, "total": total, "state": state}
        atomic_write(self.path, lambda tmp: torch.save(record, tmp))
        self.saved = (step, total)
        log.info("cell %s checkpointed at step %d/%d in %s", self.cell_id, step, total, self.path)

    def load(self, total: int) -> tuple[int, dict] | None:
        """(step, state) of a checkpoint of this cell and fingerprint with `total` steps; None (with a
        one-line warning for one that cannot be used: the cell trains from scratch) otherwise."""
        import torch

        if not self.path.exists():
            return None
        try:
            record = torch.load(self.path, map_location="cpu", weights_only=True)
            fingerprint, step, state = json.loads(record["fingerprint"]), int(record["step"]), record["state"]
        except Exception as e:  # truncated, not a checkpoint, unreadable: any of torch's errors
            return self._unusable(f"it is damaged ({(str(e).splitlines() or [type(e).__name__])[0]})")
        if non_finite({"state": state}):
            return self._unusable(f"it holds NaN or Inf values ({non_finite({'state': state})[0]})")
        if fingerprint != json.loads(json.dumps(self.fingerprint)):
            changed = changed_keys(fingerprint, self.fingerprint)
            return self._unusable(f"it comes from another configuration (changed: {', '.join(changed)})")
        if record.get("total") != total or not 0 <= step <= total:
            return self._unusable(f"its step {step}/{record.get('total')} does not fit this cell's {total} steps")
        if len(state.get("curve") or []) != step:
            return self._unusable(f"its training curve does not cover its {step} steps")
        log.info("cell %s resumes from its checkpoint at step %d/%d", self.cell_id, step, total)
        return step, state

    def _unusable(self, why: str) -> None:
        log.warning("cell %s: %s is not used, %s; training it from the start", self.cell_id, CHECKPOINT, why)
        return None


class CellLock:
    """An fcntl lock on cells/<id>/.lock: the kernel drops it when its process ends, however it ends,
    so a killed process never leaves a stale lock behind (the file itself stays, unlocked)."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, None

    def acquire(self) -> bool:
        """Take the lock if no live process holds it; False (and nothing held) otherwise."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None

    @contextmanager
    def held(self) -> Iterator[bool]:
        try:
            yield self.acquire()
        finally:
            self.release()
