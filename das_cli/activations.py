"""The activation store: each site's unedited tensors on the prompts, read for a chunk of sites at once.

A cell needs its site's tensor on the source prompts of every split (the values its intervention swaps
in) and on the base prompts of the train and test splits (what estimated interventions fit, what the
edit scores compare with). Reading them site by site would run the model once per site, split and side.
The store reads a chunk of sites (consecutive ones whose tensors fit `BUDGET_BYTES`) in one forward per
batch of every split and side, stopped after the chunk's deepest site, and hands each site's tensors
out once, keyed by the site (stream, layer, heads); then it forgets them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .data import PairSet
from .models import LoadedModel
from .sites import Site, read_sites

BUDGET_BYTES = 1 << 30  # the site tensors of one chunk, read together and held until their cells run, at most
BASE_SPLITS = ("train", "test")  # splits whose base prompts' site tensors the cells read

SiteKey = tuple  # (stream, layer, heads)


def site_key(site: Site) -> SiteKey:
    return (site.stream, site.layer, site.heads)


@dataclass
class SiteTensors:
    """One site's tensors, [N, T, C] per group of a split: on the source prompts of every split, on the
    base prompts of BASE_SPLITS."""

    source: dict[str, list[Tensor]]
    base: dict[str, list[Tensor]]


@torch.no_grad()
def read_prompts(lm: LoadedModel, sites: list[Site], pairs: PairSet, batch_size: int, side: str = "source") -> list[list[Tensor]]:
    """Every site's tensor on every source (or base) prompt, [N, T, C] per group, in one forward per batch."""
    per_site: list[list[Tensor]] = [[] for _ in sites]
    for group in pairs.groups:
        ids = (group.source_ids if side == "source" else group.base_ids).to(lm.device)
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

    def plan(self, sites: list[Site]) -> None:
        """The sites whose tensors will be asked for, in the order their cells run."""
        tokens = sum(g.source_ids.numel() for p in self.pairs.values() for g in p.groups)
        tokens += sum(g.base_ids.numel() for name in BASE_SPLITS if name in self.pairs for g in self.pairs[name].groups)
        self.upcoming = chunks(sites, tokens, self.lm.model.dtype.itemsize)
        self.ready = {}

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
        base = {name: read_prompts(self.lm, chunk, self.pairs[name], self.batch_size, side="base")
                for name in BASE_SPLITS if name in self.pairs}
        return {
            site_key(site): SiteTensors({name: per_site[k] for name, per_site in source.items()},
                                        {name: per_site[k] for name, per_site in base.items()})
            for k, site in enumerate(chunk)
        }
