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

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import Tensor

from .data import Batch, answer_matrix, resolve_positions
from .engines import FastEngine, cache_arguments, padding_inputs, prefix_cache, skip_blocks_before
from .interventions import Intervention
from .models import LoadedModel
from .readout import Readout
from .sites import Site, gather, hooked, resolve_site, scatter
from .metrics import Evaluation, EvaluationTally, evaluation_batches


def bundleable(engine) -> bool:
    """Whether a cell's train engine can join a bundle: the fast engine with the base run's caches."""
    return isinstance(engine, FastEngine) and engine.cached and all(g.residual is not None for g in engine.groups)


class BundleEngine:
    """One forward for the batches of several cells (their FastEngines over the same train pairs)."""

    def __init__(self, lm: LoadedModel, engines: list[FastEngine]):
        self.lm, self.engines, self.groups = lm, engines, engines[0].groups
        self.first = min(e.site.layer for e in engines)
        self.width = engines[0].width
        if any(e.width != self.width for e in engines):
            raise ValueError("cells of one bundle must read answers of one width")
        self.readout = Readout(lm)
        self.window = engines[0].window
        # Skipping the blocks before the first layer, each row starts as its own cell's cached residual and passes
        # through unchanged until its cell's layer: it enters as it is. From layer 0 on, rows are replaced as they enter.
        layers = {e.site.layer for e in engines if e.site.layer > self.first} if self.first == 0 else set()
        self.entries = {layer: resolve_site(lm, "block_input", layer) for layer in layers}

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
        order = sorted(range(len(self.engines)), key=lambda i: self.engines[i].site.layer)
        pieces = [(i, *piece) for i in order for piece in batches_[i]]
        layout = self._layout(pieces)
        if layout is None:  # prompts of several lengths that one left-padded forward cannot hold: cell by cell
            return [e.final_hidden(b, v) for e, b, v in zip(self.engines, batches_, interventions)]
        return self._run(pieces, *layout, interventions)

    def _layout(self, pieces: list) -> tuple[int, list[int], int] | None:
        """(padded length, left padding per piece, first fed column), or None when the pieces cannot be joined."""
        lengths = [self.engines[i].groups[g].base_ids.shape[1] for i, g, _ in pieces]
        length = max(lengths)
        pads = [length - t for t in lengths]
        start = min(self.engines[i].starts[g] + pad for (i, g, _), pad in zip(pieces, pads))
        joinable = start >= max(pads) and (self.window is None or length + self.width - 1 <= self.window)
        return (length, pads, start) if joinable else None

    def _run(self, pieces: list, length: int, pads: list[int], start: int, interventions: list[Intervention]) -> list[Tensor]:
        # per piece: its cell, group index, group, rows, left padding, first fed column in its own coordinates
        joined = [(i, g, self.engines[i].groups[g], rows, pad, start - pad) for (i, g, rows), pad in zip(pieces, pads)]
        spans = _spans([(i, len(rows)) for i, _, _, rows, _, _ in joined], len(self.engines))
        skipping = self.first > 0
        ids = torch.cat([group.fed_ids(rows, own) for _, _, group, rows, _, own in joined])
        kv_pieces = [(group, rows, pad, own) for _, _, group, rows, pad, own in joined]
        layers = [self.engines[i].site.layer for i, *_ in joined]  # ascending: the pieces are in layer order
        entered_pieces = {b: sum(layer <= b for layer in layers) for b in range(self.lm.n_layers)}
        entered_rows = {b: sum(len(rows) for (_, _, _, rows, _, _), layer in zip(joined, layers) if layer <= b) for b in range(self.lm.n_layers)}
        cache = prefix_cache(self.lm, kv_pieces, start, self.first if skipping else 0, entered_pieces) if start > 0 else None
        mask, position_ids = padding_inputs(kv_pieces, length + self.width - 1, start, ids.device)
        residual = torch.cat([group.residual[rows, own:] for _, _, group, rows, _, own in joined]) if skipping else None
        with ExitStack() as stack:
            stack.enter_context(skip_blocks_before(self.lm, self.first, residual))
            stack.enter_context(entered_rows_only(self.lm, self.first, entered_rows, len(ids)))
            for layer, entry in self.entries.items():  # cells of later layers enter with the cached residual
                stack.enter_context(hooked(entry, self._entering(layer, joined, spans)))
            for site, cells in _by_site(self.engines):
                stack.enter_context(hooked(site, self._editing(cells, joined, spans, interventions)))
            out = self.lm.model.base_model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, **cache_arguments(self.lm.model.base_model, cache)
            )
        hidden = out.last_hidden_state[:, -self.width :]
        return [hidden[a:b] for a, b in spans]

    def _entering(self, layer: int, joined: list, spans: list[tuple[int, int]]):
        cells = [i for i, e in enumerate(self.engines) if e.site.layer == layer]
        cached = {i: torch.cat([group.residual[rows, own:] for j, _, group, rows, _, own in joined if j == i]) for i in cells}

        def enter(hidden: Tensor) -> Tensor:
            return _replace_rows(hidden, {spans[i]: cached[i].to(hidden.dtype) for i in cells})

        return enter

    def _editing(self, cells: list[int], joined: list, spans: list[tuple[int, int]], interventions: list[Intervention]):
        site = self.engines[cells[0]].site
        columns = site.columns.to(self.lm.device)
        positions = {i: torch.cat([group.base_positions[rows] - own for j, _, group, rows, _, own in joined if j == i]) for i in cells}
        sources = {i: torch.cat([group.source_values[rows] for j, _, group, rows, _, _ in joined if j == i]) for i in cells}

        def edit(hidden: Tensor) -> Tensor:
            edited = {}
            for i in cells:
                a, b = spans[i]
                part = hidden[a:b]
                edited[(a, b)] = scatter(part, positions[i], columns, interventions[i](gather(part, positions[i], columns), sources[i]))
            return _replace_rows(hidden, edited)

        return edit


