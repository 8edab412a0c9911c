"""Engines: how one training or evaluation step gets the intervened logits at the answer position.

- `reference`: a full forward of every base prompt with the site edited by a hook (what pyvene does).
- `fast`: an intervention at layer l, position p cannot change anything before layer l, nor at
  positions before p (causal attention), and the model is frozen. So the unedited base run's
  keys and values, and its residual stream entering each swept layer, are computed once per
  run. Each step feeds only the tokens from the earliest intervened position on, attending to
  the cached prefix, and starts at block l: the blocks before it hand on the cached residual
  instead of computing it. A last-token cell at layer l is a one-token forward through L - l blocks.

Both return float32 logits [B, vocab] for the last position only (`logits_to_keep=1`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor
from transformers import DynamicCache

from .data import PairSet
from .models import LoadedModel
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
    prefix: list[tuple[Tensor, Tensor]] | None = None  # per layer (keys, values) [G, heads, T-1, d] of the base run
    residual: Tensor | None = None  # [G, T, hidden] residual stream entering the site's block in the base run
    kinds: list[str] | None = None  # per pair: "cause" | "isolate" (None: all cause)

    def __len__(self) -> int:
        return self.base_ids.shape[0]


class ReferenceEngine:
    """The plain path: a full forward of the base prompt with the site edited by a hook."""

    def __init__(self, lm: LoadedModel, site: Site, groups: list[CellGroup]):
        self.lm, self.site, self.groups = lm, site, groups
        self.columns = site.columns.to(lm.device)

    def _forward(self, ids: Tensor, positions: Tensor, swap: Swap, cache: DynamicCache | None = None) -> Tensor:
        def edit(hidden: Tensor) -> Tensor:
            return scatter(hidden, positions, self.columns, swap(gather(hidden, positions, self.columns)))

        with hooked(self.site, edit):
            out = self.lm.model(input_ids=ids, past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
        return out.logits[:, -1].float()

    def logits(self, g: int, rows: Tensor, swap: Swap) -> Tensor:
        group = self.groups[g]
        return self._forward(group.base_ids[rows], group.base_positions[rows], swap)


class FastEngine(ReferenceEngine):
    """Feeds only tokens from the group's earliest intervened position on, over the cached base prefix,
    and only through the blocks from the site's layer on."""

    def __init__(self, lm: LoadedModel, site: Site, groups: list[CellGroup]):
        super().__init__(lm, site, groups)
        self.starts = [int(group.base_positions.min()) for group in groups]

    def logits(self, g: int, rows: Tensor, swap: Swap) -> Tensor:
        group, start = self.groups[g], self.starts[g]
        if group.prefix is None:
            return super().logits(g, rows, swap)
        cache = None
        if start > 0:
            cache = DynamicCache(config=self.lm.model.config)
            for layer, (keys, values) in enumerate(group.prefix):
                cache.update(keys[rows, :, :start], values[rows, :, :start], layer)
        residual = group.residual[rows, start:] if group.residual is not None else None
        with skip_blocks_before(self.lm, self.site.layer, residual):
            return self._forward(group.base_ids[rows, start:], group.base_positions[rows] - start, swap, cache)


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
    prefixes: list[list[tuple[Tensor, Tensor]]] | None = None  # per group, per layer (keys, values) [G, heads, T-1, d]
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
    numbers of keys and values, plus hidden x T per swept layer of residual stream.
    """
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
                for i in range(len(caches[0]))
            ])
            run.residuals.append({layer: torch.cat([out.hidden_states[layer] for out in outs]) for layer in layers})
    return run

def base_prefixes(lm: LoadedModel, pairs: PairSet, batch_size: int) -> list[list[tuple[Tensor, Tensor]]]:
    """Only the prefix cache of `base_run`."""
    return base_run(lm, pairs, batch_size, keep_prefix=True).prefixes  # type: ignore[return-value]
