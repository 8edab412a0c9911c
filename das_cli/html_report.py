"""report.html: one self-contained page for a run folder (or a multirun, or any folder `das-cli-report` reads).

Written by `report.aggregate` next to iia.csv, so every run, every multirun's sweep folder and every
`das-cli-report` gets one. It opens offline from the file: plotly.js is inlined, the cells' PNG figures are
data URIs, and nothing on the page names a URL to load. It holds:
- the identity of each job folder: model, dataset, intervention, the command's overrides
  (.hydra/overrides.yaml), the fingerprint (a short hash; the whole of run.json's on a click), the package
  versions run.json recorded, the wall clock (first to last line of the job's log);
- per stream (and head set, and swept configuration) one layer x position heatmap per score (test IIA with
  its 95% interval, validation IIA, the extra scores), the chosen cell (on validation IIA: results.best_cell)
  outlined; hovering a cell shows its numbers, clicking it opens its section;
- a sortable table of every cell; the seeds' spread, the transfer table, failed, missing and damaged cells;
- a section per cell: its numbers, its training curve (curve.csv), its head shares and its other figures.

plotly.js (interactive heatmaps and curves from one inlined library; the figures are plain plotly dicts,
validated by plotly's own classes in tests/test_html_report.py) and jinja2 (an escaping template) are
imported only when a page is written.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import numbers
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from . import folder as layout
from .files import atomic_write_text
from .results import (EXTRA_SCORES, UNBOUNDED_SCORES, _split, best_cell, cell_text, choice_tables, colour_range, pivot,
                      seed_spread, selection_score, stopped_tables)

if TYPE_CHECKING:
    from .report import Report

PAGE = "report.html"
TEMPLATE = Path(__file__).with_name("templates") / "report.html.j2"
TABLE_COLUMNS = ["cell", "stream", "layer", "position", "heads", "intervention", "dim", "seed", "iia", "iia_lo",
                 "iia_hi", "iia_val", "train_iia", "p_label", "logit_diff", "gain", "offmanifold", "max_z", "loss",
                 "penalty", "base_accuracy", "n_test", "seconds", "prescan", "stopped", "epochs", "error"]
CELL_NUMBERS = ["iia", "iia_lo", "iia_hi", "iia_val", "train_iia", "gain", "offmanifold", "max_z", "p_label",
                "logit_diff", "loss", "penalty", "base_accuracy", "n_train", "n_val", "n_test", "steps", "seconds"]
SCORE_LABELS = {"iia": "test IIA", "iia_val": "validation IIA", "prescan": "prescan (predicted loss drop, nats)"}
SHOWN_FIGURES = ("curve.png", "head_importance.png")  # drawn on the page from their data instead
MAX_IMAGE_BYTES = 2_000_000
PLOT_CONFIG = {"displaylogo": False, "displayModeBar": False}  # drag to zoom, double-click to reset
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


def write_page(report: Report) -> Path:
    """Write <report.folder>/report.html (atomically) and return its path."""
    return atomic_write_text(Path(report.folder) / PAGE, page_html(report))


def page_html(report: Report) -> str:
    """The whole page for `report` (report.Report), as text."""
    import jinja2
    from plotly.offline import get_plotlyjs

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["num"] = _number
    template = env.from_string(TEMPLATE.read_text(encoding="utf-8"))
    frame = report.frame.reset_index(drop=True)
    anchors = [f"cell-{k}" for k in range(len(frame))]
    best = _best_rows(frame, report.swept)
    return template.render(
        title=_title(report), folder=str(Path(report.folder).resolve()), generated=_now(),
        jobs=[_job(report.folder, job) for job in report.jobs + report.not_started],
        status=_status(report), swept=report.swept, summary=_summary(report),
        heatmaps=_heatmap_groups(frame, report.swept, anchors),
        table=_table(frame, report.swept, anchors, best), seeds=_seeds(frame, report.swept),
        transfer=_transfer(report), problems=_problems(report),
        cells=[_cell(report, row, anchors[k], k in best) for k, row in frame.iterrows()],
        plotly_js=get_plotlyjs(), plot_config=json.dumps(PLOT_CONFIG),
    )


# --- the run's identity ----------------------------------------------------------------------------

def _job(root: Path, job: Path) -> dict:
    """What identifies one job folder: its configuration, overrides, versions and wall clock."""
    fingerprint, versions = _run_record(job)
    return {
        "folder": _rel(root, job), "model": _part(fingerprint, "model"), "dataset": _part(fingerprint, "dataset"),
        "intervention": _part(fingerprint, "intervention"), "overrides": _overrides(job),
        "fingerprint": _short_hash(fingerprint) if fingerprint else "",
        "fingerprint_json": json.dumps(fingerprint, indent=2, sort_keys=True) if fingerprint else "",
        "versions": versions, "clock": _clock(job), "cells": len(layout.cell_folders(job)),
    }


def _run_record(job: Path) -> tuple[dict | None, dict]:
    """run.json's fingerprint (else the first readable cell's, seed aside) and its recorded versions."""
    try:
        record = json.loads(layout.run_file(job).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    record = record if isinstance(record, dict) else {}
    fingerprint = record.get("fingerprint")
    if not isinstance(fingerprint, dict):
        cells = (layout.read_cell(job, cell_id, verify=False) for cell_id in layout.cell_ids(job))
        fingerprint = next((layout.without_seed(c.fingerprint) for c in cells if c and not c.damaged), None)
    versions = record.get("versions")
    return fingerprint, versions if isinstance(versions, dict) else {}


def _part(fingerprint: dict | None, key: str) -> str:
    """One part of the configuration on one line: its name first, then its other plain settings."""
    value = (fingerprint or {}).get(key)
    if not isinstance(value, dict):
        return "" if value is None else str(value)
    name = value.get("name", "")
    rest = ", ".join(f"{k}={json.dumps(v)}" for k, v in value.items() if k != "name" and not isinstance(v, dict))
    return f"{name} ({rest})" if rest else str(name)


def _short_hash(fingerprint: dict) -> str:
    return hashlib.sha256(layout.config_key(fingerprint).encode()).hexdigest()[:12]


def _overrides(job: Path) -> list[str] | None:
    """The command line's overrides of the defaults, as Hydra recorded them; None for a run without Hydra."""
    path = job / ".hydra" / "overrides.yaml"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return [line[2:].strip() for line in lines if line.startswith("- ")]


