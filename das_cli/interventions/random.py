"""random: random orthonormal directions, the control (CausalGym's baseline, arXiv 2402.12560).   h = b + (s − b) W Wᵀ, W drawn"""

from __future__ import annotations

from das_cli import directions

from .base import DimOptions, register
from .subspace import FixedSubspaceIntervention


@register
class RandomIntervention(FixedSubspaceIntervention):
    """`dim` random orthonormal directions, drawn at construction from torch's global RNG.

    Needs no activations: under the sweep's per-cell torch.manual_seed it is reproducible.
    """

    name = "random"
    Options = DimOptions

    def __init__(self, n: int, dim: int = 1):
        super().__init__(n, dim)
        self.set_basis(directions.random_basis(n, dim))
