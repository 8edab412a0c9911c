"""Successive halving over cells (search=halving, halving.py): the rungs and the ranking by hand; a survivor's
numbers and tensors are the full sweep's, bit for bit trained one at a time; stopped cells keep what they had and
are never the best cell; a run stopped between rungs resumes to the same table; the prescan's cut."""

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY

from das_cli import config as C
from das_cli import halving
from das_cli.errors import DasError
from das_cli.grid import Cell
from das_cli.results import format_summary, read_results
from das_cli.sweep import run

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = ["model=tiny_llama", "layers=[0,1,2,3]", "positions=[last,-2]", *TINY, "train.epochs=4", "output.plots=false"]
HALVING = ["search=halving", "search.eta=2"]
NUMBERS = ["iia", "iia_lo", "iia_hi", "iia_val", "train_iia", "loss", "test_loss", "p_label", "logit_diff", "steps"]


@pytest.mark.parametrize("epochs,eta,first,expected", [
    (10, 3, 1, [1, 3, 10]), (10, 3, 2, [3, 10]), (27, 3, 1, [1, 3, 9, 27]), (4, 2, 1, [1, 2, 4]),
    (1, 3, 1, [1]), (10, 3, 10, [10]), (10, 2, 1, [1, 2, 5, 10]), (5, 3, 2, [5]),
])
def test_rungs_end_at_the_epochs_by_hand(epochs, eta, first, expected):
    assert halving.rung_epochs(epochs, eta, first) == expected


def cells(n: int, seeds=(None,)) -> list[Cell]:
    return [Cell("block_output", layer, ("last",), None, seed) for layer in range(n) for seed in seeds]


def test_the_top_third_goes_on_ties_by_the_lower_loss():
    grid = cells(7)
    iia = [0.1, 0.5, 0.5, 0.2, 0.0, math.nan, 0.5]
    loss = [1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 3.0]
    scores = [{"cell": c.id, "iia": i, "loss": l} for c, i, l in zip(grid, iia, loss)]
    kept = halving.rank(scores, grid, eta=3)
    assert [c.layer for c in kept] == [1, 2, 6]  # ceil(7 / 3) = 3: the three at 0.5, in any order of loss
    assert [c.layer for c in halving.rank(scores, grid, eta=4)] == [1, 2]  # ceil(7 / 4) = 2: the lower losses
    assert [c.layer for c in halving.rank(scores[:1], grid, eta=3)] == [0]  # only scored cells compete


def test_seeds_of_a_cell_are_ranked_by_their_mean_and_kept_together():
    grid = cells(3, seeds=(None, 1))
    iia = {0: (0.9, 0.0), 1: (0.5, 0.5), 2: (0.1, 0.2)}  # means 0.45, 0.5, 0.15
    scores = [{"cell": c.id, "iia": iia[c.layer][0 if c.replicate is None else 1], "loss": 1.0} for c in grid]
    kept = halving.rank(scores, grid, eta=3)
    assert [(c.layer, c.replicate) for c in kept] == [(1, None), (1, 1)]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    return run(C.compose([*GRID, "train.cells_per_step=1"]), folder), folder


@pytest.fixture(scope="module")
def halved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("halved")
    return run(C.compose([*GRID, *HALVING, "train.cells_per_step=1"]), folder), folder


def test_survivors_are_the_full_sweeps_cells_bit_for_bit(full, halved):
    (whole, whole_folder), (half, half_folder) = full, halved
    survivors = half[half["stopped"].isna()]
    assert len(survivors) == 2  # 8 -> 4 -> 2 over the rungs ending at epochs 1, 2, 4
    expected = whole.set_index("cell").loc[survivors["cell"], NUMBERS].reset_index(drop=True)
    pd.testing.assert_frame_equal(survivors[NUMBERS].reset_index(drop=True), expected, check_exact=True)
    for cell in survivors["cell"]:
        ours = load_file(half_folder / "cells" / cell / "subspace.safetensors")
        theirs = load_file(whole_folder / "cells" / cell / "subspace.safetensors")
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        curve_half = pd.read_csv(half_folder / "cells" / cell / "curve.csv")
        curve_full = pd.read_csv(whole_folder / "cells" / cell / "curve.csv")
        pd.testing.assert_frame_equal(curve_half, curve_full, check_exact=True)  # the learning rate too: one schedule


