"""Baselines and other subspace parametrisations: known answers on synthetic activations, the
identities every intervention satisfies (h = b when s = b), and tiny training problems with a known solution (no model)."""

import math

import pandas as pd
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from das_cli import directions
from das_cli.errors import DasError
from das_cli.interventions import (
    INTERVENTIONS,
    DASIntervention,
    DBMIntervention,
    MeanDiffIntervention,
    ObliqueDASIntervention,
    PCAIntervention,
    ProbeIntervention,
    RandomIntervention,
    SiteActivations,
    build_intervention,
    project_swap,
)

N = 8
NEW = ["mean_diff", "pca", "probe", "random", "dbm", "oblique_das"]
ESTIMATED = ["mean_diff", "pca", "probe"]
CONF = Path(__file__).resolve().parents[1] / "conf" / "intervention"


def unit(n: int, seed: int) -> torch.Tensor:
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def orthonormal_pair(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.linalg.qr(torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))).Q
    return q[:, 0], q[:, 1]


def cos(basis: torch.Tensor, u: torch.Tensor) -> float:
    """|cosine| between a single-column basis and u (the sign of a direction is not meaningful)."""
    return abs(float(basis[:, 0] @ u)) / float(basis[:, 0].norm() * u.norm())


def assert_orthonormal(basis: torch.Tensor) -> None:
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), rtol=0, atol=1e-5)


def acts(values: torch.Tensor, classes: torch.Tensor, names=("first", "second", "third")) -> SiteActivations:
    return SiteActivations(values=values, classes=classes, names=list(names))


def two_clusters(u: torch.Tensor, rows: int = 200, separation: float = 3.0, noise: float = 0.5):
    """Class 0 around +separation/2 · u, class 1 around −separation/2 · u, isotropic noise."""
    labels = torch.arange(rows) % 2
    sign = 1.0 - 2.0 * labels.float()
    values = 0.5 * separation * sign[:, None] * u + noise * torch.randn(rows, len(u))
    return values, labels


def separable_with_nuisance(u: torch.Tensor, v: torch.Tensor, rows: int = 200):
    """Classes at ±1.5 u with small noise (separable), plus large class-independent variance along v."""
    labels = torch.arange(rows) % 2
    sign = 1.0 - 2.0 * labels.float()
    values = 1.5 * sign[:, None] * u + 5.0 * torch.randn(rows, 1) * v + 0.3 * torch.randn(rows, len(u))
    return values, labels


def fitted(name: str, n: int = N, **options):
    """A ready-to-use intervention; the estimated ones are fitted on three random classes."""
    module = build_intervention(name, n, **options)
    if module.needs_activations:
        module.fit_activations(acts(torch.randn(60, n), torch.arange(60) % 3))
    return module


# --- direction estimators on synthetic activations with a known answer -------------------


def test_mean_diff_finds_the_separating_direction():
    u = unit(N, 1)
    values, labels = two_clusters(u)
    basis = directions.mean_diff_basis(values, labels, 1)
    assert basis.shape == (N, 1) and cos(basis, u) > 0.99
    assert_orthonormal(basis)


def test_two_class_mean_diff_is_exactly_the_normalised_mean_difference():
    values, labels = two_clusters(unit(N, 2))
    diff = values[labels == 0].mean(0) - values[labels == 1].mean(0)
    torch.testing.assert_close(directions.mean_diff_basis(values, labels, 1)[:, 0], diff / diff.norm(), rtol=0, atol=1e-5)


def test_pca_finds_the_dominant_variance_axis():
    a = unit(N, 3)
    values = 4.0 * torch.randn(300, 1) * a + 0.5 * torch.randn(300, N) + 7.0  # an offset: PCA centres first
    basis = directions.pca_basis(values, 1)
    assert cos(basis, a) > 0.99
    assert_orthonormal(basis)


def test_probe_finds_the_class_axis_where_pca_finds_the_nuisance():
    u, v = orthonormal_pair(N, 4)
    values, labels = separable_with_nuisance(u, v)
    probe = directions.probe_basis(values, labels, 1, l2=1e-3)
    assert cos(probe, u) > 0.95
    assert cos(directions.pca_basis(values, 1), v) > 0.99
    assert cos(directions.mean_diff_basis(values, labels, 1), u) > 0.9  # the means are noisier than the probe


