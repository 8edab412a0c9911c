"""The sweep: expand the grid, run every cell not already on disk, write the tables.

`run(cfg, output_dir)` reads top to bottom: load model -> build data -> expand grid ->
for each cell fit and evaluate -> write results. A finished cell is written atomically the
moment it ends (folder.py owns the layout); rerunning into the same folder skips finished cells
of the same fingerprint, retrains damaged ones, and refuses cells of another configuration. The
tables are built from every finished cell on disk (report.aggregate), not from this job's rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import config as C
from .data import PairSet, resolve_positions, tokenize_pairs
from .errors import DasError, choices_error
from .examples import KINDS
from .filters import filter_pairs
from .interrupts import is_interruption, stops_the_job
from . import folder as layout
from .folder import CellStore, Checkpoint
from .interventions import Intervention, SiteActivations, build_intervention
from .ioi import make_ioi
from .models import LoadedModel, load_model
from .artefacts import describe
from . import transfer
from .analysis import ILLUSION_STREAMS, downstream_weight, fixed_subspace, head_importance, illusion_parts
from .scores import base_vectors, edit_scores
from .activations import ActivationStore, BaseRun, SiteTensors
from .results import bar_chart
from .sites import Site, gather, head_counts, resolve_site, site_key
from .engines import make_engine, prepare
from .bundles import bundleable, cells_per_step, evaluate_bundle
from .grid import Cell, expand_grid, head_rankings, layer_key, shard_cells, write_grid
from .train import Evaluation, evaluate_kinds, fit

log = logging.getLogger(__name__)

# A cell failing with one of these is recorded with its `error` and the sweep goes on
# (torch.cuda.OutOfMemoryError is a RuntimeError; named for the reader).
CELL_FAILURES = (torch.cuda.OutOfMemoryError, RuntimeError, FloatingPointError, ValueError)


def build_pairs(cfg: DictConfig, lm: LoadedModel) -> dict[str, PairSet]:
    """The pairs of each split ("train", "test", and "val" where the dataset holds one); training keeps
    the kinds `dataset.train_kinds` names (default: cause only), validation and test keep every kind."""
    ds = cfg.dataset
    if ds.name == "file":
        from .filedata import load_file_dataset

        splits = load_file_dataset(ds, lm.tokenizer)
    else:
        splits = make_ioi(lm.tokenizer, ds.variable, int(ds.n_train), int(ds.n_test), int(ds.seed), int(ds.get("n_val", 0)))
    kinds = list(ds.get("train_kinds") or ["cause"])
    for kind in kinds:
        if kind not in KINDS:
            raise choices_error("dataset.train_kinds", kind, KINDS)
    examples = dict(splits.items())
    examples["train"] = [e for e in splits.train if e.kind in kinds]
    for name in ("train", "test"):
        if not examples.get(name):
            raise DasError(f"dataset: the {name} split has no pairs (dataset.train_kinds={kinds})")
    kept = filter_pairs(lm, examples, str(ds.filter), int(cfg.eval.batch_size))
    pairs = {name: tokenize_pairs(lm.tokenizer, part, name) for name, part in kept.items()}
    if ds.filter != "none":
        for name, part in pairs.items():
            part.before_filter = len(examples[name])
    return pairs


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
    if cfg.intervention.name == "fixed":  # the file's width must be every cell's
        check_fixed_width(cfg.intervention.path, cells, sites)
    if cells:  # unknown options and bad values fail now, not after the first cell's setup
        narrowest = min(sites[site_key(c)].width * len(c.position) for c in cells)
        build_intervention(cfg.intervention.name, narrowest, **{k: v for k, v in options.items() if k != "name"})


def check_fixed_width(path: str, cells: list[Cell], sites: dict) -> None:
    from .artefacts import load_directions

    n = load_directions(path).shape[0]
    for cell in cells:
        width = sites[site_key(cell)].width * len(cell.position)
        if width != n:
            raise DasError(f"intervention.path={path}: a subspace of width {n} does not fit cell {cell.id} (width {width})")


def run_fingerprint(cfg: DictConfig, lm: LoadedModel, pairs: dict[str, PairSet]) -> dict:
    """What decides every cell's numbers but its seed: config parts, the pairs' content, device type, eval batch."""
    file = None
    if cfg.dataset.name == "file":
        from .filedata import resolve_path

        file = resolve_path(str(cfg.dataset.path))
    data = layout.data_hash(pairs, file)
    parts = C.fingerprint(cfg)
    if cfg.get("from_run"):
        parts.update(transfer.provenance(cfg))
    if cfg.intervention.name == "fixed":  # the subspace, not only its file name, decides the numbers
        from .artefacts import load_directions

        basis = load_directions(cfg.intervention.path)
        parts["intervention_subspace"] = hashlib.sha256(f"{tuple(basis.shape)}".encode() + basis.numpy().tobytes()).hexdigest()
    return layout.run_fingerprint(parts, data, lm.device.type, int(cfg.eval.batch_size))


@dataclass
class ReadyCell:
    """A cell between set-up and evaluation: what `Sweep.finish` needs after training."""

    cell: Cell
    site: Site
    sources: SiteTensors
    train: object  # its engines (engines.py)
    test: object
    intervention: object
    learned: dict  # what an estimated intervention reports (fit_model)
    seed: int
    width: int
    start: float  # perf_counter at set-up
    shared_seconds: float = 0.0  # its share of a bundle's training time (trained alone: 0, counted from start)


@dataclass
class CellResult:
    """A trained and evaluated cell: its table row, its learned tensors, and its figures, drawn once the cell
    is written (a figure that cannot be drawn costs a warning, never the cell)."""

    cell: Cell
    row: dict
    tensors: dict
    figures: list[tuple[str, Callable[[], None]]] = field(default_factory=list)  # (name, draw)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during the cells: finished cells are kept, the cell in flight is checkpointed;
    the message says how to resume; `status` is the exit status (130, or 143 for SIGTERM)."""

    def __init__(self, message: str, status: int = 130) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Sweep:
    """What every cell of one run shares: the model, the pairs, the unedited base runs, the folder."""

    cfg: DictConfig
    lm: LoadedModel
    folder: Path
    store: CellStore
    pairs: dict[str, PairSet]  # "train", "test", "val" (when the dataset has a validation split)
    activations: ActivationStore  # the base runs; the sites' tensors on the prompts, read a chunk of sites at a time
    base: dict[str, BaseRun]
    accuracy: float  # base accuracy on the test prompts
    layers: tuple[int, ...] = ()  # the layers the base runs cached for the fast engine
    loaded: dict = field(default_factory=dict)  # from_run: cell -> the source cell, its intervention frozen

    def run_site(self, site: Site, cells: list[Cell]) -> list[dict]:
        """All cells of one site; the sources' site tensors are read once for all of them."""
        done = {cell: self.store.finished(cell) for cell in cells}
        if all(done.values()):
            return list(done.values())
        try:
            sources = self.activations.take(site)
        except CELL_FAILURES as e:  # e.g. out of memory reading the site: every pending cell of it fails
            return [done[cell] or self.locked(cell, lambda c: self.save_failure(c, e)) for cell in cells]
        return [done[cell] or self.locked(cell, lambda c: self.run_and_save(c, site, sources)) for cell in cells]

    def claim(self, cell: Cell, locks: ExitStack) -> tuple[bool, dict | None]:
        """Take the cell's lock for as long as `locks` is open. (True, None): this process runs the cell;
        (False, its row): it is finished (another process may have finished it since we looked);
        (False, None): another live process holds it (that one trains it)."""
        lock = self.store.lock(cell)
        if not locks.enter_context(lock.held()):
            log.warning("cell %s is being trained by %s; skipped here", cell.id, lock.holder())
            return False, None
        done = self.store.finished(cell)
        return done is None, done

    def locked(self, cell: Cell, work) -> dict | None:
        """`work(cell)` under the cell's lock; its finished row when it is done, None when another process holds it."""
        with ExitStack() as locks:
            mine, done = self.claim(cell, locks)
            return work(cell) if mine else done

    def run_and_save(self, cell: Cell, site: Site, sources: SiteTensors) -> dict:
        try:
            result = self.run_cell(cell, site, sources)
        except CELL_FAILURES as e:
            return self.save_failure(cell, e)
        return self.write(result)

    def save_trained(self, ready: ReadyCell, fitted, evaluation: dict[str, Evaluation] | None = None) -> dict:
        """Evaluate a trained cell (unless `evaluation` is given) and write it (or its failure); its row."""
        try:
            if isinstance(fitted, BaseException):
                raise fitted
            result = self.finish(ready, fitted, evaluation)
        except CELL_FAILURES as e:
            return self.save_failure(ready.cell, e)
        return self.write(result)

    def write(self, result: CellResult) -> dict:
        """Write a finished cell atomically, then draw its figures; its row."""
        cell, row = result.cell, result.row
        self.store.save(cell, row, result.tensors, describe(self.cfg, self.lm, cell, int(row["width"])))
        log.info("cell %s trained: iia %.3f", cell.id, row["iia"])
        for name, draw in result.figures:
            try:
                draw()
            except Exception as e:  # noqa: BLE001 - matplotlib and the interventions' plots raise many kinds
                log.warning("cell %s: %s skipped (%s); the cell is kept", cell.id, name, e)
        return row

    def run_bundle(self, cells: list[Cell], sites: dict, sources: dict[tuple, SiteTensors]) -> list[dict]:
        """Several cells trained together (bundles.py), each evaluated and written as soon as the bundle ends.
        Cells another process holds are left out; a cell that cannot join (a checkpoint to resume, nothing
        to train, the reference engine) trains alone."""
        from .bundles import BundleEngine, Member, fit_bundle

        rows: list[dict] = []
        with ExitStack() as locks:
            ready: list[ReadyCell] = []
            for cell in cells:
                mine, done = self.claim(cell, locks)
                if not mine:
                    rows += [done] if done else []
                    continue
                site = sites[site_key(cell)]
                if layout.checkpoint_file(self.folder, cell.id).exists():  # resumes alone, from its own step
                    rows.append(self.run_and_save(cell, site, sources[site_key(cell)]))
                    continue
                try:
                    ready.append(self.set_up(cell, site, sources[site_key(cell)]))
                except CELL_FAILURES as e:
                    rows.append(self.save_failure(cell, e))
            t = self.cfg.train
            joins = [r for r in ready if r.intervention.trainable and int(t.epochs) > 0 and bundleable(r.train)]
            for r in ready:
                if r not in joins:
                    rows.append(self.save_trained(r, self.fit_alone(r)))
            if not joins:
                return rows
            started = time.perf_counter()
            for r in joins:
                r.shared_seconds, r.start = started - r.start, started
            try:
                bundle = BundleEngine(self.lm, [r.train for r in joins])
                members = [Member(r.intervention, r.seed, self.store.checkpoint(r.cell)) for r in joins]
                results = fit_bundle(bundle, members, int(t.epochs), float(t.lr), int(t.batch_size), float(t.lr_end_factor),
                                     bool(self.cfg.progress))
            except CELL_FAILURES as e:  # the joint step itself failed (e.g. out of memory): each cell alone
                if is_interruption(e):
                    raise
                log.warning("a bundle of %d cells failed (%s); training them one by one", len(joins), e)
                return rows + [self.save_trained(r, self.fit_alone(r)) for r in joins]
            trained = time.perf_counter()
            for r in joins:
                r.shared_seconds += (trained - started) / len(joins)
            evaluations = self.bundle_evaluations(joins, results)
            for r, result, evaluation in zip(joins, results, evaluations):
                r.start = time.perf_counter()
                rows.append(self.save_trained(r, result, evaluation))
        return rows

    def bundle_evaluations(self, ready: list[ReadyCell], fits: list) -> list[dict[str, Evaluation] | None]:
        """The evaluations of a bundle's cells that trained to a finite loss, made together; None for the
        others, and for all when the joint evaluation fails (then each cell is evaluated alone)."""
        good = [k for k, f in enumerate(fits) if not isinstance(f, BaseException) and not (math.isnan(f.loss) and f.steps)]
        out: list[dict[str, Evaluation] | None] = [None] * len(ready)
        if len(good) < 2:
            return out
        started = time.perf_counter()
        try:
            for k, evaluation in zip(good, self.evaluations([ready[k] for k in good])):
                out[k] = evaluation
        except CELL_FAILURES as e:
            if is_interruption(e):
                raise
            log.warning("the joint evaluation of %d cells failed (%s); evaluating them one by one", len(good), e)
            return [None] * len(ready)
        share = (time.perf_counter() - started) / len(good)
        for k in good:
            ready[k].shared_seconds += share
        return out

    def fit_alone(self, ready: ReadyCell):
        """`train.fit` of one cell; a failure is returned, not raised."""
        t = self.cfg.train
        try:
            return fit(ready.train, ready.intervention, int(t.epochs), float(t.lr), int(t.batch_size), float(t.lr_end_factor),
                       ready.seed, bool(self.cfg.progress), self.store.checkpoint(ready.cell))
        except CELL_FAILURES as e:
            return e

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
        self.store.save(cell, row, {})
        return row

    def engine(self, split: str, cell: Cell, site: Site, sources: SiteTensors):
        base = self.base.get(split)
        prefixes = base.prefixes if base else None
        residuals = [per_layer[cell.layer] for per_layer in base.residuals] if base and base.residuals else None
        groups = prepare(self.pairs[split], cell.position, sources.source[split], self.lm.device, prefixes, residuals)
        return make_engine(self.cfg.train.engine, self.lm, site, groups)

    def run_cell(self, cell: Cell, site: Site, sources: SiteTensors) -> CellResult:
        """Train (or estimate) and evaluate one cell."""
        ready = self.set_up(cell, site, sources)
        result = self.fit_alone(ready)
        if isinstance(result, BaseException):
            raise result
        return self.finish(ready, result)

    def set_up(self, cell: Cell, site: Site, sources: SiteTensors) -> "ReadyCell":
        """A cell ready to train: its engines, its intervention built (and estimated, for those that are)."""
        cfg, start = self.cfg, time.perf_counter()
        seed = cell.seed(int(cfg.seed))
        torch.manual_seed(seed)
        train, test = self.engine("train", cell, site, sources), self.engine("test", cell, site, sources)
        width = train.groups[0].source_values.shape[1]
        options = {k: v for k, v in OmegaConf.to_container(cfg.intervention).items() if k != "name"}
        intervention = self.new_intervention(cell, width, options).to(self.lm.device)
        if intervention.needs_activations:
            intervention.fit_activations(self.site_activations(cell, site, sources, train))
        learned = intervention.fit_model(self.lm, site, self.pairs["train"], cell.position, seed) if intervention.needs_model else {}
        return ReadyCell(cell, site, sources, train, test, intervention, learned, seed, width, start)

    def evaluations(self, ready: list[ReadyCell]) -> list[dict[str, Evaluation]]:
        """Each trained cell's evaluation on every split (train, test, and val where the dataset has it) and,
        with analysis.illusion, its illusion parts' on the test split ("illusion_row", "illusion_null"); the
        cells of a bundle together (bundles.evaluate_bundle), each batch one forward for several cells."""
        batch = int(self.cfg.eval.batch_size)
        splits = [name for name in ("train", "test", "val") if name in self.pairs]
        engines = {name: [self.evaluation_engine(r, name) for r in ready] for name in splits}
        interventions = [r.intervention for r in ready]
        out: list[dict[str, Evaluation]] = [{} for _ in ready]
        for name in splits:
            for cell_scores, evaluation in zip(out, _evaluate(engines[name], interventions, batch, **self.evaluation_arguments(name))):
                cell_scores[name] = evaluation
        patches = [(k, name, patch) for k, r in enumerate(ready) for name, patch in self.illusion_patches(r).items()]
        scores = _evaluate([ready[k].test for k, _, _ in patches], [patch for _, _, patch in patches], batch)
        for (k, name, _), evaluation in zip(patches, scores):
            out[k][f"illusion_{name}"] = evaluation
        return out

    def illusion_patches(self, ready: ReadyCell) -> dict[str, Intervention]:
        """analysis.illusion: the fixed patches of the learned subspace's rowspace and nullspace parts (relative
        to the weight that reads the site), by name ("row", "null"); a part that is (numerically) empty has none.
        No patches for oblique_das either: the split patches orthogonal swaps of parts of one subspace, and it reads
        along one and writes along another."""
        cell = ready.cell
        if not (self.cfg.analysis.illusion and cell.stream in ILLUSION_STREAMS) or self.cfg.intervention.name == "oblique_das":
            return {}
        basis = ready.intervention.state_for_saving().get("basis")
        if basis is None:
            return {}
        weight = downstream_weight(self.lm, cell.stream, cell.layer)[:, ready.site.columns.to(self.lm.device)]
        parts = illusion_parts(basis.to(self.lm.device), weight.float(), len(cell.position))
        return {name: fixed_subspace(part).to(self.lm.device) for name, part in zip(("row", "null"), parts) if part is not None}

    def evaluation_engine(self, ready: ReadyCell, split: str):
        return {"train": ready.train, "test": ready.test}.get(split) or self.engine(split, ready.cell, ready.site, ready.sources)

    def evaluation_arguments(self, split: str) -> dict:
        """The test split's evaluation also compares with the base prompts' own answers."""
        if split != "test":
            return {}
        return {"base_labels": [g.base_labels for g in self.pairs["test"].groups], "base_correct": self.base["test"].correct(self.pairs["test"])}

    def finish(self, ready: "ReadyCell", result, evaluation: dict[str, Evaluation] | None = None) -> CellResult:
        """Evaluate a trained cell (unless its `evaluation` was made with its bundle's): its row, its learned
        tensors and its figures (not drawn yet)."""
        cfg, cell, site, sources, intervention = self.cfg, ready.cell, ready.site, ready.sources, ready.intervention
        test = ready.test
        if math.isnan(result.loss) and result.steps:
            raise FloatingPointError("training loss became NaN")
        evaluation = evaluation or self.evaluations([ready])[0]
        train_scores, scores = evaluation["train"], evaluation["test"]
        validation = {"iia_val": evaluation["val"].scores()["iia"], "n_val": len(self.pairs["val"])} if "val" in evaluation else {}
        row = {
            "stream": cell.stream, "layer": cell.layer, "position": cell.position_label, "heads": cell.heads_label,
            "intervention": cfg.intervention.name, "dim": intervention.learned_dim(), "seed": cell.run_seed(int(cfg.seed)),
            **scores.scores(), "train_iia": train_scores.scores()["iia"], "loss": result.loss, "base_accuracy": self.accuracy,
            "n_train": len(self.pairs["train"]), "n_test": len(self.pairs["test"]), **validation,
            "seconds": 0.0, "test_loss": scores.loss, "width": ready.width, "steps": result.steps,
            "cell": cell.id, "cell_seed": ready.seed, "model": self.lm.name, "model_layers": self.lm.n_layers, "engine": cfg.train.engine,
            **scores.graded_scores(), "penalty": result.penalty, **ready.learned,
            **{f"n_{name}_before_filter": pairs.before_filter for name, pairs in self.pairs.items() if pairs.before_filter is not None},
        }
        figures = [("intervention plot", partial(_plot_intervention, intervention, layout.cell_dir(self.folder, cell.id)))]
        test_base = base_vectors(site, cell.position, self.pairs["test"], sources.base["test"])
        test_source = torch.cat([g.source_values for g in test.groups])
        row.update(edit_scores(intervention, self.site_activations(cell, site, sources, ready.train).values, test_base, test_source))
        tensors = intervention.state_for_saving()
        if cfg.analysis.illusion and cell.stream in ILLUSION_STREAMS:  # NaN for a part with no patch
            row.update({f"iia_{name}": evaluation[f"illusion_{name}"].scores()["iia"] if f"illusion_{name}" in evaluation else math.nan
                        for name in ("row", "null")})
        shares = _head_shares(self.lm, site, cell, tensors.get("basis"))
        if shares is not None:
            row["head_importance"] = json.dumps({str(h): round(v, 6) for h, v in shares.items()})
            title = f"{cell.id}: share of the subspace per head"
            figures.append(("head shares", partial(bar_chart, shares, layout.head_plot_file(self.folder, cell.id), title)))
        if cell in self.loaded:
            row["trained_in"] = str(self.cfg.from_run)
        row["seconds"] = time.perf_counter() - ready.start + ready.shared_seconds
        return CellResult(cell, row, tensors, figures if cfg.output.plots else [])

    def new_intervention(self, cell: Cell, width: int, options: dict):
        """The cell's intervention: built afresh, or (from_run) the source cell's, frozen."""
        if cell in self.loaded:
            return self.loaded[cell].intervention
        return build_intervention(self.cfg.intervention.name, width, **options)

    def site_activations(self, cell: Cell, site: Site, sources: SiteTensors, train) -> SiteActivations:
        """The train prompts' unedited site vectors at the cell's positions: base prompts, then sources."""
        pairs = self.pairs["train"]
        base_acts = sources.base["train"]
        every_column = torch.arange(site.width)
        base = [gather(acts, resolve_positions(g, cell.position, "base").to(acts.device), every_column.to(acts.device))
                for g, acts in zip(pairs.groups, base_acts)]
        values = torch.cat([v.float().cpu() for v in base] + [g.source_values.float().cpu() for g in train.groups])
        names = [c for g in pairs.groups for c in g.base_classes] + [c for g in pairs.groups for c in g.source_classes]
        vocabulary = sorted({n for n in names if n is not None})
        classes = torch.tensor([-1 if n is None else vocabulary.index(n) for n in names])
        return SiteActivations(values=values, classes=classes, names=vocabulary)