def test_stopped_cells_keep_what_they_had_and_the_decisions_are_recorded(halved):
    half, folder = halved
    table = pd.read_csv(folder / "halving.csv")
    assert table.groupby("rung")["cell"].count().tolist() == [8, 4]
    assert table.groupby("rung")["kept"].sum().tolist() == [4, 2]
    assert (table["split"] == "val").all()
    stopped = half[half["stopped"].notna()]
    for row in stopped.itertuples():
        decided = table[(table["cell"] == row.cell) & (table["rung"] == row.stopped)]
        assert len(decided) == 1 and not decided["kept"].iloc[0] and decided["epochs"].iloc[0] == row.epochs
        assert row.steps == row.epochs * 3  # 24 training pairs in batches of 8
        assert row.iia_val == pytest.approx(decided["iia"].iloc[0])  # the IIA it was ranked on is the row's
        assert not (folder / "cells" / row.cell / "checkpoint.pt").exists()
    assert set(stopped["stopped"]) == {1, 2}
    read = read_results(folder / "iia.csv")
    assert str(read["stopped"].dtype) == "Int64" and str(read["epochs"].dtype) == "Int64"


def test_a_stopped_cell_is_never_the_best_cell(halved):
    half, _ = halved
    rigged = half.copy()
    rigged.loc[rigged["stopped"].notna(), ["iia_val", "iia"]] = 1.0  # the stopped cells look best on every score
    text = format_summary(rigged)
    best = text.split("best: block_output ")[1].split()
    survivors = half[half["stopped"].isna()]
    assert (int(best[0][1:]), best[2]) in set(zip(survivors["layer"], survivors["position"].astype(str)))
    assert "successive halving over 8 cells: 2 trained to the full schedule; 4 stopped at rung 1 after 1 epoch; " \
           "2 stopped at rung 2 after 2 epochs" in text


def test_bundled_survivors_match_to_the_last_bits(full, tmp_path):
    whole, whole_folder = full
    half = run(C.compose([*GRID, *HALVING]), tmp_path)  # train.cells_per_step=auto: bundles
    survivors = half[half["stopped"].isna()]
    expected = whole.set_index("cell").loc[survivors["cell"]]
    assert survivors["iia"].tolist() == expected["iia"].tolist()
    assert survivors["loss"].to_numpy() == pytest.approx(expected["loss"].to_numpy(), rel=1e-5)
    for cell in survivors["cell"]:
        ours = load_file(tmp_path / "cells" / cell / "subspace.safetensors")
        theirs = load_file(whole_folder / "cells" / cell / "subspace.safetensors")
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)