def test_two_class_probe_is_the_weight_difference_and_deterministic():
    u, v = orthonormal_pair(N, 5)
    values, labels = separable_with_nuisance(u, v)
    weight, bias = directions.fit_probe(values, labels, l2=1e-3)
    assert weight.shape == (2, N) and bias.shape == (2,)
    assert ((values @ weight.T + bias).argmax(-1) == labels).all()
    diff = weight[0] - weight[1]
    basis = directions.probe_basis(values, labels, 1, l2=1e-3)
    torch.testing.assert_close(basis[:, 0], diff / diff.norm(), rtol=0, atol=1e-4)
    assert torch.equal(basis, directions.probe_basis(values, labels, 1, l2=1e-3))


def three_classes(rows: int = 300):
    """Class means on a circle in the plane span(u1, u2): two directions separate them."""
    u1, u2 = orthonormal_pair(N, 6)
    labels = torch.arange(rows) % 3
    angle = 2 * math.pi * labels.float() / 3
    values = 3.0 * (angle.cos()[:, None] * u1 + angle.sin()[:, None] * u2) + 0.3 * torch.randn(rows, N)
    return values, labels, torch.stack([u1, u2], dim=1)


@pytest.mark.parametrize("method", ["mean_diff", "probe"])
def test_three_classes_give_a_two_dim_basis_of_the_class_plane(method):
    values, labels, plane = three_classes()
    if method == "mean_diff":
        basis = directions.mean_diff_basis(values, labels, 2)
    else:
        basis = directions.probe_basis(values, labels, 2, l2=1e-3)
    assert basis.shape == (N, 2)
    assert_orthonormal(basis)
    assert float((plane.T @ basis).pow(2).sum()) > 2 * 0.95  # span(basis) ≈ span(u1, u2)


def test_random_basis_is_orthonormal_reproducible_and_seed_dependent():
    torch.manual_seed(7)
    a = directions.random_basis(N, 3)
    torch.manual_seed(7)
    b = directions.random_basis(N, 3)
    torch.manual_seed(8)
    c = directions.random_basis(N, 3)
    assert_orthonormal(a)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(directions.random_basis(N, 3, generator=g), a)


# --- estimated interventions -------------------------------------------------------------


def test_mean_diff_intervention_ignores_unknown_rows_and_absent_names():
    u = unit(N, 9)
    values, labels = two_clusters(u)
    classes = labels * 2  # names 0 and 2 are present, 1 ("second") never is
    outliers = 50.0 * torch.randn(20, N)  # would dominate the means if the unknown rows were used
    module = MeanDiffIntervention(N)
    module.fit_activations(acts(torch.cat([values, outliers]), torch.cat([classes, torch.full((20,), -1)])))
    basis = module.saved()["basis"]
    assert basis.shape == (N, 1) and cos(basis, u) > 0.99


def test_estimated_interventions_patch_their_subspace():
    u = unit(N, 10)
    values, labels = two_clusters(u)
    module = build_intervention("mean_diff", N)
    module.fit_activations(acts(values, labels))
    b, s = torch.randn(4, N), torch.randn(4, N)
    W = module.saved()["basis"]
    with torch.no_grad():
        torch.testing.assert_close(module(b, s), project_swap(b, s, W), rtol=0, atol=1e-6)
    assert module.learned_dim() == 1 and not module.trainable and module.param_groups(0.1) == []


@pytest.mark.parametrize("name", ESTIMATED)
def test_forward_before_fit_is_an_error(name):
    module = build_intervention(name, N)
    assert module.needs_activations and not module.trainable
    with pytest.raises(RuntimeError, match=rf"intervention={name}: .*call fit_activations"):
        module(torch.randn(2, N), torch.randn(2, N))


@pytest.mark.parametrize("name", ["mean_diff", "probe"])
@pytest.mark.parametrize("classes,found", [([0] * 5 + [-1] * 5, "found 1 (first)"), ([-1] * 10, "found 0")])
def test_fewer_than_two_classes_is_an_error(name, classes, found):
    module = build_intervention(name, N)
    with pytest.raises(DasError) as err:
        module.fit_activations(acts(torch.randn(10, N), torch.tensor(classes)))
    assert str(err.value).startswith(
        f"intervention={name} needs at least two values of the variable among the training prompts; {found}"
    )


