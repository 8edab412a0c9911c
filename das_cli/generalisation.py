"""The transfer table: how each cell's learned subspace does on datasets other than the one it was trained on.

Written by `das-cli-report` (and at the end of a `from_run=` run) when the cells read hold from_run
evaluations (rows with `trained_in`): `transfer.csv`, long form (cell, trained_on, tested_on, iia,
iia_lo, iia_hi, n_test), `transfer.png` (one trained-on x tested-on heatmap per cell) and a printed
matrix for the best cell.

What must not be mixed is kept apart by identity, not by name:
- a row (trained_on) is one source configuration, the run fingerprint the evaluation recorded from its
  source; two source runs of different configurations are two rows, named by their dataset and, when two
  share that name, by their folder;
- a column (tested_on) is one evaluation setting: the run fingerprint without its training, intervention
  and provenance parts, which a frozen evaluation does not use; so the dataset's config and its pairs'
  content hash, the model, device, dtype, eval batch. A file dataset is named by its path; settings that
  share a name are told apart by the keys that differ (`ioi (seed=7)`).
The diagonal (a source run on its own dataset) is the source run's own rows: those among the cells read,
else those in the source folder (`trained_in`) when it is still there; a from_run evaluation on the
source's own setting stands in only for cells the source rows lack.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import folder as layout
from .files import atomic_write
from .results import draw_heatmap, results_frame, selectable, selection_score

COLUMNS = ["cell", "trained_on", "tested_on", "iia", "iia_lo", "iia_hi", "n_test"]
NOT_EVALUATION = ("train", "intervention", "trained_in", "source")  # fingerprint parts a frozen evaluation does not use
SHOWN_KEYS = 3  # at most this many differing keys in a label


@dataclass
class Entry:
    """One value of the table: a cell's row, trained under `source`, tested under `tested` (both identity keys)."""

    source: str
    tested: str
    row: dict


@dataclass
class Transfer:
    frame: pd.DataFrame  # COLUMNS, one row per (cell, trained_on, tested_on)
    text: str


def is_evaluation(row: dict) -> bool:
    """A from_run evaluation's row (it names the run its subspace was trained in)."""
    value = row.get("trained_in")
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) != ""


def write(stored: list, folder: Path, plots: bool = True) -> Transfer | None:
    """transfer.csv (and transfer.png) in `folder` from `stored`, the (job folder, StoredCell) pairs a report
    read; None (nothing written) when none of them is a from_run evaluation."""
    evaluations = [cell for _, cell in stored if is_evaluation(cell.row) and "source" in cell.fingerprint]
    if not evaluations:
        return None
    sources, homes, entries = _evaluations(evaluations)
    own = _own_rows(stored, sources, homes)
    entries = _diagonal(own, sources) + [e for e in entries if (e.source, e.row["cell"]) not in own
                                         or e.tested != _evaluation_key(sources[e.source])]
    tested = list(dict.fromkeys([_evaluation_key(s) for s in sources.values()] + [e.tested for e in entries]))
    names = labels(tested)
    rows = _row_labels(sources, homes, names, folder)
    frame = _frame(entries, rows, names, tested)
    atomic_write(layout.table_file(folder, layout.TRANSFER_TABLE), lambda tmp: frame.to_csv(tmp, index=False))
    if plots:
        plot(frame, layout.table_file(folder, layout.TRANSFER_PLOT))
    chosen = _best_cells(own, rows)
    return Transfer(frame, summary(frame, chosen, bool(own)))


def _evaluations(cells: list) -> tuple[dict[str, dict], dict[str, list[Path]], list[Entry]]:
    """The source configurations (key -> fingerprint), their folders, and one entry per evaluated cell."""
    sources: dict[str, dict] = {}
    homes: dict[str, list[Path]] = {}
    entries = []
    for cell in cells:
        source, home = _origin(cell.fingerprint)
        key = layout.config_key(source)
        sources.setdefault(key, source)
        homes.setdefault(key, [])
        if home not in homes[key]:
            homes[key].append(home)
        entries.append(Entry(key, _evaluation_key(cell.fingerprint), cell.row))
    return sources, homes, entries


def _origin(fingerprint: dict) -> tuple[dict, Path]:
    """The configuration and folder of the run that trained the cell (followed through evaluations of evaluations)."""
    source, home = json.loads(fingerprint["source"]), fingerprint["trained_in"]
    while "source" in source:
        source, home = json.loads(source["source"]), source["trained_in"]
    return source, Path(home)


