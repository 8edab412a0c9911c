"""The first-order prescan (prescan.py): its algebra by hand, a planted direction found, and every cell's score
against the loss change an actual small swap makes (central differences through the reference engine)."""

import math

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY
from test_engines import CONF, random_pairs

from das_cli import config as C
from das_cli import prescan
from das_cli.engines import ReferenceEngine, prepare
from das_cli.grid import Cell, site_key
from das_cli.models import load_model
from das_cli.results import spearman
from das_cli.sites import read_site, resolve_site
from das_cli.sweep import run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_hand_computed_case():
    """Two pairs in 2 dimensions, M worked out below."""
    base = torch.zeros(2, 2)
    source = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # d1 = e1, d2 = e2
    grad = torch.tensor([[-2.0, 0.0], [0.0, 1.0]])  # g1 = -2 e1, g2 = e2
    # M = (g1 d1ᵀ + g2 d2ᵀ) / 2 = diag(-1, 0.5): swapping e1 lowers the mean loss by 1 (to first order)
    found = prescan.first_order(base, source, grad, k=1)
    assert found.score == pytest.approx(1.0)
    assert found.eigenvalues.tolist() == pytest.approx([-1.0])
    assert abs(float(found.directions[0, 0])) == pytest.approx(1.0)
    both = prescan.first_order(base, source, grad, k=2)  # the second direction raises it by 0.5
    assert both.score == pytest.approx(0.5)


def test_only_the_symmetric_part_counts():
    """tr(Wᵀ M W) = tr(Wᵀ S W): an antisymmetric M predicts no change along any W."""
    source = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])  # bases 0: d = s
    grad = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, -1.0]])  # M = (e1 e2ᵀ - e2 e1ᵀ) / 3, antisymmetric
    found = prescan.first_order(torch.zeros(3, 2), source, grad, k=1)
    assert found.score == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n_pairs", [3, 40])  # 2N < n: the decomposition inside the span; else the full one
def test_the_score_is_the_best_swap_over_every_subspace(n_pairs):
    gen = torch.Generator().manual_seed(n_pairs)
    n, k = 12, 2
    base, source, grad = (torch.randn(n_pairs, n, generator=gen) for _ in range(3))
    found = prescan.first_order(base, source, grad, k)
    m = (grad.double().T @ (source - base).double()) / n_pairs
    w = found.directions.double()
    assert torch.allclose(w.T @ w, torch.eye(k, dtype=torch.float64), atol=1e-5)
    assert -float(torch.trace(w.T @ m @ w)) == pytest.approx(found.score, rel=1e-5)
    for _ in range(200):  # no random orthonormal pair of directions does better
        q = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
        assert -float(torch.trace(q.T @ m @ q)) <= found.score + 1e-9
    full = torch.linalg.eigvalsh((m + m.T) / 2)
    expected = -float(full[:k].sum())
    assert found.score == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_a_planted_direction_is_found():
    """A loss that reads the base vector along u only, and pairs whose sources carry the variable along u
    (their other coordinates noise): the prescan's top direction is u."""
    gen = torch.Generator().manual_seed(0)
    n, pairs = 64, 256
    u = torch.nn.functional.normalize(torch.randn(n, generator=gen), dim=0)
    value = torch.randint(0, 2, (pairs, 2), generator=gen).float() * 2 - 1  # the variable on base and source
    base = value[:, :1] * u + torch.randn(pairs, n, generator=gen)
    source = value[:, 1:] * u + torch.randn(pairs, n, generator=gen)
    target = value[:, 1]  # the counterfactual label: the source's value
    b = base.clone().requires_grad_(True)
    loss = torch.nn.functional.softplus(-target * 3 * (b @ u)).sum()  # logistic loss on uᵀb
    (grad,) = torch.autograd.grad(loss, b)
    found = prescan.first_order(base, source, grad, k=1)
    assert abs(float(found.directions[:, 0] @ u)) > 0.95
    assert found.score > 0


@pytest.fixture(scope="module")
def lm():
    return load_model(OmegaConf.load(CONF / "tiny_llama.yaml"), "cpu", "float32")


@pytest.mark.parametrize("widths", [None, (1, 3, 2, 3)], ids=["one_token", "multi_token"])
def test_each_score_is_the_loss_change_of_a_small_swap(lm, widths):
    """For every cell of a small grid scored in one pass (two layers, one of them twice, and positions that vary by
    row), the directional derivative of the mean training loss along a swap ε W Wᵀ (s - b), ε -> 0, measured with
    the reference engine, equals tr(Wᵀ M W), for the prescan's own W and for a random one."""
    pairs = random_pairs(seed=3, widths=widths)
    cells = [Cell("block_output", layer, position, None) for layer in (0, 2) for position in (("last",), ("s1",), ("s1", "last"))]
    cells += [Cell("mlp_activation", 1, ("last",), None)]
    sites = {site_key(c): resolve_site(lm, c.stream, c.layer) for c in cells}
    found = prescan.prescan_cells(lm, pairs, cells, sites, k=2, batch_size=3)
    gen = torch.Generator().manual_seed(1)
    for cell in cells:
        site = sites[site_key(cell)]
        sources = [read_site(lm, site, g.source_ids) for g in pairs.groups]
        engine = ReferenceEngine(lm, site, prepare(pairs, cell.position, sources, lm.device))
        batch = [(g, torch.arange(len(group))) for g, group in enumerate(pairs.groups)]
        n = found[cell].directions.shape[0]
        for w in (found[cell].directions, torch.linalg.qr(torch.randn(n, 2, generator=gen)).Q):
            w = w.double()

            def loss(eps: float) -> float:
                swap = lambda b, s: (b.double() + eps * (s.double() - b.double()) @ w @ w.T).float()
                return _weighted_mean_loss(engine, batch, swap, pairs)

            eps = 0.03  # float32 losses: a smaller step drowns in rounding; central differences err by O(eps²)
            measured = (loss(eps) - loss(-eps)) / (2 * eps)
            predicted = _predicted(lm, pairs, cell, site, w)
            assert measured == pytest.approx(predicted, rel=2e-2, abs=2e-4), cell.id
        assert found[cell].score == pytest.approx(-_predicted(lm, pairs, cell, site, found[cell].directions.double()), rel=1e-3)


