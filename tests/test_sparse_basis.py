"""The sparse-Jacobian rotation: the measure by hand, orthogonality, and recovery of a planted basis."""

import pytest
import torch

from das_cli.sparse_rotation import Rotation, fit_rotation, normalised, producer_jacobian, reader_jacobian, rotate, sparsity, zeros_fraction

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
    assert len(fit.history) == 300 and fit.sparsity_after <= min(fit.history) + 1e-3  # the best rotation met is kept


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


@pytest.fixture(scope="module")
def tiny_models():
    from das_cli import config as C
    from das_cli.models import load_model

    return {name: load_model(C.compose([f"model={name}"]).model, "cpu", "float32") for name in ("tiny_llama", "tiny_gpt2")}


def prompt(lm):
    return torch.tensor(lm.tokenizer("When Mary and John went to the store, John gave a drink to").input_ids)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_reader_of_the_mlp_activation_is_the_down_projection(tiny_models, name):
    """Block output = residual + down_proj(activation): its Jacobian in the activation is the projection's weight."""
    from das_cli.sites import resolve_site

    lm = tiny_models[name]
    jacobian = reader_jacobian(lm, resolve_site(lm, "mlp_activation", 1), prompt(lm), 5)
    weight = lm.model.get_submodule(f"{lm.family.blocks}.1.{lm.family.mlp_out_proj}").weight
    expected = weight if name == "tiny_llama" else weight.T  # GPT-2's Conv1D stores [in, out]
    torch.testing.assert_close(jacobian, expected, atol=1e-5, rtol=1e-5)


def test_producer_jacobian_matches_autograd_on_one_copy(tiny_models, monkeypatch):
    from das_cli import sparse_rotation as sparse_basis
    from das_cli.sites import hooked, resolve_site

    lm, ids, position = tiny_models["tiny_llama"], prompt(tiny_models["tiny_llama"]), 6
    site, entry = resolve_site(lm, "block_output", 1), resolve_site(lm, "block_input", 1)
    monkeypatch.setattr(sparse_basis, "JACOBIAN_CHUNK", 7)  # several chunks, the last one short

    def block_output_at(x):  # the plain model, its block-1 input at `position` replaced by x
        def write(hidden):
            hidden = hidden.clone()
            hidden[0, position] = x
            return hidden

        out = []
        with hooked(entry, write), hooked(site, lambda h: out.append(h[0, position])):
            lm.model(input_ids=ids[None], use_cache=False)
        return out[0]

    start = sparse_basis._read(lm, entry, ids)[0, position]
    expected = torch.autograd.functional.jacobian(block_output_at, start)
    assert (expected - torch.eye(lm.hidden_size)).abs().max() > 1e-2  # the block does more than pass x through
    torch.testing.assert_close(producer_jacobian(lm, site, ids, position), expected, atol=1e-5, rtol=1e-5)
    # block_input is produced by the block before it
    torch.testing.assert_close(producer_jacobian(lm, entry, ids, position), producer_jacobian(lm, resolve_site(lm, "block_output", 0), ids, position))


def test_sites_without_a_producer_or_reader(tiny_models):
    from das_cli.sites import resolve_site

    lm = tiny_models["tiny_llama"]
    with pytest.raises(ValueError, match="layer 0 is the embedding"):
        producer_jacobian(lm, resolve_site(lm, "block_input", 0), prompt(lm), 3)
    with pytest.raises(ValueError, match="no block reads it"):
        reader_jacobian(lm, resolve_site(lm, "block_output", lm.n_layers - 1), prompt(lm), 3)


# --- the intervention ---------------------------------------------------------------------------

def fitted(n: int, width: int, seed: int = 0):
    """A sparse_basis intervention of n = P · width with a random rotation set (steps=0 keeps the start, I, so
    the rotation is set by hand) and random logits."""
    from das_cli.interventions import build_intervention

    intervention = build_intervention("sparse_basis", n, steps=0)
    intervention.fit_jacobians({"output": torch.randn(2, width, 3)})
    generator = torch.Generator().manual_seed(seed)
    intervention.rotation = torch.linalg.qr(torch.randn(width, width, generator=generator))[0]
    with torch.no_grad():
        intervention.logits.copy_(torch.randn(n, generator=generator))
    return intervention


