"""Controls (analysis.control): the label permutation, the re-drawn model, the selectivity interval by hand,
and whole runs that join the control's cells to the run's."""

import json

import pytest
import torch

import das_cli
from das_cli import config as C
from das_cli.controls import control_columns, control_model, difference_interval, shuffled_labels
from das_cli.data import PairGroup, PairSet
from das_cli.errors import DasError
from das_cli.scores import wilson_interval

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_selectivity_interval_is_newcombes():
    """Newcombe (1998), example (a): 56/70 against 48/80, method 10 gives [0.0524, 0.3339]."""
    low, high = difference_interval((56 / 70, *wilson_interval(56, 70)), (48 / 80, *wilson_interval(48, 80)))
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


def test_control_columns():
    row = {"iia": 0.8, "iia_lo": 0.7, "iia_hi": 0.9}
    columns = control_columns(row, {"iia": 0.5, "iia_lo": 0.4, "iia_hi": 0.6})
    assert columns["iia_control"] == 0.5 and columns["selectivity"] == pytest.approx(0.3)
    assert columns["selectivity_lo"] == pytest.approx(0.3 - (0.1**2 + 0.1**2) ** 0.5)
    assert control_columns(row, None) == {} and control_columns(row, {"iia": float("nan")}) == {}


def group(labels: torch.Tensor) -> PairGroup:
    n = len(labels)
    return PairGroup(torch.zeros(n, 3, dtype=torch.long), torch.zeros(n, 3, dtype=torch.long), labels,
                     torch.full((n, 1), -1), {"last": torch.full((n,), 2)}, {"last": torch.full((n,), 2)})


def test_shuffled_labels_permute_the_labels_among_all_pairs():
    labels = torch.arange(20).view(10, 2)
    pairs = PairSet([group(labels[:4]), group(labels[4:])])
    shuffled = shuffled_labels(pairs, seed=3)
    assert shuffled.sizes == [4, 6]
    together = torch.cat([g.labels for g in shuffled.groups])
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, labels.tolist()))  # whole labels move
    assert not torch.equal(together, labels)
    assert torch.equal(torch.cat([g.labels for g in shuffled_labels(pairs, seed=3).groups]), together)  # the seed decides
    assert not torch.equal(torch.cat([g.labels for g in shuffled_labels(pairs, seed=4).groups]), together)
    assert torch.equal(pairs.groups[0].labels, labels[:4])  # the run's pairs are untouched
    single = shuffled_labels(PairSet([group(torch.arange(5))]), seed=0).groups[0].labels
    assert single.shape == (5,) and sorted(single.tolist()) == list(range(5))


def test_control_model_redraws_every_weight_by_seed():
    from das_cli.models import load_model

    lm = load_model(C.compose(["model=tiny_llama"]).model, "cpu", "float32")
    first, again, other = control_model(lm, 1), control_model(lm, 1), control_model(lm, 2)
    assert first.tokenizer is lm.tokenizer and first.n_layers == lm.n_layers and first.family == lm.family
    for (name, real), fresh, same, different in zip(lm.model.named_parameters(), first.model.parameters(),
                                                     again.model.parameters(), other.model.parameters()):
        assert torch.equal(fresh, same), name
        if real.std() > 0:  # norms start at one in both
            assert not torch.equal(real, fresh) and not torch.equal(fresh, different), name


def run(folder, control, *extra):
    cfg = das_cli.compose(["model=tiny_llama", "layers=[1,2]", "positions=[last]", "output.plots=false", "device=cpu",
                           "dataset.n_val=4", *TINY, f"analysis.control={control}", *extra])
    return das_cli.run(cfg, folder)


@pytest.mark.parametrize("control", ["random_model", "shuffled_labels"])
def test_a_run_with_a_control_joins_its_cells(tmp_path, control):
    table = run(tmp_path, control)
    assert len(table) == 2  # the control's cells are not rows of their own
    controlled = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "control" / "cells").glob("*/metrics.json")}
    assert sorted(controlled) == sorted(table["cell"])
    for row in table.itertuples():
        assert row.iia_control == controlled[row.cell]["iia"]
        assert row.selectivity == pytest.approx(row.iia - row.iia_control)
        assert row.selectivity_lo <= row.selectivity <= row.selectivity_hi
    fingerprint = json.loads((tmp_path / "control" / "run.json").read_text())["fingerprint"]
    assert fingerprint["analysis"]["control"] == control
    again = run(tmp_path, control)  # resumed: nothing trained again, the same table
    assert again.drop(columns="seconds").equals(table.drop(columns="seconds"))


def test_a_method_that_trains_nothing_scores_the_same_under_shuffled_labels(tmp_path):
    table = run(tmp_path, "shuffled_labels", "intervention=vanilla")  # vanilla trains nothing: the control scores the same
    assert (table["iia_control"] == table["iia"]).all() and (table["selectivity"] == 0).all()


def test_without_a_control_the_fingerprint_is_the_one_before_controls():
    parts = C.fingerprint(C.compose([]))
    assert "control" not in parts["analysis"] and "control_seed" not in parts["analysis"]
    assert C.fingerprint(C.compose(["analysis.control=random_model"]))["analysis"]["control_seed"] == 1
    dbm = C.fingerprint(C.compose(["intervention=dbm"]))["intervention"]
    assert set(dbm) == {"name", "temperature_start", "temperature_end", "l1_weight"}  # as before bases existed
    assert "jacobian_steps" in C.fingerprint(C.compose(["intervention=sparse_basis"]))["intervention"]
    assert "jacobian_steps" not in C.fingerprint(C.compose(["intervention=dbm", "intervention.basis=pca"]))["intervention"]


@pytest.mark.parametrize("overrides, message", [
    (["analysis.control=shuffled"], "analysis.control=shuffled: valid choices: none, random_model, shuffled_labels"),
])
def test_bad_control_is_one_line(overrides, message):
    with pytest.raises(DasError, match=message):
        C.checked(C.compose(overrides))
