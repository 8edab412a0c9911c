"""The grid: one Cell per stream x layer x head set x position x seed, and how shards split it.

A cell's id names it on disk (cells/<id>/) and, with its seed, seeds it: a cell gives the same result
whatever else the sweep holds, alone, in a shard or in one job, and whether its seed came from
`seed` or from `seeds` (seed 0 of `seeds=2` is the cell `seed=0` runs, under the same id).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from . import config as C
from .data import position_label
from .files import atomic_write_json
from .folder import grid_file
from .models import LoadedModel
from .sites import HEAD_STREAMS, head_counts, site_key


@dataclass(frozen=True)
class Cell:
    stream: str
    layer: int
    position: tuple[int | str, ...]
    heads: tuple[int, ...] | None
    replicate: int | None = None  # the cell's seed (None: the run's `seed`)

    @property
    def position_label(self) -> str:
        return position_label(self.position)

    @property
    def heads_label(self) -> str:
        return "" if self.heads is None else "+".join(map(str, self.heads))

    @property
    def site_id(self) -> str:
        heads = f"__H{self.heads_label}" if self.heads is not None else ""
        return f"{self.stream}__L{self.layer:02d}__P{self.position_label}{heads}"

    @property
    def id(self) -> str:
        """The site id, plus __S<seed> for a seed other than 0 (one id per cell and seed, however asked for)."""
        return self.site_id + (f"__S{self.replicate}" if self.replicate else "")

    def run_seed(self, run_seed: int) -> int:
        """The seed this cell reports: its replicate's, else the run's."""
        return run_seed if self.replicate is None else self.replicate

    def seed(self, run_seed: int) -> int:
        """Derived from the run seed and the cell alone: a cell's result does not depend on what ran before."""
        digest = hashlib.sha256(f"{self.run_seed(run_seed)}|{self.site_id}".encode()).digest()
        return int.from_bytes(digest[:4], "little")


def expand_grid(cfg: DictConfig, lm: LoadedModel, rankings: dict | None = None) -> list[Cell]:
    """stream x layer x head set x position x seed, in that nesting order.

    With `heads=cumulative head_order=ranked`, head sets depend on single-head results: without
    `rankings` the grid holds the single-head cells; with them ((stream, layer, position) -> heads
    by descending IIA) it holds the cumulative cells.
    """
    ranked = cfg.heads == "cumulative" and cfg.head_order == "ranked"
    streams, positions = C.streams(cfg), C.positions(cfg)
    replicates = [int(cfg.seed) if seed is None else seed for seed in C.replicates(cfg)]
    cells = []
    for stream in streams:
        for layer in C.layers(cfg, lm.n_layers):
            for position in positions:
                ranking = (rankings or {}).get((stream, layer, position_label(position)))
                for heads in _stream_head_sets(cfg, lm, stream, ranked, ranking):
                    cells += [Cell(stream, layer, position, heads, seed) for seed in replicates]
    # cells of one site (stream, layer, head set) next to each other: their sources are read once
    return sorted(cells, key=lambda c: (streams.index(c.stream), c.layer, c.heads or (), positions.index(c.position),
                                        replicates.index(c.replicate)))


def _stream_head_sets(cfg: DictConfig, lm: LoadedModel, stream: str, ranked: bool, ranking: list[int] | None):
    if stream not in HEAD_STREAMS:
        return [None]
    n_heads = head_counts(lm, stream)[0]
    if ranked and ranking is None:
        return [(h,) for h in range(n_heads)]
    return C.head_sets(cfg, n_heads, ranking)


def head_rankings(rows: list[dict]) -> dict[tuple, list[int]]:
    """(stream, layer, position) -> heads by descending single-head validation IIA (training IIA where the
    run has no validation split; never test IIA), the mean over seeds (ties: lower head first)."""
    import pandas as pd

    from .results import selection_score

    score, _ = selection_score(pd.DataFrame(rows))
    singles: dict[tuple, dict[int, list[float]]] = {}
    for row in rows:
        heads = str(row.get("heads") or "")
        if heads and "+" not in heads and _number(row.get(score)):
            key = (row["stream"], row["layer"], row["position"])
            singles.setdefault(key, {}).setdefault(int(heads), []).append(row[score])
    return {
        key: [h for _, h in sorted((-sum(v) / len(v), h) for h, v in per_head.items())]
        for key, per_head in singles.items()
    }


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def write_grid(folder: Path, shard: int, num_shards: int, cells: list[Cell]) -> None:
    """The ids of the cells this job means to run, before it runs them: `das-cli-report` names
    cells listed here but finished nowhere (a job killed or timed out) as missing."""
    atomic_write_json(grid_file(folder, shard, num_shards), {"shard": shard, "num_shards": num_shards, "cells": [c.id for c in cells]})


def layer_key(cell: Cell) -> tuple:
    return (cell.stream, cell.layer)


def shard_cells(cells: list[Cell], shard: int, num_shards: int, unit=site_key, split_units: bool = True) -> list[Cell]:
    """The cells of shard `shard` (0-based) of `num_shards`, in grid order; the shards partition `cells`.

    Whole units (sites: stream, layer, head set) go round-robin in grid order: unit j -> shard
    j % num_shards, so every job reads a site's source activations once. With fewer units than
    shards (and `split_units`), the grid is cut instead into `num_shards` contiguous, nearly equal
    runs of cells (cells [shard*n//N, (shard+1)*n//N)), so a site spans at most a few neighbouring
    shards. Depends only on the grid and the two numbers: rerunning a shard gets the same cells.
    """
    if num_shards <= 1:
        return list(cells)
    units = list(dict.fromkeys(map(unit, cells)))
    if len(units) >= num_shards or not split_units:
        mine = set(units[shard::num_shards])
        return [c for c in cells if unit(c) in mine]
    return list(cells[shard * len(cells) // num_shards : (shard + 1) * len(cells) // num_shards])
