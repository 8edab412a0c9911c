"""The sweep: a recipe from the validated config to the tables of every finished cell.

`run(cfg, output_dir)` reads top to bottom: config -> model -> data -> grid -> every model-dependent check
-> schedule -> run cells or bundles -> write -> aggregate. One cell's work is cell.py's (no I/O); running
and writing it is runner.py's (folder.py owns the layout, the store its locks). Rerunning into the same
folder skips finished cells of the same fingerprint, retrains damaged ones, and refuses cells of another
configuration. The tables are built from every finished cell on disk.
"""

from __future__ import annotations

import logging
import math
import time
from itertools import groupby
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from . import config as C
from . import folder as layout
from . import transfer
from .bundles import cells_per_step
from .cell import CELL_FAILURES, RunData
from .checks import check_cells, run_fingerprint
from .datasets import build_pairs
from .folder import CellStore
from .grid import Cell, expand_grid, head_rankings, layer_key, shard_cells, site_key, write_grid
from .interrupts import interrupted, stops_the_job, unwritable
from .models import load_model
from .report import aggregate_settled
from .runner import CellRunner
from .sites import Site, resolve_site

log = logging.getLogger(__name__)


def run(cfg: DictConfig, output_dir: str | Path, checked: bool = False) -> pd.DataFrame:
    """Run the sweep `cfg` describes into `output_dir`; returns the IIA table of every finished cell there.
    `checked`: `cfg` is already typed and validated (`config.checked`)."""
    narrowed = None
    if cfg.get("from_run"):  # the source run's intervention and cells; nothing is trained
        cfg, narrowed = transfer.configure(cfg)
        checked = False  # the source run's intervention came in after any check
    if not checked:
        cfg = C.checked(cfg)
    if cfg.mode == "plan":  # the notebook's way to mode=plan: the plan's table, nothing trained or written
        from .plan import make_plan

        plan = make_plan(cfg, Path(output_dir))
        print(plan.text())
        return plan.frame
    folder = layout.make_folder(output_dir)
    lm = load_model(cfg.model, str(C.pick_device(cfg.device)), cfg.dtype)
    pairs = build_pairs(cfg, lm)
    loaded = transfer.cells(cfg, lm, narrowed) if narrowed is not None else None
    cells = list(loaded) if loaded else expand_grid(cfg, lm)
    sites = resolve_sites(lm, cells)
    check_cells(cfg, cells, sites, pairs, loaded)
    fingerprint = run_fingerprint(cfg, lm, pairs)
    layout.check_resume(folder, fingerprint)
    store = CellStore(folder, fingerprint, int(cfg.seed), bool(cfg.output.save_subspaces))
    stores = [store]
    try:  # Ctrl-C or SIGTERM from here on: finished cells are kept, those in flight checkpointed
        ranked = cfg.heads == "cumulative" and cfg.head_order == "ranked" and not loaded  # phase 2 needs every single head
        mine = _shard(cfg, folder, cells, ranked)
        found = _prescan(cfg, lm, pairs["train"], folder, mine, sites) if wants_prescan(cfg) and not loaded else {}
        sweep = CellRunner.start(RunData(cfg, lm, pairs, {}, math.nan, loaded or {}, prescan=found), folder, store, mine, sites)
        log.info("model %s: %d layers; base accuracy on %d test prompts: %.3f", lm.name, lm.n_layers, len(pairs["test"]),
                 sweep.data.accuracy)
        if cfg.search.name == "halving":
            trained = _halve(sweep, mine, sites, found)
        else:
            run_cells(sweep, mine, sites)
            trained = mine
        if ranked:
            _second_phase(sweep, mine)
        if cfg.analysis.control != "none":
            _control(sweep, trained, stores)
        report = aggregate_settled(folder, bool(cfg.output.plots))
    except OSError as error:
        stopped = unwritable(error, folder)
        if stopped is None:
            raise
        raise stopped from None
    except BaseException as stop:
        if not stops_the_job(stop):
            raise
        for each in stores:
            each.keep_trained()  # trained, but stopped before they were written
        if isinstance(stop, KeyboardInterrupt):
            raise interrupted(stop, folder, [cell for each in stores for cell in each.in_flight]) from None
        raise
    print(report.text())
    return report.frame


