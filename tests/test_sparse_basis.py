"""The sparse-Jacobian rotation: the measure by hand, orthogonality, and recovery of a planted basis."""

import pytest
import torch

from das_cli.sparse_basis import Rotation, fit_rotation, normalised, rotate, sparsity, zeros_fraction

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sparsity_by_hand():
    a = torch.tensor([[0.0, 1.0], [0.4, -0.9]])
    assert float(sparsity(a)) == pytest.approx(-(1 / 0.1 + 1 / 1.1 + 1 / 0.5 + 1 / 1.0))
    assert float(sparsity(torch.zeros(2, 2))) == pytest.approx(-40.0)  # the sparsest 2 x 2: every entry zero


def test_normalised_and_zeros():
    a = torch.tensor([[[0.0, 4.0], [-8.0, 0.004]], [[1.0, 1e-4], [0.5, 0.0]]])
    assert normalised(a).abs().amax(dim=(-2, -1)).tolist() == [1.0, 1.0]
    assert zeros_fraction(a) == pytest.approx(4 / 8)  # 0, 0.004 < 8e-3 in the first; 1e-4 and 0 in the second


def test_rotation_is_orthogonal_for_any_generator():
    rotation = Rotation(6)
    with torch.no_grad():
        rotation.generator.normal_(0, 3.0)
    r = rotation()
    torch.testing.assert_close(r.T @ r, torch.eye(6), atol=1e-5, rtol=0)


def planted(seed: int, n: int = 5, prompts: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A rotation Q and per-prompt sparse matrices (30% nonzero, |entries| in [0.5, 1.5])."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=generator))[0]
    mask = torch.rand(prompts, n, n, generator=generator) < 0.3
    values = torch.randn(prompts, n, n, generator=generator).sign() * (0.5 + torch.rand(prompts, n, n, generator=generator))
    return q, values * mask


def assert_signed_permutation(m: torch.Tensor) -> None:
    assert (m.abs().amax(dim=1) > 0.999).all() and (m.abs().amax(dim=0) > 0.999).all(), m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_a_planted_basis_on_the_output_side(seed):
    q, sparse = planted(seed)
    jacobians = q.T @ sparse  # the producing map's Jacobian is sparse in the coordinates q x
    fit = fit_rotation({"output": jacobians}, steps=300, restarts=3)
    assert_signed_permutation(fit.rotation @ q.T)
    target = float(sparsity(rotate(normalised(jacobians), q, "output")).mean())
    assert fit.sparsity_after < fit.sparsity_before and fit.sparsity_after == pytest.approx(target, abs=1.0)
    assert fit.zeros_after > fit.zeros_before + 0.3
    assert len(fit.history) == 300 and fit.history[-1] < fit.history[0]


def test_recovers_a_planted_basis_on_the_input_side_and_both():
    q, sparse = planted(3)
    reading = sparse @ q  # the reading map's Jacobian is sparse when its input is rotated by q
    assert_signed_permutation(fit_rotation({"input": reading}, steps=300, restarts=3).rotation @ q.T)
    _, producing = planted(4)
    both = fit_rotation({"output": q.T @ producing, "input": reading}, steps=300, restarts=3)
    assert_signed_permutation(both.rotation @ q.T)


def test_bad_jacobians():
    with pytest.raises(ValueError, match="give 'output' and/or 'input'"):
        fit_rotation({"sideways": torch.zeros(1, 2, 2)})
    with pytest.raises(ValueError, match="width differs"):
        fit_rotation({"output": torch.zeros(1, 3, 4), "input": torch.zeros(1, 4, 2)})