def _spans(sizes: list[tuple[int, int]], cells: int) -> list[tuple[int, int]]:
    """Per cell, its rows' [first, end) in the joined batch, from (cell, rows) per piece in batch order
    (a cell's pieces are consecutive)."""
    spans: dict[int, tuple[int, int]] = {}
    cursor = 0
    for i, n in sizes:
        first = spans[i][0] if i in spans else cursor
        spans[i] = (first, cursor + n)
        cursor += n
    return [spans.get(i, (0, 0)) for i in range(cells)]


@contextmanager
def entered_rows_only(lm: LoadedModel, first: int, entered: dict[int, int], total: int) -> Iterator[None]:
    """Each block from `first` on computes only the first `entered[block]` of the `total` rows (the cells that
    have entered by then); the other rows pass through it unchanged, to be replaced as their cell enters."""
    blocks = [(lm.block(b), entered[b]) for b in range(first, lm.n_layers) if entered[b] < total]
    for block, n in blocks:
        block.forward = _on_leading_rows(type(block).forward.__get__(block), n, total)
    try:
        yield
    finally:
        for block, _ in blocks:
            del block.forward  # back to the class's forward


def _on_leading_rows(forward, n: int, total: int):
    def run(*args, **kwargs):
        full = args[0] if args else kwargs["hidden_states"]
        out = forward(*_leading(args, n, total), **_leading(kwargs, n, total))
        head = out[0] if isinstance(out, tuple) else out
        joined = torch.cat([head, full[n:]])
        return (joined, *out[1:]) if isinstance(out, tuple) else joined

    return run


def _leading(value, n: int, total: int):
    """`value` with every per-row tensor (batch dimension `total`, two or more dimensions) cut to its first `n` rows."""
    if torch.is_tensor(value):
        return value[:n] if value.dim() >= 2 and value.shape[0] == total else value
    if isinstance(value, tuple):
        return tuple(_leading(v, n, total) for v in value)
    if isinstance(value, list):
        return [_leading(v, n, total) for v in value]
    if isinstance(value, dict):
        return {k: _leading(v, n, total) for k, v in value.items()}
    return value


def _by_site(engines: list[FastEngine]) -> list[tuple[Site, list[int]]]:
    """Each site of the bundle with its cells (sites told apart by identity: one Site object per site)."""
    out: dict[int, tuple[Site, list[int]]] = {}
    for i, engine in enumerate(engines):
        out.setdefault(id(engine.site), (engine.site, []))[1].append(i)
    return list(out.values())


def _replace_rows(hidden: Tensor, parts: dict[tuple[int, int], Tensor]) -> Tensor:
    """`hidden` with rows [a, b) replaced by parts[(a, b)]."""
    pieces, cursor = [], 0
    for (a, b), part in sorted(parts.items()):
        pieces += [hidden[cursor:a], part]
        cursor = b
    pieces.append(hidden[cursor:])
    return torch.cat(pieces)


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
    activation_bytes = rows * blocks * lm.model.config.hidden_size * ACTIVATIONS_PER_TOKEN_BLOCK * lm.model.dtype.itemsize
    return max(1, min(len(cells), AUTO_ROWS[device] // rows, AUTO_ACTIVATION_BYTES[device] // max(activation_bytes, 1)))


def fed_tokens(pairs, position) -> int:
    """Tokens a fast-engine step feeds per pair for cells at `position`: from the earliest intervened one on."""
    widths = []
    for group in pairs.groups:
        first = int(resolve_positions(group, position, "base").min())
        widths.append(group.base_ids.shape[1] - first + answer_matrix(group.labels).shape[1] - 1)
    return max(widths)
