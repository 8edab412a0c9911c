"""Learned subspaces as artefacts: what a saved cell records, loading it back, patching a model with it.

A finished cell (cells/<id>/) holds metrics.json (its row, plus `artefact`: the site, the intervention
and where it was trained) and subspace.safetensors (the intervention's tensors, with the same
description in the file's metadata). `load_cell` rebuilds the intervention from them; `patch` applies
it to a model's forward or `generate`, reading the source prompt's vector at the cell's site.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from . import folder as layout
from .errors import DasError
from .interventions import Intervention, build_intervention

ARTEFACT_VERSION = 1


def describe(cfg: DictConfig, lm, cell, width: int) -> dict:
    """What using `cell` alone needs: the model, the site, the intervention and its options, the das-cli version."""
    from . import __version__

    options = {k: v for k, v in OmegaConf.to_container(cfg.intervention, resolve=True).items() if k != "name"}
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
    intervention = rebuild(art["intervention"]["name"], int(art["width"]), art["intervention"]["options"], tensors, cell_path)
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


def rebuild(name: str, width: int, options: dict, tensors: dict[str, Tensor], where: object = "") -> Intervention:
    """The intervention `name` of a site of `width`, set to the saved `tensors` (state_for_saving's), in eval mode."""
    module = build_intervention(name, width, **options)
    try:
        _LOADERS.get(name, _load_basis)(module, tensors)
    except KeyError as e:
        raise DasError(f"{where}: {layout.SUBSPACE} lacks the tensor {e} that intervention={name} saves") from None
    return module.eval()


def _load_basis(module, tensors: dict[str, Tensor]) -> None:
    if hasattr(module, "set_basis") and "basis" in tensors:
        module.set_basis(tensors["basis"])


def _load_boundless(module, tensors: dict[str, Tensor]) -> None:
    module.set_rotation(tensors["rotation"])
    with torch.no_grad():
        module.boundary.copy_(tensors["boundary"].reshape(1))


def _load_dbm(module, tensors: dict[str, Tensor]) -> None:
    with torch.no_grad():
        module.logits.copy_(tensors["logits"])


def _load_oblique(module, tensors: dict[str, Tensor]) -> None:
    """read_basis is the saved Q; QR may flip its columns' signs (Q D), so the write offset is N D: P = (Q + N) Qᵀ."""
    Q, A = tensors["read_basis"], tensors["write_basis"]
    with torch.no_grad():
        module.read_basis.copy_(Q)
        signs = torch.sign((module._read() * Q).sum(0))
        module.write_offset.copy_((A - Q) * signs)


_LOADERS = {"boundless_das": _load_boundless, "dbm": _load_dbm, "oblique_das": _load_oblique, "vanilla": lambda m, t: None}


# --- a given subspace (intervention=fixed) ---------------------------------------------------------

DIRECTION_FILES = (".safetensors", ".pt", ".npy")
ORTHONORMAL_TOLERANCE = 1e-4


def load_directions(path: str | Path) -> Tensor:
    """An n × k float32 basis with orthonormal columns from `path`: a file holding an n × k basis or a 0/1 mask
    of length n (its neurons as unit columns), or a das-cli cell folder (its saved basis or mask)."""
    key = f"intervention.path={path}"
    path = Path(path).expanduser()
    if path.is_dir():
        tensor = _cell_directions(path, key)
    elif not path.is_file():
        raise DasError(f"{key}: no such file or folder")
    elif path.suffix not in DIRECTION_FILES:
        raise DasError(f"{key}: unknown file type '{path.suffix}'; valid: {', '.join(DIRECTION_FILES)} or a das-cli cell folder")
    else:
        tensor = _read_tensor(path, key)
    tensor = tensor.detach().to("cpu", torch.float32)
    if tensor.dim() == 1:
        return _mask_columns(tensor, key)
    if tensor.dim() != 2 or 0 in tensor.shape:
        raise DasError(f"{key}: holds a tensor of shape {tuple(tensor.shape)}; give an n x k basis or a 0/1 mask of length n")
    return _orthonormal(tensor, key)


def _read_tensor(path: Path, key: str) -> Tensor:
    try:
        if path.suffix == ".npy":
            import numpy as np

            return torch.from_numpy(np.load(path, allow_pickle=False).astype("float32"))
        if path.suffix == ".pt":
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            loaded = load_file(str(path))
    except Exception as e:  # numpy, pickle and safetensors each raise their own kinds
        raise DasError(f"{key}: cannot read the file ({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
    if torch.is_tensor(loaded):
        return loaded
    if isinstance(loaded, dict) and all(torch.is_tensor(v) for v in loaded.values()):
        for name in ("basis", "mask"):  # a das-cli subspace file holds several tensors
            if name in loaded:
                return loaded[name]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise DasError(f"{key}: holds several tensors ({', '.join(sorted(loaded))}); keep one, or name it 'basis' or 'mask'")
    raise DasError(f"{key}: holds no tensor")


def _cell_directions(path: Path, key: str) -> Tensor:
    cell = load_cell(path)
    name = cell.artefact["intervention"]["name"]
    if name == "oblique_das":
        raise DasError(f"{key}: an oblique_das cell reads and writes two subspaces; evaluate it with from_run= instead")
    directions = cell.intervention.edit_directions().detach().cpu()
    if directions.dim() == 1:  # coordinates (vanilla, dbm)
        mask = torch.zeros(cell.width)
        mask[directions] = 1.0
        return mask
    return directions


def _mask_columns(mask: Tensor, key: str) -> Tensor:
    if not bool(((mask == 0) | (mask == 1)).all()) or not bool(mask.any()):
        raise DasError(f"{key}: a 1-D tensor must be a 0/1 mask with at least one 1 (got values other than 0 and 1, or none set)")
    return torch.eye(len(mask))[:, mask.bool()]


def _orthonormal(basis: Tensor, key: str) -> Tensor:
    n, k = basis.shape
    if k > n:
        raise DasError(f"{key}: a basis of shape {n} x {k} has more columns than rows; give it as n x k (n = site width)")
    if torch.allclose(basis.T @ basis, torch.eye(k), atol=ORTHONORMAL_TOLERANCE):
        return basis
    Q, R = torch.linalg.qr(basis)
    if bool((R.diagonal().abs() < ORTHONORMAL_TOLERANCE * R.diagonal().abs().max()).any()):
        raise DasError(f"{key}: the {k} columns are linearly dependent; give a basis of full rank")
    from .config import ConfigWarning

    warnings.warn(f"{key}: the {k} columns are not orthonormal; using the orthonormal basis of their span (QR)", ConfigWarning)
    return Q


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
