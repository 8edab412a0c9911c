"""Results of a sweep: the long table (iia.csv), layer x position pivots, heatmaps, terminal summary.

A row is one finished cell. `results_frame` normalises rows into a frame whose `position`
column is an ordered categorical in first-appearance order, so the grid order a user asked
for ("io, s2, last") survives sorting, pivoting and plotting. A failed cell carries NaN IIA:
pivots keep it, heatmaps draw it grey with "—", the summary skips it.
"""

from __future__ import annotations

import hashlib
import json
import math

import os
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from . import folder as layout
from .files import atomic_write

COLUMNS: list[str] = [
    "stream", "layer", "position", "heads", "intervention", "dim", "seed",
    "iia", "iia_lo", "iia_hi", "iia_val", "p_label", "logit_diff", "gain", "offmanifold", "max_z",
    "train_iia", "loss", "penalty", "base_accuracy", "n_train", "n_val", "n_test", "seconds",
]
TEXT_COLUMNS = ["stream", "position", "heads", "intervention"]
OPTIONAL_INT_COLUMNS = ["stopped", "epochs", "prescan_k"]  # integers where a run has them (search=halving, prescan)
INT_COLUMNS = ["layer", "dim", "seed", "n_train", "n_val", "n_test"]
FLOAT_COLUMNS = ["iia", "iia_lo", "iia_hi", "iia_val", "p_label", "logit_diff", "gain", "offmanifold", "max_z",
                 "train_iia", "loss", "penalty", "base_accuracy", "seconds"]


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """One row per cell: COLUMNS first, extra keys after; sorted by stream, heads, layer, position.

    Positions sort in first-appearance order of `rows` (an ordered categorical), not alphabetically.
    Missing `heads` means a non-head cell and becomes ""; other missing values become NA.
    """
    extras = list(dict.fromkeys(key for row in rows for key in row if key not in COLUMNS))
    frame = pd.DataFrame(list(rows)).reindex(columns=COLUMNS + extras)
    frame["heads"] = frame["heads"].map(lambda v: "" if _missing(v) else v)
    for column in TEXT_COLUMNS:
        frame[column] = frame[column].map(lambda v: v if _missing(v) else str(v)).astype(object)
    for column in INT_COLUMNS:
        frame[column] = _integers(frame[column])
    for column in [c for c in OPTIONAL_INT_COLUMNS if c in frame]:
        frame[column] = _integers(frame[column])
    for column in FLOAT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column]).astype(float)
    order = list(dict.fromkeys(frame["position"].dropna()))
    frame["position"] = pd.Categorical(frame["position"], categories=order, ordered=True)
    frame = frame.sort_values(["stream", "heads", "layer", "position"], kind="stable")
    return frame.reset_index(drop=True)


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read an iia.csv back into the frame `results_frame` makes (labels stay strings: "-2", "")."""
    frame = pd.read_csv(path, dtype={column: str for column in TEXT_COLUMNS})
    return results_frame(frame.to_dict("records"))


# Scores some runs add (isolation, illusion check, controls, prescan); each present one gets its own pivot and heatmap.
EXTRA_SCORES = ("iia_isolate", "iia_mean", "iia_row", "iia_null", "iia_control", "selectivity", "prescan")
UNBOUNDED_SCORES = ("prescan",)  # not a share in [0, 1] (nats): heatmaps span the values present
CELL_KEY = ["stream", "heads", "layer", "position"]
MAX_SUFFIX = 120  # longer swept-value file name suffixes are replaced by a hash of their label


def pivot(frame: pd.DataFrame, value: str = "iia", agg: str = "mean") -> dict[tuple[str, str], pd.DataFrame]:
    """One layer x position table of `value` per (stream, heads); duplicate rows (seeds) are
    reduced with `agg` ("mean", or "std" for the spread over seeds).

    Index: layers ascending. Columns: the positions of that group, in the frame's position order.
    A cell whose rows are all NaN (failed) stays NaN.
    """
    order = _position_order(frame)
    tables = {}
    for (stream, heads), group in frame.groupby(["stream", "heads"], sort=True):
        positions = group["position"].astype(object)
        means = group[value].astype(float).groupby([group["layer"], positions]).agg(agg)
        table = means.unstack("position").sort_index()
        present = [p for p in order if p in table.columns]
        table = table.reindex(columns=present)
        table.index.name, table.columns.name = "layer", "position"
        tables[(str(stream), str(heads))] = table
    return tables


def seed_spread(frame: pd.DataFrame) -> pd.DataFrame | None:
    """Per cell over its seeds: n_seeds, mean, std (ddof 1), min and max of IIA; None with one seed per cell."""
    done = frame.dropna(subset=["iia"])
    if done.empty or not done.duplicated(CELL_KEY).any():
        return None
    positions = done["position"].astype(object)
    stats = done.groupby([done["stream"], done["heads"], done["layer"], positions], sort=False)["iia"]
    table = stats.agg(n_seeds="count", iia_mean="mean", iia_std="std", iia_min="min", iia_max="max")
    return table.reset_index()


def colour_range(score: str, table: pd.DataFrame) -> tuple[float, float]:
    """The colour scale of a heatmap of `score`: [0, 1] for IIA-like shares, else from min(0, least) to the largest
    value present (UNBOUNDED_SCORES)."""
    if score not in UNBOUNDED_SCORES:
        return 0.0, 1.0
    values = table.to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    low = min(0.0, float(values.min())) if values.size else 0.0
    high = float(values.max()) if values.size else 1.0
    return low, high if high > low else low + 1.0


def heatmap(table: pd.DataFrame, path: str | os.PathLike, title: str, spread: pd.DataFrame | None = None,
            label: str = "IIA", interval: tuple[pd.DataFrame, pd.DataFrame] | None = None,
            limits: tuple[float, float] = (0.0, 1.0), hatched: pd.DataFrame | None = None) -> None:
    """Write a layer (rows, layer 0 at the top) x position (columns) heatmap of IIA as PNG.

    Colours span `limits` ([0, 1] unless given: `colour_range`); every cell shows its value to 2 decimals (and "±sd" when `spread`, a
    table of the same shape, is given, or "[lo, hi]" when `interval`, two such tables, is),
    failed (NaN) cells are grey "—".
    Uses a bare Agg-rendered `Figure` (no pyplot): no GUI, no global figure state to close.
    """
    from matplotlib.figure import Figure

    n_layers, n_positions = table.shape
    width = 3.0 + 0.8 * n_positions
    title = textwrap.fill(title, width=int(11 * width))
    fig = Figure(figsize=(width, 1.6 + 0.4 * n_layers + 0.15 * (title.count("\n") + 1)), layout="constrained")
    ax = fig.add_subplot()
    image = draw_heatmap(ax, table, spread, interval, limits=limits, hatched=hatched)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def draw_heatmap(ax, table: pd.DataFrame, spread: pd.DataFrame | None = None,
                 interval: tuple[pd.DataFrame, pd.DataFrame] | None = None,
                 xlabel: str = "position", ylabel: str = "layer", limits: tuple[float, float] = (0.0, 1.0),
                 hatched: pd.DataFrame | None = None):
    """Draw `table` (rows top to bottom, columns left to right) on the matplotlib axes `ax` as `heatmap`
    describes; returns the image, for a colour bar."""
    values = table.to_numpy(dtype=float)
    low, high = limits
    image = ax.imshow(np.ma.masked_invalid(values), cmap=_colormap(), vmin=low, vmax=high, aspect="auto")
    spreads = None if spread is None else spread.reindex_like(table).to_numpy(dtype=float)
    bounds = None if interval is None else [t.reindex_like(table).to_numpy(dtype=float) for t in interval]
    for (row, col), v in np.ndenumerate(values):
        text, colour = ("—", "black") if np.isnan(v) else (cell_text(v, limits == (0.0, 1.0)), "black" if v > (low + high) / 2 else "white")
        if spreads is not None and not np.isnan(v) and not np.isnan(spreads[row, col]):
            text += f"\n±{spreads[row, col]:.2f}"
        elif bounds is not None and not np.isnan(v) and not np.isnan(bounds[0][row, col]):
            text += f"\n[{bounds[0][row, col]:.2f}, {bounds[1][row, col]:.2f}]"
        ax.text(col, row, text, ha="center", va="center", color=colour, fontsize=8 if "\n" not in text else 7)
    if hatched is not None:  # cells successive halving stopped early: they keep the IIA they had
        from matplotlib.patches import Rectangle

        for (row, col), flag in np.ndenumerate(hatched.reindex_like(table).fillna(0).to_numpy(dtype=float)):
            if flag:
                ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, hatch="///", edgecolor="grey", linewidth=0))
    ax.set_xticks(range(values.shape[1]), [str(p) for p in table.columns])
    ax.set_yticks(range(values.shape[0]), [str(r) for r in table.index])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return image


def write_results(rows: list[dict], folder: str | os.PathLike, title: str = "", plots: bool = True,
                  by: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Write folder/iia.csv and, per (stream, heads), pivot_<name>.csv and heatmap_<name>.png.

    <name> is the stream, plus "_heads-<heads>" for head-level cells, sanitised to [A-Za-z0-9_.+-].
    With several seeds per cell, pivots and heatmaps show the mean; iia_seeds.csv and
    pivot_<name>_std.csv give the spread. Extra scores (EXTRA_SCORES) get pivot_<name>_<score>.csv
    and heatmap_<name>_<score>.png. Columns `by` (configuration keys a multirun swept) split the pivots,
    heatmaps and seed tables: one set per value, <name> ending in "_<key>-<value>" (or "_config-<hash>" when
    that would be longer than MAX_SUFFIX).
    Floats are written in their shortest round-trip form. Returns the frame.
    """
    folder = Path(folder)
    frame = results_frame(rows)
    atomic_write(layout.table_file(folder), lambda tmp: frame.to_csv(tmp, index=False))
    write_head_importance(frame, folder)
    for suffix, label, part in _split(frame, by):
        _write_pivots(part, folder, " · ".join(t for t in (title, label) if t), plots, suffix)
    return frame


