"""Analyses of a learned subspace."""

from __future__ import annotations

from torch import Tensor


def head_importance(basis: Tensor, n_positions: int, heads: tuple[int, ...], head_dim: int) -> dict[int, float]:
    """Share of the basis' squared norm that falls in each head's slice (shares sum to 1).

    `basis` is [P*C, k] over a site vector laid out position-major, C = len(heads) * head_dim with
    heads in the given order. With orthonormal columns the total squared norm is k.
    """
    k = basis.shape[1]
    per_head = basis.float().reshape(n_positions, len(heads), head_dim, k).pow(2).sum(dim=(0, 2, 3))
    total = float(per_head.sum())
    return {h: float(v) / total for h, v in zip(heads, per_head)}
