"""Every registered intervention saves and loads back to the same edit: by itself (saved / load_intervention),
as a finished cell (load_cell, patch, intervention=fixed) and as from_run's frozen cell (the same IIA exactly)."""

import functools
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import das_cli
from das_cli import config as C
from das_cli import folder as layout
from das_cli.errors import DasError
from das_cli.interventions import REGISTRY, load_intervention
from das_cli.models import load_model

from conftest import TINY, fitted_intervention

pytestmark = pytest.mark.usefixtures("one_thread")
N = 8


def yaml_options(name: str) -> dict:
    options = OmegaConf.to_container(C.compose([f"intervention={name}"]).intervention)  # the group's defaults list applied
    options.pop("name")
    return options


def fitted(name: str, tmp_path) -> tuple[torch.nn.Module, dict]:
    """The method built from its YAML on a site of width N, estimated where it is, its trained parameters moved
    off their start (so a load that ignores them shows)."""
    options = yaml_options(name)
    if name == "fixed":
        path = tmp_path / "basis.safetensors"
        save_file({"basis": torch.linalg.qr(torch.randn(N, 2)).Q.contiguous()}, str(path))
        options["path"] = str(path)
    return fitted_intervention(name, N, options), options


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_saved_tensors_load_back_to_the_same_edit(name, tmp_path):
    module, options = fitted(name, tmp_path)
    path = tmp_path / "saved.safetensors"
    save_file(module.saved(), str(path))
    torch.manual_seed(123)  # a different start: the load, not the seed, must give the edit
    loaded = load_intervention(name, N, options, load_file(str(path)), path)
    base, source = torch.randn(5, N), torch.randn(5, N)
    with torch.no_grad():
        torch.testing.assert_close(loaded(base, source), module(base, source), atol=1e-5, rtol=1e-5)
    assert loaded.learned_dim() == module.learned_dim()
    assert not (loaded.trainable or loaded.needs_activations or loaded.needs_model), "a loaded edit is frozen"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_missing_saved_tensor_is_an_error_never_another_edit(name, tmp_path):
    """Without any one of its saved tensors a method either refuses to load, naming the tensor, or (the tensor
    was a copy for readers, e.g. dbm's hard mask) gives the same edit; never an unfitted or re-fitted one."""
    module, options = fitted(name, tmp_path)
    tensors = module.saved()
    base, source = torch.randn(5, N), torch.randn(5, N)
    refused = 0
    for missing in tensors:
        kept = {k: v for k, v in tensors.items() if k != missing}
        try:
            loaded = load_intervention(name, N, options, kept, "cell")
        except DasError as e:
            assert f"'{missing}'" in str(e) and f"intervention={name}" in str(e)
            refused += 1
            continue
        with torch.no_grad():
            torch.testing.assert_close(loaded(base, source), module(base, source), atol=1e-5, rtol=1e-5)
    assert refused or not tensors or name in ("random", "fixed"), "the saved tensors must matter to the load"


@functools.cache
def tiny_llama():
    return load_model(das_cli.compose(["model=tiny_llama"]).model, "cpu", "float32")


def run_cell(folder, overrides):
    cfg = das_cli.compose(["model=tiny_llama", "layers=[1]", "positions=[last]", "output.plots=false", "device=cpu", "dataset.n_val=4",
                           *TINY, *overrides])
    return das_cli.run(cfg, folder)


