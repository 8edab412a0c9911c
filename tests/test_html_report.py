"""report.html: the one page of a run folder (html_report.py). Its content on a tiny in-process run and on a
hand-built multirun folder (two configurations, seeds, heads, a failed, a missing and a damaged cell); the
page rendered by headless Chromium (slow), which must draw it without a request leaving the file."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY

import das_cli
from das_cli import folder as layout
from das_cli import html_report
from das_cli.generalisation import Transfer
from das_cli.report import aggregate
from das_cli.results import best_cell, pivot, read_results, selection_score

GRID = ["model=tiny_gpt2", "layers=[0,1]", "positions=[s2,last]"] + TINY
PNG_1x1 = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
LOADING_ATTRIBUTES = ("src", "href", "data", "srcset", "poster", "action", "formaction", "background")


# --- reading the page --------------------------------------------------------------------------------

class Tags(HTMLParser):
    """Every start tag of a page with its attributes."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def figures(html: str, kind: str) -> list[dict]:
    """The plotly figures (JSON) of the page's `div.plot.<kind>` elements, in page order."""
    found = re.findall(rf'<div class="plot {kind}" data-figure="\w+"></div><script type="application/json">(.*?)</script>', html, re.S)
    return [json.loads(text) for text in found]


def sections(html: str) -> list[dict]:
    """The cells' <details> sections: cell id, anchor, chosen, open, and its html."""
    pattern = r'<details class="cell( best)?" id="(cell-\d+)"( open)?>\s*<summary>([^<\s]+).*?</summary>(.*?)</details>'
    return [{"cell": cell, "anchor": anchor, "best": bool(best), "open": bool(opened), "html": body}
            for best, anchor, opened, cell, body in re.findall(pattern, html, re.S)]


def table_rows(html: str) -> list[tuple[str, str, str]]:
    """(row class, anchor, cell id) of every row of the table of cells."""
    table = re.search(r'<table id="cell-table".*?</table>', html, re.S).group(0)
    return re.findall(r'<tr class="([^"]*)"><td data-v="[^"]*"><a href="#([^"]+)">([^<]+)</a>', table)


def remote_references(html: str) -> list[str]:
    """Attributes that would load or link anything from outside the file (anything not "#..." or "data:")."""
    out = []
    for tag, attrs in Tags(html).tags:
        for name in LOADING_ATTRIBUTES:
            value = (attrs.get(name) or "").strip()
            if value and not value.startswith(("#", "data:")):
                out.append(f"<{tag} {name}={value[:80]}>")
    return out + re.findall(r"url\(\s*['\"]?(?!data:)[^)]*\)", "".join(re.findall(r"<style>(.*?)</style>", html, re.S)))


# --- a tiny run --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("run")
    das_cli.run(das_cli.compose(GRID), folder)
    return folder


def test_every_run_folder_gets_a_page_with_its_identity(run):
    html = (run / html_report.PAGE).read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    record = json.loads(layout.run_file(run).read_text())
    assert set(record["versions"]) >= {"python", "das-cli", "torch", "transformers"}
    for text in ("tiny_gpt2", "io_position", f"das-cli {record['versions']['das-cli']}", f"torch {record['versions']['torch']}",
                 html_report._short_hash(record["fingerprint"]), "not recorded (no .hydra/overrides.yaml"):
        assert text in html, text
    assert "Plotly" in html and "<script src" not in html  # plotly.js inlined, not loaded


def test_every_cell_is_in_the_table_and_has_a_section_with_its_curve(run):
    html = (run / html_report.PAGE).read_text(encoding="utf-8")
    table = read_results(run / layout.TABLE)
    assert [cell for _, _, cell in table_rows(html)] == table["cell"].tolist()
    found = {section["cell"]: section for section in sections(html)}
    assert sorted(found) == sorted(table["cell"])
    for row in table.itertuples():
        section = found[row.cell]
        curve = pd.read_csv(layout.curve_file(run, row.cell))
        (figure,) = figures(section["html"], "curve")
        assert figure["data"][0]["y"] == pytest.approx(curve["loss"].tolist())
        for column in ("gain", "offmanifold", "max_z"):
            assert f"<th>{column}</th>" in section["html"]
        assert f"{getattr(row, 'max_z'):.3f}" in section["html"]


