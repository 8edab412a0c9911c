"""Engines: how one training or evaluation step gets the intervened logits at the answer position.

- `reference`: a full forward of every base prompt with the site edited by a hook (what pyvene does).
- `fast`: an intervention at layer l, position p cannot change anything before layer l, nor at
  positions before p (causal attention), and the model is frozen. So the unedited base run's
  keys and values, and its residual stream entering each swept layer, are computed once per
  run. Each step feeds only the tokens from the earliest intervened position on, attending to
  the cached prefix, and starts at block l: the blocks before it hand on the cached residual
  instead of computing it. A last-token cell at layer l is a one-token forward through L - l blocks.
  A batch may hold prompts of several lengths; they are joined into one left-padded forward.

Both give float32 logits [B, vocab] for the last position only, never the whole sequence's, and
the training loss on them; the fast engine's loss reads the vocabulary weight once (`readout.py`).
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from .data import Batch, PairSet
from .models import LoadedModel
from .names import ENGINES
from .readout import Readout
from .sites import Site, gather, hooked, resolve_site, scatter

Intervene = Callable[[Tensor, Tensor], Tensor]  # (base's site values, source's) -> the edited values


@dataclass
class CellGroup:
    """One pair group, prepared for one cell: everything lives on the model's device."""

    base_ids: Tensor  # [G, T]
    base_positions: Tensor  # [G, P]
    source_values: Tensor  # [G, P*C] the source's vector at the site, computed once without gradients
    labels: Tensor  # [G]
    prefix: list[tuple[Tensor, Tensor] | None] | None = None  # per layer (keys, values) [G, heads, T-1, d] of the base
    #   run; None for layers before the earliest swept one (their blocks are skipped)
    residual: Tensor | None = None  # [G, T, hidden] residual stream entering the site's block in the base run
    kinds: list[str] | None = None  # per pair: "cause" | "isolate" (None: all cause)

    def __len__(self) -> int:
        return self.base_ids.shape[0]


class ReferenceEngine:
    """The plain path: a full forward of each base prompt with the site edited by a hook.

    A batch's pieces (rows of groups of different lengths) run as separate forwards.
    """

    def __init__(self, lm: LoadedModel, site: Site, groups: list[CellGroup]):
        self.lm, self.site, self.groups = lm, site, groups
        self.columns = site.columns.to(lm.device)

    def _edit(self, positions: Tensor, source: Tensor, intervene: Intervene) -> Callable[[Tensor], Tensor]:
        def edit(hidden: Tensor) -> Tensor:
            return scatter(hidden, positions, self.columns, intervene(gather(hidden, positions, self.columns), source))

        return edit

    def labels(self, batch: Batch) -> Tensor:
        return torch.cat([self.groups[g].labels[rows] for g, rows in batch])

    def logits(self, batch: Batch, intervene: Intervene) -> Tensor:
        """Float32 logits [B, vocab] at the last position of the batch's edited base prompts."""
        return torch.cat([self._piece_logits(self.groups[g], rows, intervene) for g, rows in batch])

    def loss(self, batch: Batch, intervene: Intervene) -> Tensor:
        """Mean cross-entropy of those logits against the pairs' labels."""
        return F.cross_entropy(self.logits(batch, intervene), self.labels(batch))

    def _piece_logits(self, group: CellGroup, rows: Tensor, intervene: Intervene) -> Tensor:
        edit = self._edit(group.base_positions[rows], group.source_values[rows], intervene)
        with hooked(self.site, edit):
            out = self.lm.model(input_ids=group.base_ids[rows], logits_to_keep=1)
        return out.logits[:, -1].float()