def _clock(job: Path) -> str:
    """Wall clock from the first to the last time-stamped line of the job's Hydra log, with the times."""
    for log in sorted(job.glob("*.log")):
        times = [m.group(1) for line in _lines(log) if (m := LOG_TIME.match(line))]
        if times:
            start, end = (datetime.fromisoformat(t) for t in (times[0], times[-1]))
            return f"{_duration((end - start).total_seconds())} ({times[0]} to {times[-1][11:]}, {log.name})"
    return ""


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def _status(report: Report) -> str:
    jobs = f"{len(report.jobs)} job folder{'s' if len(report.jobs) != 1 else ''}"
    seconds = pd.to_numeric(report.frame.get("seconds"), errors="coerce").sum()
    return (f"{len(report.frame)} cells from {jobs}; {len(report.failed)} failed, {len(report.missing)} missing, "
            f"{len(report.damaged)} damaged; cells' own time {_duration(float(seconds))}")


def _summary(report: Report) -> str:
    from .results import format_summary

    return format_summary(report.frame, by=report.swept)


# --- heatmaps ----------------------------------------------------------------------------------------

def _heatmap_groups(frame: pd.DataFrame, swept: list[str], anchors: list[str]) -> list[dict]:
    """Per (swept configuration, stream, heads): a title and one heatmap figure (JSON) per score."""
    groups = []
    for _, label, part in _split(frame, swept):
        chooser, source = selection_score(part)
        scores = ["iia", "iia_val"] + [s for s in EXTRA_SCORES if s in part and part[s].notna().any()]
        tables = {score: pivot(part, score) for score in scores if score in part and part[score].notna().any()}
        choices, spreads = choice_tables(part, chooser), pivot(part, agg="std") if seed_spread(part) is not None else {}
        lows, highs = pivot(part, "iia_lo"), pivot(part, "iia_hi")
        ids, halted = _cell_anchors(part, anchors), stopped_tables(part)
        for key, table in tables["iia"].items():
            best = best_cell(table, choices[key])
            extra = {"lo": lows.get(key), "hi": highs.get(key), "sd": spreads.get(key), "ids": ids.get(key), "stopped": halted.get(key)}
            figures = [_json(heatmap_figure(tables[s][key], SCORE_LABELS.get(s, s), best,
                                            extra if s == "iia" else {"ids": ids.get(key), "bounded": s not in UNBOUNDED_SCORES,
                                                                      "stopped": halted.get(key)},
                                            colour_range(s, tables[s][key])))
                       for s in tables if key in tables[s]]
            name = key[0] + (f" heads {key[1]}" if key[1] else "")
            groups.append({"title": " · ".join(t for t in (name, label) if t), "figures": figures,
                           "best": _best_text(table, best, source, choices[key])})
    return groups