def test_the_chosen_cell_is_marked_in_the_heatmap_the_table_and_its_section(run):
    html = (run / html_report.PAGE).read_text(encoding="utf-8")
    table = read_results(run / layout.TABLE)
    key = ("block_output", "")
    layer, position = best_cell(pivot(table)[key], pivot(table, selection_score(table)[0])[key])
    chosen = table[(table["layer"] == layer) & (table["position"] == position)]["cell"].item()
    assert [cell for classes, _, cell in table_rows(html) if "best" in classes] == [chosen]
    assert [s["cell"] for s in sections(html) if s["best"] and s["open"]] == [chosen]
    heatmaps = figures(html, "heatmap")
    assert {f["layout"]["title"]["text"] for f in heatmaps} >= {"test IIA", "validation IIA"}
    positions = list(pivot(table)[key].columns)
    for figure in heatmaps:
        (shape,) = figure["layout"]["shapes"]
        assert (shape["x0"] + 0.5, shape["y0"] + 0.5) == (positions.index(position), [0, 1].index(layer))
    test_iia = next(f for f in heatmaps if f["layout"]["title"]["text"] == "test IIA")
    row = table[table["cell"] == chosen].iloc[0]
    text = test_iia["data"][0]["text"][[0, 1].index(layer)][positions.index(position)]
    assert f"[{row.iia_lo:.2f}, {row.iia_hi:.2f}]" in text  # the interval in the cell (and on hover)


def test_nothing_on_the_page_loads_from_outside_the_file(run):
    html = (run / html_report.PAGE).read_text(encoding="utf-8")
    assert remote_references(html) == []
    assert 'http-equiv="Content-Security-Policy" content="default-src \'none\';' in html
    control = '<img src="https://cdn.example/x.png"><script src="//cdn.example/p.js"></script><link href="http://x/s.css">'
    assert len(remote_references(control)) == 3  # the scan finds what it looks for


def test_a_page_that_cannot_be_built_costs_one_warning_not_the_tables(run, tmp_path, monkeypatch, caplog):
    folder = shutil.copytree(run, tmp_path / "run")
    (folder / html_report.PAGE).unlink()
    (folder / layout.TABLE).unlink()
    monkeypatch.setattr(html_report, "page_html", lambda report: 1 / 0)
    with caplog.at_level(logging.WARNING):
        report = aggregate(folder)
    assert report.ok and (folder / layout.TABLE).exists() and not (folder / html_report.PAGE).exists()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith("report.html not written: ZeroDivisionError") and "\n" not in warning
    assert not list(folder.glob(".report.html.*"))  # no temporary file left behind


def test_a_run_of_one_position(run, tmp_path):
    folder = shutil.copytree(run, tmp_path / "run")
    for cell in folder.glob(f"{layout.CELLS}/*__Ps2"):
        shutil.rmtree(cell)
    layout.grid_file(folder, 0, 1).unlink()
    (folder / html_report.PAGE).unlink()
    aggregate(folder)
    assert len(table_rows((folder / html_report.PAGE).read_text(encoding="utf-8"))) == 2


def test_no_plots_no_page(run, tmp_path):
    folder = shutil.copytree(run, tmp_path / "run")
    (folder / html_report.PAGE).unlink()
    aggregate(folder, plots=False)
    assert not (folder / html_report.PAGE).exists()


def test_starting_das_cli_imports_neither_plotly_nor_jinja2():
    code = "import sys, das_cli.cli, das_cli.report; print(sorted({m.split('.')[0] for m in sys.modules} & {'plotly', 'jinja2'}))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# --- a hand-built multirun folder --------------------------------------------------------------------

def fingerprint(lr: float) -> dict:
    return {"model": {"name": "tiny_gpt2"}, "dataset": {"name": "ioi", "variable": "io_position"},
            "intervention": {"name": "das", "dim": 1}, "train": {"lr": lr}, "data": "0" * 64}


def cell_row(cell: str, layer: int, position: str, seed: int, iia: float, **extra) -> dict:
    return {"cell": cell, "stream": "block_output", "layer": layer, "position": position, "heads": "", "intervention": "das",
            "dim": 1, "seed": seed, "iia": iia, "iia_lo": max(0.0, iia - 0.1), "iia_hi": min(1.0, iia + 0.1),
            "iia_val": iia, "train_iia": iia, "gain": 1.0, "offmanifold": 1.1, "max_z": 2.0, "n_test": 20,
            "model": "tiny_gpt2", **extra}


