"""Directions estimated from activations, for the non-learned baselines (CausalGym, arXiv 2402.12560).

Each function takes site vectors `values` [N, n] (and, for the class-based ones, `labels` [N]
with values 0..C-1, every class present) and returns an n × k matrix with orthonormal columns,
the subspace an intervention then swaps with `project_swap`. Callers check that k is at most
what the method can give (C − 1 for class-based directions); here it is only documented.

    mean_diff   top-k right singular vectors of the centred class means (two classes: μ₀ − μ₁)
    pca         top-k principal components of the centred values
    full bases  every principal axis of the standardised values, or every right singular vector of the
                raw ones (MIB's DBM + PCA and DBM + SVD bases, arXiv 2504.13151)
    probe       top-k right singular vectors of the centred class weights of a logistic probe
    random      k orthonormal directions drawn from a normal distribution (Haar-distributed)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def class_means(values: Tensor, labels: Tensor) -> Tensor:
    """[C, n]: the mean of each class's rows."""
    n_classes = int(labels.max()) + 1
    sums = torch.zeros(n_classes, values.shape[1], dtype=values.dtype, device=values.device).index_add_(0, labels, values)
    counts = torch.bincount(labels, minlength=n_classes).to(values.dtype)
    return sums / counts[:, None]


def between_class_basis(rows: Tensor, k: int) -> Tensor:
    """The k directions along which the per-class rows [C, n] differ most: SVD of the rows centred on their mean.

    Each class counts once, however many prompts it has, so a rare value is not drowned out.
    With two rows the centred rows are ±(r₀ − r₁)/2, so the single direction is the normalised
    difference; its sign (and every column's) is chosen so that row 0 projects positively,
    which makes the two-class direction exactly (r₀ − r₁)/‖r₀ − r₁‖ and the result deterministic.
    """
    centred = rows - rows.mean(dim=0, keepdim=True)
    basis = torch.linalg.svd(centred, full_matrices=False).Vh[:k].T
    signs = torch.where(centred[0] @ basis < 0, -1.0, 1.0).to(basis.dtype)
    return basis * signs


def mean_diff_basis(values: Tensor, labels: Tensor, k: int) -> Tensor:
    """Difference of class means (two classes), or the top-k between-class directions (more classes)."""
    return between_class_basis(class_means(values, labels), k)


def pca_basis(values: Tensor, k: int) -> Tensor:
    """Top-k principal components: the directions of largest variance, whatever the classes."""
    centred = values - values.mean(dim=0, keepdim=True)
    return torch.linalg.svd(centred, full_matrices=False).Vh[:k].T


def standardised_principal_axes(values: Tensor) -> Tensor:
    """n × k: the principal axes of the values standardised per coordinate (centred, divided by their
    standard deviation, at least 1e-6), every one with a non-zero singular value (k ≤ min(N − 1, n)),
    largest first. MIB's DBM + PCA basis: the axes are computed on standardised values and applied to raw ones."""
    spread = values.std(dim=0, correction=0, keepdim=True).clamp_min(1e-6)
    return _nonzero_singular_directions((values - values.mean(dim=0, keepdim=True)) / spread)


def singular_directions(values: Tensor) -> Tensor:
    """n × k: the right singular vectors of the raw (uncentred) values with a non-zero singular value
    (k ≤ min(N, n)), largest first. MIB's DBM + SVD basis."""
    return _nonzero_singular_directions(values)


def _nonzero_singular_directions(values: Tensor) -> Tensor:
    _, singular, vh = torch.linalg.svd(values.double(), full_matrices=False)
    rank = int((singular > singular.max() * max(values.shape) * torch.finfo(torch.float32).eps).sum())
    return vh[:rank].T.float().contiguous()


def fit_probe(values: Tensor, labels: Tensor, l2: float, steps: int = 100) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression with an intercept: (weight [C, n], bias [C]).

    Loss = mean cross-entropy + l2 · ‖weight‖² (the intercept is not penalised). Inputs are not
    standardised: the probe reads the same coordinates the intervention patches. Full-batch
    L-BFGS from zero: the loss is convex, so the fit is deterministic and needs no seed.
    """
    n_classes = int(labels.max()) + 1
    weight = torch.zeros(n_classes, values.shape[1], device=values.device, requires_grad=True)
    bias = torch.zeros(n_classes, device=values.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(values @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def probe_basis(values: Tensor, labels: Tensor, k: int, l2: float) -> Tensor:
    """The probe's decision directions: weight difference (two classes), top-k of the centred class weights (more).

    Softmax weights are defined only up to a shift shared by all classes; centring removes it.
    """
    weight, _ = fit_probe(values, labels, l2)
    return between_class_basis(weight, k)


def random_basis(n: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k uniformly random orthonormal directions (torch's global RNG unless `generator` is given).

    QR of a Gaussian matrix with the signs of R's diagonal moved into Q, so the result is
    Haar-distributed rather than biased by the QR sign convention.
    """
    q, r = torch.linalg.qr(torch.randn(n, k, generator=generator))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