class FastEngine(ReferenceEngine):
    """Feeds only tokens from the batch's earliest intervened position on, over the cached base prefix,
    and only through the blocks from the site's layer on; the loss reads the vocabulary weight once.

    Pieces of different lengths are joined into one forward, left-padded: their prefixes are
    left-padded with masked zeros and each row keeps its own position ids. That needs every fed
    token to be a real one (the earliest intervened position, counted in the padded batch, lies
    after every row's padding) and no sliding window shorter than the batch; otherwise the pieces
    run one by one.
    """

    def __init__(self, lm: LoadedModel, site: Site, groups: list[CellGroup]):
        super().__init__(lm, site, groups)
        self.starts = [int(group.base_positions.min()) for group in groups]
        self.cached = all(group.prefix is not None for group in groups)
        self.readout = Readout(lm)
        self.window = getattr(lm.model.config, "sliding_window", None)

    def logits(self, batch: Batch, intervene: Intervene) -> Tensor:
        if not self.cached:
            return super().logits(batch, intervene)
        return self.readout.logits(self.final_hidden(batch, intervene))

    def loss(self, batch: Batch, intervene: Intervene) -> Tensor:
        if not self.cached:
            return super().loss(batch, intervene)
        return self.readout.loss(self.final_hidden(batch, intervene), self.labels(batch))

    def final_hidden(self, batch: Batch, intervene: Intervene) -> Tensor:
        """The edited base runs' final hidden state at their last position, [B, hidden]."""
        if len(batch) == 1 or self._joinable(batch):
            return self._run(batch, intervene)
        return torch.cat([self._run([piece], intervene) for piece in batch])

    def _layout(self, batch: Batch) -> tuple[int, list[int], int]:
        """(padded length, left padding per piece, first fed column) of the batch joined."""
        lengths = [self.groups[g].base_ids.shape[1] for g, _ in batch]
        length = max(lengths)
        pads = [length - t for t in lengths]
        return length, pads, min(self.starts[g] + pad for (g, _), pad in zip(batch, pads))

    def _joinable(self, batch: Batch) -> bool:
        length, pads, start = self._layout(batch)
        return start >= max(pads) and (self.window is None or length <= self.window)

    def _run(self, batch: Batch, intervene: Intervene) -> Tensor:
        length, pads, start = self._layout(batch)
        # per piece: its group, rows, left padding, and the first fed column in its own coordinates
        pieces = [(self.groups[g], rows, pad, start - pad) for (g, rows), pad in zip(batch, pads)]
        skipping = self.site.layer > 0 and all(group.residual is not None for group, *_ in pieces)
        ids = torch.cat([group.base_ids[rows, own:] for group, rows, _, own in pieces])
        positions = torch.cat([group.base_positions[rows] - own for group, rows, _, own in pieces])
        source = torch.cat([group.source_values[rows] for group, rows, *_ in pieces])
        residual = torch.cat([group.residual[rows, own:] for group, rows, _, own in pieces]) if skipping else None
        cache = self._prefix_cache(pieces, start, self.site.layer if skipping else 0) if start > 0 else None
        mask = position_ids = None
        if any(pads):
            device = ids.device
            mask = torch.cat([torch.arange(length, device=device).expand(len(rows), -1) >= pad for _, rows, pad, _ in pieces]).long()
            position_ids = torch.cat([torch.arange(own, own + length - start, device=device).expand(len(rows), -1) for _, rows, _, own in pieces])
        with skip_blocks_before(self.lm, self.site.layer, residual), hooked(self.site, self._edit(positions, source, intervene)):
            out = self.lm.model.base_model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, **cache_arguments(self.lm.model.base_model, cache)
            )
        return out.last_hidden_state[:, -1]

    def _prefix_cache(self, pieces: list, start: int, first_block: int) -> DynamicCache:
        """The base runs' keys and values before `start` (left-padded per piece), for blocks from `first_block` on.

        Skipped blocks read nothing from the cache, but the model reads the prefix length from
        their layers (layer 0, the first sliding-window layer), so they hold a placeholder of that length.
        """
        cache = DynamicCache(config=self.lm.model.config)
        placeholder = pieces[0][0].base_ids.new_zeros(1, 1, start, 1, dtype=self.lm.model.dtype)
        for layer in range(len(pieces[0][0].prefix)):
            if layer < first_block:
                cache.update(placeholder, placeholder, layer)
                continue
            if any(group.prefix[layer] is None for group, *_ in pieces):
                raise ValueError(f"the base run kept no keys and values for layer {layer}, which block {first_block} on needs")
            keys, values = (
                torch.cat([_left_pad(group.prefix[layer][i][rows, :, :own], pad) for group, rows, pad, own in pieces])
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


def make_engine(name: str, lm: LoadedModel, site: Site, groups: list[CellGroup]) -> ReferenceEngine:
    return {"fast": FastEngine, "reference": ReferenceEngine}[name](lm, site, groups)


@dataclass
class BaseRun:
    """The unedited base run, computed once per run: its top-1 answers, keys and values, residuals."""

    predictions: list[Tensor]  # per group [G] top-1 token id at the answer position
    prefixes: list[list[tuple[Tensor, Tensor] | None]] | None = None  # per group, per layer (keys, values) [G, heads, T-1, d]
    residuals: list[dict[int, Tensor]] | None = None  # per group, layer -> [G, T, hidden] entering that block

    def accuracy(self, pairs: PairSet) -> float:
        """Top-1 accuracy on the base prompts whose own answer is known (NaN when none is)."""
        hits = sum(int((p.cpu() == g.base_labels).sum()) for p, g in zip(self.predictions, pairs.groups))
        known = sum(int((g.base_labels >= 0).sum()) for g in pairs.groups)
        return hits / known if known else float("nan")


@torch.no_grad()
def base_run(lm: LoadedModel, pairs: PairSet, batch_size: int, keep_prefix: bool, layers: tuple[int, ...] = ()) -> BaseRun:
    """One forward over every base prompt; keeps what the fast engine reuses if asked.

    Cache cost per pair of T tokens, in the model's dtype: 2 x layers x kv_heads x head_dim x (T - 1)
    numbers of keys and values, plus hidden x T per swept layer of residual stream. With `layers`
    given, the fast engine skips the blocks before the earliest of them, so their keys and values
    are not kept (None). Each group's tensors are allocated once and filled batch by batch as the
    attention layers compute them; no batch's cache of every layer is ever held.
    """
    first = min(layers, default=0)
    run = BaseRun(predictions=[], prefixes=[] if keep_prefix else None, residuals=[] if keep_prefix else None)
    blocks = [resolve_site(lm, "block_input", layer) for layer in layers] if keep_prefix else []
    for group in pairs.groups:
        ids = group.base_ids.to(lm.device)
        kept: dict = {}  # ("kv", layer, 0 | 1) -> keys | values;  ("residual", layer) -> residual
        with ExitStack() as stack:  # only the swept layers' residuals, not every layer's hidden states
            for site in blocks:
                stack.enter_context(hooked(site, lambda hidden, layer=site.layer: _fill(kept, ("residual", layer), rows, hidden, len(ids))))
            predictions = []
            for i in range(0, len(ids), batch_size):
                rows = slice(i, i + batch_size)
                predictions.append(_base_batch(lm, ids[rows], first if keep_prefix else None, kept, rows, len(ids)))
        run.predictions.append(torch.cat(predictions))
        if keep_prefix:
            run.prefixes.append([(kept["kv", i, 0], kept["kv", i, 1]) if i >= first else None for i in range(lm.n_layers)])
            run.residuals.append({layer: kept["residual", layer] for layer in layers})
    return run


def _base_batch(lm: LoadedModel, ids: Tensor, first: int | None, kept: dict, rows: slice, total: int) -> Tensor:
    """Top-1 answers of one batch of base prompts; with `first`, its keys and values before the last
    position, from layer `first` on, are written into `kept` as the attention layers compute them."""
    cache = None if first is None else _RecordingCache(first, kept, rows, total)
    out = lm.model(input_ids=ids, logits_to_keep=1, **cache_arguments(lm.model, cache))
    return out.logits[:, -1].argmax(-1)


class _RecordingCache(DynamicCache):
    """A cache that stores nothing: each attention layer from `first` on writes its keys and values
    before the last position into rows `rows` of `kept`, and attends to this forward's own, as an
    empty cache would let it. So a base run never holds a whole batch's keys and values of every layer."""

    def __init__(self, first: int, kept: dict, rows: slice, total: int):
        super().__init__()
        self.first, self.kept, self.rows, self.total = first, kept, rows, total

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if layer_idx >= self.first:
            _fill(self.kept, ("kv", layer_idx, 0), self.rows, key_states[:, :, :-1], self.total)
            _fill(self.kept, ("kv", layer_idx, 1), self.rows, value_states[:, :, :-1], self.total)
        return key_states, value_states


def _fill(store: dict, key: tuple, rows: slice, value: Tensor, total: int) -> None:
    """store[key][rows] = value, allocating store[key] with `total` rows at the first write."""
    if key not in store:
        store[key] = value.new_empty((total, *value.shape[1:]))
    store[key][rows] = value


def base_prefixes(lm: LoadedModel, pairs: PairSet, batch_size: int) -> list[list[tuple[Tensor, Tensor]]]:
    """Only the prefix cache of `base_run`."""
    return base_run(lm, pairs, batch_size, keep_prefix=True).prefixes  # type: ignore[return-value]
