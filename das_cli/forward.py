"""The fast engine's forward: the rows of one cell, or of several (a bundle), in one left-padded forward.

Each row feeds only its tokens from the batch's earliest intervened position on, over the base
run's cached keys and values, and starts at its cell's layer: the blocks before the earliest
one are skipped (the last of them hands on each row's cached residual), and from there each
block computes only the rows whose cell has entered by then (a row entering later passes through
unchanged, or, from block 0, is replaced by its cached residual as it enters). Each cell's
intervention edits only its own rows at its own site. A lone cell is a bundle of one: its rows
enter at its layer, or at block 0 when the base run kept no residual for it.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from .data import Batch
from .models import LoadedModel
from .sites import Site, gather, hooked, resolve_site, scatter

Intervene = Callable[[Tensor, Tensor], Tensor]  # (base's site values, source's) -> the edited values


class JoinedForward:
    """The joined forward of a fixed set of cells' engines (each with lm, site, groups, starts, width)."""

    def __init__(self, lm: LoadedModel, engines: list) -> None:
        self.lm, self.engines = lm, engines
        self.width = engines[0].width
        if any(e.width != self.width for e in engines):
            raise ValueError("cells of one bundle must read answers of one width")
        self.window = getattr(lm.model.config, "sliding_window", None)
        self.entry = [e.site.layer if all(g.residual is not None for g in e.groups) else 0 for e in engines]
        self.first = min(self.entry)
        later = {layer for layer in self.entry if layer > self.first} if self.first == 0 else set()
        self.entries = {layer: resolve_site(lm, "block_input", layer) for layer in later}

    def hidden(self, batches: list[Batch], interventions: list[Intervene], check_window: bool = True) -> list[Tensor] | None:
        """Per cell, the final hidden state of its edited batch at the answer positions, [B, K, hidden];
        None when the pieces cannot share one forward (see `layout`)."""
        order = sorted(range(len(self.engines)), key=lambda i: self.entry[i])
        pieces = [(i, *piece) for i in order for piece in batches[i]]
        layout = self.layout(pieces, check_window)
        return None if layout is None else self._run(pieces, *layout, interventions)

    def layout(self, pieces: list, check_window: bool = True) -> tuple[int, list[int], int] | None:
        """(padded length, left padding per piece, first fed column) of the pieces (cell, group, rows) joined,
        or None: every fed token must be a real one (the earliest fed column lies after every row's padding)
        and, with `check_window`, the padded rows must fit the model's sliding window."""
        lengths = [self.engines[i].groups[g].base_ids.shape[1] for i, g, _ in pieces]
        length = max(lengths)
        pads = [length - t for t in lengths]
        start = min(self.engines[i].starts[g] + pad for (i, g, _), pad in zip(pieces, pads))
        fits = not check_window or self.window is None or length + self.width - 1 <= self.window
        return (length, pads, start) if start >= max(pads) and fits else None

    def _run(self, pieces: list, length: int, pads: list[int], start: int, interventions: list[Intervene]) -> list[Tensor]:
        # per piece: its cell, group, rows, left padding, first fed column in its own coordinates
        joined = [(i, self.engines[i].groups[g], rows, pad, start - pad) for (i, g, rows), pad in zip(pieces, pads)]
        spans = _spans([(i, len(rows)) for i, _, rows, _, _ in joined], len(self.engines))
        skipping = self.first > 0
        ids = torch.cat([group.fed_ids(rows, own) for _, group, rows, _, own in joined])
        kv_pieces = [(group, rows, pad, own) for _, group, rows, pad, own in joined]
        layers = [self.entry[i] for i, *_ in joined]  # ascending: the pieces are in entry order
        entered_pieces = {b: sum(layer <= b for layer in layers) for b in range(self.lm.n_layers)}
        entered_rows = {b: sum(len(rows) for (_, _, rows, _, _), layer in zip(joined, layers) if layer <= b) for b in range(self.lm.n_layers)}
        cache = prefix_cache(self.lm, kv_pieces, start, self.first, entered_pieces) if start > 0 else None
        mask, position_ids = padding_inputs(kv_pieces, length + self.width - 1, start, ids.device)
        residual = torch.cat([group.residual[rows, own:] for _, group, rows, _, own in joined]) if skipping else None
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
        cells = [i for i, entry in enumerate(self.entry) if entry == layer]
        cached = {i: torch.cat([group.residual[rows, own:] for j, group, rows, _, own in joined if j == i]) for i in cells}

        def enter(hidden: Tensor) -> Tensor:
            return _replace_rows(hidden, {spans[i]: cached[i].to(hidden.dtype) for i in cells})

        return enter

    def _editing(self, cells: list[int], joined: list, spans: list[tuple[int, int]], interventions: list[Intervene]):
        site = self.engines[cells[0]].site
        columns = site.columns.to(self.lm.device)
        positions = {i: torch.cat([group.base_positions[rows] - own for j, group, rows, _, own in joined if j == i]) for i in cells}
        sources = {i: torch.cat([group.source_values[rows] for j, group, rows, _, _ in joined if j == i]) for i in cells}

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