def _cell_anchors(part: pd.DataFrame, anchors: list[str]) -> dict:
    """(stream, heads) -> layer x position table of the anchors of the cells' sections (first seed's)."""
    named = part.assign(anchor=[anchors[k] for k in part.index])
    tables = {}
    for (stream, heads), group in named.groupby(["stream", "heads"], sort=True):
        first = group.drop_duplicates(["layer", "position"])
        table = first.set_index(["layer", first["position"].astype(object)])["anchor"]
        tables[(str(stream), str(heads))] = table.unstack("position")
    return tables


def heatmap_figure(table: pd.DataFrame, score: str, best: tuple | None, extra: dict,
                   limits: tuple[float, float] = (0.0, 1.0)) -> dict:
    """One layer (rows, 0 at the top) x position heatmap of `table` as a plotly figure (a plain dict: plotly's
    Python validation costs tens of ms a figure; tests validate these), the chosen cell outlined."""
    rows, columns = table.shape
    text, hover = _cell_texts(table, extra)
    ids = _aligned(extra.get("ids"), table, fill="")
    trace = {"type": "heatmap", "z": table.to_numpy(dtype=float).tolist(), "x": list(range(columns)),
             "y": list(range(rows)), "zmin": limits[0], "zmax": limits[1], "colorscale": "Viridis", "text": text,
             "texttemplate": "%{text}", "customdata": [[[h, i] for h, i in zip(hs, cs)] for hs, cs in zip(hover, ids)],
             "hovertemplate": "%{customdata[0]}<extra></extra>", "colorbar": {"thickness": 12, "len": 0.9},
             "xgap": 1, "ygap": 1}
    layout = {"title": {"text": score, "font": {"size": 13}}, "height": 110 + 34 * rows, "width": 190 + 80 * columns,
              "margin": {"l": 50, "r": 10, "t": 34, "b": 40}, "plot_bgcolor": "#d3d3d3",
              "xaxis": {"title": {"text": "position"}, "tickvals": list(range(columns)), "ticktext": [str(p) for p in table.columns]},
              "yaxis": {"title": {"text": "layer"}, "tickvals": list(range(rows)), "ticktext": [str(i) for i in table.index],
                        "autorange": "reversed"}}
    layout["shapes"] = [{"type": "rect", "x0": c - 0.5, "x1": c + 0.5, "y0": r - 0.5, "y1": r + 0.5, "line": {"width": 0},
                         "fillcolor": "rgba(160, 160, 160, 0.55)"}  # stopped by successive halving: greyed
                        for r, flags in enumerate(_aligned(extra.get("stopped"), table, fill=0)) for c, flag in enumerate(flags) if flag]
    if best is not None:
        row, col = list(table.index).index(best[0]), list(table.columns).index(best[1])
        layout["shapes"].append({"type": "rect", "x0": col - 0.5, "x1": col + 0.5, "y0": row - 0.5, "y1": row + 0.5,
                                 "line": {"color": "#e8112d", "width": 3}})
    return {"data": [trace], "layout": layout}


