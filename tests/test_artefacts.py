"""Saved cells as artefacts: what metrics.json and the safetensors metadata record, load_cell, patch."""

import json

import pytest
import torch
from safetensors import safe_open

import das_cli
from das_cli import folder as layout
from das_cli.errors import DasError
from das_cli.models import load_model
from das_cli.sites import read_site, resolve_site

from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

SAVED_TYPES = [
    ["intervention=das", "intervention.dim=2"],
    ["intervention=das", "intervention.dim=2", "intervention.full_rotation=true"],
    ["intervention=boundless_das", "intervention.init_boundary=0.2"],
    ["intervention=oblique_das", "intervention.dim=2"],
    ["intervention=dbm"],
    ["intervention=mean_diff"],
    ["intervention=pca", "intervention.dim=2"],
    ["intervention=probe"],
    ["intervention=random", "intervention.dim=3"],
    ["intervention=vanilla", "intervention.neurons=[1,5]"],
]


def train_cell(tmp_path, overrides, model="tiny_gpt2"):
    cfg = das_cli.compose([f"model={model}", "layers=[1]", "positions=[last]", "train.epochs=2", "output.plots=false",
                           "device=cpu", *TINY, *overrides])
    das_cli.run(cfg, tmp_path)
    (cell_id,) = layout.cell_ids(tmp_path)
    return cfg, layout.cell_dir(tmp_path, cell_id)


@pytest.fixture(scope="module")
def lm():
    cfg = das_cli.compose(["model=tiny_gpt2"])
    return load_model(cfg.model, "cpu", "float32")


def test_metrics_and_safetensors_record_the_artefact(tmp_path):
    cfg, path = train_cell(tmp_path, ["intervention=das", "intervention.dim=2"])
    art = json.loads((path / layout.METRICS).read_text())["artefact"]
    assert art["stream"] == "block_output" and art["layer"] == 1 and art["positions"] == ["last"] and art["heads"] is None
    assert art["width"] == 64 and art["intervention"] == {"name": "das", "options": {"dim": 2, "orthogonal_map": None,
                                                                                      "full_rotation": False, "init": "random"}}
    assert art["model"]["name"] == "tiny_gpt2" and art["model"]["model_type"] == "gpt2"
    assert art["das_cli_version"] == das_cli.__version__
    with safe_open(path / layout.SUBSPACE, framework="pt") as f:
        assert json.loads(f.metadata()["artefact"]) == art
    assert "artefact" not in das_cli.run(cfg, tmp_path).columns  # a record, not a table column


@pytest.mark.slow  # every method's round trip is in the quick loop's test_registry.py; these are the variants
@pytest.mark.parametrize("overrides", SAVED_TYPES, ids=lambda o: "-".join(x.split("=")[-1] for x in o))
def test_load_cell_rebuilds_the_saved_intervention(tmp_path, overrides):
    _, path = train_cell(tmp_path, overrides)
    cell = das_cli.load_cell(path)
    saved = {}
    if (path / layout.SUBSPACE).exists():
        from safetensors.torch import load_file

        saved = load_file(path / layout.SUBSPACE)
    assert not cell.intervention.training
    assert cell.intervention.learned_dim() == cell.row["dim"]
    for name, tensor in cell.intervention.saved().items():
        if name == "read_basis":  # QR may flip column signs; the map P = A Qᵀ is what must be the same
            continue
        torch.testing.assert_close(tensor, saved[name], atol=1e-5, rtol=1e-5)
    if "write_basis" in saved:
        torch.testing.assert_close(cell.intervention.projection(), saved["write_basis"] @ saved["read_basis"].T, atol=1e-5, rtol=1e-5)


def test_load_cell_refuses_a_tampered_subspace(tmp_path):
    _, path = train_cell(tmp_path, ["intervention=das"])
    (path / layout.SUBSPACE).write_bytes(b"not the file")
    with pytest.raises(DasError, match="damaged"):
        das_cli.load_cell(path)


def test_load_cell_refuses_a_folder_that_is_no_cell(tmp_path):
    with pytest.raises(DasError, match="not a das-cli cell folder"):
        das_cli.load_cell(tmp_path / "cells" / "nothing")