def _split(frame: pd.DataFrame, by) -> list[tuple[str, str, pd.DataFrame]]:
    """(file name suffix, label, rows) per value of the `by` columns; [("", "", frame)] without them."""
    if not by:
        return [("", "", frame)]
    keys = frame[list(by)].map(lambda v: "" if _missing(v) else str(v))  # a key some configurations lack: ""
    out = []
    for values, part in frame.groupby([keys[k] for k in by], sort=False):
        pairs = [(k, v) for k, v in zip(by, values if isinstance(values, tuple) else (values,)) if v != ""]
        label = ", ".join(f"{k}={v}" for k, v in pairs)
        suffix = "".join(f"_{_file_part(k)}-{_file_part(v)}" for k, v in pairs)
        if len(suffix) > MAX_SUFFIX:  # e.g. runs on other datasets differ in many keys: keep file names legal
            suffix = "_config-" + hashlib.sha256(label.encode()).hexdigest()[:8]
        out.append((suffix, label, part))
    return out


def _write_pivots(frame: pd.DataFrame, folder: Path, title: str, plots: bool, suffix: str) -> None:
    spread = seed_spread(frame)
    if spread is not None:
        atomic_write(layout.table_file(folder, f"iia_seeds{suffix}.csv"), lambda tmp: spread.to_csv(tmp, index=False))
    stds = pivot(frame, agg="std") if spread is not None else {}
    intervals = _interval_tables(frame) if spread is None else {}
    extras = {score: pivot(frame, score) for score in EXTRA_SCORES if score in frame and frame[score].notna().any()}
    hatches = stopped_tables(frame)
    for key, table in pivot(frame).items():
        name = _file_part(key[0]) + (f"_heads-{_file_part(key[1])}" if key[1] else "") + suffix
        _write_table(layout.pivot_file(folder, name), table)
        if key in stds:
            _write_table(layout.pivot_file(folder, f"{name}_std"), stds[key])
        for score, tables in extras.items():
            if key in tables:
                _write_table(layout.pivot_file(folder, f"{name}_{score}"), tables[key])
        if plots:
            seeds = f" · mean of {int(spread['n_seeds'].max())} seeds" if spread is not None else ""
            halved = " · hatched: stopped by successive halving" if key in hatches and hatches[key].to_numpy().any() else ""
            heatmap(table, layout.heatmap_file(folder, name), _plot_title(*key, title) + seeds + halved, stds.get(key),
                    interval=intervals.get(key), hatched=hatches.get(key))
            for score, tables in extras.items():
                if key in tables:
                    heatmap(tables[key], layout.heatmap_file(folder, f"{name}_{score}"),
                            f"{score} · {_plot_title(*key, title)}", label=score, limits=colour_range(score, tables[key]))