def test_forward_is_the_rotated_mask_swap_per_position():
    width, positions = 5, 3
    intervention = fitted(width * positions, width).eval()
    R, m = intervention.rotation, intervention.hard_mask().view(positions, width)
    b, s = torch.randn(4, width * positions), torch.randn(4, width * positions)
    expected = torch.cat([b[:, p * width:(p + 1) * width] + (m[p] * ((s - b)[:, p * width:(p + 1) * width] @ R.T)) @ R
                          for p in range(positions)], dim=1)
    torch.testing.assert_close(intervention(b, s), expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        intervention.logits.fill_(1.0)
    torch.testing.assert_close(intervention(b, s), s, atol=1e-5, rtol=0)  # every coordinate kept: the source
    intervention.train()
    soft = intervention.soft_mask().view(positions, width)
    assert 0 < float(soft.min().detach()) < 1  # training mixes with the soft mask, not the hard one
    torch.testing.assert_close(intervention(b, s)[:, :width], b[:, :width] + (soft[0] * ((s - b)[:, :width] @ R.T)) @ R)


def test_directions_are_the_kept_rotated_coordinates():
    width, positions = 4, 2
    intervention = fitted(width * positions, width, seed=3)
    directions = intervention.edit_directions()
    kept = torch.nonzero(intervention.logits > 0).flatten()
    assert directions.shape == (width * positions, len(kept)) == (8, intervention.learned_dim())
    torch.testing.assert_close(directions.T @ directions, torch.eye(len(kept)), atol=1e-5, rtol=0)
    b, s = torch.zeros(1, 8), torch.randn(1, 8)
    edit = intervention.eval()(b, s)[0]
    torch.testing.assert_close(edit, directions @ (directions.T @ s[0]), atol=1e-5, rtol=0)  # M = W Wᵀ: gain 1
    assert intervention.gain() == 1.0
    saved = intervention.saved()
    assert set(saved) == {"rotation", "mask", "logits", "basis"} and saved["rotation"].shape == (width, width)
    with torch.no_grad():
        intervention.logits.fill_(-1.0)
    assert intervention.gain() == 0.0 and intervention.edit_directions().shape == (8, 0)


def test_used_before_the_rotation_is_fitted():
    from das_cli.interventions import build_intervention

    with pytest.raises(RuntimeError, match="fit_model"):
        build_intervention("sparse_basis", 4)(torch.zeros(1, 4), torch.ones(1, 4))


@pytest.mark.parametrize("options, message", [
    ({"side": "sideways"}, "intervention.side"), ({"n_prompts": 0}, "intervention.n_prompts=0"),
    ({"steps": -1}, "intervention.steps=-1"), ({"restarts": 1.5}, "intervention.restarts=1.5"), ({"lr": 0}, "intervention.lr=0"),
    ({"l1_weight": -1}, "intervention.l1_weight=-1"),
])
def test_bad_options_are_clear_errors(options, message):
    from das_cli.errors import DasError
    from das_cli.interventions import build_intervention

    with pytest.raises(DasError, match=message):
        build_intervention("sparse_basis", 4, **options)


def test_fit_model_samples_prompts_by_seed_and_rotates_the_site_width(tiny_models):
    from das_cli.data import tokenize_pairs
    from das_cli.interventions import build_intervention
    from das_cli.ioi import make_ioi
    from das_cli.sites import resolve_site

    lm = tiny_models["tiny_gpt2"]
    pairs = tokenize_pairs(lm.tokenizer, make_ioi(lm.tokenizer, "io_position", 12, 2, 0).train, "train")
    site = resolve_site(lm, "mlp_activation", 1)
    calls = []

    def fit(seed, side="output"):
        intervention = build_intervention("sparse_basis", 2 * site.width, side=side, n_prompts=3, steps=5)
        real = intervention.fit_jacobians
        intervention.fit_jacobians = lambda jacobians, s: calls.append(jacobians) or real(jacobians, s)
        return intervention, intervention.fit_model(lm, site, pairs, ("s2", "last"), seed)

    intervention, row = fit(0)
    assert calls[-1]["output"].shape == (3 * 2, site.width, lm.hidden_size)  # 3 prompts x 2 positions
    assert intervention.rotation.shape == (site.width, site.width)
    assert set(row) == {"sparsity_before", "sparsity_after", "zeros_before", "zeros_after"}
    assert torch.equal(fit(0)[0].rotation, intervention.rotation)  # the seed decides the sample
    assert not torch.equal(calls[-1]["output"], fit(1) and calls[-1]["output"])
    both, _ = fit(0, "both")
    assert set(calls[-1]) == {"output", "input"} and calls[-1]["input"].shape == (6, lm.hidden_size, site.width)


def test_mask_finds_a_variable_planted_on_one_rotated_coordinate():
    """The planted model of test_planted.py (the variable on one direction u of its block output); the rotation
    comes from Jacobians sparse in a random basis q whose coordinate 5 is u. The mask, trained on the
    counterfactual loss, keeps that one coordinate and nothing else."""
    from test_planted import D, pairs, planted_model

    from das_cli.activations import base_prefixes
    from das_cli.engines import make_engine, prepare
    from das_cli.interventions import build_intervention
    from das_cli.sites import resolve_site
    from das_cli.activations import read_prompts
    from das_cli.metrics import evaluate
    from das_cli.train import fit

    lm, u = planted_model()
    q0 = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(7)))[0]
    v = q0 @ u - torch.eye(D)[5]
    q = (torch.eye(D) - 2 * torch.outer(v, v) / (v @ v)) @ q0  # orthogonal, q u = e_5
    _, sparse = planted(0, n=D, prompts=16)
    intervention = build_intervention("sparse_basis", D, steps=600, restarts=3, lr=0.05)
    intervention.fit_jacobians({"output": q.T @ sparse})
    assert_signed_permutation(intervention.rotation @ q.T)

    site = resolve_site(lm, "block_output", 0)
    groups = {}
    for name, ps in (("train", pairs(200, False, 0)), ("test", pairs(100, True, 1))):
        groups[name] = prepare(ps, ("last",), read_prompts(lm, [site], ps, 50)[0], lm.device, base_prefixes(lm, ps, 50))
    fit(make_engine("fast", lm, site, groups["train"]), intervention, 20, 0.05, 20, 0.1, seed=0, progress=False)
    iia, _ = evaluate(make_engine("fast", lm, site, groups["test"]), intervention, 50)
    assert intervention.learned_dim() == 1 and iia >= 0.95
    assert abs(float(intervention.edit_directions()[:, 0] @ u)) > 0.999