def write_job(job: Path, lr: float) -> None:
    """Two layers x two positions x two seeds, one head-level cell with head shares and a sparse-basis figure."""
    ids = []
    for layer in (0, 1):
        for position in ("s2", "last"):
            for seed in (0, 1):
                cell = f"block_output__L{layer:02d}__P{position}" + (f"__S{seed}" if seed else "")
                iia = 0.2 * layer + (0.3 if position == "last" else 0.0) + 0.05 * seed + lr
                layout.save_cell(job, cell, cell_row(cell, layer, position, seed, iia), {**fingerprint(lr), "seed": seed}, {}, False)
                ids.append(cell)
    heads = "attention_value_output__L01__Plast__H0+1"
    row = cell_row(heads, 1, "last", 0, 0.5, stream="attention_value_output", heads="0+1",
                   head_importance=json.dumps({"0": 0.75, "1": 0.25}))
    layout.save_cell(job, heads, row, {**fingerprint(lr), "seed": 0}, {}, False,
                     curve=type("Curve", (), {"steps": [(1, 1, 2.0, 0.0, 0.01), (2, 1, 1.5, 0.0, 0.005)], "validation": []})())
    (layout.cell_dir(job, heads) / "mask_logits.png").write_bytes(PNG_1x1)
    layout.run_file(job).write_text(json.dumps({"fingerprint": fingerprint(lr), "versions": {"python": "3.x", "torch": "9.9"}}))
    (job / ".hydra").mkdir()
    (job / ".hydra" / "overrides.yaml").write_text(f"- model=tiny_gpt2\n- train.lr={lr}\n")
    (job / "cli.log").write_text("[2026-01-02 10:00:00,001][x][INFO] - start\n[2026-01-02 10:02:05,500][x][INFO] - end\n")
    layout.grid_file(job, 0, 1).write_text(json.dumps({"cells": ids + [heads, "block_output__L02__Plast"]}))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    for k, lr in enumerate((0.01, 0.1)):
        write_job(folder / str(k), lr)
    failed = "block_output__L01__Ps2__S1"
    path = layout.metrics_file(folder / "1", failed)
    path.write_text(json.dumps({**json.loads(path.read_text()), "iia": math.nan, "error": "RuntimeError: <b>boom</b>"}))
    layout.metrics_file(folder / "1", "block_output__L00__Ps2").write_text("{ not json")
    return folder, aggregate(folder)


def test_one_page_for_a_multirun(sweep):
    folder, report = sweep
    html = (folder / html_report.PAGE).read_text(encoding="utf-8")
    assert report.swept == ["train.lr"] and "configurations differ in: train.lr" in html
    for text in ("<td>0 (", "<td>1 (", "train.lr=0.01", "train.lr=0.1", "torch 9.9", "2 min 5 s (2026-01-02 10:00:00 to 10:02:05, cli.log)"):
        assert text in html, text
    assert [cell for _, _, cell in table_rows(html)] == report.frame["cell"].tolist()
    # one heatmap group per configuration and stream, each with its chosen cell
    titles = re.findall(r"<h3>(.*?)</h3>\s*<p>chosen \(outlined\)", html)
    assert sorted(titles) == sorted(f"{s} · train.lr={lr}" for s in ("block_output", "attention_value_output heads 0+1")
                                    for lr in (0.01, 0.1))


def test_seeds_spread_head_shares_and_figures(sweep):
    folder, report = sweep
    html = (folder / html_report.PAGE).read_text(encoding="utf-8")
    assert '<h2 id="seeds">Spread over seeds</h2>' in html and "iia_std" in html
    heads = [s for s in sections(html) if s["cell"].startswith("attention_value_output")]
    assert len(heads) == 2
    for section in heads:
        (bars,) = figures(section["html"], "heads")
        assert bars["data"][0]["y"] == [0.75, 0.25]
        assert 'src="data:image/png;base64,' in section["html"] and "mask_logits.png" in section["html"]
        assert len(figures(section["html"], "curve")) == 1
    texts = [json.dumps(f["data"][0]["text"], ensure_ascii=False) for f in figures(html, "heatmap")
             if f["layout"]["title"]["text"] == "test IIA"]
    assert sum("±" in text for text in texts) == 2  # block_output, two seeds: the spread in the cell (one per lr)


