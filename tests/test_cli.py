"""`das-cli` end to end on tiny random models: the output contract, resume, determinism, errors."""

import json

import pandas as pd
import pytest
from conftest import TINY, run_cli

GRID = ["model=tiny_gpt2", "stream=[block_output,mlp_output]", "layers=[0,2]", "positions=[s2,last]"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    result = run_cli(GRID + TINY + [f"hydra.run.dir={out}"])
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.mark.slow
def test_table_has_one_row_per_cell(sweep):
    out, result = sweep
    table = pd.read_csv(out / "iia.csv")
    assert len(table) == 2 * 2 * 2
    assert set(map(tuple, table[["stream", "layer", "position"]].values)) == {
        (s, layer, p) for s in ("block_output", "mlp_output") for layer in (0, 2) for p in ("s2", "last")
    }
    for column in ("iia", "train_iia", "loss", "base_accuracy", "n_train", "n_test", "seconds", "dim"):
        assert table[column].notna().all(), column
    assert table["iia"].between(0, 1).all()
    assert (table["n_train"] == 24).all() and (table["n_test"] == 24).all()  # 12 flips, 12 non-flips
    assert table[["iia_isolate", "iia_mean"]].notna().all().all()  # IOI io_position reports collateral damage
    assert (table["iia_mean"] == (table["iia"] + table["iia_isolate"]) / 2).all()
    assert "results:" in result.stdout and "best:" in result.stdout
    assert (table["n_val"] == 50).all() and table["iia_val"].between(0, 1).all()  # dataset.n_val's default
    assert "(chosen on validation IIA" in result.stdout


@pytest.mark.slow
def test_output_contract_files(sweep):
    out, _ = sweep
    for stream in ("block_output", "mlp_output"):
        assert (out / f"pivot_{stream}.csv").exists()
        assert (out / f"heatmap_{stream}.png").read_bytes()[:4] == b"\x89PNG"
    cells = sorted((out / "cells").iterdir())
    assert len(cells) == 8
    for cell in cells:
        metrics = json.loads((cell / "metrics.json").read_text())
        assert metrics["cell"] == cell.name
        assert (cell / "subspace.safetensors").stat().st_size > 0
    assert (out / ".hydra" / "config.yaml").exists() and (out / "run.json").exists()


@pytest.mark.slow
def test_rerun_resumes_without_retraining(sweep):
    out, _ = sweep
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/metrics.json")}
    table = pd.read_csv(out / "iia.csv")
    result = run_cli(GRID + TINY + [f"hydra.run.dir={out}"])
    assert result.returncode == 0, result.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before
    pd.testing.assert_frame_equal(pd.read_csv(out / "iia.csv"), table)


@pytest.mark.slow
def test_resume_refuses_a_changed_config(sweep):
    out, _ = sweep
    result = run_cli(GRID + TINY + [f"hydra.run.dir={out}", "train.lr=0.5"])
    assert result.returncode == 2
    assert "changed: train" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_fixed_seed_gives_identical_tables(sweep, tmp_path):
    out, _ = sweep
    result = run_cli(GRID + TINY + [f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr
    columns = ["stream", "layer", "position", "iia", "train_iia", "loss", "test_loss"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "iia.csv")[columns], pd.read_csv(out / "iia.csv")[columns])


@pytest.mark.slow
@pytest.mark.parametrize("intervention", ["vanilla", "boundless_das", "das intervention.orthogonal_map=cayley"])
def test_other_interventions_run_on_tiny_llama(intervention, tmp_path):
    name, *options = intervention.split()
    args = ["model=tiny_llama", f"intervention={name}", *options, "stream=attention_value_output", "layers=[1]", "positions=[last]"]
    result = run_cli(args + TINY + [f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(tmp_path / "iia.csv").iloc[0]
    assert row["intervention"] == name and 1 <= row["dim"] <= 64


BAD = [
    (["model=nope"], "model=nope", "tiny_gpt2"),
    (["stream=nope"], "stream=nope", "block_output"),
    (["intervention=nope"], "intervention=nope", "boundless_das"),
    (["layers=[99]"], "layers", "0..3"),
    (["positions=[-99]"], "positions", "-"),
    (["positions=[nowhere]"], "positions", "last"),
    (["train.engine=warp"], "train.engine=warp", "reference"),
    (["dataset.variable=colour"], "dataset.variable=colour", "io_position"),
    (["intervention.dim=999"], "intervention.dim=999", "64"),
    (["train.epoch=3"], "train.epoch", ""),
    (["dtype=float8"], "dtype=float8", "bfloat16"),
    (["intervention.orthogonal_map=bogus"], "intervention.orthogonal_map", "cayley"),
    (["intervention.dim=abc"], "intervention.dim=abc", "integer"),
    (["intervention=vanilla", "intervention.neurons=[a]"], "intervention.neurons=[a]", "integers"),
    (["dataset.seed=1.5"], "dataset.seed=1.5", "integer"),
    (["eval.batch_size=0"], "eval.batch_size=0", ">= 1"),
    (["train.lr=nan"], "train.lr=nan", "finite"),
    (["train.lr_end_factor=-1"], "train.lr_end_factor", "between 0 and 1"),
    (["layer=[1]"], "layer: unknown key", "did you mean layers?"),
    (["stream=[]"], "stream=[]", "block_output"),
    (["layers=[true]"], "layers=[true]", "integers"),
    (["+intervention.foo=1"], "intervention.foo: unknown key", "dim"),
]


AFTER_LOAD = {"layers", "positions", "intervention.dim=999"}  # checked against the model, once it is loaded
END_TO_END = AFTER_LOAD | {"model=nope", "intervention.foo: unknown key"}  # also run as a user runs them


@pytest.mark.parametrize("args,key,choice", [b for b in BAD if b[1] not in AFTER_LOAD],
                         ids=[b[1] for b in BAD if b[1] not in AFTER_LOAD])
def test_bad_input_is_one_line_before_anything_loads(args, key, choice, tmp_path, capsys):
    """The same table as the CLI below, through the CLI's own check before Hydra starts (in process)."""
    from das_cli import cli

    with pytest.raises(SystemExit) as stop:
        cli.preflight(["model=tiny_gpt2", "layers=[0]"] + args + TINY + [f"hydra.run.dir={tmp_path}"])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("das-cli: error:") and key in lines[0] and choice in lines[0]
    assert not any(tmp_path.iterdir())  # no folder content before the config is sound


@pytest.mark.slow
@pytest.mark.parametrize("args,key,choice", [b for b in BAD if b[1] in END_TO_END], ids=[b[1] for b in BAD if b[1] in END_TO_END])
def test_bad_input_is_one_line(args, key, choice, tmp_path):
    result = run_cli(["model=tiny_gpt2", "layers=[0]"] + args + TINY + [f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("das-cli: error:")]
    assert len(lines) == 1, result.stderr
    assert key in lines[0] and choice in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cuda_request_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = run_cli(["model=tiny_gpt2", "device=cuda"] + TINY + [f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 2
    assert "device=cuda" in result.stderr and "cpu" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_multirun_key_typo_is_one_line(tmp_path):
    result = run_cli(["-m", "model=tiny_gpt2", "train.epoch=1,2", f"hydra.sweep.dir={tmp_path}"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "das-cli: error: train.epoch: unknown key in train; valid keys: batch_size, cells_per_step, engine, epochs, lr, lr_end_factor; "
        "did you mean train.epochs?"]


@pytest.mark.slow
def test_repeated_grid_entries_run_each_cell_once(tmp_path):
    args = ["model=tiny_gpt2", "layers=[0,0,-4]", "positions=[last,last]", "stream=[block_output,block_output]",
            "output.plots=false", "output.save_subspaces=false"]
    result = run_cli(args + TINY + [f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("das-cli: warning:")]
    assert [w.split(":")[2].strip() for w in warnings] == ["stream", "positions", "layers"], warnings
    assert "(negative indices count from the end of 4 layers)" in warnings[2]
    table = pd.read_csv(tmp_path / "iia.csv")
    assert len(table) == 1 and table["seed"].tolist() == [0]


@pytest.mark.slow
def test_model_path_with_the_default_model_is_loaded(tmp_path):
    """README's `das-cli model.name_or_path=...` reaches the loader (no Hydra '+' hint) even with the embedded preset."""
    missing = tmp_path / "no_checkpoint_here"
    result = run_cli([f"model.name_or_path={missing}", "layers=[0]"] + TINY + [f"hydra.run.dir={tmp_path / 'out'}"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"das-cli: error: model.name_or_path={missing}: no such folder, and not a hub id (namespace/name)"


def test_a_single_run_is_composed_and_checked_once(tmp_path, monkeypatch):
    """The CLI composes and validates a single run before Hydra starts it; the job runs that checked config
    (typed: lr=1 is the float 1.0) and validates nothing again. A key the preset leaves out gets its `+`."""
    import sys

    from das_cli import cli, config, sweep

    composed, validated, ran = [], [], []
    compose, validate = config.compose_checked, config.validate
    monkeypatch.setattr(config, "compose_checked", lambda overrides: composed.append(list(overrides)) or compose(overrides))
    monkeypatch.setattr(config, "validate", lambda cfg: validated.append(1) or validate(cfg))
    monkeypatch.setattr(sweep, "run", lambda cfg, out, checked=False: ran.append((cfg, checked)) or pd.DataFrame({"iia": []}))
    monkeypatch.setattr(cli, "CHECKED", {})
    monkeypatch.setattr(sys, "argv", ["das-cli", "model=tiny_gpt2", "train.lr=1", "progress=false", f"hydra.run.dir={tmp_path}"])
    cli.main()
    assert len(composed) == 1 and len(validated) == 1  # Hydra's own composition of the job is not counted here
    (cfg, checked), = ran
    assert checked and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    monkeypatch.setattr(sys, "argv", ["das-cli", "model=tiny_gpt2", "model.name_or_path=/no/such/folder", f"hydra.run.dir={tmp_path}"])
    cli.main()
    assert composed[-1][-1] == "+model.name_or_path=/no/such/folder" and len(validated) == 2
    assert ran[-1][1] and ran[-1][0].model.name_or_path == "/no/such/folder"
