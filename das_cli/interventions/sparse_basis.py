"""sparse_basis: dbm's mask over the coordinates of a sparse-Jacobian basis of the site.   h = b + Rᵀ (m ⊙ R (s − b))

The rotation R comes from sparse_rotation.py (Baker 2022: rotate a layer's activations until the Jacobian
around them is sparse), learned without labels before the mask is trained.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from omegaconf import MISSING
from torch import Tensor

from das_cli.data import PairSet, resolve_positions
from das_cli.errors import DasError, choices_error
from das_cli.sparse_rotation import SIDES, fit_rotation, normalised, producer_jacobian, reader_jacobian, rotate

from .base import as_saved, check_shapes, register
from .dbm import DBMIntervention, DbmOptions

log = logging.getLogger(__name__)
JACOBIAN_PLOT = "jacobian_rotation.png"
LOGITS_PLOT = "mask_logits.png"


@dataclass
class SparseBasisOptions(DbmOptions):
    side: str = MISSING
    n_prompts: int = MISSING
    steps: int = MISSING
    lr: float = MISSING
    restarts: int = MISSING


@register
class SparseBasisIntervention(DBMIntervention):
    """h = b + Rᵀ (m ⊙ R (s − b)) per position: dbm's mask over the coordinates of the sparse-Jacobian basis.

    R (site width w × w) is learned without labels by `fit_model` before training: the Jacobians
    of `side` at the cell's positions on `n_prompts` training base prompts, then `fit_rotation`.
    For a cell over P positions n = P · w, one R serves every position and the mask has n entries.
    The mask is trained, annealed and evaluated (hard, [logit > 0]) as dbm's is.
    """

    name = "sparse_basis"
    Options = SparseBasisOptions
    needs_model = True
    illusion_split = True

    def __init__(self, n: int, side: str = "output", n_prompts: int = 16, steps: int = 200, lr: float = 0.05,
                 restarts: int = 0, temperature_start: float = 1.0, temperature_end: float = 0.01, l1_weight: float = 1e-2):
        super().__init__(n, temperature_start, temperature_end, l1_weight)
        if side not in SIDES:
            raise choices_error("intervention.side", side, SIDES)
        for key, value, least in [("n_prompts", n_prompts, 1), ("steps", steps, 0), ("restarts", restarts, 0)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DasError(f"intervention.{key}={value}: must be an integer >= {least}")
        if not lr > 0:
            raise DasError(f"intervention.lr={lr}: must be > 0")
        self.side, self.n_prompts, self.steps, self.lr, self.restarts = side, n_prompts, steps, float(lr), restarts
        self.register_buffer("rotation", None)
        self.example: dict[str, Tensor] = {}  # one prompt's normalised Jacobian per side, unrotated (for the plot)

    def fit_model(self, lm, site, pairs: PairSet, position: tuple, seed: int) -> dict:
        """Learn R from the Jacobians at `position` of `n_prompts` base prompts of `pairs` (drawn with `seed`);
        returns the row's sparsity figures."""
        prompts = [(g.base_ids[i], rows[i]) for g in pairs.groups for rows in [resolve_positions(g, position, "base")]
                   for i in range(len(g))]
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[: self.n_prompts]
        sides = ("output", "input") if self.side == "both" else (self.side,)
        jacobian_of = {"output": producer_jacobian, "input": reader_jacobian}
        start = time.perf_counter()
        jacobians = {
            side: torch.stack([jacobian_of[side](lm, site, prompts[k][0], int(p)).cpu() for k in order.tolist() for p in prompts[k][1]])
            for side in sides
        }
        middle = time.perf_counter()
        figures = self.fit_jacobians(jacobians, seed)
        log.info("sparse_basis: %d Jacobians in %.1f s, rotation of %d (%d steps, %d starts) in %.1f s",
                 sum(len(j) for j in jacobians.values()), middle - start, site.width, self.steps, self.restarts + 1,
                 time.perf_counter() - middle)
        return figures

    def fit_jacobians(self, jacobians: dict[str, Tensor], seed: int = 0) -> dict:
        """Learn R from given Jacobians ("output": [K, w, m] and/or "input": [K, m, w]); returns the sparsity figures."""
        fit = fit_rotation(jacobians, self.steps, self.lr, self.restarts, seed)
        width = fit.rotation.shape[0]
        if self.n % width:
            raise ValueError(f"the cell's width {self.n} is no multiple of the Jacobians' site width {width}")
        self.rotation = fit.rotation.to(self.logits.device)
        self.example = {side: normalised(j[0].detach().float().cpu()) for side, j in jacobians.items()}
        return {"sparsity_before": fit.sparsity_before, "sparsity_after": fit.sparsity_after,
                "zeros_before": fit.zeros_before, "zeros_after": fit.zeros_after}

    def load(self, tensors: dict[str, Tensor]) -> None:
        super().load(tensors)
        rotation = tensors["rotation"]
        if rotation.dim() != 2 or rotation.shape[0] != rotation.shape[1] or self.n % rotation.shape[0]:
            raise ValueError(f"rotation of shape {tuple(rotation.shape)}, not w x w with w dividing {self.n}")
        self.rotation = rotation.to(self.logits.device, torch.float32)

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        check_shapes(base, source, self.n)
        if self.rotation is None:
            raise RuntimeError("intervention=sparse_basis: call fit_model (or fit_jacobians) before using it")
        R = self.rotation
        b, s = base.float(), source.float()
        mask = (self.soft_mask() if self.training else self.hard_mask()).view(-1, R.shape[0])
        rotated = (s - b).unflatten(-1, (-1, R.shape[0])) @ R.T  # R (s − b) at each position
        return (b + ((rotated * mask) @ R).flatten(-2)).to(base.dtype)

    def edit_directions(self) -> Tensor:
        """Rᵀ's columns of the kept coordinates, each at its position's block: n × r, orthonormal."""
        width = self.rotation.shape[0]
        kept = super().edit_directions().to(self.rotation.device)
        directions = torch.zeros(self.n, len(kept), device=self.rotation.device)
        for column, k in enumerate(kept.tolist()):
            block = (k // width) * width
            directions[block : block + width, column] = self.rotation[k % width]
        return directions

    def saved(self) -> dict[str, Tensor]:
        return {**super().saved(), "rotation": as_saved(self.rotation), "basis": as_saved(self.edit_directions())}

    def plot(self, directory) -> None:
        """The example Jacobian before and after rotation, and the mask logits' distribution, into `directory`."""
        from pathlib import Path

        from das_cli.results import histogram, side_by_side_heatmaps

        histogram(self.logits.detach().cpu().numpy(), Path(directory) / LOGITS_PLOT, "mask logits (kept: > 0)")
        if not self.example:  # loaded from a finished cell: no Jacobian was computed here
            return
        side, before = next(iter(self.example.items()))
        after = rotate(before, self.rotation.cpu(), side)
        names = {"output": "d site / d block input", "input": "d reading block / d site"}
        side_by_side_heatmaps(before.abs().numpy(), after.abs().numpy(), Path(directory) / JACOBIAN_PLOT,
                              f"|normalised Jacobian| ({names[side]}), one prompt", ("site basis", "rotated basis"))