def test_patch_swaps_the_subspace_at_the_site(tmp_path, lm):
    _, path = train_cell(tmp_path, ["intervention=das", "intervention.dim=2"])
    cell = das_cli.load_cell(path)
    W = cell.intervention.W.detach()
    base, source = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 12, 13]])
    after = resolve_site(lm, "block_input", 2)  # reads block 1's output, edited
    b = read_site(lm, after, base)[0]
    s = read_site(lm, after, source)[0, -1]
    with das_cli.patch(lm, cell, base, source):
        h = read_site(lm, after, base)[0]
    torch.testing.assert_close(h[:-1], b[:-1])  # other positions untouched
    torch.testing.assert_close(h[-1] @ W, s @ W, atol=1e-5, rtol=1e-4)  # the subspace comes from the source
    torch.testing.assert_close(h[-1] - (h[-1] @ W) @ W.T, b[-1] - (b[-1] @ W) @ W.T, atol=1e-5, rtol=1e-4)
    with das_cli.patch(lm.model, cell, base, base):  # a bare transformers model; source = base changes nothing
        torch.testing.assert_close(read_site(lm, after, base)[0], b)
    torch.testing.assert_close(read_site(lm, after, base)[0], b)  # the hook is gone after the block


def test_patch_edits_only_the_prompt_forward_in_generate(tmp_path, lm):
    _, path = train_cell(tmp_path, ["intervention=das", "intervention.dim=8"])
    cell = das_cli.load_cell(path)
    base, source = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 12, 13, 14]])
    args = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with das_cli.patch(lm, cell, base, source):
        cached = lm.model.generate(base, use_cache=True, **args)
        uncached = lm.model.generate(base, use_cache=False, **args)  # every step re-edits the prompt positions alike
    assert torch.equal(cached, uncached)
    logits = lm.model(base).logits
    with das_cli.patch(lm, cell, base, source):
        assert not torch.allclose(lm.model(base).logits, logits)


def test_patch_needs_indices_for_named_positions(tmp_path, lm):
    _, path = train_cell(tmp_path, ["intervention=das"])
    cell = das_cli.load_cell(path)
    cell.positions = ("io",)
    with pytest.raises(DasError, match="named position 'io'"):
        with das_cli.patch(lm, cell, torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6]])):
            pass
    with das_cli.patch(lm, cell, torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6]]), [1], [2]):
        pass


def test_patch_refuses_a_model_of_another_width(tmp_path):
    _, path = train_cell(tmp_path, ["intervention=das", "stream=mlp_activation"])
    cell = das_cli.load_cell(path)  # GPT-2's MLP is 4 x 64 wide, tiny_llama's 128
    other = load_model(das_cli.compose(["model=tiny_llama"]).model, "cpu", "float32")
    with pytest.raises(DasError, match=f"cell {cell.id}: width {cell.width} does not fit"):
        with das_cli.patch(other, cell, torch.tensor([[1, 2]]), torch.tensor([[3, 4]])):
            pass


@pytest.mark.slow
def test_patch_on_smollm2_a_full_swap_at_the_last_block_gives_the_sources_next_token(tmp_path):
    cfg = das_cli.compose(["model=smollm2_135m", "dataset=ravel_cities", "intervention=vanilla", "layers=[-1]",
                           "positions=[last]", "output.plots=false", "progress=false", "device=cpu"])
    das_cli.run(cfg, tmp_path)
    (cell_id,) = layout.cell_ids(tmp_path)
    cell = das_cli.load_cell(layout.cell_dir(tmp_path, cell_id))
    assert cell.artefact["model"]["name"] == "smollm2_135m" and cell.width == 576
    lm = load_model(cfg.model, "cpu", "float32")
    base = lm.tokenizer("Paris is a city in the country of", return_tensors="pt").input_ids
    source = lm.tokenizer("Tokyo is a city in the country of", return_tensors="pt").input_ids
    args = dict(max_new_tokens=3, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
    plain = lm.model.generate(base, **args)[0, base.shape[1]:]
    source_next = lm.model.generate(source, **args)[0, source.shape[1]]
    with das_cli.patch(lm, cell, base, source):
        edited = lm.model.generate(base, **args)[0, base.shape[1]:]
    assert edited[0] == source_next != plain[0]  # the last block's whole output is the source's