# --- end to end ---------------------------------------------------------------------------------

FAST = ["intervention=sparse_basis", "intervention.n_prompts=2", "intervention.steps=10", "layers=[1]",
        "stream=[block_output,mlp_activation]"]


def table(folder):
    import pandas as pd

    return pd.read_csv(folder / "iia.csv").sort_values(["stream", "seed"]).reset_index(drop=True)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_cli_cells_report_sparsity_save_the_rotation_and_resume(tmp_path, model):
    from conftest import TINY, run_cli
    from safetensors.torch import load_file

    args = FAST + [f"model={model}", "positions=[last,[s2,last]]", f"hydra.run.dir={tmp_path}"] + TINY
    first = run_cli(args)
    assert first.returncode == 0, first.stderr
    rows = table(tmp_path)
    assert len(rows) == 4 and ("error" not in rows or rows["error"].isna().all())
    assert (rows["sparsity_after"] <= rows["sparsity_before"]).all()
    assert rows[["zeros_before", "zeros_after"]].apply(lambda c: c.between(0, 1)).all().all()
    for row in rows.itertuples():
        cell = tmp_path / "cells" / row.cell
        saved = load_file(cell / "subspace.safetensors")
        width = row.width // (2 if "+" in row.position else 1)
        assert saved["rotation"].shape == (width, width) and saved["mask"].shape == saved["logits"].shape == (row.width,)
        torch.testing.assert_close(saved["rotation"] @ saved["rotation"].T, torch.eye(width), atol=1e-4, rtol=0)
        assert int(saved["mask"].sum()) == row.dim == saved["basis"].shape[1]
        assert (cell / "jacobian_rotation.png").stat().st_size > 0 and (cell / "mask_logits.png").stat().st_size > 0
    again = run_cli(args)
    assert again.returncode == 0, again.stderr
    assert "trained" not in again.stderr  # every cell was on disk
    assert table(tmp_path).equals(rows)


@pytest.mark.slow
def test_cli_seeds_and_shards_give_the_cells_of_one_run(tmp_path):
    from conftest import TINY, run_cli

    common = FAST + ["model=tiny_gpt2", "seeds=[0,1]", "output.plots=false"] + TINY
    whole = run_cli(common + [f"hydra.run.dir={tmp_path / 'whole'}"])
    assert whole.returncode == 0, whole.stderr
    for shard in (0, 1):
        part = run_cli(common + ["sweep.num_shards=2", f"sweep.shard={shard}", f"hydra.run.dir={tmp_path / 'sharded'}"])
        assert part.returncode == 0, part.stderr
    expected, sharded = table(tmp_path / "whole"), table(tmp_path / "sharded")
    columns = ["cell", "iia", "dim", "sparsity_before", "sparsity_after", "zeros_before", "zeros_after"]
    assert len(expected) == 4 and sharded[columns].equals(expected[columns])
    by_seed = expected.set_index(["stream", "seed"])["sparsity_before"]
    assert by_seed[("block_output", 0)] != by_seed[("block_output", 1)]  # each seed draws its own prompts


@pytest.mark.slow
def test_cli_bad_side_is_one_line(tmp_path):
    from conftest import TINY, run_cli

    result = run_cli(FAST + ["model=tiny_gpt2", "intervention.side=sideways", f"hydra.run.dir={tmp_path}"] + TINY)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "das-cli: error: intervention.side=sideways: not a valid choice; valid choices: output, input, both")


def test_never_less_sparse_than_the_start():
    """A step far too large leaves the identity's basin; the identity (already sparse) is kept."""
    _, sparse = planted(5)
    fit = fit_rotation({"output": sparse}, steps=3, lr=1.0)
    assert fit.sparsity_after <= fit.sparsity_before and max(fit.history) > fit.sparsity_before
