"""The illusion check's rowspace / nullspace split, checked on a hand-built MLP and on real model weights."""

import math

import pandas as pd
import pytest
import torch
from conftest import TINY, run_cli

from das_cli.analysis import downstream_weight, fixed_subspace, illusion_parts, rowspace_split, span_basis
from das_cli.interventions import project_swap
from das_cli.models import load_model
from omegaconf import OmegaConf

# Hand-built MLP read-out: W_out sees only hidden units 0 and 1 of 4; units 2 and 3 are its nullspace.
W_OUT = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])


def test_a_purely_null_direction_changes_no_output():
    v = torch.tensor([[0.0], [0.0], [0.6], [0.8]])  # in span(e2, e3)
    row, null = rowspace_split(v, W_OUT, 1)
    assert torch.allclose(row, torch.zeros_like(v), atol=1e-6) and torch.allclose(null, v)
    row_basis, null_basis = illusion_parts(v, W_OUT, 1)
    assert row_basis is None and null_basis.shape == (4, 1)
    base, source = torch.randn(5, 4), torch.randn(5, 4)
    patched = fixed_subspace(null_basis)(base, source)
    assert not torch.allclose(patched, base)  # the hidden vector does change ...
    assert torch.allclose(patched @ W_OUT.T, base @ W_OUT.T, atol=1e-6)  # ... the MLP's output does not


def test_parts_recombine_to_the_full_intervention():
    v = torch.tensor([[1.0], [0.0], [1.0], [0.0]]) / math.sqrt(2)
    row, null = rowspace_split(v, W_OUT, 1)
    assert torch.allclose(row, torch.tensor([[0.5 ** 0.5], [0], [0], [0]]), atol=1e-6)
    assert torch.allclose(row + null, v) and torch.allclose(W_OUT @ null, torch.zeros(2, 1), atol=1e-6)
    base, source = torch.randn(6, 4), torch.randn(6, 4)
    full = project_swap(base, source, v)
    coefficient = (source - base) @ v  # read with the whole direction ...
    by_parts = base + coefficient @ row.T + coefficient @ null.T  # ... write each part: they add up
    assert torch.allclose(full, by_parts, atol=1e-6)
    # downstream only the row part's write survives, though its size depends on the null part through the read
    assert torch.allclose(full @ W_OUT.T, (base + coefficient @ row.T) @ W_OUT.T, atol=1e-6)
    row_basis, null_basis = illusion_parts(v, W_OUT, 1)
    assert torch.allclose(row_basis.abs(), torch.tensor([[1.0], [0], [0], [0]]), atol=1e-6)
    assert torch.allclose(null_basis.abs(), torch.tensor([[0.0], [0], [1], [0]]), atol=1e-6)


def test_each_position_is_split_on_its_own():
    v = torch.zeros(8, 2)
    v[0, 0], v[6, 1] = 1.0, 1.0  # position 0: unit 0 (row); position 1: unit 2 (null)
    row, null = rowspace_split(v, W_OUT, 2)
    assert torch.allclose(row[:, 0], v[:, 0]) and torch.allclose(null[:, 1], v[:, 1])
    assert torch.allclose(row[:, 1], torch.zeros(8)) and torch.allclose(null[:, 0], torch.zeros(8))


def test_span_basis_is_orthonormal_and_drops_empty_directions():
    matrix = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    basis = span_basis(matrix)
    assert basis.shape == (3, 1) and torch.allclose(basis.T @ basis, torch.eye(1), atol=1e-6)
    assert span_basis(torch.zeros(3, 2)) is None