def _evaluate(engines: list, interventions: list, batch: int, **arguments) -> list[Evaluation]:
    """`evaluate_kinds` of each (engine, intervention), as one bundled evaluation where there are several and
    every engine can join one."""
    if len(engines) > 1 and all(bundleable(e) for e in engines):
        return evaluate_bundle(engines, interventions, batch, **arguments)
    return [evaluate_kinds(e, v, batch, **arguments) for e, v in zip(engines, interventions)]


def _head_shares(lm: LoadedModel, site: Site, cell: Cell, basis) -> dict[int, float] | None:
    """Per-head shares of a learned basis, for head-level and attention_value_output cells."""
    if basis is None or basis.shape[1] == 0 or (site.heads is None and cell.stream != "attention_value_output"):
        return None
    n_heads, head_dim = head_counts(lm, cell.stream)
    return head_importance(basis, len(cell.position), site.heads or tuple(range(n_heads)), head_dim)


def _plot_intervention(intervention, directory: Path) -> None:
    """The intervention's own figures, into the cell's folder."""
    directory.mkdir(parents=True, exist_ok=True)
    intervention.plot(directory)


def _failed_row(cell: Cell, cfg: DictConfig, error: str) -> dict:
    return {
        "stream": cell.stream, "layer": cell.layer, "position": cell.position_label, "heads": cell.heads_label,
        "intervention": cfg.intervention.name, "seed": cell.run_seed(int(cfg.seed)), "iia": math.nan, "cell": cell.id,
        "error": error,
    }


