"""from_run=<run folder>: a finished run's saved interventions evaluated on other data, nothing trained."""

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import das_cli
from das_cli import folder as layout
from das_cli.errors import DasError

from conftest import TINY, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = ["model=tiny_gpt2", "layers=[0,1]", "positions=[last]", "train.epochs=2", "output.plots=false", "device=cpu",
        *TINY, "dataset.n_val=8"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("source")
    table = das_cli.run(das_cli.compose(GRID + ["intervention=das", "intervention.dim=2"]), out)
    return out, table


def test_the_source_dataset_reproduces_the_source_iia(tmp_path, source):
    folder, trained = source
    table = das_cli.run(das_cli.compose(GRID + [f"from_run={folder}"]), tmp_path)
    merged = trained.merge(table, on="cell", suffixes=("_src", ""))
    assert len(merged) == 2
    assert (merged["iia"] == merged["iia_src"]).all() and (merged["iia_val"] == merged["iia_val_src"]).all()
    assert merged["test_loss"].tolist() == pytest.approx(merged["test_loss_src"].tolist(), rel=1e-6)
    assert (table["steps"] == 0).all() and (table["intervention"] == "das").all()
    assert set(table["trained_in"]) == {str(folder.resolve())}
    assert (merged["train_iia"] == merged["train_iia_src"]).all()


def test_the_grid_is_narrowed_by_a_grid_key_given(tmp_path, source):
    folder, _ = source
    table = das_cli.run(das_cli.compose(GRID[:1] + GRID[2:] + ["layers=[1]", f"from_run={folder}"]), tmp_path)
    assert table["layer"].tolist() == [1]


def test_estimated_baselines_keep_the_source_directions(tmp_path):
    das_cli.run(das_cli.compose(GRID + ["intervention=mean_diff"]), tmp_path / "src")
    das_cli.run(das_cli.compose(GRID + ["dataset.seed=7", f"from_run={tmp_path / 'src'}"]), tmp_path / "new")
    for cell_id in layout.cell_ids(tmp_path / "src"):
        before = load_file(layout.subspace_file(tmp_path / "src", cell_id))["basis"]
        after = load_file(layout.subspace_file(tmp_path / "new", cell_id))["basis"]
        assert torch.equal(before, after)  # not re-estimated on the new prompts


def test_another_dataset_is_evaluated(tmp_path, source):
    folder, _ = source
    other = [o for o in GRID if not o.startswith("dataset.")] + ["dataset=ioi_file", f"from_run={folder}"]
    table = das_cli.run(das_cli.compose(other), tmp_path)
    assert len(table) == 2 and (table["steps"] == 0).all() and table["n_test"].iloc[0] > 0


def test_a_cell_that_does_not_fit_the_model_is_named(tmp_path):
    das_cli.run(das_cli.compose(GRID + ["stream=mlp_activation", "layers=[0]"]), tmp_path / "src")
    result = run_cli(["model=tiny_llama", *GRID[1:], f"from_run={tmp_path / 'src'}", f"hydra.run.dir={tmp_path / 'o'}"])
    assert result.returncode == 2
    line = next(x for x in result.stderr.splitlines() if x.startswith("das-cli: error"))
    assert "cell mlp_activation__L00__Plast was trained on width 256; its site here is 128 wide" in line


def test_a_folder_that_is_no_run_is_refused(tmp_path):
    with pytest.raises(DasError, match="not a das-cli run folder"):
        das_cli.run(das_cli.compose(GRID + [f"from_run={tmp_path}"]), tmp_path / "o")
