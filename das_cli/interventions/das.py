"""das: low-rank Distributed Alignment Search (Geiger et al. 2023, arXiv 2303.02536).   h = b + (s − b) W Wᵀ"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import MISSING
from torch import Tensor

from das_cli.errors import DasError, choices_error

from .base import DimOptions, Intervention, OrthonormalColumns, as_saved, check_dim, check_shapes, project_swap, register

ORTHOGONAL_MAPS = ("cayley", "householder", "matrix_exp")
INITS = ("random", "prescan")  # where W starts: a random orthonormal matrix, or the prescan's directions (prescan.py)


@dataclass
class DasOptions(DimOptions):
    orthogonal_map: Optional[str] = None
    full_rotation: bool = MISSING
    init: str = MISSING


@register
class DASIntervention(Intervention):
    """Low-rank DAS: swap the k-dimensional subspace span(W) of base for that of source.

    By default W is an n × k matrix kept orthonormal by itself (no n × n matrix exists).
    `init=prescan` starts W at the cell's first-order prescan directions (the set-up loads them with `set_basis`).
    `full_rotation=True` instead learns a full n × n rotation R and uses its first k columns,
    as pyvene's RotatedSpaceIntervention does: the same forward for the same W, but a
    different parametrisation, so training can take another path (and costs n² parameters).
    """

    name = "das"
    Options = DasOptions
    trainable = True
    illusion_split = True

    def __init__(self, n: int, dim: int, orthogonal_map: str | None = None, full_rotation: bool = False, init: str = "random"):
        super().__init__()
        check_dim(dim, n)
        if init not in INITS:
            raise choices_error("intervention.init", init, INITS)
        if orthogonal_map is not None and orthogonal_map not in ORTHOGONAL_MAPS:
            raise choices_error("intervention.orthogonal_map", orthogonal_map, ORTHOGONAL_MAPS)
        if not isinstance(full_rotation, bool):
            raise DasError(f"intervention.full_rotation={full_rotation}: must be true or false")
        self.n, self.dim, self.full_rotation, self.init = n, dim, full_rotation, init
        self.basis = OrthonormalColumns(n, n if full_rotation else dim, orthogonal_map)

    @property
    def W(self) -> Tensor:
        return self.basis.weight[:, : self.dim]

    def set_basis(self, W: Tensor) -> None:
        """Load a given n × k matrix with orthonormal columns (e.g. a saved basis).

        With a full rotation, W is completed to an n × n orthogonal matrix whose first k columns are W.
        """
        W = W.to(self.basis.weight.device, torch.float32)
        self.basis.weight = _complete_rotation(W) if self.full_rotation else W

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        check_shapes(base, source, self.n)
        return project_swap(base.float(), source.float(), self.W).to(base.dtype)

    def learned_dim(self) -> int:
        return self.dim

    def edit_directions(self) -> Tensor:
        return self.W.detach()

    def saved(self) -> dict[str, Tensor]:
        return {"basis": as_saved(self.W)}

    def load(self, tensors: dict[str, Tensor]) -> None:
        self.set_basis(tensors["basis"])


def _complete_rotation(W: Tensor) -> Tensor:
    """An n × n orthogonal matrix whose first k columns are W (W: n × k, orthonormal columns).

    QR of [W | I] gives Q with Q[:, :k] = W up to column signs; putting W back keeps Q orthogonal.
    """
    n, k = W.shape
    Q = torch.linalg.qr(torch.cat([W, torch.eye(n, dtype=W.dtype, device=W.device)], dim=1)).Q
    Q[:, :k] = W
    return Q