@pytest.mark.parametrize("name", ["mean_diff", "probe"])
def test_dim_above_classes_minus_one_is_an_error(name):
    module = build_intervention(name, N, dim=2)
    with pytest.raises(DasError, match=rf"intervention\.dim=2: intervention={name} gives at most 1 direction"):
        module.fit_activations(acts(torch.randn(10, N), torch.arange(10) % 2))
    module.fit_activations(acts(torch.randn(12, N), torch.arange(12) % 3))  # three values: two directions
    assert module.learned_dim() == 2
    assert_orthonormal(module.saved()["basis"])


def test_pca_dim_above_rows_minus_one_is_an_error():
    with pytest.raises(DasError, match=r"intervention\.dim=3: intervention=pca gives at most 2 direction"):
        PCAIntervention(N, dim=3).fit_activations(acts(torch.randn(3, N), torch.full((3,), -1)))
    module = PCAIntervention(N, dim=2)
    module.fit_activations(acts(torch.randn(3, N), torch.full((3,), -1)))  # unknown classes are fine for PCA
    assert_orthonormal(module.saved()["basis"])


def test_probe_fits_under_no_grad():
    u, v = orthonormal_pair(N, 11)
    values, labels = separable_with_nuisance(u, v)
    module = ProbeIntervention(N, probe_l2=1e-2)
    with torch.no_grad():  # as a caller that evaluates may do
        module.fit_activations(acts(values, labels))
    assert cos(module.saved()["basis"], u) > 0.95


def test_random_intervention_needs_no_activations_and_follows_the_seed():
    torch.manual_seed(3)
    a = RandomIntervention(N, dim=2)
    torch.manual_seed(3)
    b = RandomIntervention(N, dim=2)
    assert not a.needs_activations and not a.trainable
    assert torch.equal(a.saved()["basis"], b.saved()["basis"])
    assert_orthonormal(a.saved()["basis"])
    with torch.no_grad():
        a(torch.randn(2, N), torch.randn(2, N))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ESTIMATED)
def test_cpu_activations_fit_a_module_on_the_gpu(name):
    module = build_intervention(name, N).to("cuda")
    values, labels = two_clusters(unit(N, 12))
    module.fit_activations(acts(values, labels))
    b, s = torch.randn(2, N, device="cuda"), torch.randn(2, N, device="cuda")
    with torch.no_grad():
        assert module(b, s).device.type == "cuda"
    assert module.saved()["basis"].device.type == "cpu"


# --- identities every new intervention satisfies ------------------------------------------