def test_every_figure_is_one_plotly_accepts(run, sweep):
    """The page's figures are plain dicts (plotly's Python validation is slow); plotly's classes check them here."""
    import plotly.graph_objects as go

    for html in ((folder / html_report.PAGE).read_text(encoding="utf-8") for folder in (run, sweep[0])):
        found = [f for kind in ("heatmap", "curve", "heads") for f in figures(html, kind)]
        assert len(found) >= 8
        for figure in found:
            go.Figure(figure)  # raises on any property plotly does not know or a value it does not take


def test_failed_missing_and_damaged_cells_are_listed(sweep):
    folder, report = sweep
    html = (folder / html_report.PAGE).read_text(encoding="utf-8")
    problems = re.search(r'<table id="problems-table">(.*?)</table>', html, re.S).group(1)
    assert "<td>failed</td><td>block_output__L01__Ps2__S1</td>" in problems
    assert "RuntimeError: &lt;b&gt;boom&lt;/b&gt;" in problems and "<b>boom" not in html  # escaped
    assert "<td>damaged</td><td>1/cells/block_output__L00__Ps2</td>" in problems
    assert problems.count("<td>missing</td><td>block_output__L02__Plast</td>") == 1
    assert [cell for classes, _, cell in table_rows(html) if "failed" in classes] == ["block_output__L01__Ps2__S1"]


def test_the_transfer_table_is_shown(sweep):
    folder, report = sweep
    frame = pd.DataFrame([{"cell": "c", "trained_on": "ioi", "tested_on": "ravel", "iia": 0.25, "iia_lo": 0.1,
                           "iia_hi": 0.4, "n_test": 50}])
    html = html_report.page_html(dataclasses.replace(report, transfer=Transfer(frame, "transfer of the best cell")))
    assert '<h2 id="transfer">Transfer</h2>' in html and "transfer of the best cell" in html and "<td>ravel</td>" in html


# --- in a browser ------------------------------------------------------------------------------------

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
QUIET = ["--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]


def chromium(page: Path, tmp: Path, *flags: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile{len(list(tmp.glob('profile*')))}"
    command = [CHROMIUM, *QUIET, f"--user-data-dir={profile}", *flags, page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def page_requests(net_log: Path) -> list[str]:
    """The URLs a page asked the network for, from Chromium's net log: requests with an initiator (the page's
    origin, "null" for a file); the browser's own background requests have none ("not an origin")."""
    log = json.loads(net_log.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in log["events"]
            if e["type"] == start and e["params"].get("initiator") not in (None, "not an origin")
            and re.match(r"(https?|wss?|ftp)://", e["params"].get("url", ""))]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install -y chromium)")
def test_the_page_renders_offline_in_a_browser(run, tmp_path):
    page = run / html_report.PAGE
    net_log = tmp_path / "net.json"
    dom = chromium(page, tmp_path, f"--log-net-log={net_log}", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = page.read_text(encoding="utf-8")
    heatmaps, rows = len(figures(html, "heatmap")), len(read_results(run / layout.TABLE))
    drawn = re.findall(r'<div class="plot (\w+)[^"]*" data-figure="\w+" data-drawn="1"[^>]*>(.*?)</div><script', dom.stdout, re.S)
    assert sum(kind == "heatmap" and 'class="main-svg"' in body for kind, body in drawn) == heatmaps >= 2
    assert sum(kind == "curve" and 'class="main-svg"' in body for kind, body in drawn) == 1  # the chosen cell's, open
    assert len(re.findall(r"<tr class=", re.search(r'<table id="cell-table".*?</table>', dom.stdout, re.S).group(0))) == rows
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if re.search(r"Content Security Policy|Uncaught|Error", line)], console
    assert page_requests(net_log) == []
    # the same check sees a page that does load something
    control = tmp_path / "control.html"
    control.write_text('<img src="http://example.com/x.png"><script>fetch("https://example.org/a")</script>')
    chromium(control, tmp_path, f"--log-net-log={tmp_path / 'control.json'}", "--dump-dom")
    assert sorted(page_requests(tmp_path / "control.json")) == ["http://example.com/x.png", "https://example.org/a"]
    shot = tmp_path / "page.png"
    chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,1400", "--hide-scrollbars")
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    colours = len({tuple(p) for p in (pixels[::7, ::7] * 255).astype(int).reshape(-1, 3).tolist()})
    assert pixels.shape[:2] == (1400, 1200) and (pixels.mean(axis=2) < 0.9).mean() > 0.03 and colours > 50
