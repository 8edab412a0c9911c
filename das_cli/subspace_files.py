"""A given subspace, for intervention=fixed: read from a basis or mask file, or from a das-cli cell folder."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from .errors import ConfigWarning, DasError, non_finite

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
    if tensor.is_complex() or not (tensor.is_floating_point() or tensor.dtype in (torch.bool, torch.uint8, torch.int8, torch.int16,
                                                                                torch.int32, torch.int64)):
        raise DasError(f"{key}: holds a {str(tensor.dtype).removeprefix('torch.')} tensor; give real numbers (a float basis or a 0/1 mask)")
    if non_finite({"tensor": tensor}):
        raise DasError(f"{key}: holds NaN or Inf values; give a basis of finite numbers")
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
    from .artefacts import load_cell  # a cell of any method, fixed included, so not at the top

    cell = load_cell(path)
    if not cell.intervention.subspace:
        name = cell.artefact["intervention"]["name"]
        raise DasError(f"{key}: a {name} cell does not swap one subspace (it reads along one and writes along another); "
                       "evaluate it with from_run= instead")
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
    warnings.warn(f"{key}: the {k} columns are not orthonormal; using the orthonormal basis of their span (QR)", ConfigWarning)
    return Q
