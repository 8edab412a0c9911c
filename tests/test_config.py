"""Every shipped config composes and validates; grid parsing; the schema's one-line errors; the Python API."""

import dataclasses
import inspect
import subprocess
import sys

import pytest
from omegaconf import MISSING, OmegaConf

from das_cli import config as C
from das_cli import grid as G
from das_cli.errors import DasError


@pytest.mark.parametrize("group", C.CONFIG_GROUPS)
def test_every_shipped_config_composes(group, tmp_path):
    import torch

    torch.save(torch.eye(4)[:, :1], tmp_path / "basis.pt")
    paths = {("dataset", "file"): ["dataset.path=ravel_cities.csv"], ("intervention", "fixed"): [f"intervention.path={tmp_path / 'basis.pt'}"]}
    for choice in C.group_choices(group):
        path = paths.get((group, choice), [])
        cfg = C.compose([f"{group}={choice}"] + path)
        C.validate(C.typed(cfg))
        assert cfg[group].name == choice or (group == "dataset" and cfg.dataset.name == "file")  # file-backed presets


@pytest.mark.slow
def test_default_is_the_embedded_model():
    cfg = C.compose()
    assert cfg.model.name == "smollm2_135m" and cfg.model.embedded


def grid(**values):
    return OmegaConf.merge(C.typed(C.compose(["model=tiny_gpt2"])), values)


def test_positions_parse_ints_names_and_joint_cells():
    cfg = grid(positions=[-1, "last", ["s2", "last"], "-2"])
    assert G.positions(cfg) == [(-1,), ("last",), ("s2", "last"), (-2,)]


def test_layers_all_negative_and_out_of_range():
    assert G.layers(grid(layers="all"), 4) == [0, 1, 2, 3]
    assert G.layers(grid(layers=[-1, 0]), 4) == [3, 0]
    with pytest.raises(DasError, match="valid layers: 0..3"):
        G.layers(grid(layers=[4]), 4)


def test_head_sets():
    assert G.head_sets(grid(heads=None), 4) == [None]
    assert G.head_sets(grid(heads=[0, 3]), 4) == [(0, 3)]
    assert G.head_sets(grid(heads=[[0], [1, 2]]), 4) == [(0,), (1, 2)]


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


# ---- the schema: types, unknown keys, ranges (all before the model loads) ----


def checked(*overrides):
    """compose + typed + validate, as `das-cli` runs them before loading the model."""
    C.validate(C.typed(C.compose(["model=tiny_gpt2", *overrides])))


TYPE_ERRORS = [
    (["intervention.dim=abc"], "intervention.dim=abc: must be an integer"),
    (["intervention.dim=1.5"], "intervention.dim=1.5: must be an integer"),
    (["intervention=vanilla", "intervention.neurons=[a]"], "intervention.neurons=[a]: must be a list of integers or null"),
    (["intervention=vanilla", "intervention.neurons=[true]"], "intervention.neurons=[true]: must be a list of integers or null"),
    (["dataset.n_train=abc"], "dataset.n_train=abc: must be an integer"),
    (["dataset.n_train=10.7"], "dataset.n_train=10.7: must be an integer"),
    (["dataset.seed=abc"], "dataset.seed=abc: must be an integer"),
    (["dataset=file", "dataset.path=ravel_cities.csv", "dataset.test_fraction=abc"], "dataset.test_fraction=abc: must be a number"),
    (["dataset.n_val=2.5"], "dataset.n_val=2.5: must be an integer"),
    (["intervention=boundless_das", "intervention.init_boundary=abc"], "intervention.init_boundary=abc: must be a number"),
    (["intervention.full_rotation=3"], "intervention.full_rotation=3: must be true or false"),
    (["train.lr=fast"], "train.lr=fast: must be a number"),
    (["seed=true"], "seed=true: must be an integer"),
    (["progress=3"], "progress=3: must be true or false"),
    (["output.plots=yes"], "output.plots=yes: must be true or false"),
]


