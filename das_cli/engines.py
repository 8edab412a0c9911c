"""Engines: how one training or evaluation step gets the intervened logits at the answer position.

- `reference`: a full forward of every base prompt with the site edited by a hook (what pyvene does).
- `fast`: an intervention at layer l, position p cannot change anything before layer l, nor at
  positions before p (causal attention), and the model is frozen. So the unedited base run's
  keys and values, and its residual stream entering each swept layer, are computed once per
  run. Each step feeds only the tokens from the earliest intervened position on, attending to
  the cached prefix, and starts at block l: the blocks before it hand on the cached residual
  instead of computing it. A last-token cell at layer l is a one-token forward through L - l blocks.

Both give float32 logits [B, vocab] for the last position only, never the whole sequence's, and
the training loss on them; the fast engine's loss reads the vocabulary weight once (`readout.py`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from .data import PairSet
from .models import LoadedModel
from .readout import Readout
from .sites import Site, gather, hooked, scatter

Swap = Callable[[Tensor], Tensor]
ENGINES = ("fast", "reference")


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
    """The plain path: a full forward of the base prompt with the site edited by a hook."""

    def __init__(self, lm: LoadedModel, site: Site, groups: list[CellGroup]):
        self.lm, self.site, self.groups = lm, site, groups
        self.columns = site.columns.to(lm.device)

    def _edit(self, positions: Tensor, swap: Swap) -> Callable[[Tensor], Tensor]:
        def edit(hidden: Tensor) -> Tensor:
            return scatter(hidden, positions, self.columns, swap(gather(hidden, positions, self.columns)))

        return edit

    def logits(self, g: int, rows: Tensor, swap: Swap) -> Tensor:
        """Float32 logits [B, vocab] at the last position of the edited base prompts `rows` of group g."""
        group = self.groups[g]
        with hooked(self.site, self._edit(group.base_positions[rows], swap)):
            out = self.lm.model(input_ids=group.base_ids[rows], logits_to_keep=1)
        return out.logits[:, -1].float()

    def loss(self, g: int, rows: Tensor, swap: Swap) -> Tensor:
        """Mean cross-entropy of those logits against the pairs' labels."""
        return F.cross_entropy(self.logits(g, rows, swap), self.groups[g].labels[rows])


class FastEngine(ReferenceEngine):
    """Feeds only tokens from the group's earliest intervened position on, over the cached base prefix,
    and only through the blocks from the site's layer on; the loss reads the vocabulary weight once."""

    def __init__(self, lm: LoadedModel, site: Site, groups: list[CellGroup]):
        super().__init__(lm, site, groups)
        self.starts = [int(group.base_positions.min()) for group in groups]
        self.readout = Readout(lm)

    def logits(self, g: int, rows: Tensor, swap: Swap) -> Tensor:
        if self.groups[g].prefix is None:
            return super().logits(g, rows, swap)
        return self.readout.logits(self.final_hidden(g, rows, swap))

    def loss(self, g: int, rows: Tensor, swap: Swap) -> Tensor:
        if self.groups[g].prefix is None:
            return super().loss(g, rows, swap)
        return self.readout.loss(self.final_hidden(g, rows, swap), self.groups[g].labels[rows])

    def final_hidden(self, g: int, rows: Tensor, swap: Swap) -> Tensor:
        """The edited base run's final hidden state at the last position, [B, hidden]."""
        group, start = self.groups[g], self.starts[g]
        skipping = group.residual is not None and self.site.layer > 0
        cache = self._prefix_cache(group, rows, start, self.site.layer if skipping else 0) if start > 0 else None
        residual = group.residual[rows, start:] if skipping else None
        edit = self._edit(group.base_positions[rows] - start, swap)
        with skip_blocks_before(self.lm, self.site.layer, residual), hooked(self.site, edit):
            out = self.lm.model.base_model(input_ids=group.base_ids[rows, start:], past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state[:, -1]

    def _prefix_cache(self, group: CellGroup, rows: Tensor, start: int, first_block: int) -> DynamicCache:
        """The base run's keys and values before `start`, for the blocks from `first_block` on.

        Skipped blocks read nothing from the cache, but the model reads the prefix length from
        their layers (layer 0, the first sliding-window layer), so they hold a placeholder of that length.
        """
        cache = DynamicCache(config=self.lm.model.config)
        placeholder = group.base_ids.new_zeros(1, 1, start, 1, dtype=self.lm.model.dtype)
        for layer, kv in enumerate(group.prefix):
            if kv is None and layer >= first_block:
                raise ValueError(f"the base run kept no keys and values for layer {layer}, which block {first_block} on needs")
            keys, values = (placeholder, placeholder) if layer < first_block else (t[rows, :, :start] for t in kv)
            cache.update(keys, values, layer)
        return cache


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
    are not kept (None).
    """
    first = min(layers, default=0)
    run = BaseRun(predictions=[], prefixes=[] if keep_prefix else None, residuals=[] if keep_prefix else None)
    for group in pairs.groups:
        ids = group.base_ids.to(lm.device)
        outs = [
            lm.model(input_ids=ids[i : i + batch_size], use_cache=keep_prefix, output_hidden_states=keep_prefix, logits_to_keep=1)
            for i in range(0, len(ids), batch_size)
        ]
        run.predictions.append(torch.cat([out.logits[:, -1].argmax(-1) for out in outs]))
        if keep_prefix:
            caches = [out.past_key_values.layers for out in outs]
            run.prefixes.append([
                tuple(torch.cat([getattr(c[i], kind)[:, :, :-1] for c in caches]) for kind in ("keys", "values"))
                if i >= first else None
                for i in range(len(caches[0]))
            ])
            run.residuals.append({layer: torch.cat([out.hidden_states[layer] for out in outs]) for layer in layers})
    return run


def base_prefixes(lm: LoadedModel, pairs: PairSet, batch_size: int) -> list[list[tuple[Tensor, Tensor]]]:
    """Only the prefix cache of `base_run`."""
    return base_run(lm, pairs, batch_size, keep_prefix=True).prefixes  # type: ignore[return-value]
