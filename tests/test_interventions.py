"""Hand-computed checks of the intervention maths."""

import math
import os
import tempfile
from pathlib import Path

import pytest
import torch

from das_cli.errors import DasError
from das_cli.interventions import (
    INTERVENTIONS,
    BoundlessDASIntervention,
    DASIntervention,
    SiteActivations,
    VanillaIntervention,
    build_intervention,
    project_swap,
)

N = 8


def make(name: str, n: int = N):
    """The intervention with its default options (dim 3 for das); those estimated from data are fitted on random vectors."""
    options = {"das": {"dim": 3}, "fixed": {"path": fixed_basis_file(n)}}.get(name, {})
    module = build_intervention(name, n, **options)
    if module.needs_activations:
        module.fit_activations(SiteActivations(torch.randn(30, n), torch.arange(30) % 3, ["x", "y", "z"]))
    if module.needs_model:  # sparse_basis: its rotation from random Jacobians
        module.fit_jacobians({"output": torch.randn(4, n, 5)})
    return module


def fixed_basis_file(n: int) -> str:
    """intervention=fixed reads its subspace from a file: two orthonormal columns of width n."""
    path = Path(tempfile.gettempdir()) / f"das_cli_test_fixed_basis_{os.getpid()}_{n}.pt"
    torch.save(torch.linalg.qr(torch.randn(n, 2, generator=torch.Generator().manual_seed(3)))[0], path)
    return str(path)


def train_a_little(module, steps: int = 5):
    """A few Adam steps on an arbitrary loss, so parameters move away from their initial values."""
    torch.manual_seed(1)
    groups = module.param_groups(0.1)
    if not groups:
        return
    opt = torch.optim.Adam(groups)
    target = torch.randn(4, module.n)
    for step in range(steps):
        module.set_progress(step / steps)
        out = module(torch.randn(4, module.n), torch.randn(4, module.n))
        loss = ((out - target) ** 2).mean() + module.extra_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()


def orthonormal(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g))[0]


# --- identities that hold for every intervention --------------------------------------


@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
@pytest.mark.parametrize("trained", [False, True])
def test_source_equal_base_gives_base(name, trained):
    torch.manual_seed(0)
    module = make(name)
    if trained:
        train_a_little(module)
    b = torch.randn(5, N)
    with torch.no_grad():
        out = module(b, b.clone())
    torch.testing.assert_close(out, b, rtol=0, atol=1e-6)


def test_full_rank_is_full_swap():
    torch.manual_seed(0)
    b, s = torch.randn(5, N), torch.randn(5, N)
    with torch.no_grad():
        torch.testing.assert_close(DASIntervention(N, dim=N)(b, s), s, rtol=0, atol=1e-5)
        assert torch.equal(VanillaIntervention(N)(b, s), s)
        boundless = BoundlessDASIntervention(N, init_boundary=1.0, temperature_end=1e-4)
        boundless.set_progress(1.0)
        torch.testing.assert_close(boundless(b, s), s, rtol=0, atol=1e-5)


# --- DAS: the projection view ----------------------------------------------------------


def test_projection_symmetric_idempotent_and_splits_base_and_source():
    torch.manual_seed(0)
    das = DASIntervention(N, dim=3)
    W = das.W.detach()
    torch.testing.assert_close(W.T @ W, torch.eye(3), rtol=0, atol=1e-6)
    P = W @ W.T
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-7)
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-6)

    b, s = torch.randn(5, N), torch.randn(5, N)
    with torch.no_grad():
        h = das(b, s)
    torch.testing.assert_close(h @ W, s @ W, rtol=0, atol=1e-5)  # Wᵀ h = Wᵀ s
    I = torch.eye(N)
    torch.testing.assert_close(h @ (I - P), b @ (I - P), rtol=0, atol=1e-5)  # (I − P) h = (I − P) b