def _evaluation_key(fingerprint: dict) -> str:
    return json.dumps({k: v for k, v in layout.without_seed(fingerprint).items() if k not in NOT_EVALUATION},
                      sort_keys=True)


def _own_rows(stored: list, sources: dict[str, dict], homes: dict[str, list[Path]]) -> dict[tuple[str, str], dict]:
    """(source key, cell id) -> the source run's own finished row: from the cells read, else from its folder."""
    own: dict[tuple[str, str], dict] = {}
    candidates = [cell for _, cell in stored]
    for key, folders in homes.items():
        for home in folders:
            candidates += [layout.read_cell(home, cell_id) for cell_id in layout.cell_ids(home)]
    for cell in candidates:
        if cell is None or cell.damaged or cell.failed or is_evaluation(cell.row):
            continue
        key = layout.config_key(cell.fingerprint)
        if key in sources:
            own.setdefault((key, cell.id), cell.row)
    return own


def _diagonal(own: dict[tuple[str, str], dict], sources: dict[str, dict]) -> list[Entry]:
    return [Entry(key, _evaluation_key(sources[key]), row) for (key, _), row in own.items()]


def _frame(entries: list[Entry], rows: dict[str, str], names: dict[str, str], tested: list[str]) -> pd.DataFrame:
    """The long table, cells in grid order (stream, heads, layer, position), then trained_on, tested_on."""
    cell_order = list(dict.fromkeys(results_frame([e.row for e in entries])["cell"]))
    records, seen = [], set()
    for e in entries:
        if (e.source, e.tested, e.row["cell"]) in seen:
            continue
        seen.add((e.source, e.tested, e.row["cell"]))
        records.append({"cell": e.row["cell"], "trained_on": rows[e.source], "tested_on": names[e.tested],
                        **{k: e.row.get(k, math.nan) for k in COLUMNS[3:]}})
    frame = pd.DataFrame(records, columns=COLUMNS)
    order = {"cell": cell_order, "trained_on": list(rows.values()), "tested_on": [names[k] for k in tested]}
    key = {c: frame[c].map({v: i for i, v in enumerate(values)}) for c, values in order.items()}
    frame = frame.iloc[pd.DataFrame(key).sort_values(list(order), kind="stable").index].reset_index(drop=True)
    frame["n_test"] = frame["n_test"].astype("Int64")
    return frame


def labels(keys: list[str]) -> dict[str, str]:
    """A short name per evaluation setting: its dataset's name (a file dataset's path), followed by the keys
    that tell apart the settings of one name, e.g. `ioi (seed=7)`."""
    configs = {k: json.loads(k) for k in keys}
    base = {k: _dataset_name(configs[k].get("dataset") or {}) for k in keys}
    names = {}
    for name in dict.fromkeys(base.values()):
        same = [k for k in keys if base[k] == name]
        changed = layout.changed_keys(*[configs[k] for k in same]) if len(same) > 1 else []
        shown = ([c for c in changed if c != "data"] or changed)[:SHOWN_KEYS]
        for k in same:
            flat = layout.flatten(configs[k])
            parts = [f"{c.removeprefix('dataset.')}={_short(flat.get(c))}" for c in shown]
            names[k] = f"{name} ({', '.join(parts)})" if parts else name
    if len(set(names.values())) < len(names):  # more keys differ than are shown: number the settings
        names = {k: f"{v} #{i + 1}" for i, (k, v) in enumerate(names.items())}
    return names


def _dataset_name(dataset: dict) -> str:
    return str(dataset.get("path")) if dataset.get("name") == "file" else str(dataset.get("name", "?"))


def _short(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:8] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text  # a sha256


def _row_labels(sources: dict[str, dict], homes: dict[str, list[Path]], names: dict[str, str], folder: Path) -> dict[str, str]:
    """Each source configuration's name: the label of its own dataset, and its folder when two share that."""
    rows = {key: names[_evaluation_key(source)] for key, source in sources.items()}
    clash = {label for label in rows.values() if list(rows.values()).count(label) > 1}
    rows = {key: f"{label} @ {_where(homes[key], folder)}" if label in clash else label for key, label in rows.items()}
    if len(set(rows.values())) < len(rows):  # one folder has held two configurations: number them
        rows = {key: f"{label} #{i + 1}" for i, (key, label) in enumerate(rows.items())}
    return rows


