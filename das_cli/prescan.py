"""The first-order prescan: every cell of the grid scored before any training (`search.prescan=true`).

A DAS swap along the orthonormal columns of W (n x k) edits a base vector b into b + W Wᵀ (s - b). For a small
edit the change of pair i's counterfactual loss is, to first order, gᵢᵀ W Wᵀ dᵢ, with gᵢ the gradient of that loss
with respect to bᵢ in the unedited model and dᵢ = sᵢ - bᵢ. Over the training pairs the change of the mean loss is

    Δ(W) ≈ tr(Wᵀ M W),   M = (1/N) Σᵢ gᵢ dᵢᵀ,

and since tr(Wᵀ M W) only sees M's symmetric part S = (M + Mᵀ)/2, the W with orthonormal columns that lowers it
most spans the eigenvectors of S's k most negative eigenvalues (Ky Fan's theorem); minus their sum is the
predicted drop of the mean training cross-entropy, the cell's `prescan` score (in nats; k = intervention.dim).
The score is first order: it ranks cells by how much a small swap would help, and can miss a cell whose gain
needs a large edit or a non-linear one (docs/search.md says where it fails).

Cost: one forward over the source prompts without gradients and one forward and backward over the base prompts
(hooks at every site of the grid at once), about one epoch of one cell, for the whole grid. The sites are read
in chunks that bound the tensors held (activations.chunks), one forward and backward per chunk.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from . import folder as layout
from .activations import chunks, read_prompts
from .data import PairSet, answer_matrix, resolve_positions, teacher_forced
from .files import atomic_write
from .grid import Cell, site_key
from .models import LoadedModel
from .readout import answer_cross_entropy
from .sites import Site, gather, hooked

COLUMNS = ("cell", "prescan", "prescan_k")


@dataclass
class CellPrescan:
    """A cell's first-order prescan: its score and the subspace that attains it."""

    score: float  # predicted drop of the mean training cross-entropy for the best k-dimensional swap (nats)
    eigenvalues: Tensor  # [k] the k most negative eigenvalues of S, ascending
    directions: Tensor  # [n, k] their unit eigenvectors (columns)


def first_order(base: Tensor, source: Tensor, grad: Tensor, k: int) -> CellPrescan:
    """The prescan of one cell from its training pairs' base vectors, source vectors and loss gradients (each
    [N, n]; `grad` of the summed loss, so row i is gᵢ): the k most negative eigenpairs of S = sym((1/N) Σ gᵢ dᵢᵀ).

    S has rank at most 2N: with n > 2N it is diagonalised inside the span of the gᵢ and dᵢ (its other
    eigenvalues are 0), which gives the same eigenpairs for a fraction of a full n x n decomposition."""
    g, d = grad.double(), (source - base).double()
    n_pairs, n = g.shape
    if 2 * n_pairs < n:
        span = torch.linalg.qr(torch.cat([g, d]).T).Q  # [n, r] orthonormal
        gs, ds = g @ span, d @ span
        values, vectors = torch.linalg.eigh((gs.T @ ds + ds.T @ gs) / (2 * n_pairs))
        vectors = span @ vectors
        spectrum = torch.cat([values, values.new_zeros(min(n - span.shape[1], k))]).sort().values  # S's 0s outside the span
    else:
        m = g.T @ d / n_pairs
        values, vectors = torch.linalg.eigh((m + m.T) / 2)
        spectrum = values
    k_values, k_vectors = min(k, spectrum.numel()), min(k, vectors.shape[1])
    return CellPrescan(float(-spectrum[:k_values].sum()), spectrum[:k_values].float(), vectors[:, :k_vectors].float())


def site_gradients(lm: LoadedModel, sites: list[Site], pairs: PairSet, batch_size: int) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """Per site, per group [G, T, C]: the site's columns on the base prompts, and the gradient of the summed
    counterfactual cross-entropy (teacher-forced as the engines do) with respect to them; one forward and
    backward per batch for every site at once. The gradient reaches a site by a zero added there (a leaf),
    so it counts every path from the site to the loss, through the later sites too."""
    modules = list(dict.fromkeys((site.module, site.side) for site in sites))
    values: list[list[Tensor]] = [[] for _ in sites]
    grads: list[list[Tensor]] = [[] for _ in sites]
    for group in pairs.groups:
        ids = group.base_ids.to(lm.device)
        labels = answer_matrix(group.labels).to(lm.device)
        fed = torch.cat([ids, teacher_forced(labels)], dim=1)
        parts: list[tuple[list[Tensor], list[Tensor]]] = []
        for first in range(0, len(ids), batch_size):
            rows = slice(first, first + batch_size)
            parts.append(_batch_gradients(lm, sites, modules, fed[rows], labels[rows], ids.shape[1]))
        for k in range(len(sites)):
            values[k].append(torch.cat([v[k] for v, _ in parts]))
            grads[k].append(torch.cat([g[k] for _, g in parts]))
    return values, grads


