"""The activation store: the unedited runs of the prompts that every cell reads.

- The base runs, once per run (`base_run`): each split's base prompts, their own answers, and for the
  fast engine the keys, values and residual stream it starts from.
- Each site's tensors: on the source prompts of every split (the values an intervention swaps in) and on
  the base prompts of the train and test splits (what estimated interventions fit, what the edit scores
  compare with). Reading them site by site would run the model once per site, split and side. The store
  reads a chunk of sites (consecutive ones whose tensors fit `BUDGET_BYTES`) in one forward per batch of
  every split and side, stopped after the chunk's deepest site, and hands each site's tensors out once,
  keyed by the site (stream, layer, heads); then it forgets them. The base runs record the first chunk's
  base-prompt tensors in their own forwards; later chunks repeat exactly those forwards (`read_bases`),
  so a site's tensors are the same bits whichever chunk, shard or bundle it falls in.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from .data import PairSet, answer_matrix, teacher_forced
from .forward import cache_arguments
from .grid import SiteKey, site_key
from .models import LoadedModel
from .sites import Site, hooked, read_sites, resolve_site

BUDGET_BYTES = 1 << 30  # the site tensors of one chunk, read together and held until their cells run, at most
BASE_SPLITS = ("train", "test")  # splits whose base prompts' site tensors the cells read

@dataclass
class SiteTensors:
    """One site's tensors, [N, T, C] per group of a split: on the source prompts of every split, on the
    base prompts of BASE_SPLITS."""

    source: dict[str, list[Tensor]]
    base: dict[str, list[Tensor]]


@torch.no_grad()
def read_prompts(lm: LoadedModel, sites: list[Site], pairs: PairSet, batch_size: int) -> list[list[Tensor]]:
    """Every site's tensor on every source prompt, [N, T, C] per group, in one forward per batch."""
    per_site: list[list[Tensor]] = [[] for _ in sites]
    for group in pairs.groups:
        ids = group.source_ids.to(lm.device)
        parts = [read_sites(lm, sites, ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]
        for k in range(len(sites)):
            per_site[k].append(torch.cat([part[k] for part in parts]))
    return per_site


def chunks(sites: list[Site], tokens: int, element_bytes: int, budget: int | None = None) -> list[list[Site]]:
    """Consecutive sites whose tensors over `tokens` prompt tokens together stay within the budget
    (a site wider than the budget gets a chunk of its own)."""
    budget = BUDGET_BYTES if budget is None else budget
    out: list[list[Site]] = []
    used = budget
    for site in sites:
        size = tokens * site.width * element_bytes
        if used + size > budget:
            out.append([])
            used = 0
        out[-1].append(site)
        used += size
    return out


class ActivationStore:
    """The site tensors of the sites still to run, read a chunk at a time, handed out once per site."""

    def __init__(self, lm: LoadedModel, pairs: dict[str, PairSet], batch_size: int) -> None:
        self.lm, self.pairs, self.batch_size = lm, pairs, batch_size
        self.upcoming: list[list[Site]] = []
        self.ready: dict[SiteKey, SiteTensors] = {}
        self.recorded: dict[SiteKey, dict[str, list[Tensor]]] = {}  # base-prompt tensors the base runs recorded

    def plan(self, sites: list[Site]) -> None:
        """The sites whose tensors will be asked for, in the order their cells run."""
        tokens = sum(g.source_ids.numel() for p in self.pairs.values() for g in p.groups)
        tokens += sum(g.base_ids.numel() for name in BASE_SPLITS if name in self.pairs for g in self.pairs[name].groups)
        self.upcoming = chunks(sites, tokens, self.lm.model.dtype.itemsize)
        self.ready = {}
        planned = {site_key(site) for site in sites}
        self.recorded = {key: tensors for key, tensors in self.recorded.items() if key in planned}

    def base_runs(self, layers: tuple[int, ...], keep_prefix: bool) -> dict[str, "BaseRun"]:
        """Each split's base run: every split's, with the fast engine's caches for `layers` (`keep_prefix`), or
        the test split's only (its base accuracy). The runs with caches also record the base-prompt tensors of
        the first planned chunk of sites, which then need no forward of their own."""
        first = self.upcoming[0] if keep_prefix and self.upcoming else []
        runs = {}
        for name, split in self.pairs.items():
            if not (keep_prefix or name == "test"):
                continue
            sites = first if name in BASE_SPLITS else []
            runs[name] = base_run(self.lm, split, self.batch_size, keep_prefix, layers, sites)
            for site, tensors in zip(sites, runs[name].sites or []):
                self.recorded.setdefault(site_key(site), {})[name] = tensors
            runs[name].sites = None
        return runs

    def take(self, site: Site) -> SiteTensors:
        """The site's tensors (its chunk is read on first need); each site's are handed out once (a site
        asked for again, or never planned, is read on its own)."""
        key = site_key(site)
        if key not in self.ready:
            chunk = next((c for c in self.upcoming if any(site_key(s) == key for s in c)), [site])
            if chunk in self.upcoming:
                self.upcoming.remove(chunk)
            self.ready.update(self.read(chunk))
        return self.ready.pop(key)

    def read(self, chunk: list[Site]) -> dict[SiteKey, SiteTensors]:
        source = {name: read_prompts(self.lm, chunk, pairs, self.batch_size) for name, pairs in self.pairs.items()}
        base = {name: self.base_tensors(chunk, name) for name in BASE_SPLITS if name in self.pairs}
        return {
            site_key(site): SiteTensors({name: per_site[k] for name, per_site in source.items()},
                                        {name: per_site[k] for name, per_site in base.items()})
            for k, site in enumerate(chunk)
        }

    def base_tensors(self, chunk: list[Site], split: str) -> list[list[Tensor]]:
        """Each site's tensors on the split's base prompts: as its base run recorded them, or read now."""
        missing = [site for site in chunk if split not in self.recorded.get(site_key(site), {})]
        read = dict(zip(map(site_key, missing), read_bases(self.lm, missing, self.pairs[split], self.batch_size) if missing else []))
        return [read[site_key(site)] if site_key(site) in read else self.recorded[site_key(site)].pop(split) for site in chunk]


@dataclass
class BaseRun:
    """The unedited base run, computed once per run: its answers, keys and values, residuals."""

    predictions: list[Tensor]  # per group [G, K'] top-1 token ids, the base label teacher-forced (K': its width)
    prefixes: list[list[tuple[Tensor, Tensor] | None]] | None = None  # per group, per layer (keys, values) [G, heads, T-1, d]
    residuals: list[dict[int, Tensor]] | None = None  # per group, layer -> [G, T+K-1, hidden] entering that block, label fed
    sites: list[list[Tensor]] | None = None  # per recorded site, per group [G, T, C]: the site on the base prompts

    def correct(self, pairs: PairSet) -> list[Tensor]:
        """Per group [G] bool: the base prompt's own answer is known and is the top-1 token at every one of its positions."""
        out = []
        for predictions, group in zip(self.predictions, pairs.groups):
            answers = answer_matrix(group.base_labels)
            right = ((predictions.cpu() == answers) | (answers < 0)).all(dim=1)
            out.append(right & (answers[:, 0] >= 0))
        return out

    def accuracy(self, pairs: PairSet) -> float:
        """Share of the base prompts whose own answer is known and right (`correct`); NaN when none is known."""
        known = sum(int((answer_matrix(g.base_labels)[:, 0] >= 0).sum()) for g in pairs.groups)
        return sum(int(right.sum()) for right in self.correct(pairs)) / known if known else float("nan")


@torch.no_grad()
def base_run(lm: LoadedModel, pairs: PairSet, batch_size: int, keep_prefix: bool, layers: tuple[int, ...] = (),
             sites: list[Site] | tuple = ()) -> BaseRun:
    """The base prompts' own answers (top-1 with the base label teacher-forced); keeps what the fast engine reuses if asked.

    The fast engine's caches come from the base prompts followed by the teacher-forced counterfactual
    label (the tokens it feeds); with one-token answers that is the same forward as the answers'.
    Cache cost per pair of T tokens, in the model's dtype: 2 x layers x kv_heads x head_dim x (T - 1)
    numbers of keys and values, plus hidden x (T + K - 1) per swept layer of residual stream. With `layers`
    given, the fast engine skips the blocks before the earliest of them, so their keys and values
    are not kept (None). Each group's tensors are allocated once and filled batch by batch as the
    attention layers compute them; no batch's cache of every layer is ever held. With `keep_prefix`,
    each of `sites` is recorded on the base prompts too (`sites`, as `read_bases` reads them).
    """
    first = min(layers, default=0)
    run = BaseRun(predictions=[], prefixes=[] if keep_prefix else None, residuals=[] if keep_prefix else None,
                  sites=[[] for _ in sites] if keep_prefix else None)
    blocks = [resolve_site(lm, "block_input", layer) for layer in layers] if keep_prefix else []
    for group in pairs.groups:
        ids = group.base_ids.to(lm.device)
        label_fed = teacher_forced(group.labels).to(lm.device)
        answers_fed = teacher_forced(group.base_labels).to(lm.device)
        same = label_fed.shape[1] == answers_fed.shape[1] == 0  # one-token answers: one forward serves both
        kept: dict = {}  # ("kv", layer, 0 | 1) -> keys | values;  ("residual", layer) -> residual
        predictions = []
        if keep_prefix:
            with ExitStack() as stack:  # only the swept layers' residuals, not every layer's hidden states
                for site in blocks:
                    stack.enter_context(hooked(site, lambda hidden, layer=site.layer: _fill(kept, ("residual", layer), rows, hidden, len(ids))))
                for k, site in enumerate(sites):
                    stack.enter_context(hooked(site, lambda hidden, k=k, site=site: _fill(kept, ("site", k), rows, _prompt_columns(hidden, site, ids), len(ids))))
                for i in range(0, len(ids), batch_size):
                    rows = slice(i, i + batch_size)
                    predictions.append(_cached_forward(lm, ids, label_fed, rows, first, kept))
            run.prefixes.append([(kept["kv", i, 0], kept["kv", i, 1]) if i >= first else None for i in range(lm.n_layers)])
            run.residuals.append({layer: kept["residual", layer] for layer in layers})
            for k in range(len(sites)):
                run.sites[k].append(kept["site", k])
        if not (keep_prefix and same):
            width = answers_fed.shape[1] + 1
            predictions = [_base_batch(lm, torch.cat([ids[i : i + batch_size], answers_fed[i : i + batch_size]], dim=1), width)
                           for i in range(0, len(ids), batch_size)]
        run.predictions.append(torch.cat(predictions))
    return run


@torch.no_grad()
def read_bases(lm: LoadedModel, sites: list[Site], pairs: PairSet, batch_size: int) -> list[list[Tensor]]:
    """Each site's tensor on every base prompt, [N, T, C] per group: the forwards of a base run with caches
    (the prompt and the fed label, in batches of `batch_size`, through a cache that records nothing here),
    stopped after the last site; so the tensors are the same bits as those `base_run` records."""
    per_site: list[list[Tensor]] = [[] for _ in sites]
    for group in pairs.groups:
        ids = group.base_ids.to(lm.device)
        label_fed = teacher_forced(group.labels).to(lm.device)
        kept: dict = {}
        seen: set[int] = set()  # the sites recorded in this batch

        def record(hidden: Tensor, k: int, site: Site) -> None:
            _fill(kept, ("site", k), rows, _prompt_columns(hidden, site, ids), len(ids))
            seen.add(k)
            if len(seen) == len(sites):
                raise _AllRead

        with ExitStack() as stack:
            for k, site in enumerate(sites):
                stack.enter_context(hooked(site, lambda hidden, k=k, site=site: record(hidden, k, site)))
            for i in range(0, len(ids), batch_size):
                rows = slice(i, i + batch_size)
                seen.clear()
                try:
                    _cached_forward(lm, ids, label_fed, rows, lm.n_layers, kept)
                except _AllRead:
                    pass
        for k in range(len(sites)):
            per_site[k].append(kept["site", k])
    return per_site


class _AllRead(Exception):
    """Every site of a read has been recorded for this batch: the rest of the forward is not needed."""


def _cached_forward(lm: LoadedModel, ids: Tensor, label_fed: Tensor, rows: slice, first: int, kept: dict) -> Tensor:
    """One batch of a base run with caches: rows `rows` of the prompts followed by the fed label, through a
    cache that writes the keys and values of layers from `first` on into `kept` (none with first = n_layers).
    `base_run` and `read_bases` both make exactly this call, so their site tensors are the same bits."""
    fed = torch.cat([ids[rows], label_fed[rows]], dim=1)
    return _base_batch(lm, fed, label_fed.shape[1] + 1, _RecordingCache(first, kept, rows, len(ids), ids.shape[1] - 1))


def _prompt_columns(hidden: Tensor, site: Site, ids: Tensor) -> Tensor:
    """The site's columns at the base prompt's own positions (not at the fed label's)."""
    return hidden[:, : ids.shape[1], site.columns.to(hidden.device)].detach()


def _base_batch(lm: LoadedModel, ids: Tensor, width: int, cache: "_RecordingCache | None" = None) -> Tensor:
    """[b, width] top-1 token ids at the last `width` positions of one batch; with a recording cache,
    the keys and values of the prompt before its last position are written into it."""
    out = lm.model(input_ids=ids, logits_to_keep=width, **cache_arguments(lm.model, cache))
    return out.logits.argmax(-1)


class _RecordingCache(DynamicCache):
    """A cache that stores nothing: each attention layer from `first` on writes its keys and values
    before the last position into rows `rows` of `kept`, and attends to this forward's own, as an
    empty cache would let it. So a base run never holds a whole batch's keys and values of every layer."""

    def __init__(self, first: int, kept: dict, rows: slice, total: int, prefix: int | None = None):
        super().__init__()
        self.first, self.kept, self.rows, self.total = first, kept, rows, total
        self.prefix = prefix  # positions kept: the prompt but its last token (None: all but the last position)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if layer_idx >= self.first:
            end = self.prefix if self.prefix is not None else key_states.shape[2] - 1
            _fill(self.kept, ("kv", layer_idx, 0), self.rows, key_states[:, :, :end], self.total)
            _fill(self.kept, ("kv", layer_idx, 1), self.rows, value_states[:, :, :end], self.total)
        return key_states, value_states


def _fill(store: dict, key: tuple, rows: slice, value: Tensor, total: int) -> None:
    """store[key][rows] = value, allocating store[key] with `total` rows at the first write."""
    if key not in store:
        store[key] = value.new_empty((total, *value.shape[1:]))
    store[key][rows] = value


def base_prefixes(lm: LoadedModel, pairs: PairSet, batch_size: int) -> list[list[tuple[Tensor, Tensor]]]:
    """Only the prefix cache of `base_run`."""
    return base_run(lm, pairs, batch_size, keep_prefix=True).prefixes  # type: ignore[return-value]