def _by_site(engines: list) -> list[tuple[Site, list[int]]]:
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


def padding_inputs(pieces: list, total: int, start: int, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """(attention mask, position ids) of left-padded pieces (group, rows, pad, own first column) joined into one
    forward of `total` columns fed from column `start`; (None, None) when no piece is padded."""
    if not any(pad for _, _, pad, _ in pieces):
        return None, None
    mask = torch.cat([torch.arange(total, device=device).expand(len(rows), -1) >= pad for _, rows, pad, _ in pieces]).long()
    position_ids = torch.cat([torch.arange(own, own + total - start, device=device).expand(len(rows), -1) for _, rows, _, own in pieces])
    return mask, position_ids


def prefix_cache(lm: LoadedModel, pieces: list, start: int, first_block: int, leading: dict[int, int] | None = None) -> DynamicCache:
    """The base runs' keys and values before `start` (left-padded per piece), for blocks from `first_block` on
    (`leading`: per layer, only the first so many pieces, the rows that block computes).

    Skipped blocks read nothing from the cache, but the model reads the prefix length from
    their layers (layer 0, the first sliding-window layer), so they hold a placeholder of that length.
    """
    cache = DynamicCache(config=lm.model.config)
    placeholder = pieces[0][0].base_ids.new_zeros(1, 1, start, 1, dtype=lm.model.dtype)
    for layer in range(len(pieces[0][0].prefix)):
        if layer < first_block:
            cache.update(placeholder, placeholder, layer)
            continue
        if any(group.prefix[layer] is None for group, *_ in pieces):
            raise ValueError(f"the base run kept no keys and values for layer {layer}, which block {first_block} on needs")
        kept = pieces[: leading[layer]] if leading else pieces
        keys, values = (
            torch.cat([_left_pad(group.prefix[layer][i][rows, :, :own], pad) for group, rows, pad, own in kept])
            for i in (0, 1)
        )
        cache.update(keys, values, layer)
    return cache


def cache_arguments(module: torch.nn.Module, kv_cache: DynamicCache | None) -> dict[str, object]:
    """Keyword arguments that hand `kv_cache` (or none) to a transformers model's forward."""
    return {_cache_keyword(type(module)): kv_cache, "use_cache": kv_cache is not None}


@lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    # transformers renamed the forward's `past_key_values` to `cache` after 5.18: 5.24 still
    # translates the old name, with a FutureWarning on every call, until its removal in 5.40;
    # 5.3 to 5.18 know only `past_key_values`.
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _left_pad(kv: Tensor, pad: int) -> Tensor:
    """[B, heads, t, d] -> [B, heads, pad + t, d], zeros first (masked out by the attention mask)."""
    return F.pad(kv, (0, 0, pad, 0)) if pad else kv


@contextmanager
def skip_blocks_before(lm: LoadedModel, layer: int, residual: Tensor | None) -> Iterator[None]:
    """Blocks before `layer` do no work: the last of them returns `residual`, the rest pass through."""
    if residual is None or layer == 0:
        yield
        return
    blocks = [lm.block(i) for i in range(layer)]
    for block in blocks[:-1]:
        block.forward = _pass_through
    blocks[-1].forward = lambda hidden_states, *args, **kwargs: residual
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward


def _pass_through(hidden_states: Tensor, *args, **kwargs) -> Tensor:
    return hidden_states


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