def test_hand_example_4d_span_e2_e3():
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # [a, b, c, d]
    s = torch.tensor([[5.0, 6.0, 7.0, 8.0]])  # [e, f, g, h]
    expected = torch.tensor([[1.0, 6.0, 7.0, 4.0]])  # [a, f, g, d]
    basis = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # e2, e3
    assert torch.equal(project_swap(b, s, basis), expected)

    das = DASIntervention(4, dim=2)
    # A rotated basis of the same plane gives the same swap.
    c, si = math.cos(0.3), math.sin(0.3)
    das.set_basis(basis @ torch.tensor([[c, -si], [si, c]]))
    with torch.no_grad():
        torch.testing.assert_close(das(b, s), expected, rtol=0, atol=1e-5)


def test_rotation_view_equals_projection_view():
    n, k = 6, 2
    W = orthonormal(n, k)
    # Complete W to a full orthonormal basis: the first k rows of R span the subspace.
    Q, _ = torch.linalg.qr(torch.cat([W, torch.randn(n, n - k)], dim=1))
    R = Q.T  # rows of R are the rotated axes; R⁻¹ = Rᵀ
    torch.testing.assert_close((R[:k].T @ R[:k]), W @ W.T, rtol=0, atol=1e-6)  # same subspace as W

    b, s = torch.randn(3, n), torch.randn(3, n)
    rb, rs = b @ R.T, s @ R.T  # R b, R s for each row
    rb[:, :k] = rs[:, :k]
    rotation_view = rb @ R  # R⁻¹ (R b ←[:k] R s)
    torch.testing.assert_close(rotation_view, project_swap(b, s, W), rtol=0, atol=1e-5)

    das = DASIntervention(n, dim=k)
    das.set_basis(W)
    with torch.no_grad():
        torch.testing.assert_close(das(b, s), rotation_view, rtol=0, atol=1e-5)