@pytest.mark.parametrize("model,hidden,intermediate", [("tiny_gpt2", 64, 256), ("tiny_llama", 64, 128)])
def test_downstream_weight_is_out_by_in(model, hidden, intermediate, one_thread):
    from das_cli.config import conf_dir

    cfg = OmegaConf.load(conf_dir() / "model" / f"{model}.yaml")
    lm = load_model(cfg, "cpu", "float32")
    assert tuple(downstream_weight(lm, "mlp_activation", 1).shape) == (hidden, intermediate)
    assert tuple(downstream_weight(lm, "attention_value_output", 1).shape) == (hidden, hidden)
    # the weight really is the map the model applies to the stream
    x = torch.randn(3, intermediate)
    mlp_out = lm.block(1).get_submodule(lm.family.mlp_out_proj)(x)
    bias = getattr(lm.block(1).get_submodule(lm.family.mlp_out_proj), "bias", None)
    expected = x @ downstream_weight(lm, "mlp_activation", 1).T + (0 if bias is None else bias)
    assert torch.allclose(mlp_out, expected, atol=1e-5)


@pytest.mark.slow
def test_illusion_columns_end_to_end(tmp_path):
    out = tmp_path / "run"
    args = ["model=tiny_llama", "stream=[mlp_activation,block_output]", "layers=[1]", "analysis.illusion=true"]
    result = run_cli(args + TINY + [f"hydra.run.dir={out}"])
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out / "iia.csv").set_index("stream")
    assert table.loc["mlp_activation", ["iia_row", "iia_null"]].between(0, 1).all()
    assert table.loc["block_output", ["iia_row", "iia_null"]].isna().all()  # no single reading projection
    assert (out / "pivot_mlp_activation_iia_null.csv").exists() and ", iia_row 0." in result.stdout


@pytest.mark.slow
def test_illusion_without_a_fitting_stream_is_a_one_line_error(tmp_path):
    result = run_cli(["model=tiny_llama", "analysis.illusion=true", f"hydra.run.dir={tmp_path}"] + TINY)
    assert result.returncode == 2
    assert "analysis.illusion=true: applies to the streams " in result.stderr and "mlp_activation" in result.stderr


@pytest.mark.slow
def test_illusion_is_nan_for_oblique_das(tmp_path):
    """The split patches orthogonal swaps of parts of one subspace; oblique_das reads along B and writes
    along A, so no such part is the map that was scored: both parts are NaN, IIA is still measured."""
    out = tmp_path / "run"
    args = ["model=tiny_llama", "stream=mlp_activation", "layers=[1]", "analysis.illusion=true", "intervention=oblique_das"]
    result = run_cli(args + TINY + [f"hydra.run.dir={out}"])
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(out / "iia.csv").iloc[0]
    assert 0 <= row["iia"] <= 1 and math.isnan(row["iia_row"]) and math.isnan(row["iia_null"])
    assert 1.0 <= row["gain"] <= 2.0 + 1e-4


def test_a_bundles_illusion_parts_are_evaluated_together_as_each_alone(tmp_path, monkeypatch):
    """With cells trained in one bundle, every cell's rowspace and nullspace patches are evaluated in one
    bundled evaluation, and give the IIA each cell gets trained and evaluated alone."""
    import das_cli
    import das_cli.cell as sweep_module

    sizes = []
    real = sweep_module.evaluate_bundle
    monkeypatch.setattr(sweep_module, "evaluate_bundle", lambda engines, *args, **kw: sizes.append(len(engines)) or real(engines, *args, **kw))
    overrides = ["model=tiny_llama", "stream=mlp_activation", "layers=[0,1,2]", "analysis.illusion=true", "progress=false",
                 "output.plots=false", *TINY]
    columns = ["iia", "iia_row", "iia_null"]
    bundled = das_cli.run(das_cli.compose(overrides + ["train.cells_per_step=auto"]), tmp_path / "bundled").sort_values("layer")
    patches = int(bundled[["iia_row", "iia_null"]].notna().sum().sum())
    assert patches >= 4 and sizes[-1] == patches  # the last bundled evaluation: every part of every cell at once
    sizes.clear()
    alone = das_cli.run(das_cli.compose(overrides + ["train.cells_per_step=1"]), tmp_path / "alone").sort_values("layer")
    assert sizes and max(sizes) <= 2  # one cell at a time: its own two parts together
    assert (bundled[columns].isna().values == alone[columns].isna().values).all()
    assert (bundled[columns].fillna(0).values - alone[columns].fillna(0).values).__abs__().max() <= 0.01