def _where(folders: list[Path], folder: Path) -> str:
    """The source folder, relative to the report's folder or the working directory when inside it."""
    path = folders[0].resolve()
    for base in (Path(folder).resolve(), Path.cwd()):
        if path.is_relative_to(base):
            path = Path(os.path.relpath(path, base))
            break
    return str(path) + (f" +{len(folders) - 1}" if len(folders) > 1 else "")


def _best_cells(own: dict[tuple[str, str], dict], names: dict[str, str]) -> list[tuple[str, str]]:
    """Per source run with rows, (its best cell, how it was chosen): validation IIA, else training IIA
    (results.selection_score), on the source's own rows; never on a tested_on dataset."""
    chosen = []
    for key in names:
        rows = results_frame([row for (k, _), row in own.items() if k == key])
        if rows.empty:
            continue
        column, name = selection_score(rows)
        scores = selectable(rows, column)
        if scores.notna().any():
            best = rows.loc[scores.idxmax()]
            chosen.append((str(best["cell"]), f"best cell of {names[key]} on {name} IIA {scores.max():.2f}"))
    return chosen


def matrix(frame: pd.DataFrame, cell: str, value: str = "iia") -> pd.DataFrame:
    """One cell's trained_on (rows) x tested_on (columns) table of `value`, in the frame's order."""
    part = frame[frame["cell"] == cell]
    table = part.pivot(index="trained_on", columns="tested_on", values=value)
    return table.reindex(index=list(dict.fromkeys(part["trained_on"])),
                         columns=[c for c in dict.fromkeys(frame["tested_on"]) if c in set(part["tested_on"])])


def summary(frame: pd.DataFrame, chosen: list[tuple[str, str]], with_sources: bool) -> str:
    """The transfer matrix of each chosen cell as text, with the number of test pairs per column."""
    cells = frame["cell"].nunique()
    lines = [f"transfer: test IIA of {cells} cell{'s' if cells != 1 else ''}, trained on (rows) x tested on (columns); "
             f"{len(frame)} values in {layout.TRANSFER_TABLE}"]
    if not with_sources:
        lines.append("  the source runs' own rows were not found (source folders moved?): no diagonal, no cell chosen")
    for cell in dict.fromkeys(c for c, _ in chosen):
        how = "; ".join(why for c, why in chosen if c == cell)
        table = matrix(frame, cell).map(lambda v: "—" if pd.isna(v) else f"{v:.2f}")
        counts = matrix(frame, cell, "n_test")
        table.loc["n_test"] = [_count(counts[c]) for c in table.columns]
        table.index.name, table.columns.name = None, None
        lines += ["", f"{cell} ({how})", table.to_string()]
    return "\n".join(lines)


def _count(values: pd.Series) -> str:
    numbers = sorted({int(v) for v in values.dropna()})
    return "—" if not numbers else str(numbers[0]) if len(numbers) == 1 else f"{numbers[0]}-{numbers[-1]}"


def plot(frame: pd.DataFrame, path: Path) -> None:
    """One heatmap per cell (rows trained on, columns tested on; test IIA with its 95% interval) in one figure."""
    from matplotlib.figure import Figure

    cells = list(dict.fromkeys(frame["cell"]))
    n_cols = min(len(cells), 3)
    n_rows = math.ceil(len(cells) / n_cols)
    n_trained, n_tested = frame["trained_on"].nunique(), frame["tested_on"].nunique()
    fig = Figure(figsize=(n_cols * (2.8 + 1.3 * n_tested), n_rows * (1.6 + 0.55 * n_trained) + 0.4),
                 layout="constrained")
    image = None
    for k, cell in enumerate(cells):
        ax = fig.add_subplot(n_rows, n_cols, k + 1)
        interval = (matrix(frame, cell, "iia_lo"), matrix(frame, cell, "iia_hi"))
        image = draw_heatmap(ax, matrix(frame, cell), interval=interval, xlabel="tested on", ylabel="trained on")
        ax.tick_params(axis="x", labelrotation=20)
        ax.set_title(cell, fontsize=8)
    fig.colorbar(image, ax=fig.axes, label="test IIA")
    fig.suptitle("transfer: test IIA of each cell's subspace", fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
