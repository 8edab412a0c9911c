"""`das-cli-report <folder>`: one table for a whole sweep, however many jobs ran it.

Reads every `cells/<cell-id>/metrics.json` under the folder, at any depth (a multirun's job
subfolders, several shards, or one run folder), keeps one row per cell and configuration and writes
`iia.csv`, the pivots and heatmaps into the folder (`results.write_results`), then prints the summary.
With plots it also writes `report.html`, one self-contained page of it all (html_report.py).
`das-cli` itself ends with the same call on its run folder, so the tables always hold every finished
cell on disk, whichever job wrote it. When the cells include from_run evaluations, it also writes the
transfer table (trained-on x tested-on IIA per cell: generalisation.py).

Rules:
- a cell is identified by its id and its configuration (its fingerprint, the seed aside). Jobs of
  different configurations (`-m intervention.dim=1,4` or `train.lr=0.01,0.1`) are merged into one
  table with the keys that differ as columns (`intervention.dim`); pivots and heatmaps per value;
- a cell found in several job folders with the same configuration must carry the same numbers
  there (wall-clock `seconds` aside); identical duplicates are kept once, different ones are an error;
- a damaged cell (unreadable metrics.json, missing or truncated subspace) is listed, never trusted;
- a job writes the ids of its cells (`grid*.json`) before training; cells listed there but found
  nowhere are reported as missing (a job killed, timed out, or still running), failed cells are
  listed with their error. Any of these makes the exit status 1; mistakes exit 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import folder as layout
from . import generalisation
from .errors import DasError
from .results import format_summary, write_results

log = logging.getLogger(__name__)

PROG = "das-cli-report"
IGNORED = ("seconds",)  # differs between two runs of the same cell; not a result


@dataclass
class Report:
    folder: Path
    frame: pd.DataFrame
    jobs: list[Path]  # folders holding cells/, in order
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell id, error)
    missing: list[str] = field(default_factory=list)  # cell ids some job meant to run, found nowhere
    not_started: list[Path] = field(default_factory=list)  # job folders (Hydra's .hydra/) that wrote no grid
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (cell path, problem)
    swept: list[str] = field(default_factory=list)  # configuration keys that differ between jobs (table columns)
    transfer: generalisation.Transfer | None = None  # from_run evaluations among the cells: transfer.csv

    @property
    def ok(self) -> bool:
        return not (self.failed or self.missing or self.not_started or self.damaged)

    def text(self) -> str:
        lines = [format_summary(self.frame, by=self.swept), ""]
        jobs = f"{len(self.jobs)} job folder{'s' if len(self.jobs) != 1 else ''}"
        lines.append(f"{len(self.frame)} cells from {jobs}; {len(self.failed)} failed, {len(self.missing)} missing"
                     + (f", {len(self.damaged)} damaged" if self.damaged else ""))
        if self.swept:
            lines.append(f"configurations differ in: {', '.join(self.swept)} (columns of iia.csv)")
        for cell, error in self.failed:
            lines.append(f"  failed  {cell}: {error}")
        for cell, problem in self.damaged:
            lines.append(f"  damaged {cell}: {problem} (a rerun into its folder trains it again)")
        for cell in self.missing[:20]:
            lines.append(f"  missing {cell}")
        if len(self.missing) > 20:
            lines.append(f"  ... and {len(self.missing) - 20} more missing")
        for job in self.not_started:
            lines.append(f"  job {_rel(self.folder, job)} ran no cell (failed before its grid; see its log)")
        if self.transfer is not None:
            lines += ["", self.transfer.text, ""]
        lines.append(f"results: {self.folder.resolve()}")
        return "\n".join(lines)


def aggregate_settled(folder: Path, plots: bool) -> Report:
    """`aggregate` of one run folder's own cells, built again while another process on the folder writes cells
    (at most three times more), so that the tables hold every cell on disk when the run ends."""
    seen = layout.cells_on_disk(folder)
    report = aggregate(folder, plots=plots, nested=False)
    for _ in range(3):
        now = layout.cells_on_disk(folder)
        if now == seen:
            break
        seen, report = now, aggregate(folder, plots=plots, nested=False)
    return report


def aggregate(folder: str | Path, plots: bool = True, nested: bool = True) -> Report:
    """Merge every cell under `folder` (only folder/cells/ without `nested`) into folder/iia.csv
    (+ pivots, heatmaps); see the module doc."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DasError(f"{folder}: no such folder")
    paths = layout.metrics_files_under(folder) if nested else [layout.metrics_file(folder, c) for c in layout.cell_ids(folder)]
    if not paths:
        raise DasError(f"{folder}: no cells/*/metrics.json under this folder (is it a das-cli run or multirun folder?)")
    jobs = list(dict.fromkeys(layout.job_of(p) for p in paths))
    stored, damaged = [], []
    prescans: dict[Path, dict] = {}
    for path in paths:
        cell = layout.read_cell(layout.job_of(path), path.parent.name)
        if cell.damaged:
            damaged.append((_rel(folder, path.parent), cell.problem))
        else:
            stored.append((layout.job_of(path), with_prescan(prescans, layout.job_of(path), with_control(layout.job_of(path), cell))))
    configs = list(dict.fromkeys(layout.config_key(c.fingerprint) for _, c in stored))
    swept = layout.changed_keys(*[json.loads(k) for k in configs]) if len(configs) > 1 else []
    rows = _unique_rows(folder, stored, swept)
    frame = write_results([row for _, row in rows], folder, _title(stored), plots=plots, by=swept)
    failed = [(r["cell"], str(r["error"])) for _, r in rows if layout.is_error(r.get("error"))]
    found = {(job_config, r["cell"]) for job_config, r in rows} | {(None, r["cell"]) for _, r in rows}
    job_configs = _job_configs(stored)
    others = [j for j in _job_folders(folder, nested) if j not in jobs]  # jobs that finished no cell
    broken = {Path(folder, p).name for p, _ in damaged}
    missing = list(dict.fromkeys(
        c for job in jobs + others for c in layout.grid_ids(job)
        if (job_configs.get(job), c) not in found and c not in broken
    ))
    not_started = [j for j in others if not layout.grid_files(j)]
    transfer = generalisation.write(stored, folder, plots)
    report = Report(folder, frame, jobs, failed, missing, not_started, damaged, swept, transfer)
    if plots:
        write_page(report)
    return report