def _shard(cfg: DictConfig, folder: Path, cells: list[Cell], ranked: bool) -> list[Cell]:
    """This job's shard of the grid (recorded in the folder); a ranked run shards whole layers."""
    shard, num_shards = int(cfg.sweep.shard), int(cfg.sweep.num_shards)
    mine = shard_cells(cells, shard, num_shards, layer_key if ranked else site_key, not ranked)
    if num_shards > 1:
        log.info("shard %d of %d: %d of %d cells", shard, num_shards, len(mine), len(cells))
    write_grid(folder, shard, num_shards, mine)
    return mine


def wants_prescan(cfg: DictConfig) -> bool:
    """search.prescan, or a method that starts from the prescan's directions (intervention.init=prescan)."""
    return bool(cfg.search.prescan) or cfg.intervention.get("init") == "prescan"


def _prescan(cfg: DictConfig, lm, train, folder: Path, cells: list[Cell], sites: dict[tuple, Site]) -> dict:
    """Every cell of this job scored to first order on the training pairs (prescan.py), before any training;
    written to the folder, where the tables join it to the cells."""
    from . import prescan

    started, k = time.perf_counter(), prescan.prescan_k(cfg)
    found = prescan.prescan_cells(lm, train, cells, sites, k, int(cfg.eval.batch_size))
    prescan.write(folder, int(cfg.sweep.shard), int(cfg.sweep.num_shards), found, k)
    top = sorted(found.items(), key=lambda item: -item[1].score)[:3]
    log.info("prescan: %d cells scored in %.1f s (k=%d); highest: %s", len(found), time.perf_counter() - started, k,
             ", ".join(f"{cell.id} {result.score:.3g}" for cell, result in top))
    return found


def resolve_sites(lm, cells: list[Cell]) -> dict[tuple, Site]:
    return {key: resolve_site(lm, *key) for key in dict.fromkeys(site_key(c) for c in cells)}


def run_cells(sweep: CellRunner, cells: list[Cell], sites: dict[tuple, Site]) -> list[dict]:
    """The rows of `cells`, run where not finished; cells another process holds are left out."""
    finished = {cell: sweep.store.finished(cell) for cell in cells}
    pending = dict.fromkeys(site_key(c) for c in cells if finished[c] is None)
    sweep.activations.plan([sites[key] for key in pending])
    size = cells_per_step(sweep.data.cfg, sweep.data.lm, [c for c in cells if site_key(c) in pending], sweep.data.pairs["train"])
    rows = []
    with tqdm(total=len(cells), desc="cells", disable=not sweep.data.cfg.progress) as bar:
        def record(row: dict | None) -> None:
            bar.update()
            if row is not None:
                rows.append(row)
                bar.set_postfix_str(f"{row['cell']} iia={row['iia']:.2f}")

        if size == 1:
            for key, site_cells in groupby(cells, key=site_key):
                for row in sweep.run_site(sites[key], list(site_cells)):
                    record(row)
            return rows
        for row in filter(None, finished.values()):
            record(row)
        unfinished = [c for c in cells if finished[c] is None]  # run_bundle checks each again under its lock
        for chunk in list(sweep.activations.upcoming):
            for row in run_bundles(sweep, chunk, unfinished, sites, size):
                record(row)
    return rows


