"""dbm's mask over a basis: the PCA and SVD bases of MIB's baselines by hand, the edit, saving, and whole runs."""

import pytest
import torch

import das_cli
from das_cli import directions
from das_cli.interventions import SiteActivations, build_intervention, load_intervention

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def projector(columns: torch.Tensor) -> torch.Tensor:
    return columns @ columns.T


def values(n_rows: int = 6, width: int = 10, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, width, generator=generator) * torch.linspace(0.5, 3.0, width) + 2.0


def test_svd_basis_spans_the_raw_vectors_largest_first():
    x = values()
    basis = directions.singular_directions(x)
    assert basis.shape == (10, 6)  # rank of 6 raw vectors
    torch.testing.assert_close(basis.T @ basis, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(x @ projector(basis), x, atol=1e-4, rtol=0)  # the vectors lie in its span
    energy = (x @ basis).pow(2).sum(dim=0)
    assert (energy[:-1] >= energy[1:]).all()
    top = torch.linalg.eigh(x.T @ x).eigenvectors[:, -1]  # the largest eigenvector of the uncentred second moment
    assert abs(float(top @ basis[:, 0])) == pytest.approx(1.0, abs=1e-5)


def test_pca_basis_is_the_principal_axes_of_the_standardised_vectors():
    x = values(n_rows=30, width=4)
    basis = directions.standardised_principal_axes(x)
    assert basis.shape == (4, 4)
    z = (x - x.mean(dim=0)) / x.std(dim=0, correction=0)
    correlation = z.T @ z / len(z)
    eigen = torch.linalg.eigh(correlation)
    for k in range(4):  # eigh sorts ascending; the basis descending
        assert abs(float(eigen.eigenvectors[:, 3 - k] @ basis[:, k])) == pytest.approx(1.0, abs=1e-4)
    few = directions.standardised_principal_axes(values(n_rows=5))
    assert few.shape == (10, 4)  # 5 centred vectors span at most 4 directions


@pytest.mark.parametrize("basis", ["pca", "svd"])
def test_the_mask_swaps_the_kept_coordinates_and_the_unspanned_rest_stays_base(basis):
    intervention = build_intervention("dbm", 10, basis=basis)
    assert intervention.needs_activations and not intervention.needs_model
    x = values()
    intervention.fit_activations(SiteActivations(x, torch.zeros(6, dtype=torch.long), ["a"]))
    k = intervention.features.shape[1]
    assert intervention.logits.shape == (k,) and k < 10
    b, s = torch.randn(3, 10), torch.randn(3, 10)
    with torch.no_grad():
        intervention.logits.fill_(1.0)
    edited = intervention.eval()(b, s)
    torch.testing.assert_close(edited, b + (s - b) @ projector(intervention.features), atol=1e-5, rtol=0)
    assert not torch.allclose(edited, s, atol=1e-3)  # outside the span of the training vectors, the base stays
    with torch.no_grad():
        intervention.logits.copy_(torch.linspace(-1, 1, k))
    kept = intervention.edit_directions()
    assert kept.shape == (10, intervention.learned_dim())
    torch.testing.assert_close(intervention(b, s), b + (s - b) @ projector(kept), atol=1e-5, rtol=0)
    loaded = load_intervention("dbm", 10, {"basis": basis}, intervention.saved())
    torch.testing.assert_close(loaded(b, s), intervention(b, s))


def test_neurons_are_the_default_and_need_nothing_estimated():
    intervention = build_intervention("dbm", 4)
    assert intervention.basis == "neurons" and not (intervention.needs_activations or intervention.needs_model)
    assert set(intervention.saved()) == {"mask", "logits"}


def test_a_basis_used_before_it_is_estimated_is_an_error():
    with pytest.raises(RuntimeError, match="estimate the basis"):
        build_intervention("dbm", 4, basis="svd")(torch.zeros(1, 4), torch.ones(1, 4))


@pytest.mark.parametrize("basis", ["pca", "svd"])
def test_a_run_over_a_basis(tmp_path, basis):
    cfg = das_cli.compose(["model=tiny_llama", "layers=[1]", "positions=[last,[s2,last]]", "output.plots=false", "device=cpu",
                           "dataset.n_val=4", *TINY, "intervention=dbm", f"intervention.basis={basis}"])
    table = das_cli.run(cfg, tmp_path)
    assert len(table) == 2 and table["iia"].between(0, 1).all()
    assert "error" not in table or table["error"].isna().all()
    # 24 train pairs: 48 base and source vectors span at most 48 directions of the 64 (or 128) wide site
    assert (table["dim"] <= 48).all()