def _cell_texts(table: pd.DataFrame, extra: dict) -> tuple[list[list[str]], list[list[str]]]:
    """Per cell: the text drawn in it (the value, its ±sd or 95% interval) and its hover text."""
    lo, hi, sd = (_aligned(extra.get(k), table) for k in ("lo", "hi", "sd"))
    halted = _aligned(extra.get("stopped"), table, fill=0)
    texts, hovers = [], []
    for r, layer in enumerate(table.index):
        texts.append([])
        hovers.append([])
        for c, position in enumerate(table.columns):
            v = float(table.iloc[r, c])
            text = "—" if math.isnan(v) else cell_text(v, extra.get("bounded", True))
            if not math.isnan(v) and not _nan(sd[r][c]):
                text += f"<br>±{sd[r][c]:.2f}"
            elif not math.isnan(v) and not _nan(lo[r][c]):
                text += f"<br>[{lo[r][c]:.2f}, {hi[r][c]:.2f}]"
            texts[-1].append(text)
            hovers[-1].append(f"layer {layer} @ {position}<br>{text.replace('<br>', ' ')}"
                              + ("<br>stopped by successive halving (greyed)" if halted[r][c] else "")
                              + ("" if math.isnan(v) else "<br>click: the cell's section"))
    return texts, hovers


def _aligned(table: pd.DataFrame | None, like: pd.DataFrame, fill: object = float("nan")) -> list[list]:
    if table is None:
        return [[fill] * like.shape[1] for _ in range(like.shape[0])]
    return table.reindex(index=like.index, columns=like.columns).astype(object).where(lambda t: t.notna(), fill).values.tolist()


def _best_text(table: pd.DataFrame, best: tuple | None, source: str, choice: pd.DataFrame) -> str:
    if best is None:
        return "no chosen cell (every cell failed)"
    layer, position = best
    return (f"chosen (outlined): layer {layer} @ {position}, test IIA {table.loc[layer, position]:.2f}, "
            f"chosen on {source} IIA {choice.loc[layer, position]:.2f}")


def _best_rows(frame: pd.DataFrame, swept: list[str]) -> set[int]:
    """Frame indices of the chosen cells, one per (swept configuration, stream, heads) (all its seeds' rows)."""
    chosen = set()
    for _, _, part in _split(frame, swept):
        choices = choice_tables(part, selection_score(part)[0])
        for key, table in pivot(part).items():
            best = best_cell(table, choices[key])
            if best is not None:
                hit = ((part["stream"] == key[0]) & (part["heads"] == key[1]) & (part["layer"] == best[0])
                       & (part["position"].astype(object) == best[1]))
                chosen |= set(part.index[hit])
    return chosen


# --- tables ------------------------------------------------------------------------------------------

def _table(frame: pd.DataFrame, swept: list[str], anchors: list[str], best: set[int]) -> dict:
    """Every cell as a row: the columns that have a value somewhere, swept keys after the cell id."""
    columns = [c for c in ["cell", *swept, *TABLE_COLUMNS[1:]] if c in frame and _has_values(frame[c])]
    rows = [{"anchor": anchors[k], "best": k in best, "failed": _is_error(row.get("error")),
             "values": [(_number(row[c]), _sort_key(row[c])) for c in columns]} for k, row in frame.iterrows()]
    return {"columns": columns, "rows": rows}


