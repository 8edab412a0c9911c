"""Learned subspaces as artefacts: what a saved cell records, loading it back, patching a model with it.

A finished cell (cells/<id>/) holds metrics.json (its row, plus `artefact`: the site, the intervention
and where it was trained) and subspace.safetensors (the intervention's tensors, with the same
description in the file's metadata). `load_cell` rebuilds the intervention from them; `patch` applies
it to a model's forward or `generate`, reading the source prompt's vector at the cell's site.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor

from . import config as C
from . import folder as layout
from .errors import DasError
from .interventions import Intervention, load_intervention

ARTEFACT_VERSION = 1


def describe(cfg: DictConfig, lm, cell, width: int) -> dict:
    """What using `cell` alone needs: the model, the site, the intervention and its options, the das-cli version."""
    from . import __version__

    options = C.intervention_options(cfg)
    return {
        "format": ARTEFACT_VERSION,
        "das_cli_version": __version__,
        "model": {
            "name": lm.name,
            "name_or_path": getattr(lm.model, "name_or_path", None) or cfg.model.get("name_or_path"),
            "revision": getattr(lm.model.config, "_commit_hash", None),
            "model_type": lm.model.config.model_type,
            "hidden_size": lm.hidden_size,
            "n_layers": lm.n_layers,
        },
        "stream": cell.stream,
        "layer": cell.layer,
        "positions": list(cell.position),
        "heads": None if cell.heads is None else list(cell.heads),
        "width": int(width),
        "intervention": {"name": str(cfg.intervention.name), "options": options},
        "dtype": str(cfg.dtype),
    }


@dataclass
class LoadedCell:
    """A finished cell read back: its site, its rebuilt intervention (eval mode) and its table row."""

    id: str
    stream: str
    layer: int
    positions: tuple[int | str, ...]
    heads: tuple[int, ...] | None
    width: int
    intervention: Intervention
    artefact: dict
    row: dict


def load_cell(path: str | Path) -> LoadedCell:
    """The cell saved in the folder `path` (…/cells/<id>), its tensors checked against metrics.json."""
    cell_path = Path(path)
    stored = layout.read_cell(cell_path.parent.parent, cell_path.name)
    if stored is None:
        raise DasError(f"{cell_path}: not a das-cli cell folder (no {layout.METRICS})")
    if stored.damaged:
        raise DasError(f"{cell_path}: the cell is damaged ({stored.problem})")
    if stored.failed:
        raise DasError(f"{cell_path}: the cell failed ({stored.row['error']}); it holds no subspace")
    if stored.artefact is None:
        raise DasError(f"{cell_path}: {layout.METRICS} has no artefact record (saved by an older das-cli); run the cell again")
    art = stored.artefact
    tensors = _read_tensors(cell_path, stored)
    intervention = load_intervention(art["intervention"]["name"], int(art["width"]), art["intervention"]["options"], tensors,
                                     cell_path / layout.SUBSPACE)
    heads = None if art["heads"] is None else tuple(art["heads"])
    return LoadedCell(stored.id, art["stream"], int(art["layer"]), tuple(art["positions"]), heads, int(art["width"]),
                      intervention, art, stored.row)


def _read_tensors(cell_path: Path, stored) -> dict[str, Tensor]:
    names = (stored.subspace or {}).get("tensors") or []
    if not names:
        return {}
    if not (stored.subspace or {}).get("sha256"):
        raise DasError(f"{cell_path}: no {layout.SUBSPACE} was saved with the cell (output.save_subspaces=false)")
    from safetensors.torch import load_file

    return load_file(str(cell_path / layout.SUBSPACE))


# --- patching a model ------------------------------------------------------------------------------

def _loaded_model(lm_or_model):
    from .models import LoadedModel, family_of

    if isinstance(lm_or_model, LoadedModel):
        return lm_or_model
    return LoadedModel(model=lm_or_model, tokenizer=None, family=family_of(lm_or_model), name=type(lm_or_model).__name__)


def _indices(cell: LoadedCell, positions: Sequence[int | str] | None, length: int, side: str) -> list[int]:
    """Absolute token indices of the cell's positions in a prompt of `length` tokens (`last` = -1)."""
    chosen = list(cell.positions if positions is None else positions)
    out = []
    for p in chosen:
        if p == "last":
            p = -1
        if isinstance(p, str):
            raise DasError(f"positions: cell {cell.id} uses the named position '{p}'; pass its token index "
                           f"({side}_positions=[...], ints, negative from the end)")
        index = p + length if p < 0 else p
        if not 0 <= index < length:
            raise DasError(f"positions: {p} is outside a {side} prompt of {length} tokens (cell {cell.id})")
        out.append(int(index))
    if len(out) != len(cell.positions):
        raise DasError(f"positions: cell {cell.id} edits {len(cell.positions)} position(s); got {len(out)} for the {side}")
    return out


@contextmanager
def patch(lm_or_model, cell: LoadedCell, base_ids: Tensor, source_ids: Tensor,
          base_positions: Sequence[int | str] | None = None,
          source_positions: Sequence[int | str] | None = None) -> Iterator[None]:
    """Within the block, forwards of `base_ids` (and `generate` from it) see the cell's intervention at its site:
    the base vector at `base_positions` takes the source prompt's at `source_positions` in the cell's subspace.

    Positions default to the cell's; named ones need explicit indices. Prompts are unpadded [B, T] (one
    source row, or one per base row). Only forwards over the whole prompt are edited: a generation step that
    reads the prompt from the KV cache (fewer tokens than the prompt) is left alone.
    """
    from .sites import gather, hooked, read_site, resolve_site, scatter

    lm = _loaded_model(lm_or_model)
    site = resolve_site(lm, cell.stream, cell.layer, cell.heads)
    if site.width * len(cell.positions) != cell.width:
        raise DasError(f"cell {cell.id}: width {cell.width} does not fit {cell.stream} at layer {cell.layer} of this model "
                       f"({site.width} per position x {len(cell.positions)} position(s))")
    base_ids, source_ids = torch.as_tensor(base_ids).to(lm.device), torch.as_tensor(source_ids).to(lm.device)
    length = base_ids.shape[1]
    base_at = torch.tensor(_indices(cell, base_positions, length, "base"), device=lm.device)
    source_at = torch.tensor(_indices(cell, source_positions, source_ids.shape[1], "source"), device=lm.device)
    with torch.no_grad():
        source_site = read_site(lm, site, source_ids)
        every = torch.arange(site.width, device=lm.device)
        source = gather(source_site, source_at.expand(len(source_ids), -1), every)
    if len(source) not in (1, len(base_ids)):
        raise DasError(f"source_ids: {len(source)} rows for {len(base_ids)} base rows; give one source or one per base row")
    intervention = cell.intervention.to(lm.device).eval()

    def edit(hidden: Tensor) -> Tensor | None:
        if hidden.shape[1] < length:  # a cached generation step: the prompt was edited on its own forward
            return None
        at = base_at.expand(hidden.shape[0], -1)
        base = gather(hidden, at, site.columns)
        new = intervention(base, source.expand(len(base), -1).to(base.dtype))
        return scatter(hidden, at, site.columns, new)

    with hooked(site, edit):
        yield
