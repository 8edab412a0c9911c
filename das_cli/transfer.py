"""`from_run=<run folder>`: evaluate a finished run's saved interventions on other data, training nothing.

The run takes the source run's intervention (its config, from run.json) and its finished cells as the
grid; a grid key given on the command line (`layers=`, `positions=`, `stream=`, `heads=`) keeps
only the source cells it names. Each cell's intervention is rebuilt from the source cell's tensors
(artefacts.load_cell) and frozen: it is neither trained nor re-estimated (`steps` 0).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from . import config as C
from . import folder as layout
from . import grid
from .artefacts import LoadedCell, load_cell
from .errors import ConfigWarning, DasError
from .grid import Cell
from .sites import head_counts

GRID_KEYS = ("stream", "layers", "positions", "heads")


def source_folder(cfg: DictConfig) -> Path:
    folder = Path(str(cfg.from_run)).expanduser()
    if not layout.run_file(folder).is_file():
        raise DasError(f"from_run={cfg.from_run}: not a das-cli run folder (no {layout.RUN_FILE})")
    return folder


def configure(cfg: DictConfig) -> tuple[DictConfig, list[str]]:
    """The config with the source run's intervention; the grid keys left at their defaults are dropped from
    narrowing (`narrowed` records the ones given)."""
    folder = source_folder(cfg)
    fingerprint = layout.read_run_fingerprint(folder)
    if fingerprint is None or "intervention" not in fingerprint:
        raise DasError(f"from_run={cfg.from_run}: {layout.RUN_FILE} is damaged; the run's intervention is unknown")
    defaults = OmegaConf.load(C.conf_dir() / "config.yaml")
    out = cfg.copy()
    with open_dict(out):
        out.intervention = fingerprint["intervention"]
        out.from_run = str(folder.resolve())
    narrowed = [k for k in GRID_KEYS if OmegaConf.to_container(out)[k] != OmegaConf.to_container(defaults)[k]]
    return out, narrowed


def cells(cfg: DictConfig, lm, narrowed: list[str]) -> dict[Cell, LoadedCell]:
    """The source run's finished cells (narrowed by the grid keys given), each with its rebuilt intervention."""
    folder = source_folder(cfg)
    wanted = {
        "stream": lambda c: c.stream in grid.streams(cfg),
        "layers": lambda c: c.layer in grid.layers(cfg, lm.n_layers),
        "positions": lambda c: tuple(c.position) in grid.positions(cfg),
        "heads": lambda c: c.heads is None or c.heads in grid.head_sets(cfg, head_counts(lm, c.stream)[0]),
    }
    found: dict[Cell, LoadedCell] = {}
    for cell_id in layout.cell_folders(folder):
        stored = layout.read_cell(folder, cell_id, verify=False)
        if stored is None or stored.damaged:
            why = stored.problem if stored else f"it has no {layout.METRICS} (it never finished)"
            warnings.warn(f"from_run={folder}: cell {cell_id} is left out: {why}", ConfigWarning)
            continue
        if stored.failed:  # failed in the source run: there is nothing to evaluate
            continue
        try:
            loaded = load_cell(layout.cell_dir(folder, cell_id))
        except DasError as e:  # its subspace missing, damaged, not finite, of the wrong shape
            warnings.warn(f"from_run={folder}: cell {cell_id} is left out: {e}", ConfigWarning)
            continue
        seed = int(loaded.row.get("seed", cfg.seed))
        cell = Cell(loaded.stream, loaded.layer, loaded.positions, loaded.heads, None if seed == int(cfg.seed) else seed)
        if all(wanted[k](cell) for k in narrowed):
            found[cell] = loaded  # load_cell froze its intervention: neither trained nor re-estimated
    found = dict(sorted(found.items(), key=lambda item: _order(item[0])))
    if not found:
        given = " ".join(f"{k}={OmegaConf.to_container(cfg)[k]}" for k in narrowed)
        raise DasError(f"from_run={cfg.from_run}: no finished cell{' matches ' + given if given else ''}")
    names = {c.artefact["model"]["name"] for c in found.values()}
    if names != {lm.name}:
        warnings.warn(f"from_run: the cells were trained on model={', '.join(sorted(names))}; evaluating them on model={lm.name}",
                      C.ConfigWarning)
    return found


def check_widths(found: dict[Cell, LoadedCell], sites: dict) -> None:
    """Every cell's saved width must be the width of its site in this model (one line naming the cell)."""
    for cell, loaded in found.items():
        site = sites[(cell.stream, cell.layer, cell.heads)]
        width = site.width * len(cell.position)
        if width != loaded.width:
            raise DasError(f"from_run: cell {cell.id} was trained on width {loaded.width}; its site here is {width} wide")


def _order(cell: Cell) -> tuple:
    """Cells of one site next to each other (the sweep reads a site's sources once for all its cells)."""
    return (cell.stream, cell.layer, cell.heads or (), cell.position_label, cell.replicate or 0)


def provenance(cfg: DictConfig) -> dict:
    """What the fingerprint adds: the source run and its configuration."""
    folder = source_folder(cfg)
    return {"trained_in": str(folder.resolve()), "source": json.dumps(layout.read_run_fingerprint(folder), sort_keys=True)}