def _weighted_mean_loss(engine, batch, swap, pairs) -> float:
    with torch.no_grad():
        return float(engine.loss(batch, swap))


def _predicted(lm, pairs, cell, site, w) -> float:
    """tr(Wᵀ M W) from one cell's own prescan pass (its site alone, so the pass over several sites is checked too)."""
    values, grads = prescan.site_gradients(lm, [site], pairs, batch_size=100)
    sources = [read_site(lm, site, g.source_ids) for g in pairs.groups]
    base, source, grad = [], [], []
    from das_cli.data import resolve_positions
    from das_cli.sites import gather

    for group, s, v, g in zip(pairs.groups, sources, values[0], grads[0]):
        every = torch.arange(v.shape[-1])
        at = resolve_positions(group, cell.position, "base")
        base.append(gather(v, at, every))
        grad.append(gather(g, at, every))
        source.append(gather(s, resolve_positions(group, cell.position, "source"), every))
    g, d = torch.cat(grad).double(), (torch.cat(source) - torch.cat(base)).double()
    m = g.T @ d / len(g)
    return float(torch.trace(w.T @ m @ w))


def test_spearman_by_hand():
    a = pd.Series([1.0, 2.0, 3.0, 4.0, math.nan])
    assert spearman(a, pd.Series([10.0, 20.0, 30.0, 40.0, 1.0])) == pytest.approx(1.0)
    assert spearman(a, pd.Series([4.0, 3.0, 2.0, 1.0, 0.0])) == pytest.approx(-1.0)
    # ties take their mean rank: ranks (1, 2, 3, 4) against (1.5, 1.5, 3, 4) -> Pearson of the ranks
    assert spearman(a, pd.Series([0.0, 0.0, 5.0, 6.0, 0.0])) == pytest.approx(0.9486833, rel=1e-6)
    assert math.isnan(spearman(a, pd.Series([1.0, 1.0, 1.0, 1.0, 1.0])))


def test_a_run_with_the_prescan_writes_its_scores_beside_every_cell(tmp_path):
    cfg = C.compose(["model=tiny_llama", "layers=[0,1]", "positions=[last,-2]", "search.prescan=true", *TINY])
    frame = run(cfg, tmp_path)
    table = pd.read_csv(tmp_path / "prescan.csv")
    assert sorted(table["cell"]) == sorted(frame["cell"])
    assert (table["prescan_k"] == 1).all() and table["prescan"].notna().all()
    assert frame["prescan"].tolist() == pytest.approx(table.set_index("cell").loc[frame["cell"], "prescan"].tolist())
    assert (tmp_path / "pivot_block_output_prescan.csv").exists()
    assert (tmp_path / "heatmap_block_output_prescan.png").exists()
    again = run(cfg, tmp_path)  # resumed: nothing trained again, the same scores
    assert again["prescan"].tolist() == frame["prescan"].tolist()


def test_without_the_prescan_nothing_changes(tmp_path):
    frame = run(C.compose(["model=tiny_llama", "layers=[1]", "positions=[last]", *TINY]), tmp_path)
    assert "prescan" not in frame and not list(tmp_path.glob("prescan*.csv"))


def test_init_prescan_starts_at_the_prescan_directions(tmp_path):
    """train.epochs=0: the saved subspace is where training would start, the prescan's top direction."""
    from safetensors.torch import load_file

    from das_cli.datasets import build_pairs
    from das_cli.sweep import resolve_sites

    cfg = C.compose(["model=tiny_llama", "layers=[1]", "positions=[last]", "intervention.init=prescan", *TINY, "train.epochs=0"])
    frame = run(cfg, tmp_path)
    basis = load_file(tmp_path / "cells" / frame["cell"][0] / "subspace.safetensors")["basis"]
    checked = C.checked(cfg)
    lm = load_model(checked.model, "cpu", "float32")
    cells = [Cell("block_output", 1, ("last",), None)]
    found = prescan.prescan_cells(lm, build_pairs(checked, lm)["train"], cells, resolve_sites(lm, cells), 1, 100)
    assert torch.allclose(basis, found[cells[0]].directions, atol=1e-5)
    assert (tmp_path / "prescan.csv").exists()  # scored for the start, so reported too


def test_init_prescan_trains_and_changes_the_fingerprint_only_when_asked(tmp_path):
    random_start = C.fingerprint(C.checked(C.compose([*TINY])))
    assert "init" not in random_start["intervention"]  # folders from before the option resume
    assert C.fingerprint(C.checked(C.compose(["intervention.init=prescan", *TINY])))["intervention"]["init"] == "prescan"
    frame = run(C.compose(["model=tiny_llama", "layers=[1]", "positions=[last]", "intervention.init=prescan", *TINY]), tmp_path)
    assert frame["steps"].iloc[0] > 0 and frame["iia"].notna().all()
