"""A basis found without labels: the rotation of a site that makes the Jacobian around it sparse.

Garrett Baker, "Taking the parameters which seem to matter and rotating them until they don't"
(LessWrong, 2022): rotate a layer's activations so that the Jacobian of the computation around
them has as many exact zeros as possible; local changes then have local effects, and the rotated
coordinates are candidate units of the network. The sparsity measure is

    S(A) = -sum_ij 1 / (|a_ij| + 0.1)        (lower is sparser)

which, unlike an L_n norm, rewards entries that reach zero over entries that are merely small.
The rotation is R = exp(B - B^T) (the matrix exponential of an antisymmetric matrix, always
orthogonal), learned by gradient descent on the mean S over many prompts' Jacobians: one basis
for the site, not one per input.

`side` says which Jacobian is rotated:
- "output": the Jacobian J of the map producing the site (rows are site coordinates): R J;
- "input": the Jacobian J of the map reading the site (columns are site coordinates): J R^T;
- "both": the sum of the two objectives.

The intervention built on it (dbm's mask over the rotated coordinates) is interventions/sparse_basis.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

OFFSET = 0.1  # the measure's offset: 1 / (|a| + 0.1) rewards exact zeros up to 10 per entry
ZERO_TOLERANCE = 1e-3  # an entry counts as zero below this fraction of its matrix's largest one
SIDES = ("output", "input", "both")
END_LR_FACTOR = 0.01


def sparsity(jacobians: Tensor) -> Tensor:
    """S of each matrix of [..., m, n]: -sum 1 / (|a| + 0.1); lower is sparser."""
    return -(1.0 / (jacobians.abs() + OFFSET)).sum(dim=(-2, -1))


def normalised(jacobians: Tensor) -> Tensor:
    """Each matrix divided by its largest absolute entry, so S compares prompts on one scale."""
    scale = jacobians.abs().amax(dim=(-2, -1), keepdim=True)
    return jacobians / scale.clamp_min(torch.finfo(jacobians.dtype).tiny)


def zeros_fraction(jacobians: Tensor, tolerance: float = ZERO_TOLERANCE) -> float:
    """Share of entries below `tolerance` times their matrix's largest absolute entry."""
    scale = jacobians.abs().amax(dim=(-2, -1), keepdim=True)
    return float((jacobians.abs() < tolerance * scale).float().mean())


class Rotation(nn.Module):
    """R = exp(B - B^T): orthogonal for every B; B = 0 (R = I) unless `start` gives a rotation to begin at."""

    def __init__(self, n: int, start: Tensor | None = None):
        super().__init__()
        self.generator = nn.Parameter(torch.zeros(n, n))
        self.register_buffer("start", torch.eye(n) if start is None else start.detach().clone())

    def forward(self) -> Tensor:
        skew = self.generator - self.generator.T
        return torch.linalg.matrix_exp(skew) @ self.start


def rotate(jacobians: Tensor, rotation: Tensor, side: str) -> Tensor:
    """`jacobians` in rotated site coordinates: R J for the map producing the site, J R^T for the one reading it."""
    return rotation @ jacobians if side == "output" else jacobians @ rotation.T


@dataclass
class RotationFit:
    rotation: Tensor  # n x n, orthogonal
    sparsity_before: float  # mean S of the normalised Jacobians, unrotated (both sides summed for "both")
    sparsity_after: float
    zeros_before: float  # share of (near-)zero entries, unrotated
    zeros_after: float
    history: list[float]  # mean S after every step


def fit_rotation(jacobians: dict[str, Tensor], steps: int = 500, lr: float = 0.1, restarts: int = 0,
                 seed: int = 0) -> RotationFit:
    """Learn one rotation of the site minimising the mean S of every given side's normalised Jacobians.

    `jacobians` maps "output" (the producing map's, [P, n, m]) and/or "input" (the reading map's,
    [P, m, n]) to one Jacobian per prompt; n is the site's width. Adam on the generator of R, its
    learning rate decaying linearly to 1% of `lr`. The objective has local minima: besides the
    identity, `restarts` random rotations (QR of a Gaussian matrix, from `seed`) are tried as
    starting points and the sparsest result is kept.
    """
    if not jacobians or set(jacobians) - {"output", "input"}:
        raise ValueError(f"jacobians: give 'output' and/or 'input' Jacobians, got {sorted(jacobians)}")
    prepared = {side: normalised(j.detach().float()) for side, j in jacobians.items()}
    n = _site_width(prepared)

    def objective(r: Tensor) -> Tensor:
        return sum(sparsity(rotate(j, r, side)).mean() for side, j in prepared.items())

    generator = torch.Generator().manual_seed(seed)
    starts = [None] + [torch.linalg.qr(torch.randn(n, n, generator=generator))[0] for _ in range(restarts)]
    rotation, _, history = min((_descend(objective, n, start, steps, lr) for start in starts), key=lambda fit: fit[1])
    identity = torch.eye(n)
    with torch.no_grad():
        zeros = [sum(zeros_fraction(rotate(j, m, side)) for side, j in prepared.items()) / len(prepared) for m in (identity, rotation)]
        return RotationFit(rotation, float(objective(identity)), float(objective(rotation)), zeros[0], zeros[1], history)