def test_das_gradients_flow_and_basis_stays_orthonormal():
    torch.manual_seed(0)
    das = DASIntervention(N, dim=2)
    out = das(torch.randn(4, N), torch.randn(4, N))
    out.sum().backward()
    grads = [p.grad for p in das.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    train_a_little(das, steps=10)
    W = das.W.detach()
    torch.testing.assert_close(W.T @ W, torch.eye(2), rtol=0, atol=1e-5)


def test_das_thin_basis_stores_no_square_matrix():
    das = DASIntervention(1000, dim=2)
    sizes = [t.numel() for t in list(das.parameters()) + list(das.buffers())]
    assert max(sizes) == 1000 * 2


def test_das_init_is_deterministic_under_seed():
    torch.manual_seed(3)
    a = DASIntervention(N, dim=2).W.detach()
    torch.manual_seed(3)
    b = DASIntervention(N, dim=2).W.detach()
    torch.manual_seed(4)
    c = DASIntervention(N, dim=2).W.detach()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("orthogonal_map", ["householder", "matrix_exp", "cayley"])
def test_das_orthogonal_maps(orthogonal_map):
    das = DASIntervention(N, dim=3, orthogonal_map=orthogonal_map)
    W = orthonormal(N, 3)
    das.set_basis(W)
    torch.testing.assert_close(das.W.detach(), W, rtol=0, atol=1e-5)
    train_a_little(das)
    torch.testing.assert_close(das.W.detach().T @ das.W.detach(), torch.eye(3), rtol=0, atol=1e-5)


def test_das_saved():
    das = DASIntervention(N, dim=3)
    state = das.saved()
    assert list(state) == ["basis"]
    basis = state["basis"]
    assert basis.shape == (N, 3) and basis.dtype == torch.float32 and basis.is_contiguous()
    assert basis.device.type == "cpu" and not basis.requires_grad
    assert das.learned_dim() == 3


# --- dtype ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
def test_bfloat16_in_bfloat16_out(name):
    torch.manual_seed(0)
    module = make(name)
    b, s = torch.randn(2, N), torch.randn(2, N)
    with torch.no_grad():
        out = module(b.bfloat16(), s.bfloat16())
        ref = module(b.bfloat16().float(), s.bfloat16().float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_leading_dimensions_are_kept():
    das = DASIntervention(N, dim=2)
    b, s = torch.randn(2, 3, N), torch.randn(2, 3, N)
    with torch.no_grad():
        out = das(b, s)
        torch.testing.assert_close(out[1, 2], das(b[1, 2:3], s[1, 2:3])[0])
    assert out.shape == (2, 3, N)


# --- Boundless DAS ---------------------------------------------------------------------


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_boundless_mask_values():
    bd = BoundlessDASIntervention(4, init_boundary=0.5, temperature_start=1.0, temperature_end=1e-3)
    # β n = 2, T = 1, centres 0.5, 1.5, 2.5, 3.5: m_i = σ(c_i) σ(2 − c_i)
    expected = [sig(0.5) * sig(1.5), sig(1.5) * sig(0.5), sig(2.5) * sig(-0.5), sig(3.5) * sig(-1.5)]
    assert expected[0] == pytest.approx(0.62246 * 0.81757, abs=1e-4)
    torch.testing.assert_close(bd.mask().detach(), torch.tensor(expected), rtol=0, atol=1e-6)
    bd.set_progress(1.0)  # T = 1e-3: hard mask, coordinates 0 and 1 (centres below β n = 2)
    torch.testing.assert_close(bd.mask().detach(), torch.tensor([1.0, 1.0, 0.0, 0.0]), rtol=0, atol=1e-6)


def test_boundless_hard_mask_swaps_first_rotated_coordinates():
    n = 4
    bd = BoundlessDASIntervention(n, init_boundary=0.5, temperature_end=1e-4)
    bd.set_progress(1.0)
    R = orthonormal(n, n, seed=2)
    bd.set_rotation(R)
    b, s = torch.randn(3, n), torch.randn(3, n)
    with torch.no_grad():
        torch.testing.assert_close(bd(b, s), project_swap(b, s, R[:, :2]), rtol=0, atol=1e-5)
    torch.testing.assert_close(bd.saved()["basis"], R[:, :2], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "beta,expected",
    [(0.5, 2), (0.3, 1), (0.6, 2), (0.65, 3), (1.0, 4), (1e-3, 0), (0.1, 0), (5.0, 4), (-2.0, 0)],
)
def test_boundless_learned_dim(beta, expected):
    bd = BoundlessDASIntervention(4)
    with torch.no_grad():
        bd.boundary.fill_(beta)  # out-of-range values are clamped to [1e-3, 1]
    assert bd.learned_dim() == expected
    assert bd.saved()["basis"].shape == (4, expected)


def test_boundless_evaluates_the_hard_mask_dim_reports():
    """At the default end temperature 0.1 the soft mask is σ(5)·σ(35) ≈ 0.993 on coordinate 0, not 1;
    eval mode applies [i + ½ < β n], so a full boundary is an exact swap and an empty one no swap."""
    n = 4
    bd = BoundlessDASIntervention(n, init_boundary=1.0)
    bd.set_progress(1.0)
    b, s = torch.randn(3, n), torch.randn(3, n)
    with torch.no_grad():
        assert bd.mask()[0].item() == pytest.approx(sig(5.0) * sig(35.0), abs=1e-6)
        assert not torch.allclose(bd(b, s), s, atol=1e-3)  # train mode: the soft mask
        bd.eval()
        torch.testing.assert_close(bd(b, s), s, rtol=0, atol=1e-5)
        bd.boundary.fill_(0.6)  # β n = 2.4: coordinates 0, 1
        R = bd.R.detach()
        torch.testing.assert_close(bd(b, s), project_swap(b, s, R[:, :2]), rtol=0, atol=1e-5)
        assert bd.learned_dim() == 2 and bd.gain() == 1.0
        torch.testing.assert_close(bd.edit_directions(), R[:, :2])
        bd.boundary.fill_(0.1)  # β n = 0.4 < ½: nothing is swapped, and dim says so
        torch.testing.assert_close(bd(b, s), b, rtol=0, atol=1e-6)
        assert bd.learned_dim() == 0 and bd.gain() == 0.0


def test_boundless_extra_loss_param_groups_and_temperature():
    bd = BoundlessDASIntervention(N, init_boundary=0.25, boundary_lr=0.3, boundary_loss_weight=2.0)
    assert bd.extra_loss().item() == pytest.approx(0.5)
    groups = bd.param_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 0.3]
    assert groups[1]["params"] == [bd.boundary]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in bd.parameters()}
    torch.optim.Adam(groups)  # accepted as is

    assert bd.temperature.item() == pytest.approx(50.0)
    bd.set_progress(0.5)
    assert bd.temperature.item() == pytest.approx(25.05)
    bd.set_progress(1.0)
    assert bd.temperature.item() == pytest.approx(0.1)