def run(cfg: DictConfig, output_dir: str | Path) -> pd.DataFrame:
    """Run the sweep `cfg` describes into `output_dir`; returns the IIA table of every finished cell there."""
    narrowed = None
    if cfg.get("from_run"):  # the source run's intervention and cells; nothing is trained
        cfg, narrowed = transfer.configure(cfg)
    cfg = C.typed(cfg)
    C.validate(cfg)
    folder = layout.make_folder(output_dir)
    lm = load_model(cfg.model, str(C.pick_device(cfg.device)), cfg.dtype)
    pairs = build_pairs(cfg, lm)
    loaded = transfer.cells(cfg, lm, narrowed) if narrowed is not None else None
    cells = list(loaded) if loaded else expand_grid(cfg, lm)
    sites = resolve_sites(lm, cells)
    if loaded:
        transfer.check_widths(loaded, sites)
    check_positions(cells, *pairs.values())
    check_intervention(cfg, cells, sites)
    fingerprint = run_fingerprint(cfg, lm, pairs)
    layout.check_resume(folder, fingerprint)
    store = CellStore(folder, fingerprint, int(cfg.seed), bool(cfg.output.save_subspaces))
    try:  # Ctrl-C or SIGTERM from here on: finished cells are kept, those in flight checkpointed
        return _run_cells(cfg, lm, folder, store, pairs, cells, sites, loaded)
    except BaseException as stop:
        if not stops_the_job(stop):
            raise
        store.keep_trained()  # trained, but stopped before they were written
        if isinstance(stop, KeyboardInterrupt):
            raise _interrupted(stop, folder, store.in_flight) from None
        raise


