"""Scores beside IIA: its Wilson interval, and how large and how unnatural the applied edit is.

`gain` is ‖M‖₂ of the map an intervention applies, h = b + M (s − b).

`offmanifold` compares the edited test vectors with the unedited ones, in the site's full space: the
root-mean-square Mahalanobis distance of the edited vectors divided by that of the unedited base vectors
of the same pairs, both under the mean and covariance of the natural (unedited training) activations,
the covariance shrunk towards a multiple of the identity with Ledoit and Wolf's intensity (J. Multivar.
Anal. 88, 2004) so that it is invertible with fewer vectors than dimensions. Natural vectors score about
1; an edit that leaves the activations the model produces (a stretch, or coordinates of two vectors mixed
against their correlations) scores above. `max_z` is the largest |z-score| of the edited vectors along the
directions M writes: for an orthogonal swap those coordinates are the source's own ((b + (s − b)WWᵀ)W = sW),
so it describes the values written, not the edit. Both are taken over the cause pairs (those IIA counts).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from scipy.stats import binomtest
from torch import Tensor

from .data import PairSet, resolve_positions
from .interventions import Intervention
from .sites import Site, gather


def wilson_interval(hits: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of the proportion hits / n (NaN, NaN when n is 0)."""
    if n == 0:
        return math.nan, math.nan
    interval = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def mean_proportion_interval(tallies: list[tuple[int, int]]) -> tuple[float, float]:
    """95% interval of the unweighted mean of several proportions hits_t / n_t (t: counterfactual types),
    by Price & Bonett's adjusted Wald interval for a linear function of binomial proportions
    (Comput. Stat. Data Anal. 45, 2004): each proportion gets 2/T added hits and 4/T added pairs,
    p̃_t = (h_t + 2/T) / (n_t + 4/T), and the interval is mean(p̃) ± z √(Σ p̃_t (1 − p̃_t) / (n_t + 4/T)) / T,
    clipped to [0, 1]. It is the interval of the reported mean, not of the pooled pairs (the two differ
    when types differ in size); unlike the plain Wald interval it keeps a width when a type scores 0 or 1;
    for T = 2 it is Agresti and Caffo's interval. Types without pairs are left out (NaN, NaN when none has any)."""
    counted = [(h, n) for h, n in tallies if n > 0]
    if not counted:
        return math.nan, math.nan
    t = len(counted)
    adjusted = [((h + 2 / t) / (n + 4 / t), n + 4 / t) for h, n in counted]
    centre = sum(p for p, _ in adjusted) / t
    spread = NormalDist().inv_cdf(0.975) * math.sqrt(sum(p * (1 - p) / m for p, m in adjusted)) / t
    return max(0.0, centre - spread), min(1.0, centre + spread)


def largest_z(edited: Tensor, natural: Tensor, directions: Tensor) -> float:
    """max |(x·u − mean)/std| over rows x of `edited` and directions u, mean and std (ddof 1) of `natural`·u.

    `directions`: n × r orthonormal columns, or 1-D coordinate indices. Directions along which the
    natural activations do not vary are left out; NaN when no direction is left.
    """
    if directions.dtype.is_floating_point:
        along = lambda x: x.float() @ directions.to(x.device, torch.float32)  # noqa: E731
    else:
        along = lambda x: x.float()[:, directions.to(x.device)]  # noqa: E731
    reference = along(natural)
    if reference.shape[1] == 0 or reference.shape[0] < 2:
        return math.nan
    mean, std = reference.mean(0), reference.std(0)
    varies = std > 0
    if not bool(varies.any()):
        return math.nan
    z = (along(edited.to(natural.device)) - mean) / std
    return float(z[:, varies].abs().max())


def shrunk_covariance(natural: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, covariance) of the rows of `natural` [N, n] in float64, the covariance (1 − a) S + a (tr S / n) I with
    S the sample covariance (divided by N) and a Ledoit and Wolf's (2004) estimate of the intensity that minimises the
    expected squared error, clipped to [0, 1]."""
    x = natural.double()
    mean = x.mean(0)
    x = x - mean
    count, n = x.shape
    sample = x.T @ x / count
    scale = float(torch.trace(sample)) / n
    squares = x * x
    spread = float((squares.T @ squares).sum()) / count - float((sample * sample).sum())  # Σ_k ‖x_k x_kᵀ − S‖² / N
    distance = float(((sample - scale * torch.eye(n, dtype=x.dtype)) ** 2).sum())  # ‖S − (tr S / n) I‖²
    intensity = 1.0 if distance == 0 else min(1.0, max(0.0, spread / count / distance))
    return mean, (1 - intensity) * sample + intensity * scale * torch.eye(n, dtype=x.dtype)


# Added to the shrunk covariance's diagonal (times its mean variance) before it is inverted: where the intensity is 0 and
# the natural vectors span fewer dimensions than the site, a direction they never take is then far, not undefined.
FLOOR = 1e-9


def mahalanobis_squared(rows: Tensor, mean: Tensor, covariance: Tensor) -> Tensor:
    """(x − mean)ᵀ covariance⁻¹ (x − mean) for each row x [M, n]."""
    centred = (rows.double() - mean).T
    n = covariance.shape[0]
    floored = covariance + FLOOR * float(torch.trace(covariance)) / n * torch.eye(n, dtype=covariance.dtype)
    return (centred * torch.linalg.solve(floored, centred)).sum(0)


def off_manifold(edited: Tensor, unedited: Tensor, natural: Tensor) -> float:
    """RMS Mahalanobis distance of `edited` over that of `unedited` ([M, n] each), both under the mean and shrunk
    covariance of `natural` [N, n]; NaN with fewer than 2 natural vectors, none that vary, or no rows."""
    if natural.shape[0] < 2 or edited.shape[0] == 0:
        return math.nan
    mean, covariance = shrunk_covariance(natural.cpu())
    if float(torch.trace(covariance)) == 0:
        return math.nan
    reference = float(mahalanobis_squared(unedited.cpu(), mean, covariance).mean())
    if reference == 0:
        return math.nan
    return math.sqrt(float(mahalanobis_squared(edited.cpu(), mean, covariance).mean()) / reference)


@torch.no_grad()
def edit_scores(intervention: Intervention, natural: Tensor, base: Tensor, source: Tensor) -> dict[str, float]:
    """`gain`, `offmanifold` and `max_z` of the intervention (in eval mode) applied to the test vectors `base`,
    `source` ([M, n]: the cause pairs'), against the `natural` training activations [N, n]."""
    device = intervention._device()
    edited = intervention(base.to(device), source.to(device)).cpu()
    return {"gain": intervention.gain(), "offmanifold": off_manifold(edited, base.cpu(), natural.cpu()),
            "max_z": largest_z(edited, natural.cpu(), intervention.edit_directions().cpu())}


@torch.no_grad()
def base_vectors(site: Site, position: tuple, pairs: PairSet, tensors: list[Tensor]) -> Tensor:
    """The unedited site vectors of every base prompt at `position` ([N, P*C] float32 on the CPU), group by
    group, from the site's tensors on the base prompts (`tensors`, [N, T, C] per group)."""
    every_column = torch.arange(site.width)
    return torch.cat([
        gather(acts, resolve_positions(group, position, "base").to(acts.device), every_column.to(acts.device)).float().cpu()
        for group, acts in zip(pairs.groups, tensors)
    ])