def _seeds(frame: pd.DataFrame, swept: list[str]) -> list[dict]:
    """The spread over seeds per cell (results.seed_spread), per swept configuration; [] with one seed."""
    out = []
    for _, label, part in _split(frame, swept):
        spread = seed_spread(part)
        if spread is not None:
            out.append({"label": label, "columns": list(spread.columns), "rows": spread.values.tolist()})
    return out


def _transfer(report: Report) -> dict | None:
    if report.transfer is None:
        return None
    frame = report.transfer.frame
    return {"columns": list(frame.columns), "rows": frame.values.tolist(), "text": report.transfer.text}


def _problems(report: Report) -> list[tuple[str, str, str]]:
    """(kind, cell or folder, why) for failed, damaged and missing cells and jobs that ran no cell."""
    rows = [("failed", cell, error) for cell, error in report.failed]
    rows += [("damaged", cell, problem) for cell, problem in report.damaged]
    rows += [("missing", cell, "in a grid*.json, found in no job folder (killed, timed out or still running)")
             for cell in report.missing]
    rows += [("not started", _rel(report.folder, job), "ran no cell (failed before its grid; see its log)")
             for job in report.not_started]
    return rows


# --- one cell ----------------------------------------------------------------------------------------

def _cell(report: Report, row: pd.Series, anchor: str, best: bool) -> dict:
    """A cell's section: its numbers, curve, head shares and the other PNGs of its folder."""
    home = _home(report, row)
    folder = layout.cell_dir(home, row["cell"]) if home is not None else None
    numbers = [(c, row[c]) for c in CELL_NUMBERS if c in row and not _nan(row[c])]
    return {
        "anchor": anchor, "id": row["cell"], "best": best, "error": row.get("error") if _is_error(row.get("error")) else "",
        "where": _rel(report.folder, folder) if folder is not None else "", "numbers": numbers,
        "config": [(k, row[k]) for k in report.swept if k in row],
        "curve": _curve(folder) if folder is not None else None, "heads": _heads(row.get("head_importance")),
        "images": _images(folder) if folder is not None else [],
    }


def _home(report: Report, row: pd.Series) -> Path | None:
    """The job folder that holds the row's cell: the one whose cell has the row's swept configuration values."""
    homes = [job for job in report.jobs if layout.metrics_file(job, row["cell"]).exists()]
    if len(homes) <= 1 or not report.swept:
        return homes[0] if homes else None
    for job in homes:
        stored = layout.read_cell(job, row["cell"], verify=False)
        flat = layout.flatten(stored.fingerprint) if stored and not stored.damaged else {}
        if all(_same(_column(flat.get(k)), row.get(k)) for k in report.swept):
            return job
    return homes[0]


def _curve(folder: Path) -> str | None:
    try:
        curve = pd.read_csv(folder / layout.CURVE)
    except (OSError, ValueError):
        return None
    return None if curve.empty or "step" not in curve or "loss" not in curve else _json(curve_figure(curve))


def curve_figure(curve: pd.DataFrame) -> dict:
    """A training curve (curve.csv's columns) as a plotly figure: the step losses, each epoch's mean, the penalty
    where there is one, the validation loss (its IIA beside it) and the learning rate on a second axis."""
    def line(x, y, name, colour, **more) -> dict:
        return {"type": "scatter", "x": list(x), "y": list(y), "name": name, "line": {"width": 1, "color": colour}, **more}

    ends = curve.dropna(subset=["epoch_loss"]) if "epoch_loss" in curve else curve.iloc[:0]
    scored = curve.dropna(subset=["val_loss"]) if "val_loss" in curve else curve.iloc[:0]
    data = [line(curve["step"], curve["loss"], "cross-entropy", "#3b6ea8"),
            line(ends["step"], ends["epoch_loss"], "epoch mean", "#1f3b5c", mode="lines+markers")]
    if "penalty" in curve and curve["penalty"].fillna(0).abs().sum() > 0:
        data.append(line(curve["step"], curve["penalty"], "penalty", "#c0392b"))
    if not scored.empty:
        data.append(line(scored["step"], scored["val_loss"], "validation loss", "#2e8b57", mode="markers+text",
                         text=[f"IIA {v:.2f}" for v in scored["val_iia"]], textposition="top center"))
    if "lr" in curve:
        data.append(line(curve["step"], curve["lr"], "learning rate", "#999999", yaxis="y2"))
        data[-1]["line"]["dash"] = "dash"
    layout = {"height": 300, "width": 560, "margin": {"l": 50, "r": 60, "t": 20, "b": 40},
              "xaxis": {"title": {"text": "step"}}, "yaxis": {"title": {"text": "loss"}},
              "yaxis2": {"title": {"text": "learning rate"}, "overlaying": "y", "side": "right", "showgrid": False},
              "legend": {"font": {"size": 10}, "orientation": "h", "y": -0.25}}
    return {"data": data, "layout": layout}