def _descend(objective, n: int, start: Tensor | None, steps: int, lr: float) -> tuple[Tensor, float, list[float]]:
    """Adam from `start`; returns the sparsest rotation met (the start included), its objective, the history.

    Adam's first steps move every generator entry by about `lr`, which can leave the start's basin:
    with few steps the last rotation may be less sparse than the start, so the best one is kept.
    """
    rotation = Rotation(n, start)
    optimizer = torch.optim.Adam(rotation.parameters(), lr=lr)
    # decaying to 1% lets the entries that should vanish settle at zero instead of circling it
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, END_LR_FACTOR, total_iters=max(steps, 1))
    history = []
    best, best_loss = None, float("inf")
    for _ in range(steps + 1):
        current = rotation()
        loss = objective(current)
        if float(loss.detach()) < best_loss:
            best, best_loss = current.detach().clone(), float(loss.detach())
        if len(history) == steps:  # the last rotation, scored only
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append(float(loss.detach()))
    return best, best_loss, history


def _site_width(jacobians: dict[str, Tensor]) -> int:
    widths = {j.shape[-2] if side == "output" else j.shape[-1] for side, j in jacobians.items()}
    if len(widths) != 1:
        raise ValueError(f"jacobians: the site's width differs between sides ({sorted(widths)})")
    return widths.pop()


JACOBIAN_CHUNK = 256  # output rows per batched backward pass


def producer_jacobian(lm, site, input_ids: Tensor, position: int) -> Tensor:
    """d site / d (block input) at `position` of one prompt, [width, hidden]: how the block that holds the
    site computes it from the residual stream entering that block, every other position held at its
    unedited value. `block_input` is computed by the block before (its producer); at layer 0 it has none."""
    from .sites import resolve_site

    if site.stream == "block_input":
        if site.layer == 0:
            raise ValueError("block_input at layer 0 is the embedding: no block produces it")
        site = resolve_site(lm, "block_output", site.layer - 1)
    entry = resolve_site(lm, "block_input", site.layer)
    residual = _read(lm, entry, input_ids)
    start = residual[0, position]
    return _jacobian(lambda x: _forward_edited(lm, entry, x, position, site, input_ids, residual), start, site.width)


def reader_jacobian(lm, site, input_ids: Tensor, position: int) -> Tensor:
    """d (output of the block that reads the site) / d site at `position`, [hidden, width]: the rest of the
    site's block, or the next block for `block_output`; the last block's output has no block reading it."""
    from .sites import resolve_site

    layer = site.layer + 1 if site.stream == "block_output" else site.layer
    if layer >= lm.n_layers:
        raise ValueError(f"{site.stream} at the last layer: no block reads it (side=input needs a layer after it)")
    exit_site = resolve_site(lm, "block_output", layer)
    residual = _read(lm, resolve_site(lm, "block_input", site.layer), input_ids)
    start = _read(lm, site, input_ids)[0, position]
    return _jacobian(lambda y: _forward_edited(lm, site, y, position, exit_site, input_ids, residual), start, lm.hidden_size)


class _Captured(Exception):
    pass


def _read(lm, site, input_ids: Tensor) -> Tensor:
    from .sites import read_site

    return read_site(lm, site, input_ids.to(lm.device)[None])


def _forward_edited(lm, edited, values: Tensor, position: int, read, input_ids: Tensor, residual: Tensor) -> Tensor:
    """One copy of the prompt per row of `values` [m, width]: `edited`'s columns at `position` set to that
    row, the forward stopped once `read`'s tensor exists; returns `read`'s columns there, [m, read width].
    The blocks before `edited`'s do no work: `residual` [1, T, hidden] (unedited) enters its block."""
    from .forward import skip_blocks_before
    from .sites import hooked

    m = values.shape[0]
    captured: list[Tensor] = []

    def write(hidden: Tensor) -> Tensor:
        hidden = hidden.clone()
        hidden[:, position, edited.columns.to(hidden.device)] = values.to(hidden.dtype)
        return hidden

    def grab(hidden: Tensor) -> None:
        captured.append(hidden[:, position, read.columns.to(hidden.device)])
        raise _Captured

    with skip_blocks_before(lm, edited.layer, residual.expand(m, -1, -1)), hooked(edited, write), hooked(read, grab):
        try:
            lm.model(input_ids=input_ids.to(lm.device)[None].expand(m, -1), use_cache=False)
        except _Captured:
            pass
    return captured[0]


def _jacobian(run, start: Tensor, n_out: int) -> Tensor:
    """[n_out, len(start)] by reverse mode, `JACOBIAN_CHUNK` output rows per pass: row i of a chunk is
    the gradient of output i of copy i of the input."""
    rows = []
    with torch.enable_grad():
        for first in range(0, n_out, JACOBIAN_CHUNK):
            m = min(JACOBIAN_CHUNK, n_out - first)
            x = start.detach().float().expand(m, -1).clone().requires_grad_(True)
            out = run(x)
            picked = out[torch.arange(m, device=out.device), first + torch.arange(m, device=out.device)]
            rows.append(torch.autograd.grad(picked.sum(), x)[0])
    return torch.cat(rows)
