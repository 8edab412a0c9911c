"""Analyses of a learned subspace: per-head shares, and the rowspace / nullspace split of the illusion check."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from .interventions import FixedSubspaceIntervention
from .models import LoadedModel
from .names import ILLUSION_STREAMS, STREAM_TABLE


def head_importance(basis: Tensor, n_positions: int, heads: tuple[int, ...], head_dim: int) -> dict[int, float]:
    """Share of the basis' squared norm that falls in each head's slice (shares sum to 1).

    `basis` is [P*C, k] over a site vector laid out position-major, C = len(heads) * head_dim with
    heads in the given order. With orthonormal columns the total squared norm is k.
    """
    k = basis.shape[1]
    per_head = basis.float().reshape(n_positions, len(heads), head_dim, k).pow(2).sum(dim=(0, 2, 3))
    total = float(per_head.sum())
    return {h: float(v) / total for h, v in zip(heads, per_head)}


def downstream_weight(lm: LoadedModel, stream: str, layer: int) -> Tensor:
    """[out, in] matrix of the projection that reads `stream` (MLP out-projection, attention out-projection)."""
    if stream not in ILLUSION_STREAMS:
        raise ValueError(f"no single downstream projection for stream {stream}; streams: {', '.join(ILLUSION_STREAMS)}")
    path = getattr(lm.family, STREAM_TABLE[stream].read_by)
    module = lm.block(layer).get_submodule(path)
    return module.weight.T if isinstance(module, Conv1D) else module.weight  # GPT-2's Conv1D stores [in, out]


def rowspace_split(basis: Tensor, weight: Tensor, n_positions: int) -> tuple[Tensor, Tensor]:
    """basis = row + null, column by column: `row` in the rowspace of `weight` ([out, C]), `null` in its nullspace.

    `basis` is [P*C, k] over P positions of a C-wide site; each position's slice is split alone.
    `weight @ null_slice == 0`, so the null part alone changes nothing the weight passes on
    (Makelov et al., arXiv 2311.17030).
    """
    _, singular, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    rank = int((singular > singular.max() * max(weight.shape) * torch.finfo(torch.float32).eps).sum())
    rows = vh[:rank].T  # [C, rank] orthonormal basis of the rowspace
    per_position = basis.float().reshape(n_positions, weight.shape[1], -1)
    row = rows @ (rows.T @ per_position)
    return row.reshape(basis.shape), (per_position - row).reshape(basis.shape)


def span_basis(matrix: Tensor, tolerance: float = 1e-4) -> Tensor | None:
    """Orthonormal columns spanning `matrix`'s columns (directions with singular value > tolerance); None if empty."""
    u, singular, _ = torch.linalg.svd(matrix.float(), full_matrices=False)
    keep = singular > tolerance
    return u[:, keep] if bool(keep.any()) else None


def illusion_parts(basis: Tensor, weight: Tensor, n_positions: int) -> tuple[Tensor | None, Tensor | None]:
    """Orthonormal bases of the rowspace and the nullspace parts of a learned subspace (None: part is empty)."""
    row, null = rowspace_split(basis, weight, n_positions)
    return span_basis(row), span_basis(null)


def fixed_subspace(basis: Tensor) -> FixedSubspaceIntervention:
    """An intervention that swaps span(basis) (orthonormal columns); nothing is trained."""
    patch = FixedSubspaceIntervention(basis.shape[0], basis.shape[1])
    patch.set_basis(basis)
    return patch
