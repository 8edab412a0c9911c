"""The grid: what the grid keys mean (stream, layers, positions, heads, seeds), one Cell per stream x layer x
head set x position x seed, and how shards split it. Imports neither torch nor transformers: the config's
validation reads the grid keys through here.

A cell's id names it on disk (cells/<id>/) and, with its seed, seeds it: a cell gives the same result
whatever else the sweep holds, alone, in a shard or in one job, and whether its seed came from
`seed` or from `seeds` (seed 0 of `seeds=2` is the cell `seed=0` runs, under the same id).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig

from .errors import ConfigWarning, DasError, shown
from .files import atomic_write_json
from .folder import grid_file
from .names import HEAD_STREAMS, ILLUSION_STREAMS, STREAMS

if TYPE_CHECKING:
    from .models import LoadedModel

HEAD_MODES = ("each", "leave_one_out", "cumulative")
SiteKey = tuple  # (stream, layer, heads)


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


def expand_grid(cfg: DictConfig, lm: "LoadedModel", rankings: dict | None = None) -> list[Cell]:
    """stream x layer x head set x position x seed, in that nesting order.

    With `heads=cumulative head_order=ranked`, head sets depend on single-head results: without
    `rankings` the grid holds the single-head cells; with them ((stream, layer, position) -> heads
    by descending IIA) it holds the cumulative cells.
    """
    ranked = cfg.heads == "cumulative" and cfg.head_order == "ranked"
    stream_list, position_list = streams(cfg), positions(cfg)
    seeds = [int(cfg.seed) if seed is None else seed for seed in replicates(cfg)]
    cells = []
    for stream in stream_list:
        for layer in layers(cfg, lm.n_layers):
            for position in position_list:
                ranking = (rankings or {}).get((stream, layer, position_label(position)))
                for heads in _stream_head_sets(cfg, lm, stream, ranked, ranking):
                    cells += [Cell(stream, layer, position, heads, seed) for seed in seeds]
    # cells of one site (stream, layer, head set) next to each other: their sources are read once
    return sorted(cells, key=lambda c: (stream_list.index(c.stream), c.layer, c.heads or (), position_list.index(c.position),
                                        seeds.index(c.replicate)))


def _stream_head_sets(cfg: DictConfig, lm: "LoadedModel", stream: str, ranked: bool, ranking: list[int] | None):
    if stream not in HEAD_STREAMS:
        return [None]
    from .sites import head_counts  # the model's head counts; sites imports torch, which validation does without

    n_heads = head_counts(lm, stream)[0]
    if ranked and ranking is None:
        return [(h,) for h in range(n_heads)]
    return head_sets(cfg, n_heads, ranking)


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


def position_label(position: tuple[int | str, ...]) -> str:
    return "+".join(str(p) for p in position)


def site_key(of: object) -> SiteKey:
    """What names a site: (stream, layer, heads), of a Site or of a grid cell (cells of one site share it)."""
    return (of.stream, of.layer, of.heads)


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


# ---- what the grid keys mean ----

def errors(cfg: DictConfig) -> list[str]:
    """Every problem with the grid keys (stream, layers, positions, heads, head_order, seeds, shards, and
    analysis.illusion's streams) that needs no model."""
    problems = []
    for check in (streams, positions, lambda c: head_sets(c, n_heads=None)):
        try:
            check(cfg)
        except DasError as e:
            problems.append(str(e))
    if cfg.heads is not None and not any(s in HEAD_STREAMS for s in _items(cfg.stream)):
        problems.append(f"heads: set, but no stream is head-level; head-level streams: {', '.join(HEAD_STREAMS)}")
    problems += _head_order_errors(cfg)
    value = cfg.layers
    if not (value == "all" or _is_int(value) or _is_list_of(value, _is_int)):
        problems.append(f"layers={shown(value)}: must be a non-empty list of layer indices (integers), or all")
    if cfg.analysis.illusion and not any(s in ILLUSION_STREAMS for s in _items(cfg.stream)):
        problems.append(f"analysis.illusion=true: applies to the streams {', '.join(ILLUSION_STREAMS)}; stream={shown(cfg.stream)} has none")
    return problems + _seeds_errors(cfg.seeds) + shard_errors(cfg.sweep.shard, cfg.sweep.num_shards)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # true is not layer 1


def _is_list_of(value: Any, check) -> bool:
    return isinstance(value, (list, ListConfig)) and len(value) > 0 and all(check(v) for v in value)


def _items(value: Any) -> list:
    return list(value) if isinstance(value, (list, ListConfig)) else [value]


def _unique(key: str, items: list, detail: str = "", same=lambda item: item) -> list:
    """`items` without repeats (items alike under `same` are one; the first is kept); a repeat would train the same
    cell again and pass for another seed."""
    firsts: dict = {}
    for item in items:
        firsts.setdefault(same(item), item)
    unique = list(firsts.values())
    if len(unique) < len(items):
        repeated = [shown(list(i) if isinstance(i, tuple) and len(i) > 1 else i[0] if isinstance(i, tuple) else i)
                    for i in unique if sum(same(j) == same(i) for j in items) > 1]
        warnings.warn(f"{key}: {', '.join(repeated)} given more than once{detail}; each cell runs once", ConfigWarning)
    return unique


def streams(cfg: DictConfig) -> list[str]:
    value = _items(cfg.stream)
    if not value:
        raise DasError(f"stream=[]: give at least one stream; valid choices: {', '.join(STREAMS)}")
    bad = [s for s in value if s not in STREAMS]
    if bad:
        raise DasError(f"stream={shown(bad[0])}: unknown stream; valid choices: {', '.join(STREAMS)}")
    return _unique("stream", [str(s) for s in value])


def layers(cfg: DictConfig, n_layers: int) -> list[int]:
    """The layer list; every index checked against the model; negative indices count from the end."""
    value = cfg.layers
    chosen = list(range(n_layers)) if value == "all" else _items(value)
    bad = [layer for layer in chosen if not -n_layers <= layer < n_layers]
    if bad:
        raise DasError(f"layers: {bad} out of range for a {n_layers}-layer model; valid layers: 0..{n_layers - 1} or 'all'")
    return _unique("layers", [layer % n_layers for layer in chosen], f" (negative indices count from the end of {n_layers} layers)")


def _position_item(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DasError(f"positions: {shown(value)} is neither a token index nor a position name")
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def positions(cfg: DictConfig) -> list[tuple[int | str, ...]]:
    """One tuple per cell; a nested list is one cell spanning several tokens (a joint subspace)."""
    items = _items(cfg.positions)
    if not items:
        raise DasError("positions: empty; give at least one position, e.g. positions=[last]")
    out = []
    for item in items:
        group = _items(item)
        if not group:
            raise DasError("positions: an empty nested list; each cell needs at least one position")
        out.append(tuple(_position_item(v) for v in group))
    return _unique("positions", out)


def head_sets(cfg: DictConfig, n_heads: int | None, ranking: list[int] | None = None) -> list[tuple[int, ...] | None]:
    """The head sets of one head-level stream with `n_heads` heads, one per cell (n_heads=None: check only).

    null: all heads together; [0,3]: one set; [[0],[1,2]]: several sets; `each`: one cell per head;
    `leave_one_out`: all heads but one, for each head; `cumulative`: the first 1, 2, ... heads of
    `head_order` (a list, or `ranked` = by single-head IIA, passed here as `ranking`).
    """
    value = cfg.heads
    if value is None:
        return [None]
    if isinstance(value, str):
        if value not in HEAD_MODES:
            raise DasError(f"heads={value}: valid choices: null, a list of heads, a list of lists, {', '.join(HEAD_MODES)}")
        return [] if n_heads is None else _head_mode(cfg, value, n_heads, ranking)
    items = _items(value)
    if _is_list_of(items, _is_int):
        return [tuple(items)]
    if not _is_list_of(items, lambda v: _is_int(v) or _is_list_of(v, _is_int)):
        raise DasError(f"heads={shown(value)}: give a non-empty list of heads (integers) or of non-empty lists of heads, "
                       f"or one of null, {', '.join(HEAD_MODES)}")
    sets = [tuple(v) if isinstance(v, (list, ListConfig)) else (v,) for v in items]
    return _unique("heads", sets, " (a head set is a set: its order does not make another cell)", same=frozenset)


def _head_mode(cfg: DictConfig, mode: str, n_heads: int, ranking: list[int] | None) -> list[tuple[int, ...]]:
    if mode == "each":
        return [(h,) for h in range(n_heads)]
    if mode == "leave_one_out":
        return [tuple(x for x in range(n_heads) if x != h) for h in range(n_heads)]
    order = ranking if cfg.head_order == "ranked" else list(cfg.head_order or range(n_heads))
    return [tuple(order[: i + 1]) for i in range(len(order))]


def _head_order_errors(cfg: DictConfig) -> list[str]:
    value, order = cfg.heads, cfg.head_order
    errors = []
    if order is not None and value != "cumulative":
        errors.append(f"head_order: only used with heads=cumulative (heads={shown(value)})")
    if order is not None and order != "ranked" and not (_is_list_of(order, _is_int) and len(set(order)) == len(order)):
        errors.append(f"head_order={shown(order)}: valid choices: null, a list of distinct heads, ranked")
    return errors


def _seeds_errors(value: Any) -> list[str]:
    if value is None or (_is_int(value) and value >= 1):
        return []
    if _is_list_of(value, _is_int) and len(set(value)) == len(value):
        return []
    return [f"seeds={shown(value)}: give a number of seeds (>= 1, counted up from `seed`) or a list of distinct integer seeds"]


def replicates(cfg: DictConfig) -> list[int | None]:
    """The seeds every cell runs with: [None] (just `seed`) unless `seeds` asks for several."""
    value = cfg.seeds
    if value is None:
        return [None]
    if isinstance(value, int):
        return list(range(int(cfg.seed), int(cfg.seed) + value))
    return [int(v) for v in value]


def shard_errors(shard: int, num_shards: int) -> list[str]:
    """`sweep.shard` must name one of the `sweep.num_shards` shards."""
    if num_shards < 1:
        return [f"sweep.num_shards={num_shards}: must be >= 1"]
    if not 0 <= shard < num_shards:
        return [f"sweep.shard={shard}: must be in 0..{num_shards - 1} (sweep.num_shards={num_shards})"]
    return []