def _write_table(path: Path, table: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: table.to_csv(tmp))


def format_summary(frame: pd.DataFrame, by: list[str] | tuple[str, ...] = ()) -> str:
    """Compact terminal text: per (stream, heads) the IIA pivot (2 decimals, a `max` column of the
    per-layer max over positions), the best cell (chosen on validation IIA, else training IIA; see
    `selection_score`), and the mean over layers of that max (MIB-style).
    Failed (NaN) cells print as "—" and are left out of the best cell and the mean. With `by`
    (swept configuration columns), one such summary per value, headed by it.
    """
    if by:
        return "\n\n".join(f"== {label} ==\n{format_summary(part)}" for _, label, part in _split(frame, by))
    tables = pivot(frame)
    if not tables:
        return "no results"
    spread = seed_spread(frame)
    intervals = _interval_tables(frame) if spread is None else {}
    chooser, source = selection_score(frame)
    choices = choice_tables(frame, chooser)
    extras = {score: pivot(frame, score) for score in EXTRA_SCORES if score in frame and frame[score].notna().any()}
    model_layers = int(frame["model_layers"].max()) if "model_layers" in frame and frame["model_layers"].notna().any() else None
    untrained = stopped_tables(frame, untrained_only=True)
    text = "\n\n".join(
        _group_summary(stream, heads, table, choices[stream, heads], source, intervals.get((stream, heads)),
                       {score: tables[stream, heads] for score, tables in extras.items() if (stream, heads) in tables},
                       model_layers, untrained.get((stream, heads)))
        for (stream, heads), table in tables.items())
    if "prescan" in frame and frame["prescan"].notna().any():
        text += "\n\n" + prescan_summary(frame[~stopped(frame)], chooser, source, "fully trained " if stopped(frame).any() else "")
    if stopped(frame).any():
        text += "\n\n" + halving_summary(frame)
    if spread is not None:
        text += (f"\n\nIIA above is the mean of {int(spread['n_seeds'].max())} seeds per cell; standard deviation "
                 f"median {spread['iia_std'].median():.3f}, max {spread['iia_std'].max():.3f} (iia_seeds.csv)")
    return text


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman's rank correlation of two columns over the rows where both are numbers (ties take their mean rank);
    NaN with fewer than 3 such rows or a constant column."""
    both = pd.DataFrame({"a": a, "b": b}).astype(float).dropna()
    if len(both) < 3 or both["a"].nunique() < 2 or both["b"].nunique() < 2:
        return math.nan
    return float(both["a"].rank().corr(both["b"].rank()))


def prescan_summary(frame: pd.DataFrame, chooser: str, source: str, which: str = "") -> str:
    """How well the first-order prescan, made before any training, ranked the trained cells: its Spearman
    correlation with test IIA and with the selection score, over the cells that have both."""
    trained = frame.dropna(subset=["iia", "prescan"])
    if trained.empty:
        return "prescan: no trained cell to compare it with"
    rho_test, rho_choice = spearman(trained["prescan"], trained["iia"]), spearman(trained["prescan"], trained[chooser])
    top = trained.loc[trained["prescan"].idxmax()]
    text = (f"prescan (first order, before training): Spearman with test IIA {_rho(rho_test)}, with {source} IIA "
            f"{_rho(rho_choice)}, over {len(trained)} {which}cells; its top cell {top['stream']} L{top['layer']} @ {top['position']} "
            f"(prescan {top['prescan']:.2g}, IIA {top['iia']:.2f})")
    if math.isnan(rho_test) or math.isnan(rho_choice):
        text += "\n  (a correlation is undefined under 3 cells or with a score that does not vary)"
    return text


def _rho(value: float) -> str:
    return "undefined" if math.isnan(value) else f"{value:.2f}"


def stopped(frame: pd.DataFrame) -> pd.Series:
    """Rows of cells successive halving stopped before the full schedule (or never trained)."""
    return frame["stopped"].notna() if "stopped" in frame else pd.Series(False, index=frame.index)


def stopped_tables(frame: pd.DataFrame, untrained_only: bool = False) -> dict[tuple[str, str], pd.DataFrame]:
    """Per (stream, heads), a layer x position table: 1 where halving stopped the cell (`untrained_only`: where the
    prescan left it untrained), else 0; empty without halving."""
    if not stopped(frame).any():
        return {}
    mask = frame["stopped"].eq(0).fillna(False) if untrained_only else stopped(frame)
    return pivot(frame.assign(_stopped=mask.astype(float)), "_stopped", agg="max")


def halving_summary(frame: pd.DataFrame) -> str:
    """What successive halving trained: how many cells reached the full schedule, how many stopped at each rung
    (after how many epochs), how many the prescan left untrained."""
    out = frame[stopped(frame)]
    parts = [f"{int((~stopped(frame)).sum())} trained to the full schedule"]
    for rung, group in out[out["stopped"] > 0].groupby("stopped"):
        parts.append(f"{len(group)} stopped at rung {int(rung)} after {int(group['epochs'].max())} "
                     f"epoch{'s' if int(group['epochs'].max()) != 1 else ''}")
    untrained = int((out["stopped"] == 0).sum())
    if untrained:
        parts.append(f"{untrained} never trained (below the prescan's cut)")
    return (f"successive halving over {len(frame)} cells: " + "; ".join(parts)
            + "\n  (stopped cells are hatched in the heatmaps, keep the IIA they had, and are never the best cell)")


def selectable(frame: pd.DataFrame, column: str) -> pd.Series:
    """`column` where a cell may be chosen on it: a cell halving stopped early is never the best cell."""
    return frame[column].astype(float).where(~stopped(frame))


def choice_tables(frame: pd.DataFrame, column: str) -> dict[tuple[str, str], pd.DataFrame]:
    """`pivot` of the selection score (`selection_score`) over the cells that may be chosen (`selectable`)."""
    return pivot(frame.assign(**{column: selectable(frame, column)}), column)


def selection_score(frame: pd.DataFrame) -> tuple[str, str]:
    """The column every choice among cells is made on, and its name: validation IIA where the run has a
    validation split, else training IIA. Never test IIA: the numbers reported for a choice must not have
    made it."""
    if "iia_val" in frame and frame["iia_val"].notna().any():
        return "iia_val", "validation"
    return "train_iia", "training"


def best_cell(table: pd.DataFrame, choice: pd.DataFrame) -> tuple | None:
    """The (layer, position) of `table` (test IIA) with the highest `choice` (validation or training IIA:
    `selection_score`) among the cells that have a test IIA; None when no cell has both."""
    candidates = choice.reindex_like(table).where(table.notna()).stack().dropna()
    if table.isna().all().all() or candidates.empty:
        return None
    return candidates.idxmax()


def _interval_tables(frame: pd.DataFrame) -> dict[tuple[str, str], tuple[pd.DataFrame, pd.DataFrame]]:
    """Per (stream, heads): the layer x position tables of iia_lo and iia_hi (empty when no row has them)."""
    if frame["iia_lo"].isna().all():
        return {}
    lows, highs = pivot(frame, "iia_lo"), pivot(frame, "iia_hi")
    return {key: (lows[key], highs[key]) for key in lows}


def _group_summary(stream: str, heads: str, table: pd.DataFrame, choice: pd.DataFrame, source: str,
                   interval: tuple[pd.DataFrame, pd.DataFrame] | None = None,
                   extras: dict[str, pd.DataFrame] | None = None, model_layers: int | None = None,
                   untrained: pd.DataFrame | None = None) -> str:
    """The pivot, the best cell (chosen on `choice`, the validation or training IIA; reported with its test
    IIA, interval and extra scores), and the mean over layers of the max over positions (MIB-style)."""
    name = stream + (f" heads {heads}" if heads else "")
    shown = table.copy()
    shown.columns = [str(p) for p in shown.columns]
    layer_max = table.max(axis=1, skipna=True)
    shown["max"] = layer_max
    lines = [name, shown.to_string(float_format=lambda v: f"{v:.2f}", na_rep="—")]
    failed = int(table.isna().sum().sum()) - (0 if untrained is None else int(untrained.reindex_like(table).fillna(0).sum().sum()))
    chosen = best_cell(table, choice)
    if chosen is None:
        return "\n".join(lines + [f"best: none ({failed} failed cells)"])
    layer, position = chosen
    best = f"best: {name} L{layer} @ {position}  IIA {table.loc[layer, position]:.2f}"
    if interval is not None and not np.isnan(interval[0].loc[layer, position]):
        best += f"  95% CI [{interval[0].loc[layer, position]:.2f}, {interval[1].loc[layer, position]:.2f}]"
    best += f"  (chosen on {source} IIA {choice.loc[layer, position]:.2f})"
    lines.append(best)
    at_best = [f"{score} {cell_text(scores.loc[layer, position], score not in UNBOUNDED_SCORES)}" for score, scores in (extras or {}).items()
               if position in scores.columns and layer in scores.index and not np.isnan(scores.loc[layer, position])]
    if at_best:
        lines.append("  at this cell: " + ", ".join(at_best))
    lines.append(f"mean over layers of the max over positions: {layer_max.mean():.2f}{_mib_label(table.index, model_layers)}")
    if failed:
        lines.append(f"({failed} failed {'cell' if failed == 1 else 'cells'} skipped)")
    return "\n".join(lines)


def _mib_label(layers: pd.Index, model_layers: int | None) -> str:
    """MIB's summary score averages the per-layer max over every layer of the model: name it so only then."""
    if model_layers is None:
        return ""
    if set(layers) == set(range(model_layers)):
        return f" (MIB average: all {model_layers} layers)"
    return f" ({len(layers)} of {model_layers} layers; not MIB's average, which takes every layer: layers=all)"