def run_bundles(sweep: CellRunner, chunk: list[Site], cells: list[Cell], sites: dict[tuple, Site], size: int) -> list[dict]:
    """The cells of one chunk of sites (their sources read together), in bundles of `size` cells of one position
    (cells of one position feed the same tokens, so none feeds more than it would alone)."""
    keys = [key for key in dict.fromkeys(map(site_key, cells)) if any(sites[key] is site for site in chunk)]
    mine = [c for c in cells if site_key(c) in keys]
    try:
        sources = {key: sweep.activations.take(sites[key]) for key in keys}
    except CELL_FAILURES as e:  # e.g. out of memory reading the sites: every pending cell of them fails
        return [sweep.store.locked(cell, lambda c, error=e: sweep.save_failure(c, error)) for cell in mine]
    rows = []
    for position in dict.fromkeys(c.position_label for c in mine):
        alike = [c for c in mine if c.position_label == position]
        count = -(-len(alike) // size)  # bundles of near-equal size, none over `size`
        for k in range(count):
            rows += sweep.run_bundle(alike[k * len(alike) // count : (k + 1) * len(alike) // count], sites, sources)
    return rows


def _halve(sweep: CellRunner, cells: list[Cell], sites: dict[tuple, Site], prescan: dict) -> list[Cell]:
    """search=halving (halving.py): the cells trained rung by rung, the top 1/eta kept at each; the others written
    with what they had. Returns the cells trained to the full schedule."""
    from . import halving

    cfg, folder = sweep.data.cfg, sweep.folder
    shard, num_shards, eta = int(cfg.sweep.shard), int(cfg.sweep.num_shards), int(cfg.search.eta)
    table = halving.read_table(layout.halving_file(folder, shard, num_shards))
    live, untrained = halving.start(cfg, cells, prescan)
    for cell in untrained:
        sweep.store.locked(cell, lambda c: _write_untrained(sweep, c))
    ends = halving.rung_epochs(int(cfg.train.epochs), eta, int(cfg.search.min_epochs))
    log.info("successive halving: %d of %d cells start; rungs end at epochs %s", len(live), len(cells), ", ".join(map(str, ends)))
    for index, epochs in enumerate(ends[:-1], start=1):
        rung = halving.Rung(index, epochs)
        kept = halving.decided(table, rung, live)
        if kept is None:
            sweep.rung = rung
            scores = [row for row in run_cells(sweep, live, sites) if row.get("paused")]
            kept = halving.rank(scores, live, eta)
            halving.write_decision(folder, shard, num_shards, rung, scores, kept)
        log.info("rung %d (epoch %d): %d of %d cells go on", index, epochs, len(kept), len(live))
        sweep.rung = halving.Rung(index, epochs, finish=True)
        run_cells(sweep, [c for c in live if c not in kept], sites)
        live = kept
    sweep.rung = None
    run_cells(sweep, live, sites)
    return live


def _write_untrained(sweep: CellRunner, cell: Cell) -> dict:
    """A cell the prescan left out of successive halving: its row, with no score and `epochs` 0."""
    from .cell import failed_row

    row = {k: v for k, v in failed_row(sweep.data, cell, "").items() if k != "error"}
    row.update(stopped=0, epochs=0)
    sweep.store.save(cell, row, {})
    return row


def _control(sweep: CellRunner, cells: list[Cell], stores: list[CellStore]) -> None:
    """Train and score `cells` again under analysis.control, into the run folder's control/ (controls.py)."""
    from .controls import control_data

    cfg = sweep.data.cfg
    folder = layout.make_folder(layout.control_folder(sweep.folder))
    lm, pairs = control_data(cfg.analysis.control, int(cfg.analysis.control_seed), sweep.data.lm, sweep.data.pairs)
    fingerprint = run_fingerprint(cfg, lm, pairs)
    layout.check_resume(folder, fingerprint)
    store = CellStore(folder, fingerprint, int(cfg.seed), bool(cfg.output.save_subspaces))
    stores.append(store)
    write_grid(folder, int(cfg.sweep.shard), int(cfg.sweep.num_shards), cells)
    sites = resolve_sites(lm, cells)
    control = CellRunner.start(RunData(cfg, lm, pairs, {}, math.nan, {}), folder, store, cells, sites)
    log.info("control %s: %d cells; base accuracy on %d test prompts: %.3f", cfg.analysis.control, len(cells),
             len(pairs["test"]), control.data.accuracy)
    run_cells(control, cells, sites)


def _second_phase(sweep: CellRunner, cells: list[Cell]) -> None:
    """heads=cumulative head_order=ranked: the cumulative cells, heads added best first by the single-head
    rows on disk (this process's and others'), for the layers whose single heads are all on disk."""
    cfg, folder, store = sweep.data.cfg, sweep.folder, sweep.store
    held = {layer_key(c) for c in cells if layout.read_cell(folder, c.id) is None}  # another process has some
    mine = {layer_key(c) for c in cells} - held
    singles = [row for row in map(store.finished, cells) if row]
    first_phase = set(cells)
    cumulative = [c for c in expand_grid(cfg, sweep.data.lm, head_rankings(singles)) if c not in first_phase and layer_key(c) in mine]
    write_grid(folder, int(cfg.sweep.shard), int(cfg.sweep.num_shards), cells + cumulative)
    sites = resolve_sites(sweep.data.lm, cumulative)
    pending = [c for c in cumulative if store.finished(c) is None]
    if not {c.layer for c in pending} <= set(sweep.layers):  # resumed after phase 1: cache the layers phase 2 still needs
        sweep = CellRunner.start(sweep.data, folder, store, cumulative, sites)
    run_cells(sweep, cumulative, sites)
