"""The shared base of the methods whose subspace is set once rather than trained.   h = b + (s − b) W Wᵀ"""

from __future__ import annotations

import torch
from torch import Tensor

from das_cli.errors import DasError

from .base import DimOptions, Intervention, SiteActivations, as_saved, check_dim, check_shapes, project_swap


class FixedSubspaceIntervention(Intervention):
    """Swap a k-dimensional subspace that is set once rather than trained: h = b + (s − b) W Wᵀ.

    Subclasses set W (`basis`, a buffer, so it follows `.to(device)`) at construction or in
    `fit_activations`. Until then `forward` refuses to run: a zero basis would silently return
    the base vector and report an IIA for a subspace that was never estimated.
    """

    trainable = False
    Options = DimOptions
    illusion_split = True

    def __init__(self, n: int, dim: int = 1):
        super().__init__()
        check_dim(dim, n)
        self.n, self.dim = n, dim
        self.register_buffer("basis", torch.zeros(n, dim))
        self.estimated = False

    def set_basis(self, W: Tensor) -> None:
        """Use the n × k matrix W (orthonormal columns) from now on, on the module's device."""
        self.basis = W.to(self.basis.device, torch.float32).contiguous()
        self.estimated = True

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        if not self.estimated:
            raise RuntimeError(
                f"intervention={self.name}: its directions are estimated from the training activations; "
                "call fit_activations before using it"
            )
        check_shapes(base, source, self.n)
        return project_swap(base.float(), source.float(), self.basis).to(base.dtype)

    def learned_dim(self) -> int:
        return self.dim

    def edit_directions(self) -> Tensor:
        return self.basis

    def saved(self) -> dict[str, Tensor]:
        return {"basis": as_saved(self.basis)}

    def load(self, tensors: dict[str, Tensor]) -> None:
        basis = tensors["basis"]
        if tuple(basis.shape) != (self.n, self.dim):
            raise ValueError(f"basis of shape {tuple(basis.shape)}, not {self.n} x {self.dim}")
        self.set_basis(basis)

    def _values(self, acts: SiteActivations) -> Tensor:
        """The activations as float32 on the module's device (the sweep may hand them over on the CPU)."""
        return acts.values.to(self.basis.device, torch.float32)

    def _labelled(self, acts: SiteActivations) -> tuple[Tensor, Tensor]:
        """Rows whose variable value is known, with labels renumbered 0..C-1 over the values present.

        Checks that there are two values at least and that `dim` ≤ C − 1, the rank of C centred class vectors.
        """
        known = acts.classes >= 0
        present, labels = torch.unique(acts.classes[known], return_inverse=True)
        names = [acts.names[i] for i in present.tolist()]
        if len(names) < 2:
            raise DasError(
                f"intervention={self.name} needs at least two values of the variable among the training prompts; "
                f"found {len(names)}{' (' + ', '.join(names) + ')' if names else ''}"
            )
        if self.dim > len(names) - 1:
            raise DasError(
                f"intervention.dim={self.dim}: intervention={self.name} gives at most {len(names) - 1} direction(s) "
                f"from {len(names)} values of the variable ({', '.join(names)})"
            )
        return self._values(acts)[known.to(self.basis.device)], labels.to(self.basis.device)