def scrambled(module):
    """Move every parameter away from its initial value (A ≠ B for oblique, mixed-sign DBM logits)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))
    return module


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_source_equal_base_gives_base(name, mode):
    module = scrambled(fitted(name))
    module.train(mode == "train")
    b = torch.randn(5, N)
    with torch.no_grad():
        torch.testing.assert_close(module(b, b.clone()), b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NEW)
def test_dtype_and_leading_dimensions(name):
    module = scrambled(fitted(name))
    b, s = torch.randn(2, 3, N), torch.randn(2, 3, N)
    with torch.no_grad():
        out = module(b.bfloat16(), s.bfloat16())
        ref = module(b.bfloat16().float().reshape(6, N), s.bfloat16().float().reshape(6, N))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, N)
    torch.testing.assert_close(out.float().reshape(6, N), ref, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("name", NEW)
def test_saved_is_float32_cpu_and_bases_are_orthonormal(name):
    state = scrambled(fitted(name)).saved()
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    assert all(not t.requires_grad for t in state.values())
    if "basis" in state:
        assert state["basis"].shape[0] == N
        assert_orthonormal(state["basis"])


# --- DAS with a full rotation (pyvene's parametrisation) ---------------------------------


@pytest.mark.parametrize("orthogonal_map", ["householder", "matrix_exp", "cayley"])
def test_full_rotation_keeps_w_orthonormal_and_trains(orthogonal_map):
    das = DASIntervention(N, dim=2, orthogonal_map=orthogonal_map, full_rotation=True)
    assert das.basis.weight.shape == (N, N)
    before = das.W.detach().clone()
    optimizer = torch.optim.Adam(das.param_groups(0.05))
    target = torch.randn(16, N)
    for _ in range(5):
        loss = (das(torch.randn(16, N), torch.randn(16, N)) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in das.parameters())
        optimizer.step()
    W = das.W.detach()
    assert W.shape == (N, 2) and not torch.allclose(W, before)
    assert_orthonormal(W)
    assert das.saved()["basis"].shape == (N, 2)


@pytest.mark.parametrize("orthogonal_map", ["householder", "matrix_exp", "cayley"])
def test_full_rotation_and_low_rank_give_the_same_forward(orthogonal_map):
    W = torch.linalg.qr(torch.randn(N, 3)).Q
    full = DASIntervention(N, dim=3, orthogonal_map=orthogonal_map, full_rotation=True)
    thin = DASIntervention(N, dim=3, orthogonal_map=orthogonal_map)
    full.set_basis(W)
    thin.set_basis(W)
    torch.testing.assert_close(full.W.detach(), W, rtol=0, atol=1e-5)
    R = full.basis.weight.detach()
    torch.testing.assert_close(R.T @ R, torch.eye(N), rtol=0, atol=1e-5)
    b, s = torch.randn(4, N), torch.randn(4, N)
    with torch.no_grad():
        torch.testing.assert_close(full(b, s), thin(b, s), rtol=0, atol=1e-5)


def test_full_rotation_option():
    das = build_intervention("das", N, dim=1, full_rotation=True)
    assert das.full_rotation and das.learned_dim() == 1
    assert not build_intervention("das", N, dim=1, full_rotation=None).full_rotation  # None means default
    with pytest.raises(DasError, match=r"intervention\.full_rotation=yes: must be true or false"):
        build_intervention("das", N, dim=1, full_rotation="yes")


# --- oblique DAS ------------------------------------------------------------------------


def oblique(n: int, k: int, seed: int = 0, max_gain: float = math.inf) -> ObliqueDASIntervention:
    g = torch.Generator().manual_seed(seed)
    module = ObliqueDASIntervention(n, dim=k, max_gain=max_gain)
    with torch.no_grad():
        module.write_offset.copy_(torch.randn(n, k, generator=g))
        module.read_basis.copy_(torch.randn(n, k, generator=g))
    return module


def test_oblique_projection_is_idempotent_not_symmetric_and_matches_its_formula():
    module = oblique(N, 3)
    A, B = module.write_basis.detach(), module.read_basis.detach()
    P = module.projection().detach()
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-4)
    assert not torch.allclose(P, P.T, atol=1e-2)
    torch.testing.assert_close(P, A @ torch.linalg.inv(B.T @ A) @ B.T, rtol=0, atol=1e-4)

    b, s = torch.randn(5, N), torch.randn(5, N)
    with torch.no_grad():
        h = module(b, s)
        torch.testing.assert_close(h, (b.T + P @ (s - b).T).T, rtol=0, atol=1e-4)  # h = b + P (s − b), columns
        torch.testing.assert_close(module(b, h), h, rtol=0, atol=1e-4)  # applying it twice changes nothing
    torch.testing.assert_close(h @ B, s @ B, rtol=0, atol=1e-4)  # reads the source along B
    residual = (h - b) - (h - b) @ torch.linalg.pinv(A).T @ A.T
    torch.testing.assert_close(residual, torch.zeros_like(residual), rtol=0, atol=1e-4)  # writes only in span(A)


def test_oblique_starts_as_orthogonal_das():
    torch.manual_seed(4)
    module = ObliqueDASIntervention(N, dim=2)
    A, B = module.write_basis.detach(), module.read_basis.detach()
    assert_orthonormal(A)
    torch.testing.assert_close(A @ A.T, B @ B.T, rtol=0, atol=1e-6)  # the same subspace
    assert module.gain() == pytest.approx(1.0)
    b, s = torch.randn(3, N), torch.randn(3, N)
    with torch.no_grad():
        torch.testing.assert_close(module(b, s), project_swap(b, s, A), rtol=0, atol=1e-5)


def test_oblique_hand_example_4d_span_e2_e3():
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # [a, b, c, d]
    s = torch.tensor([[5.0, 6.0, 7.0, 8.0]])  # [e, f, g, h]
    e23 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    module = ObliqueDASIntervention(4, dim=2)
    with torch.no_grad():
        module.read_basis.copy_(e23 @ torch.tensor([[2.0, 1.0], [0.0, 3.0]]))  # span(e2, e3), a non-orthonormal basis
        torch.testing.assert_close(module(b, s), torch.tensor([[1.0, 6.0, 7.0, 4.0]]), rtol=0, atol=1e-5)


def test_oblique_saved_and_gradients():
    module = oblique(N, 2)
    state = module.saved()
    assert set(state) == {"read_basis", "write_basis", "basis"}
    torch.testing.assert_close(state["write_basis"], module.write_basis.detach())
    Q = state["basis"]
    torch.testing.assert_close(Q @ Q.T @ state["write_basis"], state["write_basis"], rtol=0, atol=1e-5)  # span(Q) = span(A)
    module(torch.randn(4, N), torch.randn(4, N)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert module.learned_dim() == 2 and module.trainable


def fit_mse(module, b: torch.Tensor, s: torch.Tensor, target: torch.Tensor, steps: int, lr: float) -> float:
    optimizer = torch.optim.Adam(module.param_groups(lr))
    for _ in range(steps):
        loss = (module(b, s) - target).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((module(b, s) - target).pow(2).sum(-1).mean())


def test_oblique_learns_a_read_direction_that_differs_from_the_write_direction():
    """x = v e1 + z (e1 + e2) + noise on e3, e4. Changing v alone means writing along e1, but v can
    only be read along e1 − e2 (which cancels z): P = e1 (e1 − e2)ᵀ / 1 does it, no symmetric rank-1 P can."""
    torch.manual_seed(0)

    def vectors(rows: int):
        v, z, rest = torch.randn(rows, 1), 3.0 * torch.randn(rows, 1), torch.randn(rows, 2)
        return torch.cat([v + z, z, rest], dim=1), v

    (b, vb), (s, vs) = vectors(256), vectors(256)
    target = b.clone()
    target[:, :1] += vs - vb
    torch.manual_seed(1)
    module = ObliqueDASIntervention(4, dim=1)
    oblique_loss = fit_mse(module, b, s, target, steps=300, lr=0.05)
    torch.manual_seed(1)
    das_loss = fit_mse(DASIntervention(4, dim=1), b, s, target, steps=300, lr=0.05)
    assert oblique_loss < 1e-2 and das_loss > 0.5
    expected = torch.zeros(4, 4)
    expected[0, 0], expected[0, 1] = 1.0, -1.0  # e1 (e1 − e2)ᵀ
    torch.testing.assert_close(module.projection().detach(), expected, rtol=0, atol=0.05)


def test_oblique_gain_is_one_over_cos_and_is_capped_by_max_gain():
    """Read along e1, write along e1 + 3 e2: P = [[1, 0], [3, 0]], ‖P‖₂ = √10 = 1/cos(atan 3).
    With max_gain=2 the offset 3 e2 is scaled to √3 e2: P = [[1, 0], [√3, 0]], ‖P‖₂ = 2."""
    b, s = torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 5.0]])  # s − b = (2, 4)
    for max_gain, slope in [(math.inf, 3.0), (2.0, math.sqrt(3.0))]:
        module = ObliqueDASIntervention(2, dim=1, max_gain=max_gain)
        with torch.no_grad():
            module.read_basis.copy_(torch.tensor([[1.0], [0.0]]))
            module.write_offset.copy_(torch.tensor([[0.0], [3.0]]))
            torch.testing.assert_close(module.projection(), torch.tensor([[1.0, 0.0], [slope, 0.0]]), rtol=0, atol=1e-6)
            torch.testing.assert_close(module(b, s), torch.tensor([[3.0, 1.0 + 2.0 * slope]]), rtol=0, atol=1e-5)
        assert module.gain() == pytest.approx(math.sqrt(1 + slope**2), rel=1e-5)
        assert module.gain() == pytest.approx(float(torch.linalg.matrix_norm(module.projection().detach(), ord=2)), rel=1e-5)


def test_oblique_max_gain_one_is_orthogonal_das():
    module = oblique(N, 2, max_gain=1.0)
    P = module.projection().detach()
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-6)
    assert module.gain() == pytest.approx(1.0)


def stretch_task(rows: int = 256):
    """The label needs the read coordinate v (on e1) written 10× larger along e1 + e2: only a stretched P fits it."""
    b, s = torch.randn(rows, 4), torch.randn(rows, 4)
    target = b.clone()
    target[:, :2] += 10.0 * (s[:, :1] - b[:, :1])
    return b, s, target


def test_oblique_gain_stays_within_max_gain_at_every_step_and_grows_without_it():
    b, s, target = stretch_task()
    gains = {}
    for max_gain in (2.0, math.inf):
        torch.manual_seed(3)
        module = ObliqueDASIntervention(4, dim=1, max_gain=max_gain)
        optimizer = torch.optim.Adam(module.param_groups(0.05))
        history = []
        for _ in range(200):
            loss = (module(b, s) - target).pow(2).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert all(torch.isfinite(p).all() for p in module.parameters())
            history.append(module.gain())
        gains[max_gain] = history
    assert max(gains[2.0]) <= 2.0 + 1e-4 and gains[2.0][-1] > 1.9  # pressed against the bound, never past it
    assert gains[math.inf][-1] > 5.0


@pytest.mark.parametrize("value", [0.5, "big", True, math.nan])
def test_oblique_max_gain_must_be_a_number_at_least_one(value):
    with pytest.raises(DasError, match=r"intervention\.max_gain=.*: must be a number >= 1"):
        build_intervention("oblique_das", N, max_gain=value)


# --- DBM --------------------------------------------------------------------------------


def test_dbm_soft_mask_in_train_mode_hard_mask_in_eval_mode():
    dbm = DBMIntervention(4, temperature_start=2.0)
    with torch.no_grad():
        dbm.logits.copy_(torch.tensor([-1.0, 0.0, 0.5, 3.0]))
    b, s = torch.zeros(1, 4), torch.ones(1, 4)
    soft = torch.sigmoid(torch.tensor([-0.5, 0.0, 0.25, 1.5]))  # σ(l / T), T = 2
    assert dbm.training
    with torch.no_grad():
        torch.testing.assert_close(dbm(b, s)[0], soft, rtol=0, atol=1e-6)
        dbm.eval()
        assert torch.equal(dbm(b, s)[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # l > 0, so l = 0 is off
        rb, rs = 1e3 * torch.randn(3, 4), torch.randn(3, 4)
        assert torch.equal(dbm(rb, rs), torch.cat([rb[:, :2], rs[:, 2:]], dim=1))  # an exact swap, no rounding
        dbm.train()
        torch.testing.assert_close(dbm(b, s)[0], soft, rtol=0, atol=1e-6)
    assert dbm.learned_dim() == 2
    state = dbm.saved()
    assert set(state) == {"mask", "logits"}
    assert torch.equal(state["mask"], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(state["logits"], torch.tensor([-1.0, 0.0, 0.5, 3.0]))


def test_dbm_starts_with_no_neuron_kept():
    dbm = DBMIntervention(N)
    assert dbm.learned_dim() == 0
    assert torch.equal(dbm.eval()(torch.zeros(1, N), torch.ones(1, N)), torch.zeros(1, N))


def test_dbm_l1_term_and_log_linear_temperature():
    dbm = DBMIntervention(4, temperature_start=1.0, temperature_end=0.01, l1_weight=0.5)
    with torch.no_grad():
        dbm.logits.copy_(torch.tensor([-1.0, 0.0, 0.5, 3.0]))
    expected = 0.5 * float(torch.sigmoid(dbm.logits.detach()).mean())
    assert dbm.extra_loss().item() == pytest.approx(expected, rel=1e-6)
    dbm.extra_loss().backward()
    assert dbm.logits.grad is not None and (dbm.logits.grad > 0).all()  # the penalty pulls every logit down

    assert dbm.temperature.item() == pytest.approx(1.0)
    dbm.set_progress(0.5)
    assert dbm.temperature.item() == pytest.approx(0.1)  # geometric midpoint of 1 and 0.01
    dbm.set_progress(1.0)
    assert dbm.temperature.item() == pytest.approx(0.01)
    dbm.set_progress(2.0)  # clamped
    assert dbm.temperature.item() == pytest.approx(0.01)


def test_dbm_learns_the_neurons_a_readout_uses():
    """A fixed linear readout reads only neurons 2 and 5; the target is the readout of the source."""
    torch.manual_seed(0)
    readout = torch.zeros(N, 3)
    readout[2] = torch.tensor([2.0, -2.0, 0.0])
    readout[5] = torch.tensor([0.0, 2.0, -2.0])
    b, s = torch.randn(256, N), torch.randn(256, N)
    labels = (s @ readout).argmax(-1)
    dbm = DBMIntervention(N)
    optimizer = torch.optim.Adam(dbm.param_groups(0.1))
    steps = 150
    for step in range(steps):
        dbm.set_progress(step / steps)
        loss = F.cross_entropy(dbm(b, s) @ readout, labels) + dbm.extra_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    dbm.set_progress(1.0)
    dbm.eval()
    assert torch.nonzero(dbm.saved()["mask"]).flatten().tolist() == [2, 5]
    assert dbm.learned_dim() == 2
    with torch.no_grad():
        assert ((dbm(b, s) @ readout).argmax(-1) == labels).all()


# --- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,option,valid",
    [
        ("mean_diff", "probe_l2", "dim"),
        ("pca", "neurons", "dim"),
        ("probe", "rank", "dim, probe_l2"),
        ("random", "seed", "dim"),
        ("dbm", "dim", "basis, jacobian_prompts, jacobian_restarts, jacobian_side, jacobian_steps, l1_weight, temperature_end, temperature_start"),
        ("oblique_das", "orthogonal_map", "dim, max_gain"),
    ],
)
def test_unknown_option_is_an_error(name, option, valid):
    with pytest.raises(DasError) as err:
        build_intervention(name, N, **{option: 1})
    assert str(err.value) == f"intervention.{option}: not an option of intervention={name}; valid options: {valid}"


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("mean_diff", {"dim": 0}, r"intervention\.dim=0: must be between 1 and 8"),
        ("oblique_das", {"dim": 9}, r"intervention\.dim=9: must be between 1 and 8"),
        ("probe", {"probe_l2": -1.0}, r"intervention\.probe_l2=-1\.0: must be >= 0"),
        ("dbm", {"temperature_end": 0.0}, r"intervention\.temperature_end=0\.0: must be > 0"),
        ("dbm", {"l1_weight": -0.1}, r"intervention\.l1_weight=-0\.1: must be >= 0"),
    ],
)
def test_bad_option_values(name, options, message):
    with pytest.raises(DasError, match=message):
        build_intervention(name, N, **options)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_intervention_config_builds(path, tmp_path):
    from das_cli import config as C

    options = OmegaConf.to_container(C.compose([f"intervention={path.stem}"]).intervention)  # its defaults list applied
    name = options.pop("name")
    if name == "fixed":  # its basis is the user's file (intervention.path, no default)
        options["path"] = str(tmp_path / "basis.pt")
        torch.save(torch.linalg.qr(torch.randn(N, 2))[0], options["path"])
    assert name == path.stem and name in INTERVENTIONS
    assert isinstance(build_intervention(name, N, **options), INTERVENTIONS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["probe", "dbm", "oblique_das"])
def test_cli_runs_each_new_intervention(name, tmp_path):
    from conftest import TINY, run_cli

    result = run_cli([f"intervention={name}", "model=tiny_llama", "layers=[1]", f"hydra.run.dir={tmp_path}"] + TINY)
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(tmp_path / "iia.csv").iloc[0]
    assert row["intervention"] == name and 0 <= row["iia"] <= 1
    assert (row["steps"] > 0) == (name != "probe")
    assert (tmp_path / "cells" / row["cell"] / "subspace.safetensors").exists()
