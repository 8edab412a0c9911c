"""oblique_das: DAS relaxed to an oblique projection with a bounded gain.   h = b + P (s − b), P = A (BᵀA)⁻¹ Bᵀ"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import MISSING
from torch import Tensor, nn

from das_cli.errors import DasError

from .base import DimOptions, Intervention, as_saved, check_dim, check_shapes, register


@dataclass
class ObliqueDasOptions(DimOptions):
    max_gain: float = MISSING


@register
class ObliqueDASIntervention(Intervention):
    """Oblique ("stretch") DAS: read the source along B, write along A, with a bounded gain.

    h = b + P (s − b), P = A (BᵀA)⁻¹ Bᵀ. P is idempotent (P² = P) but not symmetric, so the
    subspace written, span(A), may differ from the one read, span(B): Bᵀ h = Bᵀ s and h − b ∈ span(A).
    ‖P‖₂ = 1 / cos θ, θ the largest principal angle between span(A) and span(B), so a free A, B
    can make the edit arbitrarily large (a steering vector, not an interchange).

    Parametrisation: Q = orthonormalised read basis (`read_basis`, QR), N = (I − QQᵀ) X the
    write offset (`write_offset`, X starts at 0), A = Q + N. Every A with BᵀA invertible spans
    the same subspace as one such Q + N, and then P = (Q + N) Qᵀ, so PᵀP = Q (I + NᵀN) Qᵀ and
    ‖P‖₂ = √(1 + ‖N‖₂²). Scaling N down to ‖N‖₂ ≤ √(max_gain² − 1) in the forward keeps
    ‖P‖₂ ≤ max_gain at every step, without an inverse. Starts as the orthogonal projection of DAS.
    """

    name = "oblique_das"
    Options = ObliqueDasOptions
    trainable = True
    subspace = False  # it reads along one subspace and writes along another

    def __init__(self, n: int, dim: int = 1, max_gain: float = 2.0):
        super().__init__()
        check_dim(dim, n)
        if isinstance(max_gain, bool) or not isinstance(max_gain, (int, float)) or not max_gain >= 1:
            raise DasError(f"intervention.max_gain={max_gain}: must be a number >= 1 (the largest allowed ‖P‖₂; 1 is orthogonal DAS)")
        self.n, self.dim, self.max_gain = n, dim, float(max_gain)
        self.read_basis = nn.Parameter(nn.init.orthogonal_(torch.empty(n, dim)))  # B
        self.write_offset = nn.Parameter(torch.zeros(n, dim))  # X

    def _read(self) -> Tensor:
        return torch.linalg.qr(self.read_basis).Q

    def _offset(self, Q: Tensor) -> Tensor:
        """N = (I − QQᵀ) X, scaled down to spectral norm √(max_gain² − 1) when it is larger."""
        N = self.write_offset - Q @ (Q.T @ self.write_offset)
        bound_sq = self.max_gain**2 - 1.0
        if bound_sq == math.inf:
            return N
        if bound_sq == 0.0:
            return torch.zeros_like(N)
        # σ_max² from the k × k Gram matrix; eigenvalues alone have gradients even when repeated.
        norm_sq = torch.linalg.eigvalsh(N.T @ N)[-1]
        return N * torch.sqrt(bound_sq / norm_sq.clamp_min(bound_sq))

    @property
    def write_basis(self) -> Tensor:
        """A = Q + N (n × k), the basis the edit writes along."""
        Q = self._read()
        return Q + self._offset(Q)

    def projection(self) -> Tensor:
        """P = A (BᵀA)⁻¹ Bᵀ = (Q + N) Qᵀ as an n × n matrix (for inspection; `forward` never forms it)."""
        Q = self._read()
        return (Q + self._offset(Q)) @ Q.T

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        check_shapes(base, source, self.n)
        b, s = base.float(), source.float()
        Q = self._read()
        return (b + ((s - b) @ Q) @ (Q + self._offset(Q)).T).to(base.dtype)

    def learned_dim(self) -> int:
        return self.dim

    def gain(self) -> float:
        Q = self._read()
        N = self._offset(Q).detach()
        return math.sqrt(1.0 + float(torch.linalg.matrix_norm(N, ord=2)) ** 2)

    def edit_directions(self) -> Tensor:
        return torch.linalg.qr(self.write_basis.detach()).Q

    def saved(self) -> dict[str, Tensor]:
        return {
            "read_basis": as_saved(self._read()),
            "write_basis": as_saved(self.write_basis),
            "basis": as_saved(self.edit_directions()),
        }

    def load(self, tensors: dict[str, Tensor]) -> None:
        """read_basis is the saved Q; QR may flip its columns' signs (Q D), so the write offset is N D: P = (Q + N) Qᵀ."""
        Q, A = tensors["read_basis"], tensors["write_basis"]
        with torch.no_grad():
            self.read_basis.copy_(Q)
            signs = torch.sign((self._read() * Q).sum(0))
            self.write_offset.copy_((A - Q) * signs)
