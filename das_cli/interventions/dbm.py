"""dbm: a differentiable binary mask over the coordinates of a basis of the site (MIB's localist baselines,
arXiv 2504.13151).   h = b + V (m ⊙ Vᵀ (s − b)),  V = I for the neurons

`basis` chooses the coordinates:
    neurons          the site's own (V = I): h = b + m ⊙ (s − b)
    pca              the principal axes of the standardised training site vectors (MIB's DBM + PCA)
    svd              the right singular vectors of the raw training site vectors (MIB's DBM + SVD)
    sparse_jacobian  the rotation that makes the Jacobian of the site's map sparsest (Baker 2022;
                     sparse_rotation.py), learned from the model alone; `intervention=sparse_basis` is this
PCA and SVD keep every direction with a non-zero singular value (k ≤ the number of training vectors):
the rest of the site, which the training vectors do not span, keeps the base's value, as in MIB. The
sparse-Jacobian basis is one rotation of the site's width applied at each of the cell's positions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING
from torch import Tensor, nn

from das_cli import directions
from das_cli.errors import DasError, choices_error

from .base import Intervention, NoOptions, SiteActivations, as_saved, check_shapes, register

log = logging.getLogger(__name__)
BASES = ("neurons", "pca", "svd", "sparse_jacobian")
JACOBIAN_PLOT = "jacobian_rotation.png"
LOGITS_PLOT = "mask_logits.png"


@dataclass
class DbmOptions(NoOptions):
    temperature_start: float = MISSING
    temperature_end: float = MISSING
    l1_weight: float = MISSING
    basis: str = MISSING
    jacobian_side: str = MISSING
    jacobian_prompts: int = MISSING
    jacobian_steps: int = MISSING
    jacobian_restarts: int = MISSING


@register
class DBMIntervention(Intervention):
    """Differentiable binary mask over a basis' coordinates (the MIB localist baseline; De Cao et al.).

    m = σ(l / T) per coordinate in train mode; in eval mode the hard mask m = [l > 0]. Logits start
    at 0 (m = ½, no coordinate favoured) so a coordinate is kept only if training pushes its logit up.
    T falls log-linearly (geometrically) from temperature_start to temperature_end with
    `set_progress`: a linear schedule from 1 to 0.01 would stay above 0.5 for half of training
    and only sharpen the mask in the last steps. The loss adds l1_weight · mean(m). Bases other than
    the neurons are estimated before training: from the training activations (pca, svd) or from the
    model (sparse_jacobian, whose `jacobian_*` options say how; the other bases ignore them).
    """

    name = "dbm"
    Options = DbmOptions
    trainable = True

    def __init__(self, n: int, temperature_start: float = 1.0, temperature_end: float = 0.01, l1_weight: float = 1e-2,
                 basis: str = "neurons", jacobian_side: str = "output", jacobian_prompts: int = 8,
                 jacobian_steps: int = 100, jacobian_restarts: int = 2):
        super().__init__()
        _check_options(temperature_start, temperature_end, l1_weight, basis, jacobian_side, jacobian_prompts,
                       jacobian_steps, jacobian_restarts)
        self.n, self.basis = n, basis
        self.temperature_start, self.temperature_end = float(temperature_start), float(temperature_end)
        # The penalty is at most l1_weight nats (mean(m) ≤ 1): 0.01 is far below the loss a useful
        # coordinate saves (chance-level CE on a binary variable is 0.69), so it does not trade IIA for
        # sparsity; it turns off the coordinates whose swap does not change the loss.
        self.l1_weight = float(l1_weight)
        self.jacobian_side, self.jacobian_prompts = jacobian_side, jacobian_prompts
        self.jacobian_steps, self.jacobian_restarts = jacobian_steps, jacobian_restarts
        self.logits = nn.Parameter(torch.zeros(n))
        self.register_buffer("temperature", torch.tensor(self.temperature_start))
        self.register_buffer("features", None)  # n × k, orthonormal columns: the basis (None: the neurons)
        self.register_buffer("rotation", None)  # sparse_jacobian: the site's w × w rotation
        self.needs_activations = basis in ("pca", "svd")
        self.needs_model = basis == "sparse_jacobian"
        self.illusion_split = basis != "neurons"  # an orthogonal swap of the kept coordinates' span
        self.example: dict[str, tuple[Tensor, str]] = {}  # one prompt's Jacobian per side, unrotated (for the plot)

    # --- estimating the basis ---------------------------------------------------------------------

    def fit_activations(self, acts: SiteActivations) -> None:
        """pca / svd: the basis from the training prompts' site vectors (base and source prompts)."""
        estimate = directions.standardised_principal_axes if self.basis == "pca" else directions.singular_directions
        self.set_features(estimate(acts.values.float()).to(self.logits.device))

    def fit_model(self, lm, site, pairs, position: tuple, seed: int) -> dict:
        """sparse_jacobian: the rotation from the Jacobians at `position` of `jacobian_prompts` base prompts of
        `pairs` (drawn with `seed`); returns the row's figures of the rotation."""
        from das_cli.data import resolve_positions
        from das_cli.sparse_rotation import site_jacobian

        prompts = [(g.base_ids[i], rows[i]) for g in pairs.groups for rows in [resolve_positions(g, position, "base")]
                   for i in range(len(g))]
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[: self.jacobian_prompts]
        sides = ("output", "input") if self.jacobian_side == "both" else (self.jacobian_side,)
        start = time.perf_counter()
        jacobians, acts = {}, {}
        for side in sides:
            taken = [site_jacobian(lm, site, side, prompts[k][0], int(p)) for k in order.tolist() for p in prompts[k][1]]
            jacobians[side], acts[side] = torch.stack([j.cpu() for j, _ in taken]), taken[0][1]
        middle = time.perf_counter()
        figures = self.fit_jacobians(jacobians, acts, seed)
        log.info("dbm basis=sparse_jacobian: %d Jacobians in %.1f s, rotation of %d (at most %d steps from %d starts) "
                 "in %.1f s", sum(len(j) for j in jacobians.values()), middle - start, site.width, self.jacobian_steps,
                 self.jacobian_restarts + 1, time.perf_counter() - middle)
        return figures

    def fit_jacobians(self, jacobians: dict[str, Tensor], acts: dict[str, str] | None = None, seed: int = 0) -> dict:
        """The rotation from given Jacobians (`sparse_rotation.fit_rotation`); returns the row's figures."""
        from das_cli.sparse_rotation import SIDE_ACTS, fit_rotation, normalised

        fit = fit_rotation(jacobians, acts, self.jacobian_steps, self.jacobian_restarts, seed)
        if fit.steps_taken == 0:
            log.warning("dbm basis=sparse_jacobian: the sparsest rotation found is its start (%s): no step from any "
                        "start made the Jacobians sparser", fit.start)
        self.set_rotation(fit.rotation)
        acts = {**SIDE_ACTS, **(acts or {})}
        self.example = {side: (normalised(j[0].detach().float().cpu()), acts[side]) for side, j in jacobians.items()}
        return {"sparsity_before": fit.sparsity_before, "sparsity_after": fit.sparsity_after,
                "zeros_before": fit.zeros_before, "zeros_after": fit.zeros_after,
                "rotation_start": fit.start, "rotation_steps": fit.steps_taken}

    def set_rotation(self, rotation: Tensor) -> None:
        """The basis of a sparse-Jacobian rotation R (w × w, w dividing n): Rᵀ at each position's block."""
        width = rotation.shape[0]
        if rotation.dim() != 2 or rotation.shape[1] != width or self.n % width:
            raise ValueError(f"rotation of shape {tuple(rotation.shape)}, not w x w with w dividing {self.n}")
        self.rotation = rotation.to(self.logits.device, torch.float32)
        self.set_features(torch.block_diag(*[self.rotation.T] * (self.n // width)))

    def set_features(self, features: Tensor) -> None:
        """Mask the coordinates of `features` (n × k, orthonormal columns); the mask gets k logits, at 0."""
        if features.dim() != 2 or features.shape[0] != self.n:
            raise ValueError(f"features of shape {tuple(features.shape)}, not {self.n} x k")
        self.features = features.to(self.logits.device, torch.float32).contiguous()
        if self.logits.shape[0] != features.shape[1]:
            self.logits = nn.Parameter(torch.zeros(features.shape[1], device=self.logits.device))

    # --- the edit -----------------------------------------------------------------------------------

    def soft_mask(self) -> Tensor:
        return torch.sigmoid(self.logits / self.temperature)

    def hard_mask(self) -> Tensor:
        return (self.logits > 0).float()

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        check_shapes(base, source, self.n)
        if self.features is None and self.basis != "neurons":
            raise RuntimeError(f"intervention=dbm basis={self.basis}: estimate the basis before using it")
        if self.features is None:
            if not self.training:  # an exact neuron swap, like vanilla with `neurons`
                return torch.where(self.logits > 0, source.to(base.dtype), base)
            b, s = base.float(), source.float()
            return (b + self.soft_mask() * (s - b)).to(base.dtype)
        b, s = base.float(), source.float()
        mask = self.soft_mask() if self.training else self.hard_mask()
        return (b + (((s - b) @ self.features) * mask) @ self.features.T).to(base.dtype)

    def set_progress(self, fraction: float) -> None:
        f = min(max(float(fraction), 0.0), 1.0)
        self.temperature.fill_(self.temperature_start * (self.temperature_end / self.temperature_start) ** f)

    def extra_loss(self) -> Tensor:
        return self.l1_weight * self.soft_mask().mean()

    def learned_dim(self) -> int:
        """Coordinates the hard mask keeps (0 when none is)."""
        return int((self.logits > 0).sum())

    def gain(self) -> float:
        return 1.0 if self.learned_dim() else 0.0

    def edit_directions(self) -> Tensor:
        """The kept neurons' indices, or the kept coordinates' directions (n × r, orthonormal)."""
        kept = torch.nonzero(self.logits.detach() > 0).flatten()
        return kept if self.features is None else self.features[:, kept.to(self.features.device)]

    # --- saving and loading ---------------------------------------------------------------------

    def saved(self) -> dict[str, Tensor]:
        tensors = {"mask": as_saved(self.hard_mask()), "logits": as_saved(self.logits)}
        if self.features is not None:
            tensors.update(features=as_saved(self.features), basis=as_saved(self.edit_directions()))
        if self.rotation is not None:
            tensors["rotation"] = as_saved(self.rotation)
        return tensors

    def load(self, tensors: dict[str, Tensor]) -> None:
        if self.basis == "sparse_jacobian" and "features" not in tensors:  # written before the basis was stored
            self.set_rotation(tensors["rotation"])
        elif self.basis == "sparse_jacobian":
            self.rotation = tensors["rotation"].to(self.logits.device, torch.float32)
            self.set_features(tensors["features"])
        elif self.basis != "neurons":
            self.set_features(tensors["features"])
        with torch.no_grad():
            self.logits.copy_(tensors["logits"])

    def plot(self, directory) -> None:
        """The mask logits' distribution and, for the sparse-Jacobian basis, one Jacobian before and after rotation."""
        from das_cli.results import histogram, side_by_side_heatmaps
        from das_cli.sparse_rotation import ZERO_TOLERANCE, rotate

        if self.basis == "neurons":
            return
        histogram(self.logits.detach().cpu().numpy(), Path(directory) / LOGITS_PLOT, "mask logits (kept: > 0)")
        if not self.example:  # loaded from a finished cell, or another basis: no Jacobian was computed here
            return
        side, (before, act) = next(iter(self.example.items()))
        after = rotate(before, self.rotation.cpu(), act)
        names = {"output": "the map producing the site", "input": "the map reading the site"}
        magnitude = lambda j: torch.log10(j.abs() + ZERO_TOLERANCE).numpy()  # noqa: E731  zeros dark, not one bright entry
        side_by_side_heatmaps(magnitude(before), magnitude(after), Path(directory) / JACOBIAN_PLOT,
                              f"log10(|normalised Jacobian| + 1e-3) of {names[side]}, one prompt", ("site basis", "rotated basis"))


def _check_options(temperature_start: float, temperature_end: float, l1_weight: float, basis: str, side: str,
                   prompts: int, steps: int, restarts: int) -> None:
    from das_cli.sparse_rotation import SIDES

    for key, value in [("temperature_start", temperature_start), ("temperature_end", temperature_end)]:
        if not value > 0:
            raise DasError(f"intervention.{key}={value}: must be > 0")
    if not l1_weight >= 0:
        raise DasError(f"intervention.l1_weight={l1_weight}: must be >= 0")
    if basis not in BASES:
        raise choices_error("intervention.basis", basis, BASES)
    if side not in SIDES:
        raise choices_error("intervention.jacobian_side", side, SIDES)
    for key, value, least in [("jacobian_prompts", prompts, 1), ("jacobian_steps", steps, 0), ("jacobian_restarts", restarts, 0)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DasError(f"intervention.{key}={value}: must be an integer >= {least}")
