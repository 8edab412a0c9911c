"""Scores beside IIA: Wilson interval, graded scores, gain, offmanifold and max_z, the CE / penalty split, checked by hand."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import TINY, fitted_intervention, run_cli

from das_cli.interventions import INTERVENTIONS, DASIntervention, ObliqueDASIntervention, build_intervention
from das_cli.scores import edit_scores, largest_z, off_manifold, shrunk_covariance, wilson_interval
from das_cli.metrics import Evaluation, evaluate_kinds
from das_cli.train import fit

N = 6


# --- Wilson interval ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "hits,n,lo,hi",
    [
        (62, 100, 0.522, 0.709),
        # 0 of 12: lo = 0, hi = z² / (n + z²) = 3.8415 / 15.8415
        (0, 12, 0.0, 1.959964**2 / (12 + 1.959964**2)),
        (12, 12, 12 / (12 + 1.959964**2), 1.0),
    ],
)
def test_wilson_interval_known_values(hits, n, lo, hi):
    low, high = wilson_interval(hits, n)
    assert low == pytest.approx(lo, abs=5e-4) and high == pytest.approx(hi, abs=5e-4)


def test_wilson_interval_of_no_pairs_is_nan():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


# --- graded scores ------------------------------------------------------------------------


class FixedEngine:
    """An engine whose logits per pair are given: two groups, vocabulary of 3."""

    def __init__(self, logits: list[list[float]], labels: list[int], kinds: list[str] | None = None):
        self.all_logits, self.all_labels = torch.tensor(logits), torch.tensor(labels)
        half = len(labels) // 2
        self.offsets = [0, half]
        kinds = kinds or []
        self.groups = [_Group(half, kinds[:half]), _Group(len(labels) - half, kinds[half:])]
        self.lm = SimpleNamespace(device=torch.device("cpu"))

    def _index(self, batch):
        return torch.cat([self.offsets[g] + rows for g, rows in batch])

    def logits(self, batch, intervention):
        return self.all_logits[self._index(batch)]

    def labels(self, batch):
        return self.all_labels[self._index(batch)]


class _Group:
    def __init__(self, size: int, kinds: list[str]):
        self.size, self.kinds = size, kinds

    def __len__(self) -> int:
        return self.size


def test_p_label_and_logit_diff_by_hand():
    logits = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]
    labels = [0, 0, 2, 1]
    base = [torch.tensor([1, 0]), torch.tensor([-1, 2])]  # pair 2: unknown, pair 3: base answer 2
    result = evaluate_kinds(FixedEngine(logits, labels), None, batch_size=3, base_labels=base)
    e = math.e
    p = [e**2 / (e**2 + 2), 1 / (e + 2), e**3 / (e**3 + 2), 1 / 3]
    scores = result.graded_scores()
    assert result.scores()["iia"] == 0.5  # pairs 0 and 2 have their label on top
    assert scores["p_label"] == pytest.approx(sum(p) / 4, rel=1e-6)
    # pair 0: 2 − 0 (base answer 1); pair 1: base answer is the label, left out; pair 2 unknown; pair 3: 1 − 1
    assert scores["logit_diff"] == pytest.approx((2.0 + 0.0) / 2, rel=1e-6)
    assert scores["iia_lo"] == pytest.approx(wilson_interval(2, 4)[0]) and scores["iia_hi"] == pytest.approx(wilson_interval(2, 4)[1])
    unknown = evaluate_kinds(FixedEngine(logits, labels), None, batch_size=3).graded_scores()
    assert math.isnan(unknown["logit_diff"]) and unknown["p_label"] == pytest.approx(scores["p_label"])


def test_graded_scores_count_the_pairs_iia_counts():
    """With isolate pairs, iia is the cause score; its interval and p_label are over cause pairs only."""
    result = Evaluation(
        hits={"cause": 62, "isolate": 10}, counts={"cause": 100, "isolate": 10}, loss=0.0,
        label_probability={"cause": 50.0, "isolate": 9.0}, logit_diff={"cause": 20.0}, logit_diff_counts={"cause": 80},
    )
    scores = result.graded_scores()
    assert scores["iia_lo"] == pytest.approx(0.522, abs=5e-4) and scores["iia_hi"] == pytest.approx(0.709, abs=5e-4)
    assert scores["p_label"] == pytest.approx(0.5) and scores["logit_diff"] == pytest.approx(0.25)


# --- loss and penalty ---------------------------------------------------------------------


class SquareEngine:
    """Loss = mean squared intervened vector; base 0, source 2 everywhere (one group of 8)."""

    def __init__(self, n: int):
        self.groups = [_Group(8, [])]
        self.lm = SimpleNamespace(device=torch.device("cpu"))
        self.n = n

    def loss(self, batch, intervention):
        rows = sum(len(r) for _, r in batch)
        return intervention(torch.zeros(rows, self.n), torch.full((rows, self.n), 2.0)).pow(2).mean()


def test_loss_is_the_cross_entropy_and_the_penalty_is_apart():
    """dbm with lr 0: the mask stays σ(0) = ½, so h = 1 (loss 1) and the L1 term is 0.01 · ½."""
    dbm = build_intervention("dbm", N, l1_weight=0.01)
    result = fit(SquareEngine(N), dbm, epochs=2, lr=0.0, batch_size=4, lr_end_factor=1.0, seed=0, progress=False)
    assert result.steps == 4
    assert result.loss == pytest.approx(1.0) and result.penalty == pytest.approx(0.005)
    das = fit(SquareEngine(N), DASIntervention(N, 1), epochs=1, lr=0.0, batch_size=4, lr_end_factor=1.0, seed=0, progress=False)
    assert das.penalty == 0.0


# --- gain, offmanifold and max_z -----------------------------------------------------------

# Three natural vectors on the diagonal: S = (2/3)[[1,1],[1,1]], tr S / n = 2/3, Σ‖x‖⁴/N = 8/3, ‖S‖² = 16/9,
# ‖S − (2/3) I‖² = 8/9, so the Ledoit-Wolf intensity is (8/3 − 16/9) / 3 / (8/9) = 1/3 and the shrunk covariance
# [[2/3, 4/9], [4/9, 2/3]]: variance 10/9 along (1, 1), 2/9 along (1, −1).
DIAGONAL = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])


def test_shrunk_covariance_by_hand():
    mean, covariance = shrunk_covariance(DIAGONAL)
    torch.testing.assert_close(mean, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(covariance, torch.tensor([[2 / 3, 4 / 9], [4 / 9, 2 / 3]], dtype=torch.float64))


def test_off_manifold_by_hand():
    base = torch.tensor([[1.0, 1.0]])  # d² = 2 / (10/9) = 1.8
    assert off_manifold(torch.tensor([[-1.0, -1.0]]), base, DIAGONAL) == pytest.approx(1.0, rel=1e-6)  # a natural swap
    for g in (2.0, 10.0):  # a stretch of gain g along the natural direction scores g
        assert off_manifold(g * base, base, DIAGONAL) == pytest.approx(g, rel=1e-6)
    # the first coordinate of (1, 1) with the second of (−1, −1): both coordinates natural, the pair is not,
    # d² = 2 / (2/9) = 9, so √(9 / 1.8) = √5
    assert off_manifold(torch.tensor([[1.0, -1.0]]), base, DIAGONAL) == pytest.approx(math.sqrt(5), rel=1e-6)
    assert math.isnan(off_manifold(base, base, DIAGONAL[:1])) and math.isnan(off_manifold(base[:0], base, DIAGONAL))


def test_an_orthogonal_swap_of_natural_vectors_scores_about_one_and_an_oblique_stretch_grows():
    """Swapping coordinates that vary independently gives natural vectors (about 1), however far out the swapped
    coordinates' own values lie; swapping a random subspace of the same anisotropic vectors does not (the swap
    breaks their covariance: Σ is not (I − P) Σ (I − P) + P Σ P unless P commutes with Σ); oblique_das unbounded
    grows with its stretch."""
    from das_cli.analysis import fixed_subspace

    g = torch.Generator().manual_seed(0)
    n = 8
    natural = torch.randn(2000, n, generator=g) * torch.linspace(0.5, 3.0, n)
    base, source = natural[:300], natural[300:600]
    aligned = fixed_subspace(torch.eye(n)[:, :3]).eval()
    assert off_manifold(aligned(base, source).detach(), base, natural) == pytest.approx(1.0, abs=0.1)
    rotated = DASIntervention(n, 3).eval()
    assert off_manifold(rotated(base, source).detach(), base, natural) > 1.2
    scores = []
    for offset in (0.0, 3.0, 30.0):
        oblique = ObliqueDASIntervention(n, dim=1, max_gain=math.inf)
        with torch.no_grad():
            oblique.read_basis.copy_(torch.eye(n)[:, :1])
            oblique.write_offset.copy_(offset * torch.eye(n)[:, 1:2])
        scores.append(edit_scores(oblique.eval(), natural, base, source)["offmanifold"])
    assert scores[0] == pytest.approx(1.0, abs=0.1) and scores[0] < scores[1] < scores[2] and scores[2] > 5




def test_largest_z_by_hand():
    natural = torch.tensor([[1.0, 5.0, 0.0], [2.0, 5.0, 0.0], [3.0, 5.0, 0.0]])  # e0: mean 2, std 1; e1 constant
    edited = torch.tensor([[5.0, 9.0, 0.0], [0.0, 5.0, 0.0]])
    assert largest_z(edited, natural, torch.tensor([0])) == pytest.approx(3.0)
    assert largest_z(edited, natural, torch.tensor([0, 1])) == pytest.approx(3.0)  # e1 never varies: left out
    assert math.isnan(largest_z(edited, natural, torch.tensor([1])))
    diagonal = torch.tensor([[1.0], [1.0], [0.0]]) / math.sqrt(2)  # along (e0 + e1)/√2: mean 7/√2, std 1/√2
    assert largest_z(edited, natural, diagonal) == pytest.approx(abs(14 / math.sqrt(2) - 7 / math.sqrt(2)) * math.sqrt(2))
    assert math.isnan(largest_z(edited, natural, torch.zeros(3, 0)))


def applied_map(module) -> torch.Tensor:
    """M of h = b + M (s − b), read off column by column (b = 0, s = eᵢ)."""
    with torch.no_grad():
        return module(torch.zeros(module.n, module.n), torch.eye(module.n)).T


def ready(name: str, folder) -> object:
    torch.manual_seed(1)
    options = {"vanilla": {"neurons": [1, 4]}, "das": {"dim": 2}, "oblique_das": {"dim": 2, "max_gain": 1e9},
               "pca": {"dim": 2}, "random": {"dim": 2}, "fixed": {"path": str(folder / "basis.pt")}}.get(name, {})
    if name == "fixed":
        torch.save(torch.linalg.qr(torch.randn(N, 2))[0], options["path"])
    return fitted_intervention(name, N, options)


@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
def test_gain_is_the_norm_of_the_applied_map_and_directions_span_what_it_writes(name, tmp_path):
    module = ready(name, tmp_path)
    M = applied_map(module)
    assert module.gain() == pytest.approx(float(torch.linalg.matrix_norm(M, ord=2)), abs=1e-4)
    directions = module.edit_directions()
    U = torch.eye(N)[:, directions] if not directions.dtype.is_floating_point else directions
    torch.testing.assert_close(U @ (U.T @ M), M, rtol=0, atol=1e-4)  # M writes only within span(U)


def test_oblique_edit_scores_see_the_stretch():
    """Read along e0, write along e0 + 3 e1 (unbounded): an edit of 2 along e0 moves e1 by 6."""
    module = ObliqueDASIntervention(2, dim=1, max_gain=math.inf)
    with torch.no_grad():
        module.read_basis.copy_(torch.tensor([[1.0], [0.0]]))
        module.write_offset.copy_(torch.tensor([[0.0], [3.0]]))
    natural = torch.tensor([[0.0, -1.0], [0.0, 1.0], [2.0, 0.0], [2.0, 0.0]])
    base, source = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])  # edited: (2, 6)
    scores = edit_scores(module.eval(), natural, base, source)
    assert scores["gain"] == pytest.approx(math.sqrt(10))
    write = torch.tensor([1.0, 3.0]) / math.sqrt(10)
    along = natural @ write
    expected = abs((torch.tensor([2.0, 6.0]) @ write - along.mean()) / along.std())
    assert scores["max_z"] == pytest.approx(float(expected), rel=1e-5)


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.slow
def test_new_columns_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = run_cli(["model=tiny_llama", "layers=[1]", "intervention=boundless_das", f"hydra.run.dir={out}"] + TINY)
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(out / "iia.csv").iloc[0]
    assert row["iia_lo"] <= row["iia"] <= row["iia_hi"]
    flips = row["n_test"] // 2  # iia counts the flips; as many non-flips score iia_isolate
    assert (row["iia_lo"], row["iia_hi"]) == pytest.approx(wilson_interval(round(row["iia"] * flips), flips))
    assert 0 <= row["p_label"] <= 1 and math.isfinite(row["logit_diff"])  # IOI knows the base's answer
    assert row["gain"] == (1.0 if row["dim"] > 0 else 0.0) and row["max_z"] >= 0 and row["offmanifold"] > 0
    assert row["penalty"] > 0 and row["loss"] > 0  # λ·β is reported apart from the cross-entropy
    best = next(line for line in result.stdout.splitlines() if line.startswith("best:"))
    assert f"95% CI [{row['iia_lo']:.2f}, {row['iia_hi']:.2f}]" in best
