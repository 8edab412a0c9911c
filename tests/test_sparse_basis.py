"""The sparse-Jacobian rotation: the measure by hand, orthogonality, and recovery of a planted basis."""

import pytest
import torch

from das_cli.sparse_rotation import JacobianMap, fit_rotation, jacobian_map, normalised, rotate, site_jacobian, sparsity, zeros_fraction

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sparsity_by_hand():
    a = torch.tensor([[0.0, 1.0], [0.4, -0.9]])
    assert float(sparsity(a)) == pytest.approx(-(1 / 0.1 + 1 / 1.1 + 1 / 0.5 + 1 / 1.0))
    assert float(sparsity(torch.zeros(2, 2))) == pytest.approx(-40.0)  # the sparsest 2 x 2: every entry zero


def test_normalised_and_zeros():
    a = torch.tensor([[[0.0, 4.0], [-8.0, 0.004]], [[1.0, 1e-4], [0.5, 0.0]]])
    assert normalised(a).abs().amax(dim=(-2, -1)).tolist() == [1.0, 1.0]
    assert zeros_fraction(a) == pytest.approx(4 / 8)  # 0, 0.004 < 8e-3 in the first; 1e-4 and 0 in the second


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
    target = float(sparsity(rotate(normalised(jacobians), q, "left")).mean())
    assert fit.sparsity_after < fit.sparsity_before and fit.sparsity_after == pytest.approx(target, rel=0.01)
    assert fit.zeros_after > fit.zeros_before + 0.3
    assert 0 < fit.steps_taken == len(fit.history) <= 300


def test_recovers_a_planted_basis_on_the_input_side_and_both():
    q, sparse = planted(3)
    reading = sparse @ q  # the reading map's Jacobian is sparse when its input is rotated by q
    assert_signed_permutation(fit_rotation({"input": reading}, steps=300, restarts=3).rotation @ q.T)
    _, producing = planted(4)
    both = fit_rotation({"output": q.T @ producing, "input": reading}, steps=300, restarts=3)
    assert_signed_permutation(both.rotation @ q.T)


def skip_network(q: torch.Tensor, weights: torch.Tensor):
    """x -> x + Qᵀ tanh(S Q x): a residual block whose update is sparse (S's pattern) in the coordinates Q x."""
    return lambda x: x + q.T @ torch.tanh(weights @ (q @ x))


def test_recovers_the_planted_basis_of_a_network_with_a_skip_connection():
    """The block's Jacobian is I + Qᵀ diag(tanh') S Q. Its residual branch, rotated on both sides, is sparse at
    R = Q; the whole Jacobian rotated on one side (R (I + F)), as das-cli did before, does not find Q."""
    n = 6
    q, sparse = planted(11, n=n, prompts=1)
    block = skip_network(q, 2 * sparse[0])
    inputs = torch.randn(12, n, generator=torch.Generator().manual_seed(0))
    whole = torch.stack([torch.autograd.functional.jacobian(block, x) for x in inputs])
    branch = whole - torch.eye(n)
    fit = fit_rotation({"update": branch}, {"update": "both"}, steps=400, restarts=4, seed=0)
    assert_signed_permutation(fit.rotation @ q.T)
    assert fit.zeros_after > fit.zeros_before + 0.3
    one_sided = fit_rotation({"output": whole}, steps=400, restarts=0)
    assert (one_sided.rotation @ q.T).abs().amax(dim=1).min() < 0.9  # not Q


def test_the_kept_rotation_is_the_sparsest_met_and_never_worse_than_the_start():
    q, sparse = planted(5, n=8)
    fit = fit_rotation({"output": q.T @ sparse}, steps=50, restarts=0)
    assert fit.start == "identity" and fit.steps_taken == len(fit.history) > 0
    assert fit.sparsity_after == pytest.approx(min(fit.history), rel=1e-6) and fit.sparsity_after < fit.sparsity_before
    torch.testing.assert_close(fit.rotation @ fit.rotation.T, torch.eye(8), atol=1e-5, rtol=0)


