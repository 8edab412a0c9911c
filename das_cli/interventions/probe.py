"""probe: the decision directions of a logistic probe for the variable (CausalGym's baseline, arXiv 2402.12560).   h = b + (s − b) W Wᵀ, W estimated"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from das_cli import directions
from das_cli.errors import DasError

from .base import DimOptions, SiteActivations, register
from .subspace import FixedSubspaceIntervention


@dataclass
class ProbeOptions(DimOptions):
    probe_l2: float = MISSING


@register
class ProbeIntervention(FixedSubspaceIntervention):
    """Decision directions of a multinomial logistic probe for the variable (L2 weight `probe_l2`)."""

    name = "probe"
    Options = ProbeOptions
    needs_activations = True

    def __init__(self, n: int, dim: int = 1, probe_l2: float = 1e-3):
        super().__init__(n, dim)
        if not probe_l2 >= 0:
            raise DasError(f"intervention.probe_l2={probe_l2}: must be >= 0")
        self.probe_l2 = float(probe_l2)

    def fit_activations(self, acts: SiteActivations) -> None:
        values, labels = self._labelled(acts)
        self.set_basis(directions.probe_basis(values, labels, self.dim, self.probe_l2))
