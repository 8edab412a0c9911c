"""Heads as a grid axis: head sets, leave-one-out, cumulative (given and ranked order), head importance."""

import json

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

import das_cli
from das_cli import config as C
from das_cli import grid
from das_cli.analysis import head_importance
from das_cli.errors import DasError
from das_cli.grid import head_rankings

TINY = ["dataset.n_train=16", "dataset.n_test=8", "train.epochs=1", "train.batch_size=8", "progress=false"]


def cfg_with(**values):
    return OmegaConf.merge(C.typed(C.compose(["model=tiny_llama"])), values)


def test_head_set_modes():
    assert grid.head_sets(cfg_with(heads="each"), 3) == [(0,), (1,), (2,)]
    assert grid.head_sets(cfg_with(heads="leave_one_out"), 3) == [(1, 2), (0, 2), (0, 1)]
    assert grid.head_sets(cfg_with(heads="cumulative"), 3) == [(0,), (0, 1), (0, 1, 2)]
    assert grid.head_sets(cfg_with(heads="cumulative", head_order=[2, 0, 1]), 3) == [(2,), (2, 0), (2, 0, 1)]
    assert grid.head_sets(cfg_with(heads="cumulative", head_order="ranked"), 3, ranking=[1, 2, 0]) == [(1,), (1, 2), (1, 2, 0)]


@pytest.mark.parametrize("values,key", [({"heads": "some"}, "heads=some"), ({"heads": "each", "head_order": [0]}, "head_order")])
def test_head_mode_errors(values, key):
    with pytest.raises(DasError, match=key):
        C.validate(cfg_with(stream="head_attention_value_output", **values))


def test_head_importance_by_hand():
    # two positions x two heads of dim 2; the basis lives in head 1 at position 0 and head 0 at position 1
    basis = torch.zeros(8, 2)
    basis[2, 0] = 1.0  # position 0, head 1, coordinate 0
    basis[4, 1] = 0.6  # position 1, head 0
    basis[5, 1] = 0.8
    shares = head_importance(basis, n_positions=2, heads=(3, 5), head_dim=2)
    assert shares == pytest.approx({3: 0.5, 5: 0.5})
    shares = head_importance(basis[:, :1], n_positions=2, heads=(3, 5), head_dim=2)
    assert shares == pytest.approx({3: 0.0, 5: 1.0})


def test_rankings_order_heads_by_single_head_validation_iia():
    """Validation IIA decides (test IIA never does); without a validation split, training IIA."""
    rows = [
        {"stream": "s", "layer": 1, "position": "last", "heads": h, "iia": test, "iia_val": val, "train_iia": train}
        for h, test, val, train in (("0", 0.9, 0.1, 0.5), ("1", 0.1, 0.7, 0.2), ("2", 0.5, 0.1, 0.9),
                                    ("0+1", 0.9, 0.9, 0.9), ("3", 0.2, float("nan"), 0.3))
    ]
    assert head_rankings(rows) == {("s", 1, "last"): [1, 0, 2]}
    without_validation = [{k: v for k, v in row.items() if k != "iia_val"} for row in rows]
    assert head_rankings(without_validation) == {("s", 1, "last"): [2, 0, 3, 1]}


def test_leave_one_out_sweep_has_one_row_per_head(tmp_path):
    cfg = das_cli.compose(["stream=head_attention_value_output", "heads=leave_one_out", "layers=[1]",
                           "positions=[last]", "model=tiny_llama"] + TINY)
    table = das_cli.run(cfg, tmp_path)
    assert sorted(table["heads"]) == ["0+1+2", "0+1+3", "0+2+3", "1+2+3"]
    assert (table["width"] == 3 * 16).all()
    shares = pd.read_csv(tmp_path / "head_importance.csv")
    assert len(shares) == 4 * 3
    assert (shares.groupby("cell")["share"].sum() - 1).abs().max() < 1e-5
    for cell in table["cell"]:
        assert (tmp_path / "cells" / cell / "head_importance.png").exists()


def test_ranked_cumulative_runs_single_heads_first(tmp_path):
    cfg = das_cli.compose(["stream=head_key_output", "heads=cumulative", "head_order=ranked", "layers=[2]",
                           "positions=[last]", "model=tiny_llama"] + TINY)
    table = das_cli.run(cfg, tmp_path)
    singles = table[~table["heads"].astype(str).str.contains(r"\+")]
    assert sorted(singles["heads"].astype(str)) == ["0", "1"]  # tiny_llama has 2 key/value heads
    iia = dict(zip(singles["heads"].astype(str), singles["iia"]))
    best, other = ("0", "1") if iia["0"] >= iia["1"] else ("1", "0")
    pairs = table[table["heads"].astype(str).str.contains(r"\+")]
    assert list(pairs["heads"].astype(str)) == [f"{best}+{other}"]  # the best single head comes first


def test_attention_value_output_cells_get_head_importance(tmp_path):
    cfg = das_cli.compose(["stream=attention_value_output", "layers=[0]", "positions=[last]", "model=tiny_llama",
                           "intervention.dim=2"] + TINY)
    table = das_cli.run(cfg, tmp_path)
    shares = json.loads(table["head_importance"].iloc[0])
    assert sorted(shares) == ["0", "1", "2", "3"] and sum(shares.values()) == pytest.approx(1.0, abs=1e-5)


def test_a_figure_that_cannot_be_drawn_never_fails_its_cell(tmp_path, monkeypatch, caplog):
    """The head-share chart and the intervention's own plot are drawn after the cell is written: an error in
    either costs a warning, the cell keeps its numbers and its subspace."""
    import das_cli.cell as sweep_module
    from das_cli.interventions import Intervention

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(sweep_module, "bar_chart", broken)
    monkeypatch.setattr(Intervention, "plot", broken)
    cfg = das_cli.compose(["stream=attention_value_output", "layers=[0]", "positions=[last]", "model=tiny_llama",
                           "intervention.dim=2", "output.plots=true"] + TINY)
    table = das_cli.run(cfg, tmp_path)
    cell = table["cell"].iloc[0]
    row = json.loads((tmp_path / "cells" / cell / "metrics.json").read_text())
    assert not row.get("error") and row["iia"] == table["iia"].iloc[0] and "head_importance" in row
    assert (tmp_path / "cells" / cell / "subspace.safetensors").exists()
    skipped = [r.getMessage() for r in caplog.records if "skipped (no display)" in r.getMessage()]
    assert skipped == [f"cell {cell}: intervention plot skipped (no display); the cell is kept",
                       f"cell {cell}: head shares skipped (no display); the cell is kept"]