def test_a_step_turns_by_at_most_the_angle_cap():
    from das_cli import sparse_rotation

    q, sparse = planted(6, n=8)
    fit = fit_rotation({"output": q.T @ sparse}, steps=1, restarts=0)
    if fit.steps_taken:  # one step from the identity, at the warm-up's first angle
        angles = torch.linalg.eigvals(fit.rotation).angle().abs()
        assert float(angles.max()) <= sparse_rotation.MAX_ANGLE / sparse_rotation.WARMUP_STEPS + 1e-4


def test_a_stationary_start_is_reported_as_kept():
    """Diagonal Jacobians rotated on both sides: the identity is a stationary point (the off-diagonal entries
    sit at the kink of |a|, the diagonal ones do not move to first order), so no step is taken."""
    diagonal = torch.diag_embed(torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) + 0.5)
    fit = fit_rotation({"update": diagonal}, {"update": "both"}, steps=20, restarts=0)
    assert fit.start == "identity" and fit.steps_taken == 0 and fit.history == []
    assert torch.equal(fit.rotation, torch.eye(5)) and fit.sparsity_after == pytest.approx(fit.sparsity_before)


def test_a_random_start_can_win_and_is_named():
    q, sparse = planted(2, n=6)
    fit = fit_rotation({"output": q.T @ sparse}, steps=5, restarts=3, seed=1)
    assert fit.start in {"identity", "random 1", "random 2", "random 3"}
    torch.testing.assert_close(fit.rotation @ fit.rotation.T, torch.eye(6), atol=1e-5, rtol=0)


def test_bad_jacobians():
    with pytest.raises(ValueError, match="every term needs an act"):
        fit_rotation({"sideways": torch.zeros(1, 2, 2)})
    with pytest.raises(ValueError, match="width differs"):
        fit_rotation({"output": torch.zeros(1, 3, 4), "input": torch.zeros(1, 4, 2)})
    with pytest.raises(ValueError, match="square"):
        fit_rotation({"update": torch.zeros(1, 3, 4)}, {"update": "both"})


@pytest.mark.parametrize("stream, layer, side, expected", [
    ("block_output", 2, "output", JacobianMap(("block_input", 2), ("block_output", 2), True, "both")),
    ("block_output", 2, "input", JacobianMap(("block_input", 3), ("block_output", 3), True, "both")),
    ("block_input", 2, "output", JacobianMap(("block_input", 1), ("block_output", 1), True, "both")),
    ("block_input", 2, "input", JacobianMap(("block_input", 2), ("block_output", 2), True, "both")),
    ("mlp_activation", 1, "output", JacobianMap(("mlp_input", 1), ("mlp_activation", 1), False, "left")),
    ("mlp_activation", 1, "input", JacobianMap(("mlp_activation", 1), ("mlp_output", 1), False, "right")),
    ("mlp_output", 1, "input", JacobianMap(("block_input", 2), ("block_output", 2), True, "right")),
    ("attention_output", 1, "input", JacobianMap(("attention_output", 1), ("mlp_output", 1), False, "right")),
    ("head_query_output", 1, "output", JacobianMap(("attention_input", 1), ("head_query_output", 1), False, "left")),
    ("mlp_input", 1, "output", JacobianMap(("block_input", 1), ("mlp_input", 1), False, "left")),
])
def test_which_map_each_site_takes(stream, layer, side, expected):
    assert jacobian_map(stream, layer, side, 4) == expected


@pytest.fixture(scope="module")
def tiny_models():
    from das_cli import config as C
    from das_cli.models import load_model

    return {name: load_model(C.compose([f"model={name}"]).model, "cpu", "float32") for name in ("tiny_llama", "tiny_gpt2")}


def prompt(lm):
    return torch.tensor(lm.tokenizer("When Mary and John went to the store, John gave a drink to").input_ids)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_reader_of_the_mlp_activation_is_the_down_projection(tiny_models, name):
    """MLP output = down_proj(activation): its Jacobian in the activation is the projection's weight."""
    from das_cli.sites import resolve_site

    lm = tiny_models[name]
    jacobian, act = site_jacobian(lm, resolve_site(lm, "mlp_activation", 1), "input", prompt(lm), 5)
    weight = lm.model.get_submodule(f"{lm.family.blocks}.1.{lm.family.mlp_out_proj}").weight
    expected = weight if name == "tiny_llama" else weight.T  # GPT-2's Conv1D stores [in, out]
    assert act == "right"
    torch.testing.assert_close(jacobian, expected, atol=1e-5, rtol=1e-5)


