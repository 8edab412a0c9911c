"""Successive halving over the cells of a grid (`search=halving`; Jamieson and Talwalkar 2016, Li et al. 2017).

Every cell trains for the first rung's epochs; the cells are ranked by validation IIA (ties: the lower validation
loss first); the top 1/eta go on to the next rung, the others are written with what they have (`stopped` = the
rung, `epochs` = the epochs they had), and so on until the survivors reach the full schedule. A cell's schedule
is the full run's at every rung (its seed, its batches, the learning rate decaying over all `train.epochs`): it
pauses at a rung's end, checkpointed, and resumes from there, so a survivor ends where the full sweep's cell ends
(bit for bit trained one at a time; to the last bits in bundles, whose products over another set of rows round
differently). With `search.prescan_keep` < 1 only the prescan's top fraction of cells starts; the rest are
written untrained (`stopped` = 0, `epochs` = 0).

Rungs: with E = train.epochs, the largest R with min_epochs * eta^(R-1) <= E, rung i (1..R) ends at epoch
round(E / eta^(R-i)) (at least min_epochs): E=10, eta=3, min_epochs=1 gives 1, 3, 10. Each decision is written to
the folder (halving.csv) before the stopped cells are, so a run killed anywhere resumes to the same decisions.
Several seeds of one cell are ranked by their mean and kept or stopped together. Each shard halves its own cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from . import folder as layout
from .errors import DasError
from .files import atomic_write
from .grid import Cell

COLUMNS = ("rung", "epochs", "cell", "split", "iia", "loss", "kept")


@dataclass(frozen=True)
class Rung:
    """A rung of successive halving: train the live cells to `epochs` and pause them (or, with `finish`, write the
    cells stopped there)."""

    index: int  # 1-based
    epochs: int
    finish: bool = False


def rung_epochs(epochs: int, eta: int, min_epochs: int) -> list[int]:
    """The epoch at which each rung ends, the last being `epochs` (see the module doc)."""
    count = 1
    while min_epochs * eta ** count <= epochs:
        count += 1
    ends = [max(min_epochs, round(epochs / eta ** (count - 1 - i))) for i in range(count)]
    return sorted(set(ends[:-1] + [epochs]))


def cells_per_rung(cells: int, epochs: int, eta: int, min_epochs: int, keep: float = 1.0) -> list[tuple[int, int]]:
    """(cells trained, the epoch it ends at) per rung, for a grid of `cells` single-seed cells."""
    live = max(1, math.ceil(keep * cells)) if keep < 1 else cells
    out = []
    for end in rung_epochs(epochs, eta, min_epochs):
        out.append((live, end))
        live = kept_count(live, eta)
    return out


def epoch_share(cells: int, epochs: int, eta: int, min_epochs: int, keep: float = 1.0) -> float:
    """The share of the full sweep's cell-epochs that halving trains."""
    rungs, trained, before = cells_per_rung(cells, epochs, eta, min_epochs, keep), 0, 0
    for live, end in rungs:
        trained += live * (end - before)
        before = end
    return trained / max(1, cells * epochs)


def kept_count(live: int, eta: int) -> int:
    return max(1, math.ceil(live / eta))


def rank(scores: list[dict], cells: list[Cell], eta: int) -> list[Cell]:
    """The cells that go on: the top 1/eta of the cells' units (a cell and its other seeds), by mean rung IIA, ties
    by the lower mean rung loss, then grid order."""
    by_id = {s["cell"]: s for s in scores}
    units: dict[str, list[Cell]] = {}
    for cell in cells:
        units.setdefault(cell.site_id, []).append(cell)
    order = []
    for k, (unit, members) in enumerate(units.items()):
        found = [by_id[c.id] for c in members if c.id in by_id]
        if not found:
            continue
        iia = sum(s["iia"] for s in found) / len(found)
        loss = sum(s["loss"] for s in found) / len(found)
        order.append((-_finite(iia, -1.0), _finite(loss, math.inf), k, unit))
    kept = {unit for *_, unit in sorted(order)[: kept_count(len(order), eta)]}
    return [c for c in cells if c.site_id in kept]


def _finite(value: float, instead: float) -> float:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else instead


def start(cfg: DictConfig, cells: list[Cell], prescan: dict) -> tuple[list[Cell], list[Cell]]:
    """(the cells the first rung trains, those the prescan leaves untrained): the prescan's top
    `search.prescan_keep` of the units (all cells with prescan_keep = 1)."""
    keep = float(cfg.search.prescan_keep)
    if keep >= 1:
        return cells, []
    units = list(dict.fromkeys(c.site_id for c in cells))
    score = {c.site_id: prescan[c].score for c in cells if c in prescan}
    count = max(1, math.ceil(keep * len(units)))
    chosen = set(sorted(units, key=lambda u: (-score.get(u, -math.inf), units.index(u)))[:count])
    return [c for c in cells if c.site_id in chosen], [c for c in cells if c.site_id not in chosen]


def write_decision(folder: Path, shard: int, num_shards: int, rung: Rung, scores: list[dict], kept: list[Cell]) -> None:
    """Add a rung's scores and decision to the folder's halving table, atomically."""
    path = layout.halving_file(folder, shard, num_shards)
    table = read_table(path)
    ids = {c.id for c in kept}
    new = pd.DataFrame([{**{k: s[k] for k in ("cell", "split", "iia", "loss")}, "rung": rung.index, "epochs": rung.epochs,
                         "kept": s["cell"] in ids} for s in scores], columns=list(COLUMNS))
    table = pd.concat([table[table["rung"] != rung.index], new]) if len(table) else new
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


def read_table(path: Path) -> pd.DataFrame:
    """The halving table (empty when there is none yet); a damaged one is an error: its decisions cannot be
    made again once the cells it kept trained on."""
    if not path.exists():
        return pd.DataFrame(columns=list(COLUMNS))
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise DasError(f"{path}: unreadable ({e}); the rungs it decided cannot be decided again: use a new folder") from None
    if not set(COLUMNS) <= set(table.columns):
        raise DasError(f"{path}: not a halving table (columns {', '.join(COLUMNS)}); use a new folder")
    return table


def decided(table: pd.DataFrame, rung: Rung, live: list[Cell]) -> list[Cell] | None:
    """The cells a recorded decision of `rung` kept (None: not decided yet)."""
    rows = table[table["rung"] == rung.index]
    if rows.empty:
        return None
    kept = set(rows.loc[rows["kept"].astype(bool), "cell"])
    return [c for c in live if c.id in kept]