def write_page(report: Report) -> None:
    """report.html (html_report.py); a failure to build it costs the page only, on one warning line."""
    try:
        from .html_report import write_page as write_html

        write_html(report)
    except Exception as e:  # the tables are written already; a page is not worth failing the run for
        reason = (str(e).splitlines() or [""])[0] or type(e).__name__
        log.warning("report.html not written: %s: %s", type(e).__name__, reason)


def _unique_rows(folder: Path, stored: list, swept: list[str]) -> list[tuple[str, dict]]:
    """(configuration, row) once per cell and configuration, in job then grid order; swept keys become columns."""
    rows: dict[tuple[str, str], dict] = {}
    where: dict[tuple[str, str], Path] = {}
    order: dict[tuple[str, str], tuple] = {}
    grids: dict[Path, list[str]] = {}
    jobs = list(dict.fromkeys(job for job, _ in stored))
    for job, cell in stored:
        key = (layout.config_key(cell.fingerprint), cell.id)
        flat = layout.flatten(cell.fingerprint)
        row = {**cell.row, **{k: _column_value(flat.get(k)) for k in swept}}
        if key in rows:
            if _result(rows[key]) != _result(row):
                raise DasError(
                    f"cell {cell.id}: different results in {_rel(folder, where[key])} and {_rel(folder, job)} "
                    f"(iia {rows[key].get('iia')} vs {row.get('iia')}) with the same configuration; two jobs ran "
                    "the same cell, check sweep.shard / sweep.num_shards and the layer chunks"
                )
            continue
        rows[key], where[key] = row, job
        grid = grids.setdefault(job, layout.grid_ids(job))
        order[key] = (jobs.index(job), grid.index(cell.id) if cell.id in grid else len(grid), cell.id)
    return [(key[0], rows[key]) for key in sorted(rows, key=order.get)]