def block_output_at(lm, entry, site, ids, position):
    """The plain model's `site` at `position` as a function of `entry` there (autograd's reference)."""
    from das_cli.sites import hooked

    def run(x):
        def write(hidden):
            hidden = hidden.clone()
            hidden[0, position] = x
            return hidden

        out = []
        with hooked(entry, write), hooked(site, lambda h: out.append(h[0, position])):
            lm.model(input_ids=ids[None], use_cache=False)
        return out[0]

    return run


def test_residual_branch_jacobian_matches_autograd(tiny_models, monkeypatch):
    """block_output's map is its block's update: autograd's d block_output / d block_input minus I, in chunks."""
    from das_cli import sparse_rotation
    from das_cli.sites import resolve_site

    lm, ids, position = tiny_models["tiny_llama"], prompt(tiny_models["tiny_llama"]), 6
    site, entry = resolve_site(lm, "block_output", 1), resolve_site(lm, "block_input", 1)
    monkeypatch.setattr(sparse_rotation, "JACOBIAN_CHUNK", 7)  # several chunks, the last one short
    start = sparse_rotation._read(lm, entry, ids)[0, position]
    whole = torch.autograd.functional.jacobian(block_output_at(lm, entry, site, ids, position), start)
    assert (whole - torch.eye(lm.hidden_size)).abs().max() > 1e-2  # the block does more than pass x through
    jacobian, act = site_jacobian(lm, site, "output", ids, position)
    assert act == "both"
    torch.testing.assert_close(jacobian, whole - torch.eye(lm.hidden_size), atol=1e-5, rtol=1e-5)
    # block_input 2 is produced by block 1, block_output 1 is read by block 2
    torch.testing.assert_close(site_jacobian(lm, resolve_site(lm, "block_input", 2), "output", ids, position)[0], jacobian)
    read, _ = site_jacobian(lm, site, "input", ids, position)
    torch.testing.assert_close(read, site_jacobian(lm, resolve_site(lm, "block_input", 2), "input", ids, position)[0])


def test_mlp_activation_is_produced_from_the_mlp_input(tiny_models):
    from das_cli import sparse_rotation
    from das_cli.sites import resolve_site

    lm, ids, position = tiny_models["tiny_gpt2"], prompt(tiny_models["tiny_gpt2"]), 4
    site, entry = resolve_site(lm, "mlp_activation", 1), resolve_site(lm, "mlp_input", 1)
    start = sparse_rotation._read(lm, entry, ids)[0, position]
    expected = torch.autograd.functional.jacobian(block_output_at(lm, entry, site, ids, position), start)
    jacobian, act = site_jacobian(lm, site, "output", ids, position)
    assert act == "left" and jacobian.shape == (site.width, lm.hidden_size)
    torch.testing.assert_close(jacobian, expected, atol=1e-5, rtol=1e-5)


def test_sites_without_a_producer_or_reader(tiny_models):
    from das_cli.sites import resolve_site

    lm = tiny_models["tiny_llama"]
    with pytest.raises(ValueError, match="layer 0 is the embedding"):
        site_jacobian(lm, resolve_site(lm, "block_input", 0), "output", prompt(lm), 3)
    for stream in ("block_output", "mlp_output"):
        with pytest.raises(ValueError, match="no block reads it"):
            site_jacobian(lm, resolve_site(lm, stream, lm.n_layers - 1), "input", prompt(lm), 3)


# --- the intervention ---------------------------------------------------------------------------

def fitted(n: int, width: int, seed: int = 0):
    """A sparse_basis intervention of n = P · width with a random rotation set by hand and random logits."""
    from das_cli.interventions import build_intervention

    intervention = build_intervention("sparse_basis", n, jacobian_steps=0, jacobian_restarts=0)
    generator = torch.Generator().manual_seed(seed)
    intervention.set_rotation(torch.linalg.qr(torch.randn(width, width, generator=generator))[0])
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
    assert set(saved) == {"rotation", "features", "mask", "logits", "basis"} and saved["rotation"].shape == (width, width)
    with torch.no_grad():
        intervention.logits.fill_(-1.0)
    assert intervention.gain() == 0.0 and intervention.edit_directions().shape == (8, 0)


