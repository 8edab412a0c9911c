"""mean_diff: the difference of class means (CausalGym's baseline, arXiv 2402.12560).   h = b + (s − b) W Wᵀ, W estimated"""

from __future__ import annotations

from das_cli import directions

from .base import DimOptions, SiteActivations, register
from .subspace import FixedSubspaceIntervention


@register
class MeanDiffIntervention(FixedSubspaceIntervention):
    """Difference of class means (two values of the variable), or the top-`dim` between-class directions."""

    name = "mean_diff"
    Options = DimOptions
    needs_activations = True

    def fit_activations(self, acts: SiteActivations) -> None:
        values, labels = self._labelled(acts)
        self.set_basis(directions.mean_diff_basis(values, labels, self.dim))
