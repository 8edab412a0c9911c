"""From Examples to tensors: token ids grouped by prompt length, positions resolved per example.

Pairs are grouped so that every base prompt of a group has one length, and a base position index
means the same token for every row of a group. A batch may span groups: `batches` sorts rows by
length and cuts full batches across group boundaries (each batch is a list of (group, rows)
pieces), so a dataset of many lengths still trains on full batches; the engines join the pieces.
Source prompts of a group are right-padded to the longest: with causal attention a token's
activations never depend on tokens after it, so padding changes no source vector the swap reads,
and each row keeps its own length for positions counted from the end.

An answer (label, base label) may be several tokens. Labels are [G, K] token ids, right-padded with
-1 to the longest answer of the split, so every group of a split has one width K; the engines feed
the base prompt followed by the label's tokens but the last (`teacher_forced`) and read the answer at
the prompt's last position and at each fed one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import DasError
from .examples import Example, encode


@dataclass
class PairGroup:
    """Pairs whose base prompts share one length (sources right-padded to the longest of the group)."""

    base_ids: Tensor  # [G, T]
    source_ids: Tensor  # [G, S] right-padded to the longest source prompt of the group
    labels: Tensor  # [G, K] counterfactual answer token ids, right-padded with -1 ([G]: one token each)
    base_labels: Tensor  # [G, K'] the base prompt's own answer token ids, -1 padded (a row of -1: not given)
    base_positions: dict[str, Tensor]  # name -> [G] token index
    source_positions: dict[str, Tensor]
    kinds: list[str] = field(default_factory=list)  # per pair: "cause" | "isolate"
    base_classes: list[str | None] = field(default_factory=list)  # the variable's value on each base prompt
    source_classes: list[str | None] = field(default_factory=list)  # ... and on each source prompt
    source_lengths: Tensor | None = None  # [G] tokens of each source prompt before padding (None: no padding)
    counterfactuals: list[str] = field(default_factory=list)  # per pair: its counterfactual type ("" when not given)

    def __len__(self) -> int:
        return self.base_ids.shape[0]


@dataclass
class PairSet:
    groups: list[PairGroup]
    before_filter: int | None = None  # pairs of the split before `dataset.filter` (None: not filtered)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def sizes(self) -> list[int]:
        return [len(g) for g in self.groups]


def tokenize_pairs(tokenizer, examples: list[Example], split: str) -> PairSet:
    """Encode every pair, grouped by base length; answers are checked (see `answer_tokens`), with the offending example."""
    labels = [_answer_ids(tokenizer, ex.base, ex.label, "label", split) for ex in examples]
    base_labels = [[] if ex.base_label is None else _answer_ids(tokenizer, ex.base, ex.base_label, "base_label", split) for ex in examples]
    width, base_width = max(map(len, labels), default=1), max([1, *map(len, base_labels)])  # no base label: a column of -1
    buckets: dict[int, list[tuple]] = {}
    for ex, label, base_label in zip(examples, labels, base_labels):
        base, source = encode(tokenizer, ex.base), encode(tokenizer, ex.source)
        buckets.setdefault(len(base), []).append((ex, base, source, _padded(label, width), _padded(base_label, base_width)))
    return PairSet(groups=[_group(tokenizer, rows) for _, rows in sorted(buckets.items())])


def grouped_order(tokenizer, examples: list[Example]) -> list[int]:
    """The index into `examples` of each row of `tokenize_pairs(tokenizer, examples, ...)`, group after
    group: groups by base length ascending, file order within a group (a stable sort)."""
    lengths = [len(encode(tokenizer, ex.base)) for ex in examples]
    return sorted(range(len(examples)), key=lengths.__getitem__)


def answer_tokens(tokenizer, prompt: str, answer: str) -> tuple[list[int], str | None]:
    """The answer's token ids as the model must produce them after `prompt`, and what is wrong with them (None: nothing).

    An answer is at least one token, and `prompt + answer` must tokenize as the prompt's tokens followed
    by the answer's: where the tokenizer merges across the boundary ("Indones" + "ia"), the model never
    sees the answer's tokens after this prompt, so training and scoring them would be meaningless.
    """
    ids = list(tokenizer(answer, add_special_tokens=False).input_ids)
    if not ids:
        return ids, "has no tokens"
    prompt_ids, joined = encode(tokenizer, prompt), encode(tokenizer, prompt + answer)
    apart = prompt_ids + ids
    if joined == apart:
        return ids, None
    differ = next((i for i, (a, b) in enumerate(zip(joined, apart)) if a != b), min(len(joined), len(apart)))
    start = max(0, min(differ, len(prompt_ids) - 1))
    pieces = tokenizer.convert_ids_to_tokens
    return ids, (
        f"merges with the end of its prompt: prompt and answer tokenize together as {pieces(joined[start:])}, "
        f"not as the prompt's tokens then the answer's {pieces(apart[start:])}; start it at a token boundary (e.g. with a leading space)"
    )


def _answer_ids(tokenizer, prompt: str, answer: str, column: str, split: str) -> list[int]:
    ids, problem = answer_tokens(tokenizer, prompt, answer)
    if problem:
        raise DasError(f"dataset: {column} {answer!r} in the {split} split {problem}")
    return ids


def _padded(ids: list[int], width: int) -> list[int]:
    return ids + [-1] * (width - len(ids))


def answer_matrix(labels: Tensor) -> Tensor:
    """Answers as [G, K] token ids (-1 padded); a [G] tensor is one token per pair."""
    return labels[:, None] if labels.dim() == 1 else labels


def teacher_forced(labels: Tensor) -> Tensor:
    """[G, K-1]: the tokens fed after the prompt, every answer token but the last; a shorter answer's
    padding is fed as token 0 (it follows every token that is scored, so it changes no scored logit)."""
    return answer_matrix(labels)[:, :-1].clamp_min(0)


def _group(tokenizer, rows) -> PairGroup:
    exs = [r[0] for r in rows]
    source_lengths = torch.tensor([len(r[2]) for r in rows])
    width = int(source_lengths.max())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # never read: it follows every real token
    return PairGroup(
        base_ids=torch.tensor([r[1] for r in rows]),
        source_ids=torch.tensor([r[2] + [pad] * (width - len(r[2])) for r in rows]),
        labels=torch.tensor([r[3] for r in rows]),
        base_labels=torch.tensor([r[4] for r in rows]),
        base_positions=_named(exs, "base_positions", torch.full((len(exs),), len(rows[0][1]) - 1)),
        source_positions=_named(exs, "source_positions", source_lengths - 1),
        kinds=[e.kind for e in exs],
        base_classes=[e.base_class for e in exs],
        source_classes=[e.source_class for e in exs],
        source_lengths=source_lengths,
        counterfactuals=[e.counterfactual for e in exs],
    )


def _named(exs: list[Example], attr: str, last: Tensor) -> dict[str, Tensor]:
    names = set.intersection(*(set(getattr(e, attr)) for e in exs)) if exs else set()
    named = {n: torch.tensor([getattr(e, attr)[n] for e in exs]) for n in sorted(names)}
    named["last"] = last
    return named


Position = int | str


def resolve_positions(group: PairGroup, position: tuple[Position, ...], side: str) -> Tensor:
    """[G, P] token indices of `position` (ints count from the end when negative) on one side."""
    ids = group.base_ids if side == "base" else group.source_ids
    named = group.base_positions if side == "base" else group.source_positions
    padded = side == "source" and group.source_lengths is not None
    lengths = group.source_lengths if padded else torch.full((len(group),), ids.shape[1])
    columns = []
    for p in position:
        if isinstance(p, str):
            if p not in named:
                raise DasError(f"positions: unknown position '{p}'; valid names: {', '.join(sorted(named))}, or integers")
            columns.append(named[p])
        else:
            index = p + lengths if p < 0 else torch.full((len(group),), p)
            outside = (index < 0) | (index >= lengths)
            if bool(outside.any()):
                length = int(lengths[outside.nonzero()[0, 0]])
                raise DasError(f"positions: {p} is outside a {side} prompt of {length} tokens; valid: {-length}..{length - 1}")
            columns.append(index)
    stacked = torch.stack(columns, dim=1)
    if len(position) > 1 and (stacked.sort(dim=1).values.diff(dim=1) == 0).any():
        raise DasError(f"positions: {list(position)} names one token twice in a {side} prompt; give each token once")
    return stacked


Piece = tuple[int, Tensor]  # (group index, row indices in that group)
Batch = list[Piece]


def batches(sizes: list[int], batch_size: int, generator: torch.Generator | None = None) -> list[Batch]:
    """Every row of groups of the given sizes once, in batches of `batch_size` (the last may be smaller).

    Rows are taken group by group (groups are sorted by base length), so a batch spans as few
    groups, and as few lengths, as possible. With a generator, rows are shuffled within each group
    and the batches' order is shuffled; without, everything is in order.
    """
    orders = [torch.randperm(n, generator=generator) if generator is not None else torch.arange(n) for n in sizes]
    owners = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)] + [torch.zeros(0, dtype=torch.long)])
    flat_rows = torch.cat(orders + [torch.zeros(0, dtype=torch.long)])
    out = []
    for first in range(0, len(flat_rows), batch_size):
        groups, members = owners[first : first + batch_size], flat_rows[first : first + batch_size]
        out.append([(int(g), members[groups == g]) for g in groups.unique_consecutive().tolist()])
    if generator is not None:
        out = [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]
    return out


def to_device(plan: list[Batch], device: torch.device) -> list[Batch]:
    """The batches' row indices on `device`, moved in one copy (none inside a training loop)."""
    if torch.device(device).type == "cpu" or not plan:
        return plan
    rows = torch.cat([r for batch in plan for _, r in batch]).to(device)
    parts = iter(rows.split([len(r) for batch in plan for _, r in batch]))
    return [[(g, next(parts)) for g, _ in batch] for batch in plan]
