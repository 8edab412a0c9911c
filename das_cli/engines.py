"""Engines: how one training or evaluation step gets the intervened logits at the answer position.

- `reference`: a full forward of every base prompt with the site edited by a hook (what pyvene does).
- `fast`: an intervention at layer l, position p cannot change anything before layer l, nor at
  positions before p (causal attention), and the model is frozen. So the unedited base run's
  keys and values, and its residual stream entering each swept layer, are computed once per
  run. Each step feeds only the tokens from the earliest intervened position on, attending to
  the cached prefix, and starts at block l: the blocks before it hand on the cached residual
  instead of computing it. A last-token cell at layer l is a one-token forward through L - l blocks.
  A batch may hold prompts of several lengths; they are joined into one left-padded forward.

An answer of K tokens is teacher-forced: the base prompt is followed by the label's first K - 1
tokens, and the answer is read at the prompt's last position and at each fed one. The fed tokens
come after every intervened position, so for the fast engine they are part of the suffix it feeds;
its cached keys and values (the prompt before the earliest intervened position) do not change.

Both give float32 logits [B, K, vocab] at those K positions only, never the whole sequence's, and
the training loss on them; the fast engine's loss reads the vocabulary weight once (`readout.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from .data import Batch, PairSet, answer_matrix, resolve_positions, teacher_forced
from .forward import Intervene, JoinedForward
from .models import LoadedModel
from .readout import Readout, answer_cross_entropy
from .sites import Site, gather, hooked, scatter


@dataclass
class CellGroup:
    """One pair group, prepared for one cell: everything lives on the model's device."""

    base_ids: Tensor  # [G, T]
    base_positions: Tensor  # [G, P]
    source_values: Tensor  # [G, P*C] the source's vector at the site, computed once without gradients
    labels: Tensor  # [G, K] answer token ids, -1 padded ([G]: one token each); one K for every group of a split
    prefix: list[tuple[Tensor, Tensor] | None] | None = None  # per layer (keys, values) [G, heads, T-1, d] of the base
    #   run; None for layers before the earliest swept one (their blocks are skipped)
    residual: Tensor | None = None  # [G, T+K-1, hidden] residual stream entering the site's block in the base run
    #   (prompt and fed label tokens)
    kinds: list[str] | None = None  # per pair: "cause" | "isolate" (None: all cause)
    counterfactuals: list[str] | None = None  # per pair: its counterfactual type (None: none given)

    def __post_init__(self) -> None:
        self.labels = answer_matrix(self.labels)

    def __len__(self) -> int:
        return self.base_ids.shape[0]

    def fed_ids(self, rows: Tensor, first: int = 0) -> Tensor:
        """The rows' base prompts from column `first` on, followed by their teacher-forced label tokens."""
        return torch.cat([self.base_ids[rows, first:], teacher_forced(self.labels[rows])], dim=1)


def prepare(
    pairs: PairSet,
    position: tuple,
    source_acts: list[Tensor],
    device: torch.device,
    prefixes: list | None = None,
    residuals: list[Tensor] | None = None,
) -> list[CellGroup]:
    """Per group: base ids and positions, and the source's site vector gathered at its positions.

    `source_acts[g]` is the site's tensor for every source prompt of group g at every position,
    [G, S, C] (read once per stream and layer, shared by all position cells of that layer).
    """
    out = []
    for g, (group, acts) in enumerate(zip(pairs.groups, source_acts)):
        source_pos = resolve_positions(group, position, "source").to(acts.device)
        every_column = torch.arange(acts.shape[-1], device=acts.device)
        out.append(
            CellGroup(
                base_ids=group.base_ids.to(device),
                base_positions=resolve_positions(group, position, "base").to(device),
                source_values=gather(acts, source_pos, every_column).to(device),
                labels=group.labels.to(device),
                prefix=prefixes[g] if prefixes else None,
                residual=residuals[g] if residuals else None,
                kinds=group.kinds or None,
                counterfactuals=group.counterfactuals or None,
            )
        )
    return out


class Engine(Protocol):
    """What training and evaluation need of an engine: a cell's pair groups, and per batch (pieces of groups)
    its labels, its edited logits at the answer positions and its training loss."""

    lm: LoadedModel
    site: Site
    groups: list[CellGroup]
    width: int  # K: answer positions read per pair

    def labels(self, batch: Batch) -> Tensor: ...

    def logits(self, batch: Batch, intervene: Intervene) -> Tensor: ...

    def loss(self, batch: Batch, intervene: Intervene) -> Tensor: ...