@pytest.mark.parametrize("overrides,message", TYPE_ERRORS, ids=[t[1].split(":")[0] for t in TYPE_ERRORS])
def test_wrong_types_are_one_line_errors(overrides, message):
    with pytest.raises(DasError) as e:
        checked(*overrides)
    assert str(e.value) == message


VALUE_ERRORS = [
    (["train.lr=nan"], "train.lr=nan: must be a finite number > 0"),
    (["train.lr=inf"], "train.lr=inf: must be a finite number > 0"),
    (["train.lr=0"], "train.lr=0.0: must be a finite number > 0"),
    (["train.lr_end_factor=-0.5"], "train.lr_end_factor=-0.5: must be between 0 and 1"),
    (["train.lr_end_factor=1.5"], "train.lr_end_factor=1.5: must be between 0 and 1"),
    (["dataset.n_train=0"], "dataset.n_train=0: must be >= 1"),
    (["dataset.n_test=0"], "dataset.n_test=0: must be >= 1"),
    (["dataset.variable=colour"], "dataset.variable=colour: valid choices: io_position, io_name"),
    (["dataset=file", "dataset.path=ravel_cities.csv", "dataset.test_fraction=1.5"], "dataset.test_fraction=1.5: must be between 0 and 1"),
    (["dataset=file", "dataset.path=ravel_cities.csv", "dataset.val_fraction=1"], "dataset.val_fraction=1.0: must be at least 0 and below 1"),
    (["dataset.n_val=-1"], "dataset.n_val=-1: must be >= 0"),
    (["dataset=file", "dataset.path=ravel_cities.csv", "dataset.train_kinds=[]"], "dataset.train_kinds=[]: give a non-empty list"),
    (["dataset=file", "dataset.path=ravel_cities.csv", "dataset.train_kinds=[causes]"], "dataset.train_kinds=[causes]: give a non-empty list of kinds; valid kinds: cause, isolate"),
    (["intervention.dim=0"], "intervention.dim=0: must be >= 1"),
    (["intervention=vanilla", "intervention.neurons=[]"], "intervention.neurons=[]: must be null or a non-empty list"),
    (["intervention=vanilla", "intervention.neurons=[-1]"], "intervention.neurons=[-1]: must be null or a non-empty list"),
    (["intervention.orthogonal_map=bogus"], "intervention.orthogonal_map=bogus: not a valid choice; valid choices: cayley"),
    (["intervention=boundless_das", "intervention.init_boundary=7"], "intervention.init_boundary=7.0: must be between"),
    (["intervention=dbm", "intervention.l1_weight=inf"], "intervention.l1_weight=inf: must be a finite number"),
    (["intervention=probe", "intervention.probe_l2=nan"], "intervention.probe_l2=nan: must be a finite number"),
    (["layers=[true]"], "layers=[true]: must be a non-empty list of layer indices"),
    (["layers=true"], "layers=true: must be a non-empty list of layer indices"),
    (["layers=[]"], "layers=[]: must be a non-empty list of layer indices"),
    (["stream=[]"], "stream=[]: give at least one stream; valid choices: block_input"),
    (["stream=head_query_output", "heads=[]"], "heads=[]: give a non-empty list of heads"),
    (["stream=head_query_output", "heads=[true]"], "heads=[true]: give a non-empty list of heads"),
    (["stream=head_query_output", "heads=[[0],[]]"], "heads=[[0],[]]: give a non-empty list of heads"),
    (["stream=head_query_output", "heads=cumulative", "head_order=[1,1]"], "head_order=[1,1]: valid choices: null, a list of distinct heads"),
    (["positions=[true]"], "positions: true is neither a token index nor a position name"),
    (["seeds=[true,2]"], "seeds=[true,2]: give a number of seeds"),
    (["seeds=true"], "seeds=true: give a number of seeds"),
]


