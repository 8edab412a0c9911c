"""Every shipped config composes and validates; grid parsing; the Python API."""

import pytest
from omegaconf import OmegaConf

from das_cli import config as C
from das_cli.errors import DasError


@pytest.mark.parametrize("group", C.CONFIG_GROUPS)
def test_every_shipped_config_composes(group):
    for choice in C.group_choices(group):
        path = ["dataset.path=ravel_cities.csv"] if (group, choice) == ("dataset", "file") else []
        cfg = C.compose([f"{group}={choice}"] + path)
        C.validate(C.typed(cfg))
        assert cfg[group].name == choice or (group == "dataset" and cfg.dataset.name == "file")  # file-backed presets


def test_default_is_the_embedded_model():
    cfg = C.compose()
    assert cfg.model.name == "smollm2_135m" and cfg.model.embedded


def grid(**values):
    return OmegaConf.merge(C.typed(C.compose(["model=tiny_gpt2"])), values)


def test_positions_parse_ints_names_and_joint_cells():
    cfg = grid(positions=[-1, "last", ["s2", "last"], "-2"])
    assert C.positions(cfg) == [(-1,), ("last",), ("s2", "last"), (-2,)]


def test_layers_all_negative_and_out_of_range():
    assert C.layers(grid(layers="all"), 4) == [0, 1, 2, 3]
    assert C.layers(grid(layers=[-1, 0]), 4) == [3, 0]
    with pytest.raises(DasError, match="valid layers: 0..3"):
        C.layers(grid(layers=[4]), 4)


def test_head_sets():
    assert C.head_sets(grid(heads=None), 4) == [None]
    assert C.head_sets(grid(heads=[0, 3]), 4) == [(0, 3)]
    assert C.head_sets(grid(heads=[[0], [1, 2]]), 4) == [(0,), (1, 2)]


def test_all_errors_reported_together():
    cfg = grid(stream="nope", dtype="float8")
    with pytest.raises(DasError) as e:
        C.validate(cfg)
    assert "stream=nope" in str(e.value) and "dtype=float8" in str(e.value) and "\n" not in str(e.value)


def test_wrong_type_names_the_key():
    cfg = C.compose(["model=tiny_gpt2"])
    cfg.train.epochs = "many"
    with pytest.raises(DasError, match="train.epochs"):
        C.typed(cfg)


def test_python_api_returns_the_table(tmp_path):
    import das_cli

    cfg = das_cli.compose(["model=tiny_llama", "layers=[1]", "positions=[last]", "dataset.n_train=16",
                           "dataset.n_test=8", "train.epochs=1", "progress=false"])
    table = das_cli.run(cfg, tmp_path)
    assert list(table["layer"]) == [1] and (tmp_path / "iia.csv").exists()


def test_file_dataset_without_a_path_fails_before_loading_the_model():
    with pytest.raises(DasError, match=r"dataset.path: missing"):
        C.validate(C.typed(C.compose(["model=tiny_gpt2", "dataset=file"])))