def test_a_cell_saved_before_the_features_were_stored_loads_from_its_rotation():
    from das_cli.interventions import load_intervention

    intervention = fitted(8, 4, seed=1).eval()
    old = {k: v for k, v in intervention.saved().items() if k != "features"}
    loaded = load_intervention("sparse_basis", 8, {}, old)
    b, s = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(loaded(b, s), intervention(b, s))


def test_used_before_the_rotation_is_fitted():
    from das_cli.interventions import build_intervention

    with pytest.raises(RuntimeError, match="estimate the basis"):
        build_intervention("sparse_basis", 4)(torch.zeros(1, 4), torch.ones(1, 4))


@pytest.mark.parametrize("name, options, message", [
    ("sparse_basis", {"jacobian_side": "sideways"}, "intervention.jacobian_side"),
    ("sparse_basis", {"jacobian_prompts": 0}, "intervention.jacobian_prompts=0"),
    ("sparse_basis", {"jacobian_steps": -1}, "intervention.jacobian_steps=-1"),
    ("dbm", {"jacobian_restarts": 1.5}, "intervention.jacobian_restarts=1.5"),
    ("dbm", {"l1_weight": -1}, "intervention.l1_weight=-1"),
    ("dbm", {"basis": "ica"}, "intervention.basis=ica: not a valid choice; valid choices: neurons, pca, svd, sparse_jacobian"),
    ("sparse_basis", {"basis": "pca"}, "intervention=dbm intervention.basis=pca"),
])
def test_bad_options_are_clear_errors(name, options, message):
    from das_cli.errors import DasError
    from das_cli.interventions import build_intervention

    with pytest.raises(DasError, match=message):
        build_intervention(name, 4, **options)


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
        intervention = build_intervention("sparse_basis", 2 * site.width, jacobian_side=side, jacobian_prompts=3,
                                          jacobian_steps=5, jacobian_restarts=1)
        real = intervention.fit_jacobians
        intervention.fit_jacobians = lambda jacobians, acts, s: calls.append((jacobians, acts)) or real(jacobians, acts, s)
        return intervention, intervention.fit_model(lm, site, pairs, ("s2", "last"), seed)

    intervention, row = fit(0)
    jacobians, acts = calls[-1]
    assert jacobians["output"].shape == (3 * 2, site.width, lm.hidden_size) and acts == {"output": "left"}  # 3 prompts x 2 positions
    assert intervention.rotation.shape == (site.width, site.width)
    assert set(row) == {"sparsity_before", "sparsity_after", "zeros_before", "zeros_after", "rotation_start", "rotation_steps"}
    assert torch.equal(fit(0)[0].rotation, intervention.rotation)  # the seed decides the sample
    assert not torch.equal(calls[-1][0]["output"], fit(1) and calls[-1][0]["output"])
    fit(0, "both")
    assert calls[-1][1] == {"output": "left", "input": "right"}
    assert calls[-1][0]["input"].shape == (6, lm.hidden_size, site.width)


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
    intervention = build_intervention("sparse_basis", D, jacobian_steps=600, jacobian_restarts=3)
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

FAST = ["intervention=sparse_basis", "intervention.jacobian_prompts=2", "intervention.jacobian_steps=10", "layers=[1]",
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
    assert (rows["sparsity_after"] <= rows["sparsity_before"]).all() and (rows["rotation_steps"] >= 0).all()
    assert rows[["zeros_before", "zeros_after"]].apply(lambda c: c.between(0, 1)).all().all()
    for row in rows.itertuples():
        cell = tmp_path / "cells" / row.cell
        saved = load_file(cell / "subspace.safetensors")
        width = row.width // (2 if "+" in row.position else 1)
        assert saved["rotation"].shape == (width, width) and saved["mask"].shape == saved["logits"].shape == (row.width,)
        assert saved["features"].shape == (row.width, row.width)
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

    result = run_cli(FAST + ["model=tiny_gpt2", "intervention.jacobian_side=sideways", f"hydra.run.dir={tmp_path}"] + TINY)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "das-cli: error: intervention.jacobian_side=sideways: not a valid choice; valid choices: output, input, both")