def _run_cells(cfg: DictConfig, lm: LoadedModel, folder: Path, store: CellStore, pairs: dict[str, PairSet],
               cells: list[Cell], sites: dict, loaded: dict | None) -> pd.DataFrame:
    """This job's shard of `cells`, then the tables of every finished cell in the folder."""
    ranked = cfg.heads == "cumulative" and cfg.head_order == "ranked" and not loaded  # phase 2 needs all single heads of a layer
    shard, num_shards = int(cfg.sweep.shard), int(cfg.sweep.num_shards)
    grid_size, cells = len(cells), shard_cells(cells, shard, num_shards, layer_key if ranked else site_key, not ranked)
    if num_shards > 1:
        log.info("shard %d of %d: %d of %d cells", shard, num_shards, len(cells), grid_size)
    write_grid(folder, shard, num_shards, cells)
    pending = [c for c in cells if store.finished(c) is None]
    sweep = _start(cfg, lm, folder, store, pairs, _layers(pending), _sites_of(pending, sites))
    sweep.loaded = loaded or {}
    log.info("model %s: %d layers; base accuracy on %d test prompts: %.3f", lm.name, lm.n_layers, len(pairs["test"]), sweep.accuracy)
    run_cells(sweep, cells, sites)
    if ranked:
        _second_phase(sweep, cells, shard, num_shards)
    from .report import aggregate

    seen = _cells_on_disk(folder)
    report = aggregate(folder, plots=bool(cfg.output.plots), nested=False)
    for _ in range(3):  # another process on the folder may have written a cell meanwhile: its tables must hold it
        now = _cells_on_disk(folder)
        if now == seen:
            break
        seen, report = now, aggregate(folder, plots=bool(cfg.output.plots), nested=False)
    print(report.text())
    return report.frame