def _heads(value: object) -> str | None:
    """The cell's head shares (its head_importance JSON) as a plotly bar chart; None without them."""
    try:
        shares = json.loads(value) if isinstance(value, str) and value else None
    except ValueError:
        return None
    return _json(heads_figure(shares)) if isinstance(shares, dict) and shares else None


def heads_figure(shares: dict) -> dict:
    """A bar per head: its share of the subspace (head_importance), as a plotly figure."""
    bars = {"type": "bar", "x": [f"head {h}" for h in shares], "y": list(shares.values()), "marker": {"color": "#3b6ea8"}}
    layout = {"height": 260, "width": 120 + 45 * len(shares), "margin": {"l": 50, "r": 10, "t": 30, "b": 40},
              "title": {"text": "share of the subspace per head", "font": {"size": 12}}, "yaxis": {"title": {"text": "share"}}}
    return {"data": [bars], "layout": layout}


def _images(folder: Path) -> list[tuple[str, str]]:
    """(file name, data URI) of the PNGs in the cell's folder that the page does not draw itself."""
    out = []
    for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        if path.name in SHOWN_FIGURES:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if len(data) <= MAX_IMAGE_BYTES:
            out.append((path.name, "data:image/png;base64," + base64.b64encode(data).decode("ascii")))
    return out


# --- small helpers -----------------------------------------------------------------------------------

def _json(figure: dict) -> str:
    """The figure as JSON (NaN as null) safe inside a <script> element."""
    text = json.dumps(_plain(figure), allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _plain(value: object) -> object:
    """Nested dicts and lists with numpy scalars as Python numbers and NaN or infinity as None."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return None if value is pd.NA else value


def _title(report: Report) -> str:
    frame = report.frame
    parts = [", ".join(dict.fromkeys(str(v) for v in frame[c].dropna())) for c in ("model", "intervention") if c in frame]
    return " · ".join(p for p in parts if p) or "das-cli run"


def _now() -> str:
    return datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _rel(root: Path, path: Path) -> str:
    root, path = Path(root), Path(path)
    return "." if path == root else (str(path.relative_to(root)) if path.is_relative_to(root) else str(path))


def _has_values(column: pd.Series) -> bool:
    return bool(column.astype(object).map(lambda v: not _nan(v) and v != "").any())


def _nan(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _is_error(value: object) -> bool:
    return not _nan(value) and str(value) != ""


def _column(value: object) -> object:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _same(a: object, b: object) -> bool:
    if _nan(a) or _nan(b):
        return _nan(a) and _nan(b)
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _sort_key(value: object) -> str:
    """What the table sorts a value on (numbers as numbers, missing last): data-v of its <td>."""
    if _nan(value):
        return ""
    return repr(float(value)) if isinstance(value, numbers.Real) and not isinstance(value, bool) else str(value)


def _number(value: object) -> str:
    """A table value as text: floats to 3 significant decimals, missing as an em dash."""
    if _nan(value):
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if value and abs(value) < 1e-3 else f"{value:.3f}"
    return str(value)