def method_overrides(name: str, tmp_path) -> list[str]:
    if name == "fixed":
        path = tmp_path / "basis.safetensors"
        save_file({"basis": torch.linalg.qr(torch.randn(64, 2)).Q.contiguous()}, str(path))
        return ["intervention=fixed", f"intervention.path={path}"]
    if name == "sparse_basis":
        return ["intervention=sparse_basis", "intervention.jacobian_steps=3", "intervention.jacobian_prompts=2"]
    return [f"intervention={name}"]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_finished_cell_loads_back_patches_and_transfers(name, tmp_path):
    trained = run_cell(tmp_path / "run", method_overrides(name, tmp_path))
    assert "error" not in trained or trained["error"].isna().all()
    (cell_id,) = layout.cell_ids(tmp_path / "run")
    cell = das_cli.load_cell(layout.cell_dir(tmp_path / "run", cell_id))
    assert cell.intervention.learned_dim() == trained["dim"].item()
    saved = load_file(str(layout.cell_dir(tmp_path / "run", cell_id) / layout.SUBSPACE)) if cell.intervention.saved() else {}
    for key, tensor in saved.items():
        if key != "read_basis":  # QR may flip column signs; the map is compared by the IIA below
            torch.testing.assert_close(cell.intervention.saved()[key], tensor, atol=1e-6, rtol=1e-6)

    lm = tiny_llama()
    base_ids, source_ids = torch.randint(0, 1000, (2, 7)), torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        plain = lm.model(input_ids=base_ids).logits[:, -1]
        with das_cli.patch(lm, cell, base_ids, source_ids):
            patched = lm.model(input_ids=base_ids).logits[:, -1]
    assert torch.equal(plain, patched) == (cell.intervention.learned_dim() == 0)

    again = run_cell(tmp_path / "again", [f"from_run={tmp_path / 'run'}"])
    for column in ("iia", "dim", "train_iia"):
        assert again[column].item() == trained[column].item(), column
    assert math.isclose(again["test_loss"].item(), trained["test_loss"].item(), rel_tol=1e-5)

    as_fixed = ["intervention=fixed", f"intervention.path={layout.cell_dir(tmp_path / 'run', cell_id)}"]
    if not cell.intervention.subspace:
        with pytest.raises(DasError, match="from_run"):
            run_cell(tmp_path / "fixed", as_fixed)
    elif cell.intervention.learned_dim():
        fixed = run_cell(tmp_path / "fixed", as_fixed)
        assert fixed["dim"].item() == cell.intervention.learned_dim()
        if name in ("das", "mean_diff", "pca", "probe", "random", "fixed"):  # the same projection, computed the same way
            assert fixed["iia"].item() == trained["iia"].item()


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if n != "vanilla"))
def test_a_saved_tensor_with_nan_or_inf_is_refused_naming_it(name, tmp_path):
    module, options = fitted(name, tmp_path)
    for bad in (float("nan"), float("inf")):
        tensors = module.saved()
        key = next(iter(tensors))
        tensors[key] = tensors[key].clone().flatten().index_fill(0, torch.tensor([0]), bad).reshape(tensors[key].shape)
        with pytest.raises(DasError, match=f"the saved tensor '{key}' holds NaN or Inf"):
            load_intervention(name, N, options, tensors, "cell")


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if n != "vanilla"))
def test_a_saved_tensor_of_another_type_is_refused_naming_it(name, tmp_path):
    module, options = fitted(name, tmp_path)
    key, tensor = next(iter(module.saved().items()))
    for other in (tensor.round().to(torch.int64), tensor.to(torch.float64), tensor > 0):
        with pytest.raises(DasError, match=f"the saved tensor '{key}' is {str(other.dtype).removeprefix('torch.')}, not the float32"):
            load_intervention(name, N, options, {**module.saved(), key: other}, "cell")


def test_an_estimate_that_is_not_finite_fails_its_cell_with_the_reason(tmp_path, monkeypatch):
    """A method whose estimate holds NaN (here mean_diff's directions) leaves a failed cell naming the tensor, never a
    row of made-up scores."""
    from das_cli import directions

    monkeypatch.setattr(directions, "mean_diff_basis", lambda values, labels, k: torch.full((values.shape[1], k), float("nan")))
    row = run_cell(tmp_path / "run", ["intervention=mean_diff"]).iloc[0]
    assert row["error"] == "the estimated tensor 'basis' holds NaN or Inf values" and math.isnan(row["iia"])


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if n != "vanilla"))
def test_a_saved_tensor_of_another_shape_is_refused_or_changes_nothing(name, tmp_path):
    """A saved tensor of the wrong shape (one more column, flattened, empty) is a one-line error naming the shapes, or
    (a copy that load does not read) gives the same edit; never a silently different edit."""
    module, options = fitted(name, tmp_path)
    base, source = torch.randn(5, N), torch.randn(5, N)
    refused = 0
    for key, tensor in module.saved().items():
        for wrong in (torch.cat([tensor, tensor[..., :1]], dim=-1), tensor.flatten()[:-1], tensor.flatten()[:0]):
            tensors = {**module.saved(), key: wrong}
            try:
                loaded = load_intervention(name, N, options, tensors, "cell")
            except DasError as e:
                assert "do not fit intervention=" in str(e) and f"{key} {tuple(wrong.shape)}" in str(e) and "\n" not in str(e)
                refused += 1
                continue
            with torch.no_grad():
                torch.testing.assert_close(loaded(base, source), module(base, source), atol=1e-5, rtol=1e-5)
    assert refused