def _cells_on_disk(folder: Path) -> set[tuple[str, int]]:
    """Every cell's metrics.json in the folder, with its modification time."""
    out = set()
    for path in Path(folder).glob(f"cells/*/{layout.METRICS}"):
        try:
            out.add((path.parent.name, path.stat().st_mtime_ns))
        except FileNotFoundError:
            pass
    return out


def _interrupted(stop: KeyboardInterrupt, folder: Path, in_flight: list[Checkpoint]) -> Interrupted:
    """The one line Ctrl-C or SIGTERM ends with: what is kept, which cells are checkpointed, how to resume."""
    saved = [c for c in in_flight if c.saved]
    steps = {c.saved for c in saved}
    if len(saved) == 1:
        checkpointed = f"cell {saved[0].cell_id} checkpointed at step {saved[0].saved[0]}/{saved[0].saved[1]}; "
    elif len(steps) == 1:  # a bundle stops all its cells at one step
        (step, total), = steps
        checkpointed = f"cells {', '.join(c.cell_id for c in saved)} checkpointed at step {step}/{total}; "
    else:
        checkpointed = "cells " + ", ".join(f"{c.cell_id} at step {c.saved[0]}/{c.saved[1]}" for c in saved) + " checkpointed; "
    return Interrupted(f"{str(stop) or 'interrupted'}; {layout.count_finished(folder)} finished cells are kept in {folder}; "
                       f"{checkpointed if saved else ''}to resume, run the same command with hydra.run.dir={folder}",
                       getattr(stop, "status", 130))


