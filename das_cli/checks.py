"""What is checked once the model and the data are known, before the first cell: every position exists in
every prompt, the intervention fits every cell's width, from_run's cells fit this model; and the run's
fingerprint, which decides whether the folder's finished cells can be reused."""

from __future__ import annotations

from omegaconf import DictConfig

from . import config as C
from . import folder as layout
from . import transfer
from .data import PairSet, resolve_positions
from .datasets import source_file
from .errors import DasError
from .grid import Cell
from .interventions import build_intervention, method
from .models import LoadedModel
from .grid import site_key
from .sites import Site

def check_cells(cfg: DictConfig, cells: list[Cell], sites: dict[tuple, Site], pairs: dict[str, PairSet],
                loaded: dict | None) -> None:
    """Every model-dependent check of the grid, in the order a user would fix them."""
    if loaded:
        transfer.check_widths(loaded, sites)
    check_positions(cells, *pairs.values())
    check_intervention(cfg, cells, sites)

def check_positions(cells: list[Cell], *pair_sets: PairSet) -> None:
    """Fail before any training if some position does not exist in some prompt."""
    for position in dict.fromkeys(c.position for c in cells):
        for pairs in pair_sets:
            for group in pairs.groups:
                resolve_positions(group, position, "base")
                resolve_positions(group, position, "source")

def check_intervention(cfg: DictConfig, cells: list[Cell], sites: dict) -> None:
    """`intervention.dim` / `neurons` must fit every cell's width (site width x number of positions), and a given
    subspace's width must be every cell's."""
    given = C.intervention_options(cfg)
    fixed = method(cfg.intervention.name).fixed_width(given)
    for cell in cells:
        width = sites[site_key(cell)].width * len(cell.position)
        dim = given.get("dim")
        if dim is not None and not 1 <= int(dim) <= width:
            raise DasError(f"intervention.dim={dim}: must be between 1 and {width} (the width of cell {cell.id})")
        neurons = given.get("neurons") or []
        if any(not 0 <= int(n) < width for n in neurons):
            raise DasError(f"intervention.neurons: indices must be in 0..{width - 1} (the width of cell {cell.id})")
        if fixed is not None and width != fixed:
            raise DasError(f"intervention.path={given.get('path')}: a subspace of width {fixed} does not fit cell {cell.id} "
                           f"(width {width})")
    if cells:  # unknown options and bad values fail now, not after the first cell's setup
        narrowest = min(sites[site_key(c)].width * len(c.position) for c in cells)
        build_intervention(cfg.intervention.name, fixed or narrowest, **given)

def run_fingerprint(cfg: DictConfig, lm: LoadedModel, pairs: dict[str, PairSet]) -> dict:
    """What decides every cell's numbers but its seed: config parts, the pairs' content, device type, eval batch."""
    data = layout.data_hash(pairs, source_file(cfg.dataset))
    parts = C.fingerprint(cfg)
    if cfg.get("from_run"):
        parts.update(transfer.provenance(cfg))
    parts.update(method(cfg.intervention.name).fingerprint(C.intervention_options(cfg)))
    return layout.run_fingerprint(parts, data, lm.device.type, int(cfg.eval.batch_size))