class ReferenceEngine:
    """The plain path: a full forward of each base prompt with the site edited by a hook.

    A batch's pieces (rows of groups of different lengths) run as separate forwards.
    """

    def __init__(self, lm: LoadedModel, site: Site, groups: list[CellGroup]):
        self.lm, self.site, self.groups = lm, site, groups
        self.columns = site.columns.to(lm.device)
        widths = {group.labels.shape[1] for group in groups}
        if len(widths) > 1:
            raise ValueError(f"the groups' labels have different widths {sorted(widths)}; pad them to one (data.tokenize_pairs does)")
        self.width = widths.pop() if widths else 1  # K: answer positions read per pair

    def edit(self, positions: Tensor, source: Tensor, intervene: Intervene) -> Callable[[Tensor], Tensor]:
        """The hook's edit: the site's values at `positions` (per row) replaced by `intervene(base, source)`."""
        def edit(hidden: Tensor) -> Tensor:
            return scatter(hidden, positions, self.columns, intervene(gather(hidden, positions, self.columns), source))

        return edit

    def labels(self, batch: Batch) -> Tensor:
        """[B, K] answer token ids (-1: past the end of a shorter answer)."""
        return torch.cat([self.groups[g].labels[rows] for g, rows in batch])

    def logits(self, batch: Batch, intervene: Intervene) -> Tensor:
        """Float32 logits [B, K, vocab] of the batch's edited base prompts, teacher-forced: at the prompt's
        last position and at each fed label token."""
        return torch.cat([self._piece_logits(self.groups[g], rows, intervene) for g, rows in batch])

    def loss(self, batch: Batch, intervene: Intervene) -> Tensor:
        """Cross-entropy of those logits against the labels: mean over each label's tokens, then over pairs."""
        return answer_cross_entropy(self.logits(batch, intervene), self.labels(batch))

    def _piece_logits(self, group: CellGroup, rows: Tensor, intervene: Intervene) -> Tensor:
        edit = self.edit(group.base_positions[rows], group.source_values[rows], intervene)
        with hooked(self.site, edit):
            out = self.lm.model(input_ids=group.fed_ids(rows), logits_to_keep=self.width)
        return out.logits.float()


class FastEngine:
    """Feeds only tokens from the batch's earliest intervened position on, over the cached base prefix,
    and only through the blocks from the site's layer on; the loss reads the vocabulary weight once.

    Pieces of different lengths are joined into one forward, left-padded: their prefixes are
    left-padded with masked zeros and each row keeps its own position ids. That needs every fed
    token to be a real one (the earliest intervened position, counted in the padded batch, lies
    after every row's padding) and no sliding window shorter than the batch; otherwise the pieces
    run one by one.
    """

    def __init__(self, lm: LoadedModel, site: Site, groups: list[CellGroup]):
        self.reference = ReferenceEngine(lm, site, groups)  # its fallback, where the caches are missing
        self.lm, self.site, self.groups, self.width = lm, site, groups, self.reference.width
        self.starts = [int(group.base_positions.min()) for group in groups]
        self.cached = all(group.prefix is not None for group in groups)
        self.readout = Readout(lm)
        for group in groups:
            fed = group.base_ids.shape[1] + self.width - 1
            if group.residual is not None and group.residual.shape[1] != fed:
                raise ValueError(f"the cached residual covers {group.residual.shape[1]} tokens, not the {fed} of prompt and fed label")
        self.joined = JoinedForward(lm, [self])

    def labels(self, batch: Batch) -> Tensor:
        return self.reference.labels(batch)

    def logits(self, batch: Batch, intervene: Intervene) -> Tensor:
        if not self.cached:
            return self.reference.logits(batch, intervene)
        return self.readout.logits(self.final_hidden(batch, intervene))

    def loss(self, batch: Batch, intervene: Intervene) -> Tensor:
        if not self.cached:
            return self.reference.loss(batch, intervene)
        return self.readout.loss(self.final_hidden(batch, intervene), self.labels(batch))

    def final_hidden(self, batch: Batch, intervene: Intervene) -> Tensor:
        """The edited base runs' final hidden state at the K answer positions, [B, K, hidden]."""
        hidden = self.joined.hidden([batch], [intervene], check_window=len(batch) > 1)
        if hidden is not None:
            return hidden[0]
        return torch.cat([self.joined.hidden([[piece]], [intervene], check_window=False)[0] for piece in batch])

    def joinable(self, batch: Batch) -> bool:
        """Whether the batch's pieces run as one left-padded forward (else one forward per piece)."""
        return self.joined.layout([(0, *piece) for piece in batch]) is not None


def make_engine(name: str, lm: LoadedModel, site: Site, groups: list[CellGroup]) -> Engine:
    return {"fast": FastEngine, "reference": ReferenceEngine}[name](lm, site, groups)
