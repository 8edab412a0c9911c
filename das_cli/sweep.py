"""The sweep: expand the grid, run every cell not already on disk, write the tables.

`run(cfg, output_dir)` reads top to bottom: load model -> build data -> expand grid ->
for each cell fit and evaluate -> write results. A finished cell is written atomically the
moment it ends (cells/<cell-id>/metrics.json + subspace.safetensors); rerunning into the same
folder skips finished cells.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import config as C
from .data import PairSet, resolve_positions, tokenize_pairs
from .errors import DasError, choices_error
from .examples import KINDS
from .files import atomic_write, atomic_write_json
from .interrupts import is_interruption
from .interventions import SiteActivations, build_intervention
from .ioi import make_ioi
from .models import LoadedModel, load_model
from .analysis import ILLUSION_STREAMS, downstream_weight, fixed_subspace, head_importance, illusion_parts
from .scores import base_vectors, edit_scores
from .results import bar_chart, format_summary, write_results
from .sites import Site, gather, head_counts, read_sites, resolve_site
from .engines import BaseRun, base_run, make_engine
from .grid import Cell, expand_grid, head_rankings, layer_key, shard_cells, site_key, write_grid
from .train import evaluate_kinds, fit, prepare

log = logging.getLogger(__name__)

# A cell failing with one of these is recorded with its `error` and the sweep goes on
# (torch.cuda.OutOfMemoryError is a RuntimeError; named for the reader).
CELL_FAILURES = (torch.cuda.OutOfMemoryError, RuntimeError, FloatingPointError, ValueError)


def build_pairs(cfg: DictConfig, lm: LoadedModel) -> tuple[PairSet, PairSet]:
    """Train and test pairs; training keeps the kinds `dataset.train_kinds` names (default: cause only)."""
    ds = cfg.dataset
    if ds.name == "file":
        from .filedata import load_file_dataset

        splits = load_file_dataset(ds, lm.tokenizer)
        train, test = splits.train, splits.test
    else:
        splits = make_ioi(lm.tokenizer, ds.variable, int(ds.n_train), int(ds.n_test), int(ds.seed), int(ds.get("n_val", 0)))
        train, test = splits.train, splits.test
    kinds = list(ds.get("train_kinds") or ["cause"])
    for kind in kinds:
        if kind not in KINDS:
            raise choices_error("dataset.train_kinds", kind, KINDS)
    train = [e for e in train if e.kind in kinds]
    if not train or not test:
        empty = "train" if not train else "test"
        raise DasError(f"dataset: the {empty} split has no pairs (dataset.train_kinds={kinds})")
    return tokenize_pairs(lm.tokenizer, train, "train"), tokenize_pairs(lm.tokenizer, test, "test")


def check_positions(cells: list[Cell], *pair_sets: PairSet) -> None:
    """Fail before any training if some position does not exist in some prompt."""
    for position in dict.fromkeys(c.position for c in cells):
        for pairs in pair_sets:
            for group in pairs.groups:
                resolve_positions(group, position, "base")
                resolve_positions(group, position, "source")


def check_intervention(cfg: DictConfig, cells: list[Cell], sites: dict) -> None:
    """`intervention.dim` / `neurons` must fit every cell's width (site width x number of positions)."""
    options = OmegaConf.to_container(cfg.intervention)
    for cell in cells:
        width = sites[(cell.stream, cell.layer, cell.heads)].width * len(cell.position)
        dim = options.get("dim")
        if dim is not None and not 1 <= int(dim) <= width:
            raise DasError(f"intervention.dim={dim}: must be between 1 and {width} (the width of cell {cell.id})")
        neurons = options.get("neurons") or []
        if any(not 0 <= int(n) < width for n in neurons):
            raise DasError(f"intervention.neurons: indices must be in 0..{width - 1} (the width of cell {cell.id})")
    if cells:  # unknown options and bad values fail now, not after the first cell's setup
        narrowest = min(sites[site_key(c)].width * len(c.position) for c in cells)
        build_intervention(cfg.intervention.name, narrowest, **{k: v for k, v in options.items() if k != "name"})


