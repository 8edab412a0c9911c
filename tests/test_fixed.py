"""intervention=fixed: a given subspace (file or cell folder) evaluated at every cell without training."""

import hashlib
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import das_cli
from das_cli import folder as layout
from das_cli.config import ConfigWarning
from das_cli.errors import DasError

from conftest import TINY, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = ["model=tiny_gpt2", "layers=[1]", "positions=[last]", "train.epochs=2", "output.plots=false", "device=cpu", *TINY]


def run(tmp_path, name, overrides):
    table = das_cli.run(das_cli.compose(GRID + overrides), tmp_path / name)
    return table.iloc[0]


@pytest.fixture(scope="module")
def das_cell(tmp_path_factory):
    out = tmp_path_factory.mktemp("das")
    row = das_cli.run(das_cli.compose(GRID + ["intervention=das", "intervention.dim=2"]), out).iloc[0]
    return row, layout.cell_dir(out, row["cell"])


def test_a_saved_basis_gives_the_trained_cells_iia(tmp_path, das_cell):
    trained, cell = das_cell
    basis = load_file(cell / layout.SUBSPACE)["basis"]
    np.save(tmp_path / "basis.npy", basis.numpy())
    torch.save(basis, tmp_path / "basis.pt")
    for path in (tmp_path / "basis.npy", tmp_path / "basis.pt", cell / layout.SUBSPACE, cell):
        row = run(tmp_path, f"out_{path.name}", ["intervention=fixed", f"intervention.path={path}"])
        assert row["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-6) and row["iia"] == trained["iia"]
        assert row["steps"] == 0 and row["dim"] == 2
        file = path / layout.SUBSPACE if path.is_dir() else path  # every row names the file read and its content
        assert row["subspace_file"] == str(file.resolve())
        assert row["subspace_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()


def test_a_basis_that_is_not_orthonormal_is_orthonormalised_with_a_warning(tmp_path, das_cell):
    trained, cell = das_cell
    basis = load_file(cell / layout.SUBSPACE)["basis"]
    save_file({"directions": basis @ torch.tensor([[3.0, 1.0], [0.0, 2.0]])}, tmp_path / "skewed.safetensors")
    with pytest.warns(ConfigWarning, match="not orthonormal"):
        row = run(tmp_path, "skewed", ["intervention=fixed", f"intervention.path={tmp_path / 'skewed.safetensors'}"])
    assert row["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-5)  # the same span


def test_a_mask_swaps_its_neurons_like_vanilla(tmp_path):
    mask = torch.zeros(64)
    mask[[1, 5, 9]] = 1
    torch.save(mask, tmp_path / "mask.pt")
    fixed = run(tmp_path, "fixed", ["intervention=fixed", f"intervention.path={tmp_path / 'mask.pt'}"])
    vanilla = run(tmp_path, "vanilla", ["intervention=vanilla", "intervention.neurons=[1,5,9]"])
    assert fixed["test_loss"] == pytest.approx(vanilla["test_loss"], rel=1e-6) and fixed["dim"] == 3


@pytest.mark.parametrize("tensor, message", [
    (torch.ones(3, 64), "more columns than rows"),
    (torch.tensor([0.0, 2.0, 1.0]), "0/1 mask"),
    (torch.ones(64, 2), "linearly dependent"),
    (torch.ones(2, 3, 4), "shape"),
    (torch.empty(64, 0), "shape"),
    (torch.full((64, 2), float("nan")), "NaN or Inf"),
    (torch.eye(64)[:, :2].index_put((torch.tensor([5]), torch.tensor([1])), torch.tensor(float("inf"))), "NaN or Inf"),
    (torch.eye(64)[:, :2].to(torch.complex64), "complex64 tensor; give real numbers"),
    (torch.tensor([0.0, float("nan"), 1.0]), "NaN or Inf"),
])
def test_bad_files_are_refused_on_one_line(tmp_path, tensor, message):
    torch.save(tensor, tmp_path / "bad.pt")
    with warnings.catch_warnings(), pytest.raises(DasError, match=message):
        warnings.simplefilter("ignore")
        das_cli.run(das_cli.compose(GRID + ["intervention=fixed", f"intervention.path={tmp_path / 'bad.pt'}"]), tmp_path / "o")


@pytest.mark.slow
def test_a_basis_that_does_not_fit_a_cell_names_it(tmp_path):
    np.save(tmp_path / "basis.npy", np.eye(64)[:, :2])
    result = run_cli(GRID + ["intervention=fixed", f"intervention.path={tmp_path / 'basis.npy'}",
                            "stream=[block_output,mlp_activation]", f"hydra.run.dir={tmp_path / 'o'}"])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("das-cli: error")]
    assert lines and "does not fit cell mlp_activation__L01__Plast (width 256)" in lines[0]


@pytest.mark.slow
def test_path_is_required_and_checked(tmp_path):
    for path, message in [(None, "intervention.path: required"), (tmp_path / "none.npy", "no such file"),
                          (tmp_path, "not a das-cli cell folder")]:
        extra = [] if path is None else [f"intervention.path={path}"]
        result = run_cli(GRID + ["intervention=fixed", *extra, f"hydra.run.dir={tmp_path / 'o'}"])
        assert result.returncode == 2 and message in result.stderr, result.stderr