def with_control(job: Path, cell):
    """The cell with its control's columns in its row when the job ran a control and it finished this cell."""
    from dataclasses import replace

    from .controls import control_columns

    control = layout.control_folder(job)
    if not control.is_dir():
        return cell
    stored = layout.read_cell(control, cell.id)
    found = None if stored is None or stored.damaged else stored.row
    return replace(cell, row={**cell.row, **control_columns(cell.row, found)})


def with_prescan(prescans: dict[Path, dict], job: Path, cell):
    """The cell with its prescan score in its row when the job ran search.prescan (`prescans`: each job's
    table, read once)."""
    from dataclasses import replace

    if job not in prescans:
        from . import prescan  # torch: only for a folder that has a prescan table

        prescans[job] = prescan.read(job) if layout.prescan_files(job) else {}
    found = prescans[job].get(cell.id)
    return replace(cell, row={**cell.row, **found}) if found else cell


def _column_value(value: object) -> object:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _job_configs(stored: list) -> dict[Path, str]:
    """Each job folder's configuration, from its first readable cell."""
    configs: dict[Path, str] = {}
    for job, cell in stored:
        configs.setdefault(job, layout.config_key(cell.fingerprint))
    return configs


def _job_folders(folder: Path, nested: bool = True) -> list[Path]:
    """Folders a job ran in: Hydra's (.hydra/config.yaml) and any with a grid file, the folder itself included."""
    if not nested:
        return [folder]
    found = [p.parent.parent for p in folder.rglob("config.yaml") if p.parent.name == ".hydra"]
    found += [p.parent for p in folder.rglob("grid*.json") if p.parent.name != layout.CONTROL]
    return sorted(dict.fromkeys(found), key=layout.natural_order)


def _result(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in IGNORED and not (isinstance(v, float) and math.isnan(v))}


def _title(stored: list) -> str:
    rows = [cell.row for _, cell in stored]
    models = list(dict.fromkeys(str(r["model"]) for r in rows if r.get("model")))
    interventions = list(dict.fromkeys(str(r["intervention"]) for r in rows if r.get("intervention")))
    datasets = list(dict.fromkeys(
        f"{ds.get('name', '')} {ds.get('variable', '')}".strip()
        for _, cell in stored if isinstance(ds := cell.fingerprint.get("dataset"), dict)
    ))
    return " · ".join(part for part in (", ".join(models), ", ".join(interventions), ", ".join(datasets)) if part)


def _rel(folder: Path, path: Path) -> str:
    return "." if path == folder else str(path.relative_to(folder))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Merge every cells/*/metrics.json under FOLDER (a das-cli run, a multirun, shards) into "
        "FOLDER/iia.csv, pivots and heatmaps, and print the summary. Exit status: 0 all cells done, "
        "1 some cells failed or are missing, 2 a mistake.",
    )
    parser.add_argument("folder", help="a das-cli run folder or multirun sweep folder (hydra.sweep.dir)")
    parser.add_argument("--no-plots", action="store_true", help="skip the heatmap PNGs")
    args = parser.parse_args(argv)
    try:
        report = aggregate(args.folder, plots=not args.no_plots)
    except DasError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"{PROG}: error: {args.folder}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the cells are untouched; the tables are written atomically
        print(f"{PROG}: interrupted; no table was half-written, run it again", file=sys.stderr)
        sys.exit(130)
    print(report.text())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