def _second_phase(sweep: Sweep, cells: list[Cell], shard: int, num_shards: int) -> None:
    """heads=cumulative head_order=ranked: the cumulative cells, heads added best first by the single-head
    rows on disk (this process's and others'), for the layers whose single heads are all on disk."""
    cfg, lm, folder, store = sweep.cfg, sweep.lm, sweep.folder, sweep.store
    held = {layer_key(c) for c in cells if layout.read_cell(folder, c.id) is None}  # another process has some
    mine = {layer_key(c) for c in cells} - held
    singles = [row for row in map(store.finished, cells) if row]
    first_phase = set(cells)
    cumulative = [c for c in expand_grid(cfg, lm, head_rankings(singles)) if c not in first_phase and layer_key(c) in mine]
    write_grid(folder, shard, num_shards, cells + cumulative)
    layers = _layers([c for c in cumulative if store.finished(c) is None])
    sites = resolve_sites(lm, cumulative)
    if not set(layers) <= set(sweep.layers):  # resumed after phase 1: cache the layers phase 2 still needs
        sweep = _start(cfg, lm, folder, store, sweep.pairs, layers, _sites_of([c for c in cumulative if store.finished(c) is None], sites))
    run_cells(sweep, cumulative, sites)


def _layers(cells: list[Cell]) -> tuple[int, ...]:
    return tuple(sorted({c.layer for c in cells}))


