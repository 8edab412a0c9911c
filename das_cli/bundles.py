"""Bundles: several cells trained in one step of the fast engine.

A last-token cell's step feeds about `batch_size` one-token rows through the blocks after its
layer: products far too small to use the hardware, and on a GPU a step bound by kernel launches.
The cells of a sweep are independent but share the frozen model, the base prompts and their cached
prefix, so a bundle trains them together. Each cell draws its own batch (its own order, from its own
seed, as when trained alone); the rows of all cells are stacked, deepest cells last, into one forward
that starts at the bundle's earliest layer; a cell's rows enter at its own layer with the base run's
cached residual (before it, each block computes only the rows that have entered, so no cell's rows
cost more blocks than alone); each cell's intervention edits only its own rows at its own site. The
step's loss is the sum of the cells' mean losses, so each cell's gradient, and its own Adam update, is what it would get
alone. Products of another size round differently, so a cell's numbers can differ from its lone run
in the last bits.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .data import Batch, answer_matrix, resolve_positions
from .engines import FastEngine
from .forward import JoinedForward
from .interventions import Intervention
from .models import LoadedModel
from .readout import Readout
from .metrics import Evaluation, EvaluationTally, evaluation_batches


def bundleable(engine) -> bool:
    """Whether a cell's train engine can join a bundle: the fast engine with the base run's caches."""
    return isinstance(engine, FastEngine) and engine.cached and all(g.residual is not None for g in engine.groups)


class BundleEngine:
    """One forward for the batches of several cells (their FastEngines over the same train pairs)."""

    def __init__(self, lm: LoadedModel, engines: list[FastEngine]):
        self.lm, self.engines, self.groups = lm, engines, engines[0].groups
        self.joined = JoinedForward(lm, engines)
        self.readout = Readout(lm)

    def keeping(self, cells: list[int]) -> "BundleEngine":
        """The bundle of these cells (indices into its engines): what trains on when others leave."""
        return BundleEngine(self.lm, [self.engines[i] for i in cells])

    def losses(self, batches_: list[Batch], interventions: list[Intervention]) -> Tensor:
        """[cells]: each cell's training loss (mean cross-entropy over its batch), from one forward where it can."""
        hidden = self.final_hidden(batches_, interventions)
        labels = [e.labels(b) for e, b in zip(self.engines, batches_)]
        return self.readout.losses(hidden, labels)

    def logits(self, batches_: list[Batch], interventions: list[Intervention]) -> Iterator[Tensor]:
        """Per cell, the logits of its batch at the answer positions, [B, K, vocab], from one forward where it can;
        each cell's are computed as they are consumed, so one cell's vocabulary-wide logits are held at a time."""
        hidden = self.final_hidden(batches_, interventions)
        return (self.readout.logits(h) for h in hidden)

    def final_hidden(self, batches_: list[Batch], interventions: list[Intervention]) -> list[Tensor]:
        hidden = self.joined.hidden(batches_, interventions)
        if hidden is None:  # prompts of several lengths that one left-padded forward cannot hold: cell by cell
            return [e.final_hidden(b, v) for e, b, v in zip(self.engines, batches_, interventions)]
        return hidden


@torch.no_grad()
def evaluate_bundle(engines: list[FastEngine], interventions: list[Intervention], batch_size: int,
                    base_labels: list[Tensor] | None = None, base_correct: list[Tensor] | None = None) -> list[Evaluation]:
    """`metrics.evaluate_kinds` for several cells over the same pairs: every batch of the evaluation is one
    forward for as many cells as keep it within EVAL_ROWS rows (each cell's own batch, as alone)."""
    lm = engines[0].lm
    device = "cuda" if lm.device.type == "cuda" else "cpu"
    tallies = [EvaluationTally(engine, base_labels, base_correct) for engine in engines]
    plan = evaluation_batches(engines[0], batch_size)
    per_step = max(1, EVAL_ROWS[device] // max(batch_size * engines[0].width, 1))
    for first in range(0, len(engines), per_step):
        part = slice(first, first + per_step)
        bundle = BundleEngine(lm, engines[part])
        for batch in plan:
            for tally, logits in zip(tallies[part], bundle.logits([batch] * len(bundle.engines), interventions[part])):
                tally.add(batch, logits)
    return [tally.result() for tally in tallies]


# Bundled evaluation: at most this many rows per forward (its hidden states; each cell's logits are made in turn).
EVAL_ROWS = {"cpu": 1024, "cuda": 16384}

# `train.cells_per_step=auto`: enough cells that a step feeds about this many token rows, where a bigger
# step stops paying on the device (measured with benchmarks/bench_engines.py; docs/internals.md; figures in benchmarks/README.md) ...
AUTO_ROWS = {"cpu": 256, "cuda": 4096}
# ... and no more than keeps the step's activations (kept for the backward pass) within this budget.
AUTO_ACTIVATION_BYTES = {"cpu": 2 << 30, "cuda": 16 << 30}
ACTIVATIONS_PER_TOKEN_BLOCK = 16  # vectors of the hidden size a block keeps per token for backward (attention, MLP, norms)


def cells_per_step(cfg, lm: LoadedModel, cells: list, pairs) -> int:
    """`train.cells_per_step` for these cells: 1 with the reference engine; `auto` from the rows a step feeds."""
    setting = cfg.train.cells_per_step
    if cfg.train.engine != "fast" or not cells:
        return 1
    if setting != "auto":
        return int(setting)
    device = "cuda" if lm.device.type == "cuda" else "cpu"
    fed = max(fed_tokens(pairs, cell.position) for cell in cells)  # the widest cell decides
    rows = int(cfg.train.batch_size) * fed
    blocks = lm.n_layers - min(cell.layer for cell in cells)
    activation_bytes = rows * blocks * lm.config.hidden_size * ACTIVATIONS_PER_TOKEN_BLOCK * lm.dtype.itemsize
    return max(1, min(len(cells), AUTO_ROWS[device] // rows, AUTO_ACTIVATION_BYTES[device] // max(activation_bytes, 1)))


def fed_tokens(pairs, position) -> int:
    """Tokens a fast-engine step feeds per pair for cells at `position`: from the earliest intervened one on."""
    widths = []
    for group in pairs.groups:
        first = int(resolve_positions(group, position, "base").min())
        widths.append(group.base_ids.shape[1] - first + answer_matrix(group.labels).shape[1] - 1)
    return max(widths)
