"""Scores beside IIA: its Wilson interval, and how large and how unnatural the applied edit is.

`gain` is ‖M‖₂ of the map an intervention applies, h = b + M (s − b). `ood` is the largest
|z-score| of the edited test vectors along the directions M writes, each direction's mean and
standard deviation taken over the unedited training activations (base and source prompts).
An interchange moves a base vector to values the model produces itself (|z| of a few); an
edit far outside them steers the model rather than interchanging a variable.
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


@torch.no_grad()
def edit_scores(intervention: Intervention, natural: Tensor, base: Tensor, source: Tensor) -> dict[str, float]:
    """`gain` and `ood` of the intervention (in eval mode) applied to test vectors `base`, `source` ([M, n])."""
    device = intervention._device()
    edited = intervention(base.to(device), source.to(device))
    return {"gain": intervention.gain(), "ood": largest_z(edited.cpu(), natural.cpu(), intervention.edit_directions().cpu())}


@torch.no_grad()
def base_vectors(site: Site, position: tuple, pairs: PairSet, tensors: list[Tensor]) -> Tensor:
    """The unedited site vectors of every base prompt at `position` ([N, P*C] float32 on the CPU), group by
    group, from the site's tensors on the base prompts (`tensors`, [N, T, C] per group)."""
    every_column = torch.arange(site.width)
    return torch.cat([
        gather(acts, resolve_positions(group, position, "base").to(acts.device), every_column.to(acts.device)).float().cpu()
        for group, acts in zip(pairs.groups, tensors)
    ])
