"""Results tables, pivots, heatmaps and summary on small hand-built rows with known IIA."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from das_cli.results import (
    COLUMNS, format_summary, heatmap, pivot, read_results, results_frame, write_results,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POSITIONS = ["last", "-2"]  # grid order; alphabetical would put "-2" first

# Known IIA per (stream, layer, position); values like 0.1 * 3 and 1/3 are not short decimals, so the
# CSV round-trip must write full precision.
IIA = {
    ("block_output", layer, position): (0.1 * (layer + 1) if position == "last" else 0.05 * layer)
    for layer in range(3) for position in POSITIONS
}
IIA |= {("attention_output", layer, position): 1 / 3 + 0.1 * layer for layer in range(3) for position in POSITIONS}


def row(stream: str, layer: int, position: str, iia: float, **extra) -> dict:
    return {
        "stream": stream, "layer": layer, "position": position, "heads": "", "intervention": "das",
        "dim": 1, "seed": 0, "iia": iia, "train_iia": min(1.0, iia + 0.1), "loss": 0.25 + iia,
        "base_accuracy": 0.95, "n_train": 20, "n_test": 10, "seconds": 1.5, **extra,
    }


@pytest.fixture
def rows() -> list[dict]:
    # stream order reversed and layers descending, so sorting has work to do
    return [
        row(stream, layer, position, IIA[stream, layer, position], cell=f"{stream}-{layer}-{position}")
        for stream in ("block_output", "attention_output")
        for layer in (2, 1, 0)
        for position in POSITIONS
    ]


def test_columns_first_then_extras(rows):
    rows[0]["error"] = "boom"
    frame = results_frame(rows)
    assert list(frame.columns) == COLUMNS + ["cell", "error"]
    assert frame["error"].isna().sum() == len(rows) - 1


def test_missing_columns_are_na_and_heads_default_empty():
    frame = results_frame([{"stream": "block_output", "layer": 0, "position": "last", "iia": 0.5}])
    assert list(frame.columns) == COLUMNS
    assert frame.loc[0, "heads"] == ""
    assert frame[["intervention", "dim", "loss", "seconds"]].isna().all().all()


def test_sorted_by_stream_heads_layer_then_first_appearance_position(rows):
    frame = results_frame(rows)
    keys = list(zip(frame["stream"], frame["layer"], frame["position"].astype(str)))
    expected = [(s, layer, p) for s in ("attention_output", "block_output") for layer in range(3) for p in POSITIONS]
    assert keys == expected


def test_grid_order_survives_when_a_later_layer_shows_it_first():
    rows = [row("block_output", 1, p, 0.5) for p in ("io", "s2", "last")]
    rows += [row("block_output", 0, p, 0.5) for p in ("last", "io")]  # layer 0 lacks s2
    frame = results_frame(rows)
    assert list(frame["position"].astype(str)) == ["io", "last", "io", "s2", "last"]
    assert list(pivot(frame)["block_output", ""].columns) == ["io", "s2", "last"]


def test_pivot_shape_values_and_mean_of_duplicates(rows):
    rows.append(row("block_output", 1, "last", 0.6, seed=1))  # second seed: cell mean (0.2 + 0.6) / 2
    tables = pivot(results_frame(rows))
    assert list(tables) == [("attention_output", ""), ("block_output", "")]
    table = tables["block_output", ""]
    assert table.shape == (3, 2)
    assert list(table.index) == [0, 1, 2]
    assert list(table.columns) == POSITIONS
    assert table.loc[1, "last"] == pytest.approx(0.4)
    assert table.loc[2, "last"] == pytest.approx(0.3)
    assert table.loc[2, "-2"] == pytest.approx(0.1)


def test_pivot_other_value_and_head_groups(rows):
    rows.append(row("attention_output", 1, "last", 0.9, heads="0+3"))
    tables = pivot(results_frame(rows), value="train_iia")
    assert ("attention_output", "0+3") in tables
    assert tables["attention_output", "0+3"].shape == (1, 1)
    assert tables["attention_output", "0+3"].loc[1, "last"] == pytest.approx(1.0)


def test_write_results_files_and_round_trip(rows, tmp_path):
    rows.append(row("attention_output", 1, "last", 0.9, heads="0+3"))
    rows.append(row("block/out put", 0, "last", 0.5))
    frame = write_results(rows, tmp_path, title="SmolLM2-135M · das (dim 1) · IOI io_position")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([
        "iia.csv",
        "pivot_attention_output.csv", "heatmap_attention_output.png",
        "pivot_attention_output_heads-0+3.csv", "heatmap_attention_output_heads-0+3.png",
        "pivot_block_output.csv", "heatmap_block_output.png",
        "pivot_block_out_put.csv", "heatmap_block_out_put.png",
    ])
    for png in tmp_path.glob("*.png"):
        assert png.stat().st_size > 0 and png.read_bytes()[:8] == PNG_MAGIC

    back = read_results(tmp_path / "iia.csv")
    pd.testing.assert_frame_equal(back, frame, check_categorical=False)
    by_cell = {r["cell"]: r["iia"] for r in rows if "cell" in r}
    assert all(by_cell[c] == v for c, v in zip(back["cell"], back["iia"]) if isinstance(c, str))  # exact floats


def test_pivot_csv_matches_pivot(rows, tmp_path):
    frame = write_results(rows, tmp_path)
    table = pd.read_csv(tmp_path / "pivot_block_output.csv", index_col="layer")
    assert list(table.columns) == POSITIONS
    assert (table.to_numpy() == pivot(frame)["block_output", ""].to_numpy()).all()


def test_heatmap_with_nan_cell(tmp_path):
    table = pd.DataFrame([[0.5, math.nan], [1.0, 0.0]], index=[0, 1], columns=["io", "last"])
    heatmap(table, tmp_path / "h.png", "test")
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]  # no temporary file left behind


def test_format_summary_best_cell_and_mib_mean(rows):
    text = format_summary(results_frame(rows))
    # block_output per-layer max over positions: 0.1, 0.2, 0.3 -> mean 0.20; best L2 @ last 0.30
    assert "best: block_output L2 @ last  IIA 0.30" in text
    # attention_output: 1/3 + 0.1 * layer -> max 0.333, 0.433, 0.533 -> mean 0.433
    assert "best: attention_output L2 @ last  IIA 0.53" in text
    block = text.split("\n\n")[1]
    assert "mean over layers of the max over positions: 0.20" in block
    assert "mean over layers of the max over positions: 0.43" in text.split("\n\n")[0]


def test_best_cell_is_chosen_on_validation_never_on_test(rows):
    for r in rows:  # validation prefers layer 0 @ last of block_output, test prefers layer 2
        r["iia_val"] = 0.9 if (r["stream"], r["layer"], r["position"]) == ("block_output", 0, "last") else 0.2
        r["iia_isolate"] = 0.5 + 0.1 * r["layer"]
    text = format_summary(results_frame(rows)).split("\n\n")[1]
    assert "best: block_output L0 @ last  IIA 0.10  (chosen on validation IIA 0.90)" in text
    assert "  at this cell: iia_isolate 0.50" in text
    for r in rows:
        del r["iia_val"]
    text = format_summary(results_frame(rows)).split("\n\n")[1]
    assert "best: block_output L2 @ last  IIA 0.30  (chosen on training IIA 0.40)" in text


def test_mib_average_is_named_only_over_every_layer(rows):
    for r in rows:
        r["model_layers"] = 3
    text = format_summary(results_frame(rows)).split("\n\n")[1]
    assert "mean over layers of the max over positions: 0.20 (MIB average: all 3 layers)" in text
    for r in rows:
        r["model_layers"] = 30
    text = format_summary(results_frame(rows)).split("\n\n")[1]
    assert "mean over layers of the max over positions: 0.20 (3 of 30 layers; not MIB's average" in text


def test_nan_cells_are_kept_in_pivot_and_skipped_by_summary(rows, tmp_path):
    for r in rows:
        if r["stream"] == "block_output" and r["layer"] == 2:
            r["iia"], r["error"] = math.nan, "out of memory"
    frame = write_results(rows, tmp_path)
    table = pivot(frame)["block_output", ""]
    assert table.loc[2].isna().all()
    text = format_summary(frame).split("\n\n")[1]
    # layer 2 failed: best becomes L1 @ last 0.20; mean of per-layer max over layers 0, 1 = (0.1 + 0.2) / 2
    assert "best: block_output L1 @ last  IIA 0.20" in text
    assert "mean over layers of the max over positions: 0.15" in text
    assert "2 failed cells skipped" in text and "—" in text


def test_all_failed_and_empty():
    frame = results_frame([row("block_output", 0, "last", math.nan)])
    assert "best: none" in format_summary(frame)
    assert format_summary(results_frame([])) == "no results"
    assert list(results_frame([]).columns) == COLUMNS