def check_resume(folder: Path, cfg: DictConfig) -> None:
    """A folder holds cells of one configuration only; refuse to mix in incomparable ones."""
    path = folder / "run.json"
    current = json.loads(json.dumps(C.fingerprint(cfg), default=str))
    if path.exists():
        previous = json.loads(path.read_text())["fingerprint"]
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            raise DasError(
                f"output folder {folder} holds cells from another configuration (changed: {', '.join(changed)}); "
                "choose a new folder with hydra.run.dir=..."
            )
    else:
        atomic_write_json(path, {"fingerprint": current})


@torch.no_grad()
def read_sources(lm: LoadedModel, sites: list[Site], pairs: PairSet, batch_size: int, side: str = "source") -> list[list[torch.Tensor]]:
    """Every site's tensor on every source (or base) prompt, [G, S, C] per group, in one forward per batch."""
    per_site: list[list[torch.Tensor]] = [[] for _ in sites]
    for group in pairs.groups:
        ids = (group.source_ids if side == "source" else group.base_ids).to(lm.device)
        parts = [read_sites(lm, sites, ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]
        for k in range(len(sites)):
            per_site[k].append(torch.cat([part[k] for part in parts]))
    return per_site


SOURCE_BUDGET_BYTES = 1 << 30  # source activations read together in one pass, at most


def source_chunks(sites: list[Site], pairs: list[PairSet], element_bytes: int) -> list[list[Site]]:
    """Consecutive sites whose source tensors together stay within SOURCE_BUDGET_BYTES."""
    tokens = sum(g.source_ids.numel() for p in pairs for g in p.groups)
    chunks: list[list[Site]] = []
    used = SOURCE_BUDGET_BYTES
    for site in sites:
        size = tokens * site.width * element_bytes
        if used + size > SOURCE_BUDGET_BYTES:
            chunks.append([])
            used = 0
        chunks[-1].append(site)
        used += size
    return chunks


def cell_row(cell: Cell, folder: Path) -> dict | None:
    """The finished row of a cell, if it is on disk and did not fail."""
    path = folder / "cells" / cell.id / "metrics.json"
    if not path.exists():
        return None
    row = json.loads(path.read_text())
    return None if row.get("error") else row


@dataclass
class Sweep:
    """What every cell of one run shares: the model, the pairs, the unedited base runs, the folder."""

    cfg: DictConfig
    lm: LoadedModel
    folder: Path
    pairs: dict[str, PairSet]  # "train", "test"
    base: dict[str, BaseRun]
    accuracy: float  # base accuracy on the test prompts
    upcoming: list[list[Site]] = field(default_factory=list)  # sites whose sources are still to be read, in chunks
    sources: dict[int, dict] = field(default_factory=dict)  # id(site) -> {"train"|"test": [G, S, C] per group}

    def read_ahead(self, sites: list[Site]) -> None:
        """Source activations of the sites still to run, several sites per forward (within a memory budget)."""
        self.upcoming = source_chunks(sites, list(self.pairs.values()), self.lm.model.dtype.itemsize)
        self.sources = {}

    def sources_of(self, site: Site) -> dict:
        if id(site) not in self.sources:
            chunk = next(c for c in self.upcoming if any(s is site for s in c))
            self.upcoming.remove(chunk)
            batch = int(self.cfg.eval.batch_size)
            read = {name: read_sources(self.lm, chunk, pairs, batch) for name, pairs in self.pairs.items()}
            for k, s in enumerate(chunk):
                self.sources[id(s)] = {name: per_site[k] for name, per_site in read.items()}
        return self.sources.pop(id(site))

    def run_site(self, site: Site, cells: list[Cell]) -> list[dict]:
        """All cells of one site; the sources' site tensors are read once for all of them."""
        done = {cell: cell_row(cell, self.folder) for cell in cells}
        if all(done.values()):
            return list(done.values())
        try:
            sources = self.sources_of(site)
        except CELL_FAILURES as e:  # e.g. out of memory reading the site: every pending cell of it fails
            return [done[cell] or self.save_failure(cell, e) for cell in cells]
        return [done[cell] or self.run_and_save(cell, site, sources) for cell in cells]

    def run_and_save(self, cell: Cell, site: Site, sources: dict) -> dict:
        try:
            row, tensors = self.run_cell(cell, site, sources)
        except CELL_FAILURES as e:
            return self.save_failure(cell, e)
        save_cell(self.folder, cell, row, tensors, bool(self.cfg.output.save_subspaces))
        return row

    def save_failure(self, cell: Cell, error: BaseException) -> dict:
        """Record the cell with its `error` (first line of the message) and let the sweep go on;
        an interruption (the job's time is up: das_cli/interrupts.py) is no cell failure and propagates."""
        if is_interruption(error):
            raise error
        text = (str(error).strip().splitlines() or [""])[0]
        text = f"{type(error).__name__}: {text}" if isinstance(error, torch.cuda.OutOfMemoryError) or not text else text
        log.error("cell %s failed: %s", cell.id, text)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # after an out-of-memory error the next cell starts from a clean cache
        row = _failed_row(cell, self.cfg, text)
        row.update(base_accuracy=self.accuracy, model=self.lm.name)
        save_cell(self.folder, cell, row, {}, False)
        return row

    def engine(self, split: str, cell: Cell, site: Site, sources: dict):
        base = self.base.get(split)
        prefixes = base.prefixes if base else None
        residuals = [per_layer[cell.layer] for per_layer in base.residuals] if base and base.residuals else None
        groups = prepare(self.pairs[split], cell.position, sources[split], self.lm.device, prefixes, residuals)
        return make_engine(self.cfg.train.engine, self.lm, site, groups)

    def run_cell(self, cell: Cell, site: Site, sources: dict) -> tuple[dict, dict]:
        """Train (or estimate) and evaluate one cell; returns its table row and its learned tensors."""
        cfg, start = self.cfg, time.perf_counter()
        seed = cell.seed(int(cfg.seed))
        torch.manual_seed(seed)
        train, test = self.engine("train", cell, site, sources), self.engine("test", cell, site, sources)
        width = train.groups[0].source_values.shape[1]
        options = {k: v for k, v in OmegaConf.to_container(cfg.intervention).items() if k != "name"}
        intervention = build_intervention(cfg.intervention.name, width, **options).to(self.lm.device)
        if intervention.needs_activations:
            intervention.fit_activations(self.site_activations(cell, site, sources, train))
        t = cfg.train
        result = fit(train, intervention, int(t.epochs), float(t.lr), int(t.batch_size), float(t.lr_end_factor), seed, bool(cfg.progress))
        if math.isnan(result.loss) and result.steps:
            raise FloatingPointError("training loss became NaN")
        batch = int(cfg.eval.batch_size)
        train_scores = evaluate_kinds(train, intervention, batch)
        scores = evaluate_kinds(test, intervention, batch, [g.base_labels for g in self.pairs["test"].groups])
        row = {
            "stream": cell.stream, "layer": cell.layer, "position": cell.position_label, "heads": cell.heads_label,
            "intervention": cfg.intervention.name, "dim": intervention.learned_dim(), "seed": cell.run_seed(int(cfg.seed)),
            **scores.scores(), "train_iia": train_scores.scores()["iia"], "loss": result.loss, "base_accuracy": self.accuracy,
            "n_train": len(self.pairs["train"]), "n_test": len(self.pairs["test"]),
            "seconds": 0.0, "test_loss": scores.loss, "width": width, "steps": result.steps,
            "cell": cell.id, "cell_seed": seed, "model": self.lm.name, "engine": cfg.train.engine,
            **scores.graded_scores(), "penalty": result.penalty,
        }
        test_base = base_vectors(self.lm, site, cell.position, self.pairs["test"], batch, cache=sources)
        test_source = torch.cat([g.source_values for g in test.groups])
        row.update(edit_scores(intervention, self.site_activations(cell, site, sources, train).values, test_base, test_source))
        tensors = intervention.state_for_saving()
        if cfg.analysis.illusion and cell.stream in ILLUSION_STREAMS:
            # the split patches orthogonal swaps of parts of one subspace; oblique_das reads and writes two
            swapped = None if cfg.intervention.name == "oblique_das" else tensors.get("basis")
            row.update(self.illusion_scores(cell, site, test, swapped))
        shares = _head_shares(self.lm, site, cell, tensors.get("basis"))
        if shares is not None:
            row["head_importance"] = json.dumps({str(h): round(v, 6) for h, v in shares.items()})
            if cfg.output.plots:
                bar_chart(shares, self.folder / "cells" / cell.id / "head_importance.png", f"{cell.id}: share of the subspace per head")
        row["seconds"] = time.perf_counter() - start
        return row, tensors

    def site_activations(self, cell: Cell, site: Site, sources: dict, train) -> SiteActivations:
        """The train prompts' unedited site vectors at the cell's positions: base prompts, then sources.

        The base prompts' site tensors are read once per site and kept with its sources for its other cells.
        """
        pairs = self.pairs["train"]
        if "train_base" not in sources:
            sources["train_base"] = read_sources(self.lm, [site], pairs, int(self.cfg.eval.batch_size), side="base")[0]
        base_acts = sources["train_base"]
        every_column = torch.arange(site.width)
        base = [gather(acts, resolve_positions(g, cell.position, "base").to(acts.device), every_column.to(acts.device))
                for g, acts in zip(pairs.groups, base_acts)]
        values = torch.cat([v.float().cpu() for v in base] + [g.source_values.float().cpu() for g in train.groups])
        names = [c for g in pairs.groups for c in g.base_classes] + [c for g in pairs.groups for c in g.source_classes]
        vocabulary = sorted({n for n in names if n is not None})
        classes = torch.tensor([-1 if n is None else vocabulary.index(n) for n in names])
        return SiteActivations(values=values, classes=classes, names=vocabulary)

    def illusion_scores(self, cell: Cell, site: Site, test, basis: torch.Tensor | None) -> dict:
        """IIA when patching only the rowspace part or only the nullspace part of the learned subspace
        (relative to the weight that reads the site); NaN for a part that is (numerically) empty."""
        if basis is None:
            return {"iia_row": math.nan, "iia_null": math.nan}
        weight = downstream_weight(self.lm, cell.stream, cell.layer)[:, site.columns.to(self.lm.device)]
        parts = illusion_parts(basis.to(self.lm.device), weight.float(), len(cell.position))
        batch = int(self.cfg.eval.batch_size)
        out = {}
        for name, part in zip(("row", "null"), parts):
            patch = fixed_subspace(part).to(self.lm.device) if part is not None else None
            out[f"iia_{name}"] = evaluate_kinds(test, patch, batch).scores()["iia"] if patch else math.nan
        return out


def _head_shares(lm: LoadedModel, site: Site, cell: Cell, basis) -> dict[int, float] | None:
    """Per-head shares of a learned basis, for head-level and attention_value_output cells."""
    if basis is None or basis.shape[1] == 0 or (site.heads is None and cell.stream != "attention_value_output"):
        return None
    n_heads, head_dim = head_counts(lm, cell.stream)
    return head_importance(basis, len(cell.position), site.heads or tuple(range(n_heads)), head_dim)


def save_cell(folder: Path, cell: Cell, row: dict, tensors: dict, save_subspace: bool) -> None:
    cell_dir = folder / "cells" / cell.id
    if save_subspace and tensors:
        atomic_write(cell_dir / "subspace.safetensors", lambda tmp: save_file(tensors, tmp))
    atomic_write_json(cell_dir / "metrics.json", row)


def _failed_row(cell: Cell, cfg: DictConfig, error: str) -> dict:
    return {
        "stream": cell.stream, "layer": cell.layer, "position": cell.position_label, "heads": cell.heads_label,
        "intervention": cfg.intervention.name, "seed": cell.run_seed(int(cfg.seed)), "iia": math.nan, "cell": cell.id,
        "error": error,
    }


def run(cfg: DictConfig, output_dir: str | Path) -> pd.DataFrame:
    """Run the sweep `cfg` describes into `output_dir`; returns the IIA table (one row per cell)."""
    cfg = C.typed(cfg)
    C.validate(cfg)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lm = load_model(cfg.model, str(C.pick_device(cfg.device)), cfg.dtype)
    train, test = build_pairs(cfg, lm)
    cells = expand_grid(cfg, lm)
    sites = resolve_sites(lm, cells)
    check_positions(cells, train, test)
    check_intervention(cfg, cells, sites)
    check_resume(folder, cfg)
    ranked = cfg.heads == "cumulative" and cfg.head_order == "ranked"  # phase 2 needs all single heads of a layer
    shard, num_shards = int(cfg.sweep.shard), int(cfg.sweep.num_shards)
    grid_size, cells = len(cells), shard_cells(cells, shard, num_shards, layer_key if ranked else site_key, not ranked)
    if num_shards > 1:
        log.info("shard %d of %d: %d of %d cells", shard, num_shards, len(cells), grid_size)
    write_grid(folder, shard, num_shards, cells)
    pending = [c for c in cells if cell_row(c, folder) is None]
    sweep = _start(cfg, lm, folder, train, test, layers=tuple(sorted({c.layer for c in pending})))
    log.info("model %s: %d layers; base accuracy on %d test prompts: %.3f", lm.name, lm.n_layers, len(test), sweep.accuracy)
    rows = run_cells(sweep, cells, sites)
    if cfg.heads == "cumulative" and cfg.head_order == "ranked":  # second phase: heads added best first
        mine = {layer_key(c) for c in cells}  # this shard's (stream, layer)s
        first_phase = set(cells)
        cumulative = [c for c in expand_grid(cfg, lm, head_rankings(rows)) if c not in first_phase and layer_key(c) in mine]
        write_grid(folder, shard, num_shards, cells + cumulative)
        sites = resolve_sites(lm, cumulative)
        rows += run_cells(sweep, cumulative, sites)
    title = f"{lm.name} · {cfg.intervention.name} · {cfg.dataset.name} {cfg.dataset.get('variable', '')}".strip()
    frame = write_results(rows, folder, title, plots=bool(cfg.output.plots))
    print(format_summary(frame))
    print(f"results: {folder.resolve()}")
    return frame


def resolve_sites(lm: LoadedModel, cells: list[Cell]) -> dict[tuple, Site]:
    return {key: resolve_site(lm, *key) for key in dict.fromkeys(site_key(c) for c in cells)}


def run_cells(sweep: Sweep, cells: list[Cell], sites: dict[tuple, Site]) -> list[dict]:
    pending = dict.fromkeys(site_key(c) for c in cells if cell_row(c, sweep.folder) is None)
    sweep.read_ahead([sites[key] for key in pending])
    rows = []
    with tqdm(total=len(cells), desc="cells", disable=not sweep.cfg.progress) as bar:
        for key, site_cells in groupby(cells, key=site_key):
            for row in sweep.run_site(sites[key], list(site_cells)):
                rows.append(row)
                bar.update()
                bar.set_postfix_str(f"{row['cell']} iia={row['iia']:.2f}")
    return rows


def _start(cfg: DictConfig, lm: LoadedModel, folder: Path, train: PairSet, test: PairSet, layers: tuple[int, ...]) -> Sweep:
    """One forward over the base prompts: base accuracy, plus the fast engine's caches for pending layers."""
    keep = bool(layers) and cfg.train.engine == "fast"
    batch = int(cfg.eval.batch_size)
    base = {"test": base_run(lm, test, batch, keep, layers)}
    if keep:
        base["train"] = base_run(lm, train, batch, keep, layers)
    return Sweep(cfg, lm, folder, {"train": train, "test": test}, base, base["test"].accuracy(test))
