"""A basis found without labels: the rotation of a site that makes the Jacobian around it sparse.

Garrett Baker, "Taking the parameters which seem to matter and rotating them until they don't"
(LessWrong, 2022): rotate a layer's activations so that the Jacobian of the layer's own map has as
many exact zeros as possible; local changes then have local effects, and the rotated coordinates
are candidate units of the network. The sparsity measure is

    S(A) = -sum_ij 1 / (|a_ij| + 0.1)        (lower is sparser)

which, unlike an L_n norm, rewards entries that reach zero over entries that are merely small.

Which map, and how the rotation R of the site acts on its Jacobian J (`jacobian_map`):
- a residual-stream site (block_input, block_output) is both the input and the output of a block's
  update x -> x + F(x). The map is the residual branch F alone (J = d block_output / d block_input
  minus the identity: the skip connection is not the block's computation), and the change of basis
  acts on both sides, R J Rᵀ. Rotating only one side of I + F would mostly measure how far R is from
  a signed permutation and favour R = I whatever the network computes;
- a site inside a block (the MLP's hidden activation, a sublayer's output, q/k/v, ...) sits between
  two different spaces: the map producing it (`side=output`: from the sublayer's input, R J) or
  the map reading it (`side=input`: to the sublayer's output, or the next block's update for a
  sublayer output added to the residual stream; J Rᵀ).

The rotation is found by Adam on the rotation group (`_descend`): the moments of the objective's
Riemannian gradient give an antisymmetric update U and R <- exp(-U) R, each step's angle capped so
that its size does not grow with the site's width, after a short warm-up. S has kinks at every
zero entry, where plain gradient descent with a line search stalls (measured: planted bases were
recovered 0 times in 8 that way, 8 in 8 with this rule); Adam's normalised steps cross them. The
identity and `restarts` random rotations are starting points; the sparsest rotation met is kept
and the fit says which start it came from and at which step (0: nothing was sparser than the start).

The intervention built on it (dbm's mask over the rotated coordinates) is interventions/dbm.py
with basis=sparse_jacobian (alias intervention=sparse_basis).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

OFFSET = 0.1  # the measure's offset: 1 / (|a| + 0.1) rewards exact zeros up to 10 per entry
ZERO_TOLERANCE = 1e-3  # an entry counts as zero below this fraction of its matrix's largest one
SIDES = ("output", "input", "both")
ACTS = ("left", "right", "both")  # R J, J Rᵀ, R J Rᵀ
SIDE_ACTS = {"output": "left", "input": "right"}  # how R acts on a one-sided term named by its side
RESIDUAL_STREAMS = ("block_input", "block_output")
MAX_ANGLE = 0.2  # radians: the most a step turns in any plane (see _descend)
WARMUP_STEPS = 10  # the angle grows linearly over these steps while Adam's moments form
END_FACTOR = 0.01  # then falls linearly to this fraction of MAX_ANGLE at the last step
BETAS = (0.9, 0.999)  # Adam's


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


def rotate(jacobians: Tensor, rotation: Tensor, act: str) -> Tensor:
    """`jacobians` in rotated site coordinates: R J (the site is the map's output), J Rᵀ (its input), R J Rᵀ (both)."""
    if act == "left":
        return rotation @ jacobians
    if act == "right":
        return jacobians @ rotation.T
    return rotation @ jacobians @ rotation.T


def random_rotation(n: int, generator: torch.Generator) -> Tensor:
    """A Haar-distributed orthogonal matrix (QR of a Gaussian one, R's diagonal signs moved into Q)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


@dataclass
class RotationFit:
    rotation: Tensor  # n x n, orthogonal
    sparsity_before: float  # mean S of the normalised Jacobians, unrotated (summed over the terms)
    sparsity_after: float
    zeros_before: float  # share of (near-)zero entries, unrotated
    zeros_after: float
    start: str  # the start the kept rotation came from: "identity" or "random <k>"
    steps_taken: int  # the step of that start's descent the kept rotation was met at; 0: the start itself
    history: list[float]  # S after each step of the kept start, up to the kept rotation


def fit_rotation(jacobians: dict[str, Tensor], acts: dict[str, str] | None = None, steps: int = 100,
                 restarts: int = 2, seed: int = 0) -> RotationFit:
    """Learn one rotation of the site minimising the summed mean S of every term's normalised Jacobians.

    `jacobians` maps a term's name to one Jacobian per prompt [P, a, b]; `acts` says how the rotation
    acts on it ("left", "right" or "both"; by default "output" terms left and "input" terms right).
    Starts: the identity, then `restarts` random rotations drawn with `seed`; `steps` steps from each.
    """
    acts = {**SIDE_ACTS, **(acts or {})}
    unknown = [name for name in jacobians if acts.get(name) not in ACTS]
    if not jacobians or unknown:
        raise ValueError(f"jacobians: every term needs an act in {ACTS}; got terms {sorted(jacobians)}")
    terms = [(normalised(j.detach().float()), acts[name]) for name, j in jacobians.items()]
    n = _site_width(terms)

    def objective(r: Tensor) -> Tensor:
        return sum(sparsity(rotate(j, r, act)).mean() for j, act in terms)

    generator = torch.Generator().manual_seed(seed)
    starts = [("identity", torch.eye(n))] + [(f"random {k + 1}", random_rotation(n, generator)) for k in range(restarts)]
    fits = [(name, *_descend(objective, start, steps)) for name, start in starts]
    name, rotation, loss, history = min(fits, key=lambda fit: fit[2])
    identity = torch.eye(n)
    with torch.no_grad():
        zeros = [sum(zeros_fraction(rotate(j, m, act)) for j, act in terms) / len(terms) for m in (identity, rotation)]
        return RotationFit(rotation, float(objective(identity)), loss, zeros[0], zeros[1], name, len(history), history)


def _descend(objective, start: Tensor, steps: int) -> tuple[Tensor, float, list[float]]:
    """Adam on the rotation group from `start`: (the sparsest rotation met, its S, S after each step up to it).

    At R the Euclidean gradient G of S gives the Riemannian one as the antisymmetric A = G Rᵀ − R Gᵀ;
    Adam's moments of A give an antisymmetric update U, R ← exp(−U) R. U is scaled so that it turns by
    at most MAX_ANGLE radians in any plane (its spectral norm), times a schedule that warms up over
    WARMUP_STEPS and then falls linearly to END_FACTOR. Plain Adam moves every generator entry by about
    its learning rate, a rotation whose angle grows with the width (with 576 coordinates, a step of 0.05
    per entry turns by several radians and leaves every basin); the cap makes a step's size independent
    of the width and of the Jacobians' scale. The sparsest rotation met is kept, so the result is never
    less sparse than the start; `history` stops at it (empty: the start was kept).
    """
    rotation, first, second = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    best, best_loss, history, trail = rotation, float(objective(rotation)), [], []
    for step in range(1, steps + 1):
        with torch.enable_grad():
            r = rotation.clone().requires_grad_(True)
            gradient = torch.autograd.grad(objective(r), r)[0]
        a = gradient @ rotation.T
        a = a - a.T
        first.mul_(BETAS[0]).add_(a, alpha=1 - BETAS[0])
        second.mul_(BETAS[1]).addcmul_(a, a, value=1 - BETAS[1])
        update = (first / (1 - BETAS[0] ** step)) / ((second / (1 - BETAS[1] ** step)).sqrt() + 1e-8)
        size = _spectral_norm(update)
        if size == 0.0:  # a stationary point: nothing moves any more
            break
        angle = MAX_ANGLE * min(step / WARMUP_STEPS, 1.0) * (1 - (1 - END_FACTOR) * (step - 1) / max(steps - 1, 1))
        with torch.no_grad():
            rotation = _nearest_orthogonal(torch.linalg.matrix_exp(update * (-angle / size)) @ rotation)
            loss = float(objective(rotation))
        trail.append(loss)
        if loss < best_loss:
            best, best_loss, history = rotation, loss, list(trail)
    return best, best_loss, history


def _spectral_norm(m: Tensor, iterations: int = 30) -> float:
    """The largest singular value of m by power iteration on mᵀm (from a fixed vector: deterministic)."""
    v = torch.ones(m.shape[1], dtype=m.dtype) / m.shape[1] ** 0.5
    for _ in range(iterations):
        w = m.T @ (m @ v)
        norm = float(torch.linalg.vector_norm(w))
        if norm == 0.0:
            return 0.0
        v = w / norm
    return float(torch.linalg.vector_norm(m @ v))


def _nearest_orthogonal(m: Tensor) -> Tensor:
    """U Vᵀ of m's SVD: removes the rounding a product of many exponentials accumulates."""
    u, _, vh = torch.linalg.svd(m.double())
    return (u @ vh).float()


def _site_width(terms: list[tuple[Tensor, str]]) -> int:
    widths = set()
    for j, act in terms:
        if act == "both" and j.shape[-1] != j.shape[-2]:
            raise ValueError(f"jacobians: a two-sided term needs square matrices, got {tuple(j.shape[-2:])}")
        widths.add(j.shape[-1] if act == "right" else j.shape[-2])
    if len(widths) != 1:
        raise ValueError(f"jacobians: the site's width differs between terms ({sorted(widths)})")
    return widths.pop()


# --- which map, and its Jacobian -------------------------------------------------------------------

# The input of the sublayer that computes a stream inside a block (side=output); others: the block's input.
SUBLAYER_INPUT = {"mlp": "mlp_input", "mlp_activation": "mlp_input", "attention": "attention_input",
                  "qkv": "attention_input", "attention_out_proj": "attention_input"}


@dataclass(frozen=True)
class JacobianMap:
    """The map one side of a site takes the Jacobian of: d exit / d entry at the site's position."""

    entry: tuple[str, int]  # (stream, layer) differentiated against
    exit: tuple[str, int]  # (stream, layer) differentiated
    residual_branch: bool  # J minus the identity: a block's update without its skip connection
    act: str  # how the site's rotation acts on J: "left" (R J), "right" (J Rᵀ), "both" (R J Rᵀ)


def jacobian_map(stream: str, layer: int, side: str, n_layers: int) -> JacobianMap:
    """The map whose Jacobian `side` ("output": the map producing the site; "input": the one reading it) takes."""
    from .names import STREAM_TABLE

    if stream in RESIDUAL_STREAMS:
        block = layer + {("block_input", "output"): -1, ("block_output", "input"): 1}.get((stream, side), 0)
        _check_block(stream, block, side, n_layers)
        return JacobianMap(("block_input", block), ("block_output", block), True, "both")
    if side == "output":
        entry = "block_input" if stream in ("attention_input", "mlp_input") else SUBLAYER_INPUT[STREAM_TABLE[stream].module]
        return JacobianMap((entry, layer), (stream, layer), False, "left")
    if stream == "mlp_output":  # added to the residual stream: read by the next block's update
        _check_block(stream, layer + 1, side, n_layers)
        return JacobianMap(("block_input", layer + 1), ("block_output", layer + 1), True, "right")
    if stream in ("attention_output", "mlp_activation"):  # read by the MLP (the skip passes attention_output on as it is)
        return JacobianMap((stream, layer), ("mlp_output", layer), False, "right")
    return JacobianMap((stream, layer), ("block_output", layer), False, "right")


def _check_block(stream: str, block: int, side: str, n_layers: int) -> None:
    if block < 0:
        raise ValueError(f"{stream} at layer 0 is the embedding: no block produces it (side=output needs a layer before it)")
    if block >= n_layers:
        raise ValueError(f"{stream} at the last layer: no block reads it (side=input needs a layer after it)")


JACOBIAN_CHUNK = 256  # output rows per batched backward pass


def site_jacobian(lm, site, side: str, input_ids: Tensor, position: int) -> tuple[Tensor, str]:
    """The Jacobian of `side`'s map (`jacobian_map`) at `position` of one prompt, every other position held at
    its unedited value, and how the site's rotation acts on it."""
    from .sites import resolve_site

    spec = jacobian_map(site.stream, site.layer, side, lm.n_layers)
    entry, exit_ = (site if where == (site.stream, site.layer) else resolve_site(lm, *where) for where in (spec.entry, spec.exit))
    residual = _read(lm, resolve_site(lm, "block_input", entry.layer), input_ids)
    start = _read(lm, entry, input_ids)[0, position]
    jacobian = _jacobian(lambda x: _forward_edited(lm, entry, x, position, exit_, input_ids, residual), start, exit_.width)
    if spec.residual_branch:
        jacobian = jacobian - torch.eye(len(jacobian), device=jacobian.device, dtype=jacobian.dtype)
    return jacobian, spec.act


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