def test_a_run_stopped_after_a_decision_resumes_to_the_same_table(halved, tmp_path, monkeypatch):
    """Stopped right after rung 1's decision is written (before the cells it stopped are): the rerun replays the
    decision, writes the stopped cells from their checkpoints and trains on to the same table."""
    half, _ = halved
    real = halving.write_decision

    def then_stop(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(halving, "write_decision", then_stop)
    cfg = C.compose([*GRID, *HALVING, "train.cells_per_step=1"])
    with pytest.raises(BaseException):
        run(cfg, tmp_path)
    assert len(list(tmp_path.glob("cells/*/checkpoint.pt"))) == 8 and not list(tmp_path.glob("cells/*/metrics.json"))
    monkeypatch.setattr(halving, "write_decision", real)
    again = run(cfg, tmp_path)
    columns = ["cell", *NUMBERS, "stopped", "epochs"]
    pd.testing.assert_frame_equal(again[columns], half[columns], check_exact=True)
    rerun = run(cfg, tmp_path)  # finished: nothing trained again
    pd.testing.assert_frame_equal(rerun[columns], half[columns], check_exact=True)


def test_the_prescans_cut_leaves_cells_untrained_with_a_row(tmp_path):
    frame = run(C.compose([*GRID, *HALVING, "search.prescan=true", "search.prescan_keep=0.5"]), tmp_path)
    untrained = frame[frame["stopped"] == 0]
    prescan = pd.read_csv(tmp_path / "prescan.csv").set_index("cell")["prescan"]
    assert len(untrained) == 4 and untrained["iia"].isna().all() and (untrained["epochs"] == 0).all()
    assert prescan[untrained["cell"]].max() <= prescan.drop(untrained["cell"]).min()  # the lower half by prescan
    assert "error" not in frame or frame["error"].isna().all()
    text = format_summary(read_results(tmp_path / "iia.csv"))
    assert "4 never trained (below the prescan's cut)" in text and "failed" not in text
    assert (pd.read_csv(tmp_path / "halving.csv").groupby("rung")["cell"].count().tolist() == [4, 2])


def test_a_halving_folder_is_not_resumed_as_a_full_sweep(halved):
    _, folder = halved
    with pytest.raises(DasError, match="changed: search"):
        run(C.compose([*GRID, "train.cells_per_step=1"]), folder)


@pytest.mark.parametrize("overrides,message", [
    (["search.eta=1"], "search.eta=1: must be a whole number >= 2"),
    (["search.min_epochs=20"], "search.min_epochs=20: must be between 1 and train.epochs=10"),
    (["search.prescan_keep=0.5"], "search.prescan_keep=0.5: needs the prescan's scores; add search.prescan=true"),
    (["search.prescan_keep=0"], "search.prescan_keep=0.0: must be above 0 and at most 1"),
    (["heads=cumulative", "head_order=ranked", "stream=head_attention_value_output"], "search=halving: head_order=ranked"),
    (["intervention=mean_diff"], "search=halving: intervention=mean_diff is estimated, not trained"),
])
def test_bad_halving_settings_are_one_line(overrides, message):
    with pytest.raises(DasError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        C.checked(C.compose(["search=halving", *overrides]))


def test_halving_keys_belong_to_search_halving():
    with pytest.raises(DasError, match="search.eta: unknown key in search; valid keys: name, prescan; "
                                       "search.eta belongs to search=halving"):
        C.compose(["search.eta=3"])
    assert "search" not in C.fingerprint(C.checked(C.compose([])))
    assert C.fingerprint(C.checked(C.compose(["search=halving"])))["search"] == {"name": "halving", "eta": 3, "min_epochs": 1,
                                                                             "prescan_keep": 1.0}
    assert "prescan" not in json.dumps(C.fingerprint(C.checked(C.compose(["search.prescan=true"]))))


def test_the_plan_counts_the_rungs_share():
    assert halving.cells_per_rung(90, 10, 3, 1) == [(90, 1), (30, 3), (10, 10)]
    assert halving.epoch_share(90, 10, 3, 1) == pytest.approx((90 * 1 + 30 * 2 + 10 * 7) / 900)
    assert halving.cells_per_rung(90, 10, 3, 1, keep=0.34) == [(31, 1), (11, 3), (4, 10)]
    from das_cli.plan import make_plan

    full = make_plan(C.checked(C.compose(["model=tiny_llama", "layers=all", *TINY])), None)
    halved = make_plan(C.checked(C.compose(["model=tiny_llama", "layers=all", *TINY, "search=halving", "search.eta=2", "train.epochs=4"])), None)
    assert any("search=halving: 4 cells to epoch 1 -> 2 cells to epoch 2 -> 1 cells to epoch 4" in n for n in halved.notes)
    assert not any("halving" in n for n in full.notes)


def test_each_shard_halves_its_own_cells_into_one_table(tmp_path):
    for shard in (0, 1):
        run(C.compose([*GRID, *HALVING, f"sweep.shard={shard}", "sweep.num_shards=2"]), tmp_path)
    tables = [pd.read_csv(tmp_path / f"halving.shard{s}of2.csv") for s in (0, 1)]
    assert [t[t["rung"] == 1]["cell"].count() for t in tables] == [4, 4]  # 4 cells each: 4 -> 2 -> 1
    assert [int(t[t["rung"] == 2]["kept"].sum()) for t in tables] == [1, 1]
    frame = read_results(tmp_path / "iia.csv")
    assert len(frame) == 8 and int(frame["stopped"].isna().sum()) == 2


def test_seeds_of_a_cell_go_on_or_stop_together(tmp_path):
    frame = run(C.compose([*GRID, *HALVING, "seeds=2", "layers=[0,1]"]), tmp_path)
    assert len(frame) == 8
    for _, group in frame.groupby(["layer", "position"], observed=True):
        assert group["stopped"].isna().all() or group["stopped"].notna().all()
        assert group["stopped"].nunique(dropna=False) == 1