def _batch_gradients(lm: LoadedModel, sites: list[Site], modules: list, fed: Tensor, labels: Tensor, prompt: int):
    zeros: dict[int, Tensor] = {}
    captured: dict[int, Tensor] = {}

    def add_zero(hidden: Tensor, m: int) -> Tensor:
        zeros[m] = hidden.new_zeros(hidden.shape, requires_grad=True)
        captured[m] = hidden.detach()
        return hidden + zeros[m]

    with ExitStack() as stack:
        for m, (module, side) in enumerate(modules):
            probe = Site("prescan", -1, module, side, torch.arange(0))
            stack.enter_context(hooked(probe, lambda hidden, m=m: add_zero(hidden, m)))
        logits = lm.model(input_ids=fed, logits_to_keep=labels.shape[1], use_cache=False).logits.float()
    loss = answer_cross_entropy(logits, labels, reduction="sum")
    order = list(range(len(modules)))
    found = torch.autograd.grad(loss, [zeros[m] for m in order], allow_unused=True)
    by_module = {m: (g if g is not None else torch.zeros_like(zeros[m])) for m, g in zip(order, found)}
    index = {key: m for m, key in enumerate(modules)}
    out_values, out_grads = [], []
    for site in sites:
        m = index[site.module, site.side]
        columns = site.columns.to(lm.device)
        out_values.append(captured[m][:, :prompt, columns].float())
        out_grads.append(by_module[m][:, :prompt, columns].float())
    return out_values, out_grads


def prescan_cells(lm: LoadedModel, pairs: PairSet, cells: list[Cell], sites: dict[tuple, Site], k: int,
                  batch_size: int) -> dict[Cell, CellPrescan]:
    """Every cell's prescan on the training pairs `pairs`; cells of one site and position (seeds) share theirs."""
    keys = list(dict.fromkeys(site_key(c) for c in cells))
    tokens = 2 * sum(g.base_ids.numel() + g.source_ids.numel() for g in pairs.groups)  # values, gradients, sources
    out: dict[Cell, CellPrescan] = {}
    for chunk in chunks([sites[key] for key in keys], tokens, 4):
        sources = read_prompts(lm, chunk, pairs, batch_size)
        values, grads = site_gradients(lm, chunk, pairs, batch_size)
        for j, site in enumerate(chunk):
            mine = [c for c in cells if site_key(c) == site_key(site)]
            done: dict[tuple, CellPrescan] = {}
            for cell in mine:
                if cell.position not in done:
                    done[cell.position] = _cell_prescan(pairs, cell.position, sources[j], values[j], grads[j], k)
                out[cell] = done[cell.position]
    return out


def _cell_prescan(pairs: PairSet, position: tuple, sources: list[Tensor], values: list[Tensor], grads: list[Tensor],
                  k: int) -> CellPrescan:
    base, source, grad = [], [], []
    for group, s, v, g in zip(pairs.groups, sources, values, grads):
        every = torch.arange(v.shape[-1], device=v.device)
        at_base = resolve_positions(group, position, "base").to(v.device)
        base.append(gather(v, at_base, every))
        grad.append(gather(g, at_base, every))
        source.append(gather(s.float(), resolve_positions(group, position, "source").to(s.device), every.to(s.device)).to(v.device))
    return first_order(torch.cat(base), torch.cat(source), torch.cat(grad), k)


def prescan_k(cfg) -> int:
    """The subspace dimension the prescan scores: the intervention's `dim`, 1 for a method without one."""
    dim = cfg.intervention.get("dim")
    return int(dim) if isinstance(dim, int) and not isinstance(dim, bool) else 1


def write(folder: Path, shard: int, num_shards: int, found: dict[Cell, CellPrescan], k: int) -> None:
    """The prescan's table of this job's cells (folder.prescan_file), written atomically."""
    table = pd.DataFrame([{"cell": cell.id, "prescan": result.score, "prescan_k": k} for cell, result in found.items()],
                         columns=list(COLUMNS))
    atomic_write(layout.prescan_file(folder, shard, num_shards), lambda tmp: table.to_csv(tmp, index=False))


def read(folder: Path) -> dict[str, dict]:
    """cell id -> its prescan columns, from every prescan table in the folder (unreadable ones skipped)."""
    found: dict[str, dict] = {}
    for path in layout.prescan_files(folder):
        try:
            table = pd.read_csv(path)
        except (OSError, ValueError):
            continue
        if not set(COLUMNS) <= set(table.columns):
            continue
        for row in table.itertuples(index=False):
            score = float(row.prescan)
            found[str(row.cell)] = {"prescan": score if math.isfinite(score) else math.nan, "prescan_k": int(row.prescan_k)}
    return found