def cell_text(value: float, bounded: bool = True) -> str:
    """A heatmap cell's number: 2 decimals for a score in [0, 1], 2 significant digits for another (a prescan
    score in nats can be 0.003)."""
    return f"{value:.2f}" if bounded else f"{value:.2g}"


def _position_order(frame: pd.DataFrame) -> list:
    if isinstance(frame["position"].dtype, pd.CategoricalDtype):
        return list(frame["position"].cat.categories)
    return list(dict.fromkeys(frame["position"].dropna()))


def _integers(column: pd.Series) -> pd.Series:
    numbers = pd.to_numeric(column)
    whole = numbers.dropna()
    return numbers.astype("Int64") if (whole == whole.round()).all() else numbers


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def _plot_title(stream: str, heads: str, title: str) -> str:
    name = stream + (f" heads {heads}" if heads else "")
    return f"{name} · {title}" if title else name


def _colormap():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")


def bar_chart(values: dict, path: str | os.PathLike, title: str, ylabel: str = "share of subspace") -> None:
    """One bar per key (e.g. head -> share), written atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(3.0, 0.45 * len(values) + 1.5), 2.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.bar([str(k) for k in values], list(values.values()), color="#3b6ea8")
    axes.set_xlabel("head")
    axes.set_ylabel(ylabel)
    axes.set_ylim(0, max(1e-9, max(values.values(), default=0)) * 1.1)
    axes.set_title(title, fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def curve_plot(curve: list[tuple], path: str | os.PathLike, title: str, validation: list[tuple] | None = None) -> None:
    """A training curve (train.Curve's steps): the cross-entropy per step with each epoch's mean, the penalty where
    the method has one, the learning rate on a second axis, and with `validation` ((epoch, IIA, loss) per epoch)
    the validation loss at each epoch's end; written atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, epochs, losses, penalties, rates = (list(column) for column in zip(*curve))
    figure = Figure(figsize=(5.0, 3.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="#3b6ea8", linewidth=0.8, label="cross-entropy")
    ends = [k for k in range(len(steps)) if k + 1 == len(steps) or epochs[k + 1] != epochs[k]]
    means = [float(np.mean([loss for loss, e in zip(losses, epochs) if e == epochs[k]])) for k in ends]
    axes.plot([steps[k] for k in ends], means, "o-", color="#1f3b5c", markersize=3, label="epoch mean")
    if any(penalties):
        axes.plot(steps, penalties, color="#c0392b", linewidth=0.8, label="penalty")
    if validation:
        ends_of = {epochs[k]: steps[k] for k in ends}
        axes.plot([ends_of[e] for e, _, _ in validation], [loss for _, _, loss in validation], "s--", color="#2e8b57",
                  markersize=3, label="validation loss")
        for e, iia, loss in validation:
            axes.annotate(f"{iia:.2f}", (ends_of[e], loss), fontsize=6, color="#2e8b57", textcoords="offset points", xytext=(0, 4))
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    rate_axes = axes.twinx()
    rate_axes.plot(steps, rates, color="#999999", linewidth=0.8, linestyle="--")
    rate_axes.set_ylabel("learning rate", color="#777777")
    axes.legend(fontsize=7, loc="upper right")
    axes.set_title(title, fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def side_by_side_heatmaps(left, right, path: str | os.PathLike, title: str, titles: tuple[str, str]) -> None:
    """Two matrices as heatmaps on one colour scale from min(0, their least) to their largest entry (e.g. a Jacobian
    before and after a rotation), atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.0, 4.2))
    FigureCanvasAgg(figure)
    bottom, top = float(min(np.min(left), np.min(right), 0.0)), float(max(np.max(left), np.max(right)))
    for k, (matrix, name) in enumerate(zip((left, right), titles)):
        axes = figure.add_subplot(1, 2, k + 1)
        image = axes.imshow(np.asarray(matrix), cmap="magma", vmin=bottom, vmax=top, interpolation="nearest", aspect="auto")
        axes.set_title(name, fontsize=9)
    figure.colorbar(image, ax=figure.axes, shrink=0.8)
    figure.suptitle(title, fontsize=9)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def histogram(values, path: str | os.PathLike, title: str) -> None:
    """The distribution of `values` (e.g. mask logits), atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5, 2.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(np.asarray(values), bins=50, color="#3b6ea8")
    axes.axvline(0.0, color="grey", linewidth=0.8)
    axes.set_ylabel("count")
    axes.set_title(title, fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def write_head_importance(frame: pd.DataFrame, folder: str | os.PathLike) -> None:
    """head_importance.csv, long format (cell, stream, layer, position, heads, head, share), if any cell has one."""
    if "head_importance" not in frame or frame["head_importance"].isna().all():
        return
    records = [
        {"cell": row.cell, "stream": row.stream, "layer": row.layer, "position": row.position,
         "heads": row.heads, "head": int(head), "share": share}
        for row in frame.dropna(subset=["head_importance"]).itertuples()
        for head, share in json.loads(row.head_importance).items()
    ]
    table = pd.DataFrame(records)
    atomic_write(layout.table_file(folder, layout.HEADS_TABLE), lambda tmp: table.to_csv(tmp, index=False))
