"""Running the cells of one run: cell.py's work under the store's locks, alone or in bundles, each result
written atomically the moment it ends (its failure too: one failed cell never stops the others)."""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cell as one
from . import folder as layout
from .activations import ActivationStore
from .artefacts import describe
from .bundles import BundleEngine, bundleable
from .cell import CELL_FAILURES, CellResult, ReadyCell, RunData
from .folder import CellStore
from .grid import Cell
from .interrupts import is_interruption
from .grid import site_key
from .sites import Site
from .train import Member, fit_cells
from .trackers import Tracking

log = logging.getLogger(__name__)


@dataclass
class CellRunner:
    """Running cells and bundles of one run: the store's locks around cell.py's work, each result written."""

    data: RunData
    folder: Path
    store: CellStore
    activations: ActivationStore  # the base runs; the sites' tensors on the prompts, read a chunk of sites at a time
    layers: tuple[int, ...] = ()  # the layers the base runs cached for the fast engine
    rung: object | None = None  # halving.Rung: train to its epochs and pause (or write the cells stopped there)

    @property
    def until(self) -> int | None:
        """The epoch training pauses at (successive halving's rung); None: the whole schedule."""
        return None if self.rung is None else self.rung.epochs

    @classmethod
    def start(cls, data: RunData, folder: Path, store: CellStore, cells: list[Cell], sites: dict[tuple, Site]) -> "CellRunner":
        """The activation store for the pending cells' sites and its base runs: base accuracy, plus the fast
        engine's caches for the pending layers (whose forwards also record the first chunk of sites)."""
        pending = [c for c in cells if store.finished(c) is None]
        layers = tuple(sorted({c.layer for c in pending}))
        activations = ActivationStore(data.lm, data.pairs, int(data.cfg.eval.batch_size))
        activations.plan([sites[key] for key in dict.fromkeys(map(site_key, pending))])
        data.base = activations.base_runs(layers, bool(layers) and data.cfg.train.engine == "fast")
        data.accuracy = data.base["test"].accuracy(data.pairs["test"])
        if data.tracking is None:  # logger=...: each tracker's library imported (or its failure a warning) once per run
            data.tracking = Tracking.start(data.cfg, folder)
        return cls(data, folder, store, activations, layers)

    def run_site(self, site: Site, cells: list[Cell]) -> list[dict]:
        """All cells of one site, one at a time; the sources' site tensors are read once for all of them."""
        done = {cell: self.store.finished(cell) for cell in cells}
        if all(done.values()):
            return list(done.values())
        try:
            sources = self.activations.take(site)
        except CELL_FAILURES as e:  # e.g. out of memory reading the site: every pending cell of it fails
            return [done[cell] or self.store.locked(cell, lambda c, error=e: self.save_failure(c, error)) for cell in cells]
        return [done[cell] or self.store.locked(cell, lambda c: self.run_alone(c, site, sources)) for cell in cells]

    def run_alone(self, cell: Cell, site: Site, sources) -> dict:
        try:
            ready = one.set_up(self.data, cell, site, sources)
        except CELL_FAILURES as e:
            return self.save_failure(cell, e)
        return self.save_trained(ready, one.fit_alone(self.data, ready, self.store.checkpoint(cell), self.until))

    def run_bundle(self, cells: list[Cell], sites: dict, sources: dict) -> list[dict]:
        """Several cells trained together (bundles.py), each evaluated and written as soon as the bundle ends.
        Cells another process holds are left out; a cell that cannot join (a checkpoint to resume, nothing
        to train, the reference engine) trains alone."""
        rows: list[dict] = []
        with ExitStack() as locks:
            ready: list[ReadyCell] = []
            for cell in cells:
                mine, done = self.store.claim(cell, locks)
                if not mine:
                    rows += [done] if done else []
                elif self.rung is None and layout.checkpoint_file(self.folder, cell.id).exists():  # resumes alone, from its own step
                    # (a rung's cells all resume from that rung's step, so they train on together)
                    rows.append(self.run_alone(cell, sites[site_key(cell)], sources[site_key(cell)]))
                else:
                    try:
                        ready.append(one.set_up(self.data, cell, sites[site_key(cell)], sources[site_key(cell)]))
                    except CELL_FAILURES as e:
                        rows.append(self.save_failure(cell, e))
            joins = [r for r in ready if r.intervention.trainable and int(self.data.cfg.train.epochs) > 0 and bundleable(r.train)]
            for r in ready:
                if r not in joins:
                    rows.append(self.save_trained(r, one.fit_alone(self.data, r, self.store.checkpoint(r.cell), self.until)))
            return rows + (self.train_bundle(joins) if joins else [])

    def train_bundle(self, joins: list[ReadyCell]) -> list[dict]:
        """One joint fit of the cells, then their joint evaluation; each cell alone if the joint step fails."""
        t = self.data.cfg.train
        started = time.perf_counter()
        for r in joins:
            r.shared_seconds, r.start = started - r.start, started
        try:
            bundle = BundleEngine(self.data.lm, [r.train for r in joins])
            members = [Member(r.intervention, r.seed, self.store.checkpoint(r.cell), one.track(self.data, r.cell)) for r in joins]
            results = fit_cells(bundle, members, int(t.epochs), float(t.lr), int(t.batch_size), float(t.lr_end_factor),
                                bool(self.data.cfg.progress), one.validation(self.data, joins), self.until)
        except CELL_FAILURES as e:  # the joint step itself failed (e.g. out of memory): each cell alone
            if is_interruption(e):
                raise
            log.warning("a bundle of %d cells failed (%s); training them one by one", len(joins), e)
            return [self.save_trained(r, one.fit_alone(self.data, r, self.store.checkpoint(r.cell), self.until)) for r in joins]
        for r in joins:
            r.shared_seconds += (time.perf_counter() - started) / len(joins)
        if self.pausing:
            return self.paused(joins, results)
        evaluations = self.bundle_evaluations(joins, results)
        rows = []
        for r, result, evaluation in zip(joins, results, evaluations):
            r.start = time.perf_counter()
            rows.append(self.save_trained(r, result, evaluation))
        return rows

    def bundle_evaluations(self, ready: list[ReadyCell], fits: list) -> list[dict | None]:
        """The evaluations of a bundle's cells that trained to a finite loss, made together; None for the
        others, and for all when the joint evaluation fails (then each cell is evaluated alone)."""
        good = [k for k, f in enumerate(fits) if not isinstance(f, BaseException) and not (math.isnan(f.loss) and f.steps)]
        out: list[dict | None] = [None] * len(ready)
        if len(good) < 2:
            return out
        started = time.perf_counter()
        try:
            for k, evaluation in zip(good, one.evaluations(self.data, [ready[k] for k in good])):
                out[k] = evaluation
        except CELL_FAILURES as e:
            if is_interruption(e):
                raise
            log.warning("the joint evaluation of %d cells failed (%s); evaluating them one by one", len(good), e)
            return [None] * len(ready)
        for k in good:
            ready[k].shared_seconds += (time.perf_counter() - started) / len(good)
        return out

    @property
    def pausing(self) -> bool:
        return self.rung is not None and not self.rung.finish

    def paused(self, ready: list[ReadyCell], fits: list) -> list[dict]:
        """Cells paused at a rung (checkpointed by the training): their ranking scores (cell.rung_scores), written
        nowhere; a cell whose training failed is written as failed."""
        rows, good = [], []
        for r, fitted in zip(ready, fits):
            if isinstance(fitted, BaseException) or not getattr(fitted, "paused", False):
                rows.append(self.save_trained(r, fitted))
            else:
                good.append(r)
        try:
            return rows + [{**score, "paused": True} for score in one.rung_scores(self.data, good)] if good else rows
        except CELL_FAILURES as e:
            if is_interruption(e):
                raise
            return rows + [self.save_failure(r.cell, e) for r in good]

    def save_trained(self, ready: ReadyCell, fitted, evaluation: dict | None = None) -> dict:
        """Evaluate a trained cell (unless `evaluation` is given) and write it (or its failure); its row. At a
        rung of successive halving: a paused cell's ranking scores instead, or (finishing the rung) its row
        with the rung it stopped at and the epochs it had."""
        if self.pausing and not isinstance(fitted, BaseException) and getattr(fitted, "paused", False):
            return self.paused([ready], [fitted])[0]
        try:
            if isinstance(fitted, BaseException):
                raise fitted
            result = one.finish(self.data, ready, fitted, evaluation)
        except CELL_FAILURES as e:
            return self.save_failure(ready.cell, e)
        if self.rung is not None and fitted.paused:
            result.row.update(stopped=self.rung.index, epochs=self.rung.epochs)
        return self.write(result)

    def write(self, result: CellResult) -> dict:
        """Write a finished cell atomically, then draw its figures; its row."""
        cell, row = result.cell, result.row
        self.store.save(cell, row, result.tensors, describe(self.data.cfg, self.data.lm, cell, int(row["width"])), result.curve)
        log.info("cell %s trained: iia %.3f", cell.id, row["iia"])
        self.data.tracking.finished(cell, row)
        for name, draw in result.figures:
            try:
                draw(self.folder)
            except Exception as e:  # noqa: BLE001 - matplotlib and the interventions' plots raise many kinds
                log.warning("cell %s: %s skipped (%s); the cell is kept", cell.id, name, e)
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
        row = one.failed_row(self.data, cell, text)
        self.store.save(cell, row, {})
        self.data.tracking.failed(cell, text)
        return row
