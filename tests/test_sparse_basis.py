"""The sparse-Jacobian rotation: the measure by hand, orthogonality, and recovery of a planted basis."""

import pytest
import torch

from das_cli.sparse_basis import Rotation, fit_rotation, normalised, producer_jacobian, reader_jacobian, rotate, sparsity, zeros_fraction

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
    from das_cli import sparse_basis
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
