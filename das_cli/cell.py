"""One cell's work, without I/O: set up its engines and intervention, fit it, evaluate it, build its row.

`set_up` -> `fit_alone` (or a bundle's joint fit, sweep.py) -> `evaluations` -> `finish`, which returns a
`CellResult`: the table row, the tensors to save and the figures to draw; writing them is the sweep's job.
The columns beside the IIA scores come from `ANALYSES`, a list of functions of the finished cell.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig

from . import config as C
from . import folder as layout
from .activations import BaseRun, SiteTensors
from .analysis import downstream_weight, fixed_subspace, head_importance, illusion_parts
from .bundles import bundleable, evaluate_bundle
from .data import PairSet, resolve_positions
from .engines import make_engine, prepare
from .errors import non_finite
from .grid import Cell, site_key
from .interventions import Intervention, SiteActivations, build_intervention, method
from .models import LoadedModel
from .results import bar_chart, curve_plot
from .scores import base_vectors, edit_scores
from .sites import Site, gather, head_counts
from .metrics import Evaluation, evaluate_kinds
from .names import ILLUSION_STREAMS
from .train import Curve, fit

# A cell failing with one of these is recorded with its `error` and the sweep goes on
# (torch.cuda.OutOfMemoryError is a RuntimeError; named for the reader).
CELL_FAILURES = (torch.cuda.OutOfMemoryError, RuntimeError, FloatingPointError, ValueError)

Figure = tuple[str, Callable[[Path], None]]  # (name, draw into the run folder)
# Scores every finished cell has as numbers (others are NaN by design where they do not apply: loss with nothing
# trained, logit_diff without the base's answer, max_z without a direction that varies).
FINITE_SCORES = ("iia", "test_loss", "p_label", "gain")


@dataclass
class RunData:
    """What every cell of one run reads: the config, the model, the pairs and the unedited base runs."""

    cfg: DictConfig
    lm: LoadedModel
    pairs: dict[str, PairSet]  # "train", "test", "val" (when the dataset has a validation split)
    base: dict[str, BaseRun]
    accuracy: float  # base accuracy on the test prompts
    loaded: dict = field(default_factory=dict)  # from_run: cell -> the source cell, its intervention frozen
    tracking: object | None = None  # trackers.Tracking (logger=...), started by runner.CellRunner.start
    prescan: dict = field(default_factory=dict)  # cell -> prescan.CellPrescan, scored before training (search.prescan)


@dataclass
class ReadyCell:
    """A cell between set-up and evaluation."""

    cell: Cell
    site: Site
    sources: SiteTensors
    train: object  # its engines (engines.py)
    test: object
    intervention: Intervention
    learned: dict  # what an intervention estimated from the model reports (fit_model)
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
    figures: list[Figure] = field(default_factory=list)
    curve: Curve | None = None  # train.Fit.curve


def engine(run: RunData, split: str, cell: Cell, site: Site, sources: SiteTensors):
    """The cell's engine over the pairs of `split`, with the base run's caches where there are some."""
    base = run.base.get(split)
    prefixes = base.prefixes if base else None
    residuals = [per_layer[cell.layer] for per_layer in base.residuals] if base and base.residuals else None
    groups = prepare(run.pairs[split], cell.position, sources.source[split], run.lm.device, prefixes, residuals)
    return make_engine(run.cfg.train.engine, run.lm, site, groups)


def set_up(run: RunData, cell: Cell, site: Site, sources: SiteTensors) -> ReadyCell:
    """A cell ready to train: its engines, its intervention built (and estimated, for those that are)."""
    cfg, start = run.cfg, time.perf_counter()
    seed = cell.seed(int(cfg.seed))
    torch.manual_seed(seed)
    train, test = engine(run, "train", cell, site, sources), engine(run, "test", cell, site, sources)
    width = train.groups[0].source_values.shape[1]
    intervention = new_intervention(run, cell, width).to(run.lm.device)
    if getattr(intervention, "init", "random") == "prescan" and cell not in run.loaded:
        intervention.set_basis(prescan_of(run, cell, site).directions)
    if intervention.needs_activations:
        intervention.fit_activations(site_activations(run, cell, site, sources, train))
    learned = intervention.fit_model(run.lm, site, run.pairs["train"], cell.position, seed) if intervention.needs_model else {}
    return ReadyCell(cell, site, sources, train, test, intervention, learned, seed, width, start)


def prescan_of(run: RunData, cell: Cell, site: Site):
    """The cell's first-order prescan: from the run's pass over the grid, or scored now for a cell it did not
    cover (a control's, the second phase of ranked heads)."""
    if cell not in run.prescan:
        from . import prescan

        run.prescan.update(prescan.prescan_cells(run.lm, run.pairs["train"], [cell], {site_key(cell): site},
                                                 prescan.prescan_k(run.cfg), int(run.cfg.eval.batch_size)))
    return run.prescan[cell]


def new_intervention(run: RunData, cell: Cell, width: int) -> Intervention:
    """The cell's intervention: built afresh, or (from_run) the source cell's, frozen."""
    if cell in run.loaded:
        return run.loaded[cell].intervention
    return build_intervention(run.cfg.intervention.name, width, **C.intervention_options(run.cfg))


def fit_alone(run: RunData, ready: ReadyCell, checkpoint, until: int | None = None):
    """`train.fit` of one cell (`checkpoint`: the store's, for a stop mid-cell; `until`: the epoch to pause at, a
    rung of successive halving); a failure is returned, not raised."""
    t = run.cfg.train
    try:
        return fit(ready.train, ready.intervention, int(t.epochs), float(t.lr), int(t.batch_size), float(t.lr_end_factor),
                   ready.seed, bool(run.cfg.progress), checkpoint, validation(run, [ready]), track(run, ready.cell), until)
    except CELL_FAILURES as e:
        return e


def track(run: RunData, cell: Cell):
    """The cell's tracker runs (trackers.CellTrack), fed its curve as it trains; None without trackers."""
    return run.tracking.cell(cell) if run.tracking is not None else None


def validation(run: RunData, ready: list[ReadyCell]):
    """eval.every_epoch: the function training calls at each epoch's end with the live cells (indices into
    `ready`), returning each one's validation IIA and loss; None without the option or a validation split."""
    if not (run.cfg.eval.every_epoch and "val" in run.pairs):
        return None
    engines = [evaluation_engine(run, r, "val") for r in ready]
    batch = int(run.cfg.eval.batch_size)

    def validate(live: list[int]) -> list[tuple[float, float]]:
        scores = evaluate([engines[i] for i in live], [ready[i].intervention for i in live], batch)
        return [(s.scores()["iia"], s.loss) for s in scores]

    return validate


def site_activations(run: RunData, cell: Cell, site: Site, sources: SiteTensors, train) -> SiteActivations:
    """The train prompts' unedited site vectors at the cell's positions: base prompts, then sources."""
    pairs = run.pairs["train"]
    every_column = torch.arange(site.width)
    base = [gather(acts, resolve_positions(g, cell.position, "base").to(acts.device), every_column.to(acts.device))
            for g, acts in zip(pairs.groups, sources.base["train"])]
    values = torch.cat([v.float().cpu() for v in base] + [g.source_values.float().cpu() for g in train.groups])
    names = [c for g in pairs.groups for c in g.base_classes] + [c for g in pairs.groups for c in g.source_classes]
    vocabulary = sorted({n for n in names if n is not None})
    classes = torch.tensor([-1 if n is None else vocabulary.index(n) for n in names])
    return SiteActivations(values=values, classes=classes, names=vocabulary)


# ---- evaluation ----

def evaluations(run: RunData, ready: list[ReadyCell]) -> list[dict[str, Evaluation]]:
    """Each trained cell's evaluation on every split (train, test, and val where the dataset has it) and,
    with analysis.illusion, its illusion parts' on the test split ("illusion_row", "illusion_null"); the
    cells of a bundle together (bundles.evaluate_bundle), each batch one forward for several cells."""
    batch = int(run.cfg.eval.batch_size)
    splits = [name for name in ("train", "test", "val") if name in run.pairs]
    interventions = [r.intervention for r in ready]
    out: list[dict[str, Evaluation]] = [{} for _ in ready]
    for name in splits:
        engines = [evaluation_engine(run, r, name) for r in ready]
        for cell_scores, evaluation in zip(out, evaluate(engines, interventions, batch, **evaluation_arguments(run, name))):
            cell_scores[name] = evaluation
    patches = [(k, name, patch) for k, r in enumerate(ready) for name, patch in illusion_patches(run, r).items()]
    scores = evaluate([ready[k].test for k, _, _ in patches], [patch for _, _, patch in patches], batch)
    for (k, name, _), evaluation in zip(patches, scores):
        out[k][f"illusion_{name}"] = evaluation
    return out


def evaluate(engines: list, interventions: list, batch: int, **arguments) -> list[Evaluation]:
    """`evaluate_kinds` of each (engine, intervention), as one bundled evaluation where there are several and
    every engine can join one."""
    if len(engines) > 1 and all(bundleable(e) for e in engines):
        return evaluate_bundle(engines, interventions, batch, **arguments)
    return [evaluate_kinds(e, v, batch, **arguments) for e, v in zip(engines, interventions)]


def rung_scores(run: RunData, ready: list[ReadyCell]) -> list[dict]:
    """Successive halving's ranking scores of paused cells: IIA and loss on the validation pairs (the training
    pairs when the dataset has no validation split), evaluated together."""
    split = "val" if "val" in run.pairs else "train"
    engines = [evaluation_engine(run, r, split) for r in ready]
    scores = evaluate(engines, [r.intervention for r in ready], int(run.cfg.eval.batch_size))
    return [{"cell": r.cell.id, "split": split, "iia": s.scores()["iia"], "loss": s.loss} for r, s in zip(ready, scores)]


def evaluation_engine(run: RunData, ready: ReadyCell, split: str):
    return {"train": ready.train, "test": ready.test}.get(split) or engine(run, split, ready.cell, ready.site, ready.sources)


def evaluation_arguments(run: RunData, split: str) -> dict:
    """The test split's evaluation also compares with the base prompts' own answers."""
    if split != "test":
        return {}
    return {"base_labels": [g.base_labels for g in run.pairs["test"].groups], "base_correct": run.base["test"].correct(run.pairs["test"])}


def illusion_patches(run: RunData, ready: ReadyCell) -> dict[str, Intervention]:
    """analysis.illusion: the fixed patches of the learned subspace's rowspace and nullspace parts (relative
    to the weight that reads the site), by name ("row", "null"); a part that is (numerically) empty has none.
    Only for methods that swap an orthonormal basis (`illusion_split`): the split patches orthogonal swaps of
    parts of that subspace."""
    cell, lm = ready.cell, run.lm
    if not (run.cfg.analysis.illusion and cell.stream in ILLUSION_STREAMS and ready.intervention.illusion_split):
        return {}
    basis = ready.intervention.saved()["basis"]
    weight = downstream_weight(lm, cell.stream, cell.layer)[:, ready.site.columns.to(lm.device)]
    parts = illusion_parts(basis.to(lm.device), weight.float(), len(cell.position))
    return {name: fixed_subspace(part).to(lm.device) for name, part in zip(("row", "null"), parts) if part is not None}


# ---- the row ----

def finish(run: RunData, ready: ReadyCell, result, evaluation: dict[str, Evaluation] | None = None) -> CellResult:
    """Evaluate a trained cell (unless its `evaluation` was made with its bundle's): its row, its learned
    tensors and its figures (not drawn yet)."""
    cfg, cell, intervention = run.cfg, ready.cell, ready.intervention
    if math.isnan(result.loss) and result.steps:
        raise FloatingPointError("training loss became NaN")
    tensors = intervention.saved()
    bad = non_finite(tensors)
    if bad:
        raise FloatingPointError(f"the {'learned' if intervention.trainable else 'estimated'} tensor '{bad[0]}' holds NaN or Inf values")
    evaluation = evaluation or evaluations(run, [ready])[0]
    train_scores, scores = evaluation["train"], evaluation["test"]
    validation = {"iia_val": evaluation["val"].scores()["iia"], "n_val": len(run.pairs["val"])} if "val" in evaluation else {}
    row = {
        "stream": cell.stream, "layer": cell.layer, "position": cell.position_label, "heads": cell.heads_label,
        "intervention": cfg.intervention.name, "dim": intervention.learned_dim(), "seed": cell.run_seed(int(cfg.seed)),
        **scores.scores(), "train_iia": train_scores.scores()["iia"], "loss": result.loss, "base_accuracy": run.accuracy,
        "n_train": len(run.pairs["train"]), "n_test": len(run.pairs["test"]), **validation,
        "seconds": 0.0, "test_loss": scores.loss, "width": ready.width, "steps": result.steps,
        "cell": cell.id, "cell_seed": ready.seed, "model": run.lm.name, "model_layers": run.lm.n_layers, "engine": cfg.train.engine,
        **scores.graded_scores(), "penalty": result.penalty, **ready.learned,
        **{f"n_{name}_before_filter": pairs.before_filter for name, pairs in run.pairs.items() if pairs.before_filter is not None},
    }
    figures: list[Figure] = [("intervention plot", partial(_plot_intervention, intervention, cell.id))]
    if result.curve.steps:
        figures.append(("training curve", partial(_plot_curve, result.curve, cell.id)))
    for analysis in ANALYSES:
        columns, drawn = analysis(run, ready, evaluation, tensors)
        row.update(columns)
        figures += drawn
    for key in FINITE_SCORES:
        if not math.isfinite(row[key]):
            raise FloatingPointError(f"{key} is {row[key]}: the cell's scores are not numbers")
    row["seconds"] = time.perf_counter() - ready.start + ready.shared_seconds
    return CellResult(cell, row, tensors, figures if cfg.output.plots else [], result.curve)


def failed_row(run: RunData, cell: Cell, error: str) -> dict:
    return {
        "stream": cell.stream, "layer": cell.layer, "position": cell.position_label, "heads": cell.heads_label,
        "intervention": run.cfg.intervention.name, "seed": cell.run_seed(int(run.cfg.seed)), "iia": math.nan, "cell": cell.id,
        "error": error, "base_accuracy": run.accuracy, "model": run.lm.name,
    }


# ---- the analyses beside IIA: (run, ready cell, its evaluation, its tensors) -> (columns, figures) ----

def edit_score_columns(run: RunData, ready: ReadyCell, evaluation: dict, tensors: dict) -> tuple[dict, list[Figure]]:
    """`gain`, `offmanifold` and `max_z` of the applied edit on the test cause pairs (scores.py)."""
    test_base = base_vectors(ready.site, ready.cell.position, run.pairs["test"], ready.sources.base["test"])
    test_source = torch.cat([g.source_values for g in ready.test.groups])
    causes = torch.tensor([kind == "cause" for g in ready.test.groups for kind in (g.kinds or ["cause"] * len(g))])
    natural = site_activations(run, ready.cell, ready.site, ready.sources, ready.train).values
    return edit_scores(ready.intervention, natural, test_base[causes], test_source[causes.to(test_source.device)]), []


def illusion_columns(run: RunData, ready: ReadyCell, evaluation: dict, tensors: dict) -> tuple[dict, list[Figure]]:
    """`iia_row`, `iia_null`: the IIA of the rowspace and nullspace parts (NaN for a part with no patch)."""
    if not (run.cfg.analysis.illusion and ready.cell.stream in ILLUSION_STREAMS):
        return {}, []
    return {f"iia_{name}": evaluation[f"illusion_{name}"].scores()["iia"] if f"illusion_{name}" in evaluation else math.nan
            for name in ("row", "null")}, []


def head_share_columns(run: RunData, ready: ReadyCell, evaluation: dict, tensors: dict) -> tuple[dict, list[Figure]]:
    """`head_importance`: the share of the subspace per head, for head-level and attention_value_output cells."""
    cell, site, basis = ready.cell, ready.site, tensors.get("basis")
    if basis is None or basis.shape[1] == 0 or (site.heads is None and cell.stream != "attention_value_output"):
        return {}, []
    n_heads, head_dim = head_counts(run.lm, cell.stream)
    shares = head_importance(basis, len(cell.position), site.heads or tuple(range(n_heads)), head_dim)
    title = f"{cell.id}: share of the subspace per head"
    draw = partial(_bar_chart, shares, cell.id, title)
    return {"head_importance": json.dumps({str(h): round(v, 6) for h, v in shares.items()})}, [("head shares", draw)]


def provenance_columns(run: RunData, ready: ReadyCell, evaluation: dict, tensors: dict) -> tuple[dict, list[Figure]]:
    """`trained_in`: the run a from_run cell's intervention was trained in; a given subspace's file and sha256
    (`subspace_file`, `subspace_sha256`: intervention=fixed)."""
    if ready.cell in run.loaded:
        return {"trained_in": str(run.cfg.from_run)}, []
    return method(run.cfg.intervention.name).provenance(C.intervention_options(run.cfg)), []


ANALYSES = [edit_score_columns, illusion_columns, head_share_columns, provenance_columns]


def _plot_intervention(intervention: Intervention, cell_id: str, folder: Path) -> None:
    """The intervention's own figures, into the cell's folder."""
    directory = layout.cell_dir(folder, cell_id)
    directory.mkdir(parents=True, exist_ok=True)
    intervention.plot(directory)


def _plot_curve(curve: Curve, cell_id: str, folder: Path) -> None:
    curve_plot(curve.steps, layout.curve_plot_file(folder, cell_id), cell_id, curve.validation)


def _bar_chart(shares: dict, cell_id: str, title: str, folder: Path) -> None:
    bar_chart(shares, layout.head_plot_file(folder, cell_id), title)