@pytest.mark.parametrize("overrides,message", VALUE_ERRORS, ids=[" ".join(v[0]) for v in VALUE_ERRORS])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(DasError) as e:
        checked(*overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("override,message", [
    ("layer=[1]", "layer: unknown key; valid keys: analysis, dataset,"),
    ("train.epoch=3", "train.epoch: unknown key in train; valid keys: batch_size, cells_per_step, engine, epochs, lr, lr_end_factor; did you mean train.epochs?"),
    ("intervention.dimm=2", "intervention.dimm: unknown key of intervention=das; valid keys: dim, full_rotation, init, name, orthogonal_map; did you mean intervention.dim?"),
    ("dataset.ntrain=5", "did you mean dataset.n_train?"),
])
def test_unknown_keys_name_the_valid_keys_and_the_closest(override, message):
    with pytest.raises(DasError) as e:
        C.compose(["model=tiny_gpt2", override])
    assert message in str(e.value) and "+" not in str(e.value)
    assert override.startswith("layer=") <= ("did you mean layers?" in str(e.value))


def test_added_unknown_keys_are_caught_by_the_schema():
    with pytest.raises(DasError, match=r"^intervention.foo: unknown key of intervention=das; valid keys: dim, full_rotation"):
        checked("+intervention.foo=1")
    with pytest.raises(DasError, match=r"^train.epoch: unknown key; valid keys: batch_size, .*did you mean train.epochs\?"):
        checked("+train.epoch=1")


@pytest.mark.slow
def test_model_path_works_with_every_model_preset():
    """README: `das-cli model.name_or_path=...` with the default (embedded) model loads that path instead."""
    assert C.check_override_keys(["model.name_or_path=/ckpt"]) == ["+model.name_or_path=/ckpt"]
    assert C.check_override_keys(["model=gpt2", "model.name_or_path=/ckpt"]) == ["model=gpt2", "model.name_or_path=/ckpt"]
    cfg = C.typed(C.compose(["model.name_or_path=/ckpt"]))
    assert cfg.model.name_or_path == "/ckpt" and cfg.model.name == "smollm2_135m"
    assert "name_or_path" not in C.typed(C.compose()).model  # an unset optional key stays out of the fingerprint
    assert C.check_override_keys(["dataset=file", "dataset.path=x.csv"])[1] == "dataset.path=x.csv"  # set, not added


def test_cells_per_step_with_the_reference_engine_warns_that_it_does_nothing(recwarn):
    with pytest.warns(C.ConfigWarning, match=r"^train.cells_per_step=4 has no effect with train.engine=reference"):
        checked("train.engine=reference", "train.cells_per_step=4")
    for quiet in (["train.engine=reference"], ["train.engine=reference", "train.cells_per_step=1"], ["train.cells_per_step=4"]):
        checked(*quiet)
    assert not [w for w in recwarn if issubclass(w.category, C.ConfigWarning)]


def test_repeated_grid_entries_run_once_with_a_warning():
    with pytest.warns(C.ConfigWarning, match=r"^layers: 0 given more than once"):
        assert G.layers(grid(layers=[0, 0, -4, 1]), 4) == [0, 1]
    with pytest.warns(C.ConfigWarning, match=r"^positions: last, -1 given more than once"):
        assert G.positions(grid(positions=["last", "last", -1, "-1", ["s2", "last"]])) == [("last",), (-1,), ("s2", "last")]
    with pytest.warns(C.ConfigWarning, match=r"^stream: block_output given more than once"):
        assert G.streams(grid(stream=["block_output", "mlp_output", "block_output"])) == ["block_output", "mlp_output"]
    with pytest.warns(C.ConfigWarning, match=r"^heads: 0 given more than once"):
        assert G.head_sets(grid(heads=[[0], [0], [0, 1]]), 4) == [(0,), (0, 1)]


def test_booleans_are_not_indices():
    for key, value in [("layers", [True]), ("heads", [True]), ("seeds", [True, 2]), ("positions", [True])]:
        cfg = grid(**{key: value, "stream": "head_query_output"})
        with pytest.raises(DasError, match=key):
            C.validate(cfg)


def test_intervention_schema_matches_the_constructors():
    from das_cli.interventions import REGISTRY

    schemas = C.group_schemas("intervention")
    assert set(schemas) == set(REGISTRY) == set(C.group_choices("intervention"))
    for name, schema in schemas.items():
        options = {f.name for f in dataclasses.fields(schema)} - {"name"}
        assert options == set(inspect.signature(REGISTRY[name]).parameters) - {"n"}, name


def test_register_refuses_options_out_of_step_with_the_constructor():
    from das_cli.interventions import DASIntervention, register

    class Renamed(DASIntervention):
        name = "renamed"

        def __init__(self, n: int, dim: int, other: int = 0):
            super().__init__(n, dim)

    with pytest.raises(TypeError, match="Options fields"):
        register(Renamed)


def test_defaults_live_only_in_the_yaml():
    """A schema field holds a type, never a value: MISSING (the YAML gives it) or None (optional, unset)."""
    schemas = [C.RunSchema, C.ModelSchema, *C.DATASETS.values(), *C.group_schemas("intervention").values()]
    schemas += [f.type for f in dataclasses.fields(C.RunSchema) if f.default_factory is not dataclasses.MISSING]
    for schema in schemas:
        schema = getattr(C, schema) if isinstance(schema, str) else schema
        for f in dataclasses.fields(schema):
            if f.default_factory is dataclasses.MISSING:
                assert f.default in (MISSING, None), f"{schema.__name__}.{f.name}"


def test_help_and_the_schema_do_not_import_torch():
    """--help, composing and the model's and dataset's schemas stay torch-free; an intervention's schema is its
    method's `Options`, which lives with the method (a torch module), so only that group imports torch."""
    code = ("import sys; sys.argv = ['das-cli', '--help']\nfrom das_cli import cli, config as C\n"
            "cfg = C.compose(['model=tiny_gpt2'])\nfrom omegaconf import OmegaConf as O\nC._typed_group('model', O.to_container(cfg.model))\n"
            "C._typed_group('dataset', O.to_container(cfg.dataset))\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "Configuration groups" in result.stdout


def test_integers_are_numbers():
    checked("intervention=boundless_das", "intervention.temperature_start=50", "train.lr=1")
    assert C.typed(C.compose(["train.lr=1"])).train.lr == 1.0


def test_a_head_set_in_another_order_is_the_same_cell():
    with pytest.warns(C.ConfigWarning, match=r"heads: \[0,1\] given more than once \(a head set is a set"):
        assert G.head_sets(grid(heads=[[0, 1], [1, 0], [2]]), 4) == [(0, 1), (2,)]


def test_checking_the_options_allocates_for_no_width(monkeypatch):
    """Before the model is known the options are checked on a one-coordinate site: intervention.dim=100000 asks for
    no 100000 x 100000 rotation; the width check names the cell's width once the model is loaded."""
    import das_cli.interventions as interventions

    built = []
    real = interventions.build_intervention
    monkeypatch.setattr(interventions, "build_intervention", lambda name, n, **options: built.append((n, options)) or real(name, n, **options))
    C.validate(C.typed(C.compose(["model=tiny_gpt2", "intervention.dim=100000", "intervention.full_rotation=true"])))
    assert built == [(1, {"dim": 1, "orthogonal_map": None, "full_rotation": True, "init": "random"})]


def test_a_dim_wider_than_the_site_names_the_width(tmp_path):
    import das_cli

    with pytest.raises(DasError, match=r"^intervention.dim=100000: must be between 1 and 64 \(the width of cell block_output__L01__Plast\)$"):
        das_cli.run(das_cli.compose(["model=tiny_gpt2", "layers=[1]", "positions=[last]", "intervention.dim=100000"]), tmp_path)
