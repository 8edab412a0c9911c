"""sparse_basis: dbm's mask over the coordinates of the site's sparse-Jacobian basis (Baker 2022), the name
`intervention=dbm intervention.basis=sparse_jacobian` is also known by.   h = b + Rᵀ (m ⊙ R (s − b)) per position

One implementation: interventions/dbm.py (the mask, every basis) and sparse_rotation.py (the rotation).
"""

from __future__ import annotations

from das_cli.errors import DasError

from .base import register
from .dbm import DBMIntervention, DbmOptions


@register
class SparseBasisIntervention(DBMIntervention):
    """dbm with basis=sparse_jacobian, under its own name in tables and run folders."""

    name = "sparse_basis"
    Options = DbmOptions

    def __init__(self, n: int, temperature_start: float = 1.0, temperature_end: float = 0.01, l1_weight: float = 1e-2,
                 basis: str = "sparse_jacobian", jacobian_side: str = "output", jacobian_prompts: int = 8,
                 jacobian_steps: int = 100, jacobian_restarts: int = 2):
        if basis != "sparse_jacobian":
            raise DasError(f"intervention.basis={basis}: intervention=sparse_basis is dbm over the sparse_jacobian basis; "
                           f"for another basis use intervention=dbm intervention.basis={basis}")
        super().__init__(n, temperature_start, temperature_end, l1_weight, basis, jacobian_side, jacobian_prompts,
                         jacobian_steps, jacobian_restarts)
