"""`das-cli-report <folder>`: one table for a whole sweep, however many jobs ran it.

Reads every `cells/<cell-id>/metrics.json` under the folder, at any depth (a multirun's job
subfolders, several shards, or one run folder), keeps one row per cell id and writes `iia.csv`,
the pivots and heatmaps into the folder (`results.write_results`), then prints the summary.

Rules:
- every job folder (the one holding `cells/`) must come from one configuration (`run.json`
  fingerprint: model, dataset, intervention, train, seed, dtype); a sweep over such keys
  (`-m train.lr=0.01,0.1`) gives incomparable tables: report each job folder on its own;
- a cell id found in several job folders must carry the same numbers there (wall-clock
  `seconds` aside); identical duplicates are kept once, different ones are an error;
- a job writes the ids of its cells (`grid*.json`) before training; cells listed there but found
  nowhere are reported as missing (a job killed, timed out, or still running), failed cells are
  listed with their error. Either makes the exit status 1; mistakes exit 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import DasError
from .results import format_summary, write_results

PROG = "das-cli-report"
IGNORED = ("seconds",)  # differs between two runs of the same cell; not a result


class MixedConfigs(DasError):
    """The folder holds job folders of different configurations: no single table is meaningful."""


@dataclass
class Report:
    folder: Path
    frame: pd.DataFrame
    jobs: list[Path]  # folders holding cells/, in order
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell id, error)
    missing: list[str] = field(default_factory=list)  # cell ids some job meant to run, found nowhere
    not_started: list[Path] = field(default_factory=list)  # job folders (Hydra's .hydra/) that wrote no grid

    @property
    def ok(self) -> bool:
        return not (self.failed or self.missing or self.not_started)

    def text(self) -> str:
        lines = [format_summary(self.frame), ""]
        jobs = f"{len(self.jobs)} job folder{'s' if len(self.jobs) != 1 else ''}"
        lines.append(f"{len(self.frame)} cells from {jobs}; {len(self.failed)} failed, {len(self.missing)} missing")
        for cell, error in self.failed:
            lines.append(f"  failed  {cell}: {error}")
        for cell in self.missing[:20]:
            lines.append(f"  missing {cell}")
        if len(self.missing) > 20:
            lines.append(f"  ... and {len(self.missing) - 20} more missing")
        for job in self.not_started:
            lines.append(f"  job {self._rel(job)} ran no cell (failed before its grid; see its log)")
        lines.append(f"results: {self.folder.resolve()}")
        return "\n".join(lines)

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.folder)) if path != self.folder else "."


def aggregate(folder: str | Path, plots: bool = True) -> Report:
    """Merge every cell under `folder` into folder/iia.csv (+ pivots, heatmaps); see the module doc."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DasError(f"{folder}: no such folder")
    paths = sorted((p for p in folder.rglob("metrics.json") if p.parent.parent.name == "cells"), key=_natural)
    if not paths:
        raise DasError(f"{folder}: no cells/*/metrics.json under this folder (is it a das-cli run or multirun folder?)")
    jobs = list(dict.fromkeys(p.parent.parent.parent for p in paths))
    _check_one_configuration(folder, jobs)
    grids = {job: _grid(job) for job in jobs}
    rows: dict[str, dict] = {}
    where: dict[str, Path] = {}
    order: dict[str, tuple] = {}
    for path in paths:
        job = path.parent.parent.parent
        row = json.loads(path.read_text())
        cell = str(row.get("cell") or path.parent.name)
        if cell in rows:
            if _result(rows[cell]) != _result(row):
                raise DasError(
                    f"cell {cell}: different results in {_rel(folder, where[cell])} and {_rel(folder, job)} "
                    f"(iia {rows[cell].get('iia')} vs {row.get('iia')}); two jobs ran the same cell, "
                    "check sweep.shard / sweep.num_shards and the layer chunks"
                )
            continue
        rows[cell], where[cell] = row, job
        position = grids[job].index(cell) if cell in grids[job] else len(grids[job])
        order[cell] = (jobs.index(job), position, cell)
    ordered = [rows[c] for c in sorted(rows, key=order.get)]
    frame = write_results(ordered, folder, _title(folder, jobs, ordered), plots=plots)
    failed = [(r["cell"], str(r["error"])) for r in ordered if _is_error(r.get("error"))]
    others = [j for j in _job_folders(folder) if j not in grids]  # jobs that finished no cell
    expected = dict.fromkeys(c for job in jobs + others for c in (grids[job] if job in grids else _grid(job)))
    missing = [c for c in expected if c not in rows]
    not_started = [j for j in others if not _grid_files(j)]
    return Report(folder, frame, jobs, failed, missing, not_started)


def _check_one_configuration(folder: Path, jobs: list[Path]) -> None:
    prints = {}
    for job in jobs:
        path = job / "run.json"
        if path.exists():
            prints[job] = json.loads(path.read_text()).get("fingerprint", {})
    if len(prints) < 2:
        return
    first_job, first = next(iter(prints.items()))
    for job, other in prints.items():
        changed = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if changed:
            raise MixedConfigs(
                f"{folder}: job folders {_rel(folder, first_job)} and {_rel(folder, job)} ran different "
                f"configurations (changed: {', '.join(changed)}); run {PROG} on each job folder"
            )


def _grid_files(job: Path) -> list[Path]:
    return sorted(job.glob("grid*.json"))


def _grid(job: Path) -> list[str]:
    """The cell ids the job(s) that ran in this folder meant to run, in grid order."""
    ids: list[str] = []
    for path in _grid_files(job):
        try:
            ids += json.loads(path.read_text()).get("cells", [])
        except (OSError, ValueError):
            continue
    return list(dict.fromkeys(ids))


def _job_folders(folder: Path) -> list[Path]:
    """Folders a job ran in: Hydra's (.hydra/config.yaml) and any with a grid file, the folder itself included."""
    found = [p.parent.parent for p in folder.rglob("config.yaml") if p.parent.name == ".hydra"]
    found += [p.parent for p in folder.rglob("grid*.json")]
    return sorted(dict.fromkeys(found), key=_natural)


def _result(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in IGNORED and not (isinstance(v, float) and math.isnan(v))}


def _is_error(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) != ""


def _title(folder: Path, jobs: list[Path], rows: list[dict]) -> str:
    models = list(dict.fromkeys(str(r["model"]) for r in rows if r.get("model")))
    interventions = list(dict.fromkeys(str(r["intervention"]) for r in rows if r.get("intervention")))
    dataset = ""
    for job in jobs:
        path = job / "run.json"
        if path.exists():
            ds = json.loads(path.read_text()).get("fingerprint", {}).get("dataset") or {}
            dataset = f"{ds.get('name', '')} {ds.get('variable', '')}".strip()
            break
    return " · ".join(part for part in (", ".join(models), ", ".join(interventions), dataset) if part)


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


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
    print(report.text())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