def test_boundless_saved_and_gradients():
    torch.manual_seed(0)
    bd = BoundlessDASIntervention(N)
    state = bd.saved()
    assert state["rotation"].shape == (N, N) and state["boundary"].shape == (1,)
    assert all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in state.values())
    torch.testing.assert_close(state["basis"], state["rotation"][:, : bd.learned_dim()])
    R = state["rotation"]
    torch.testing.assert_close(R.T @ R, torch.eye(N), rtol=0, atol=1e-5)

    bd.set_progress(0.9)
    loss = bd(torch.randn(4, N), torch.randn(4, N)).pow(2).sum() + bd.extra_loss()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bd.parameters())


def test_boundless_clamped_boundary_still_gets_gradient():
    bd = BoundlessDASIntervention(4)
    with torch.no_grad():
        bd.boundary.fill_(1.5)
    assert bd.beta().item() == 1.0
    bd.extra_loss().backward()
    assert bd.boundary.grad.item() == pytest.approx(1.0)  # λ β pulls it back into range


# --- vanilla ---------------------------------------------------------------------------


def test_vanilla_neuron_subset():
    v = VanillaIntervention(5, neurons=[1, 3])
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    s = torch.tensor([[10.0, 20.0, 30.0, 40.0, 50.0]])
    assert torch.equal(v(b, s), torch.tensor([[1.0, 20.0, 3.0, 40.0, 5.0]]))
    assert v.learned_dim() == 2 and VanillaIntervention(5).learned_dim() == 5
    assert not v.trainable and v.param_groups(0.1) == [] and v.saved() == {}
    assert v.extra_loss().item() == 0.0


@pytest.mark.parametrize("neurons", [[0, 5], [-1], []])
def test_vanilla_bad_neurons(neurons):
    with pytest.raises(DasError, match=r"intervention\.neurons.*between 0 and 4"):
        VanillaIntervention(5, neurons=neurons)


# --- build_intervention ----------------------------------------------------------------


def test_build_intervention_types_and_options():
    assert isinstance(build_intervention("vanilla", 4), VanillaIntervention)
    das = build_intervention("das", 4, dim=2, orthogonal_map=None)  # None means default
    assert isinstance(das, DASIntervention) and das.learned_dim() == 2
    bd = build_intervention("boundless_das", 4, boundary_lr=0.5, temperature_end=None)
    assert isinstance(bd, BoundlessDASIntervention) and bd.boundary_lr == 0.5 and bd.temperature_end == 0.1
    assert DASIntervention.trainable and BoundlessDASIntervention.trainable and not VanillaIntervention.trainable


def test_build_intervention_errors():
    with pytest.raises(DasError) as err:
        build_intervention("lora", 4)
    assert str(err.value) == (
        "intervention=lora: not a valid choice; valid choices: boundless_das, das, dbm, fixed, mean_diff, oblique_das, pca, probe, random, sparse_basis, vanilla"
    )

    with pytest.raises(DasError, match=r"intervention\.rank.*valid options: dim, full_rotation, init, orthogonal_map"):
        build_intervention("das", 4, dim=1, rank=2)

    for dim in (0, 5):
        with pytest.raises(DasError) as err:
            build_intervention("das", 4, dim=dim)
        assert str(err.value) == f"intervention.dim={dim}: must be between 1 and 4 (the site width)"

    with pytest.raises(DasError, match=r"intervention\.dim"):
        build_intervention("das", 4)
    with pytest.raises(DasError, match=r"intervention\.orthogonal_map=qr.*householder"):
        build_intervention("das", 4, dim=1, orthogonal_map="qr")
    with pytest.raises(DasError, match=r"intervention\.init_boundary"):
        build_intervention("boundless_das", 4, init_boundary=0.0)
