"""Training curves: cells/<id>/curve.csv (per step: cross-entropy, penalty, learning rate; each epoch's mean
loss on its last step) and curve.png; the same curve trained alone or in a bundle. Resumed cells continue
their curve (tests/test_checkpoint.py compares it with the uninterrupted run's)."""

import math

import pandas as pd
import pytest
from conftest import TINY

import das_cli
from das_cli import folder as layout

GRID = ["model=tiny_gpt2", "stream=[block_output,mlp_output]", "layers=[1,2]", "positions=[last]"] + TINY


def test_curve_csv_by_hand():
    curve = [(1, 1, 2.0, 0.0, 0.01), (2, 1, 1.0, 0.0, 0.009), (3, 2, 0.5, 0.25, 0.008)]
    lines = layout.curve_csv(curve).splitlines()
    assert lines == ["step,epoch,loss,penalty,lr,epoch_loss,val_iia,val_loss", "1,1,2.0,0.0,0.01,,,", "2,1,1.0,0.0,0.009,1.5,,",
                     "3,2,0.5,0.25,0.008,0.5,,"]
    scored = layout.curve_csv(curve, [(1, 0.25, 1.75), (2, 0.5, 1.25)]).splitlines()
    assert scored[2] == "2,1,1.0,0.0,0.009,1.5,0.25,1.75" and scored[3] == "3,2,0.5,0.25,0.008,0.5,0.5,1.25"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, extra in (("bundled", ["train.cells_per_step=4"]), ("alone", ["train.cells_per_step=1"])):
        folder = tmp_path_factory.mktemp(name)
        das_cli.run(das_cli.compose(GRID + ["train.epochs=3", "train.lr=0.02", "train.lr_end_factor=0.5"] + extra), folder)
        out[name] = folder
    return out


def test_every_trained_cell_has_its_curve(runs):
    folder = runs["bundled"]
    table = pd.read_csv(folder / "iia.csv")
    assert len(table) == 4
    for row in table.itertuples():
        curve = pd.read_csv(layout.curve_file(folder, row.cell))
        assert list(curve.columns) == list(layout.CURVE_COLUMNS)
        assert curve["step"].tolist() == list(range(1, row.steps + 1)) and curve["epoch"].max() == 3
        per_epoch = row.steps // 3
        assert curve["epoch"].tolist() == [1 + k // per_epoch for k in range(row.steps)]
        assert curve["lr"].iloc[0] == pytest.approx(0.02)  # linear decay to lr x lr_end_factor over the steps
        assert curve["lr"].iloc[-1] == pytest.approx(0.02 * (1 + (0.5 - 1) * (row.steps - 1) / row.steps))
        assert curve["lr"].is_monotonic_decreasing and (curve["penalty"] == 0).all()
        means = curve.dropna(subset=["epoch_loss"])
        assert means["epoch"].tolist() == [1, 2, 3]
        expected = curve.groupby("epoch")["loss"].mean().tolist()
        assert means["epoch_loss"].tolist() == pytest.approx(expected, rel=1e-12)
        assert row.loss == pytest.approx(expected[-1], rel=1e-5)  # the row's loss is the last epoch's mean
        assert layout.curve_plot_file(folder, row.cell).stat().st_size > 0


def test_a_bundled_cell_has_the_curve_it_has_alone(runs):
    for cell in pd.read_csv(runs["alone"] / "iia.csv")["cell"]:
        bundled = pd.read_csv(layout.curve_file(runs["bundled"], cell))
        alone = pd.read_csv(layout.curve_file(runs["alone"], cell))
        pd.testing.assert_frame_equal(bundled, alone, check_exact=False, rtol=1e-5, atol=1e-6)


def test_a_penalised_method_records_its_penalty(tmp_path):
    das_cli.run(das_cli.compose(["model=tiny_gpt2", "layers=[1]", "positions=[last]", "intervention=boundless_das"] + TINY), tmp_path)
    cell, = pd.read_csv(tmp_path / "iia.csv")["cell"]
    curve = pd.read_csv(layout.curve_file(tmp_path, cell))
    assert (curve["penalty"] > 0).any() and all(math.isfinite(v) for v in curve["penalty"])


def test_nothing_trained_writes_no_curve(tmp_path):
    das_cli.run(das_cli.compose(["model=tiny_gpt2", "layers=[1]", "positions=[last]", "intervention=mean_diff"] + TINY), tmp_path)
    cell, = pd.read_csv(tmp_path / "iia.csv")["cell"]
    assert not layout.curve_file(tmp_path, cell).exists() and not layout.curve_plot_file(tmp_path, cell).exists()


def test_every_epoch_adds_validation_to_the_curve_and_changes_no_number(tmp_path, runs):
    """eval.every_epoch scores each cell on the validation pairs at each epoch's end; the last epoch's is the row's
    iia_val and val loss, and the training is untouched: every number of the row and the step curve as without it."""
    args = GRID + ["train.epochs=3", "train.lr=0.02", "train.lr_end_factor=0.5", "train.cells_per_step=4", "dataset.n_val=10"]
    plain = das_cli.run(das_cli.compose(args), tmp_path / "plain").set_index("cell")
    scored = das_cli.run(das_cli.compose(args + ["eval.every_epoch=true"]), tmp_path / "scored").set_index("cell")
    numbers = [c for c in plain.columns if c != "seconds"]
    pd.testing.assert_frame_equal(scored[numbers], plain[numbers])
    for cell in plain.index:
        curve = pd.read_csv(layout.curve_file(tmp_path / "scored", cell))
        before = pd.read_csv(layout.curve_file(tmp_path / "plain", cell))
        pd.testing.assert_frame_equal(curve[["step", "loss", "lr"]], before[["step", "loss", "lr"]])
        ends = curve.dropna(subset=["val_iia"])
        assert ends["epoch"].tolist() == [1, 2, 3] and before["val_iia"].isna().all()
        assert ends["val_iia"].iloc[-1] == plain.loc[cell, "iia_val"]