def _sites_of(cells: list[Cell], sites: dict[tuple, Site]) -> list[Site]:
    """The sites of `cells`, in the order the cells run."""
    return [sites[key] for key in dict.fromkeys(map(site_key, cells))]


def resolve_sites(lm: LoadedModel, cells: list[Cell]) -> dict[tuple, Site]:
    return {key: resolve_site(lm, *key) for key in dict.fromkeys(site_key(c) for c in cells)}


def run_cells(sweep: Sweep, cells: list[Cell], sites: dict[tuple, Site]) -> list[dict]:
    """The rows of `cells`, run where not finished; cells another process holds are left out."""
    finished = {cell: sweep.store.finished(cell) for cell in cells}
    pending = dict.fromkeys(site_key(c) for c in cells if finished[c] is None)
    sweep.activations.plan([sites[key] for key in pending])
    size = cells_per_step(sweep.cfg, sweep.lm, [c for c in cells if site_key(c) in pending], sweep.pairs["train"])
    rows = []
    with tqdm(total=len(cells), desc="cells", disable=not sweep.cfg.progress) as bar:
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


def run_bundles(sweep: Sweep, chunk: list[Site], cells: list[Cell], sites: dict[tuple, Site], size: int) -> list[dict]:
    """The cells of one chunk of sites (their sources read together), in bundles of `size` cells of one position
    (cells of one position feed the same tokens, so none feeds more than it would alone)."""
    keys = [key for key in dict.fromkeys(map(site_key, cells)) if any(sites[key] is site for site in chunk)]
    mine = [c for c in cells if site_key(c) in keys]
    try:
        sources = {key: sweep.activations.take(sites[key]) for key in keys}
    except CELL_FAILURES as e:  # e.g. out of memory reading the sites: every pending cell of them fails
        return [sweep.locked(cell, lambda c: sweep.save_failure(c, e)) for cell in mine]
    rows = []
    for position in dict.fromkeys(c.position_label for c in mine):
        alike = [c for c in mine if c.position_label == position]
        count = -(-len(alike) // size)  # bundles of near-equal size, none over `size`
        for k in range(count):
            rows += sweep.run_bundle(alike[k * len(alike) // count : (k + 1) * len(alike) // count], sites, sources)
    return rows


def _start(cfg: DictConfig, lm: LoadedModel, folder: Path, store: CellStore, pairs: dict[str, PairSet],
           layers: tuple[int, ...], sites: list[Site]) -> Sweep:
    """The activation store for the pending `sites` and its base runs: base accuracy, plus the fast engine's
    caches for the pending layers (whose forwards also record the first chunk of sites on the base prompts)."""
    keep = bool(layers) and cfg.train.engine == "fast"
    activations = ActivationStore(lm, pairs, int(cfg.eval.batch_size))
    activations.plan(sites)
    base = activations.base_runs(layers, keep)
    return Sweep(cfg, lm, folder, store, pairs, activations, base, base["test"].accuracy(pairs["test"]), layers)
