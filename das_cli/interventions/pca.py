"""pca: the top principal components of the training activations (CausalGym's baseline, arXiv 2402.12560).   h = b + (s − b) W Wᵀ, W estimated"""

from __future__ import annotations

from das_cli import directions
from das_cli.errors import DasError

from .base import DimOptions, SiteActivations, register
from .subspace import FixedSubspaceIntervention


@register
class PCAIntervention(FixedSubspaceIntervention):
    """Top-`dim` principal components of all training activations, whatever the variable's value."""

    name = "pca"
    Options = DimOptions
    needs_activations = True

    def fit_activations(self, acts: SiteActivations) -> None:
        values = self._values(acts)
        if self.dim > len(values) - 1:
            raise DasError(
                f"intervention.dim={self.dim}: intervention=pca gives at most {len(values) - 1} direction(s) "
                f"from {len(values)} training vectors"
            )
        self.set_basis(directions.pca_basis(values, self.dim))
