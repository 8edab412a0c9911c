"""from_run=<run folder>: a finished run's saved interventions evaluated on other data, nothing trained."""

import json
import re
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import das_cli
from das_cli import folder as layout
from das_cli import generalisation
from das_cli.config import conf_dir
from das_cli.errors import DasError
from das_cli.report import aggregate

from conftest import TINY, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = ["model=tiny_gpt2", "layers=[0,1]", "positions=[last]", "train.epochs=2", "output.plots=false", "device=cpu",
        *TINY, "dataset.n_val=8"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("source")
    table = das_cli.run(das_cli.compose(GRID + ["intervention=das", "intervention.dim=2"]), out)
    return out, table


def test_the_source_dataset_reproduces_the_source_iia(tmp_path, source):
    folder, trained = source
    table = das_cli.run(das_cli.compose(GRID + [f"from_run={folder}"]), tmp_path)
    merged = trained.merge(table, on="cell", suffixes=("_src", ""))
    assert len(merged) == 2
    assert (merged["iia"] == merged["iia_src"]).all() and (merged["iia_val"] == merged["iia_val_src"]).all()
    assert merged["test_loss"].tolist() == pytest.approx(merged["test_loss_src"].tolist(), rel=1e-6)
    assert (table["steps"] == 0).all() and (table["intervention"] == "das").all()
    assert set(table["trained_in"]) == {str(folder.resolve())}
    assert (merged["train_iia"] == merged["train_iia_src"]).all()


def test_the_grid_is_narrowed_by_a_grid_key_given(tmp_path, source):
    folder, _ = source
    table = das_cli.run(das_cli.compose(GRID[:1] + GRID[2:] + ["layers=[1]", f"from_run={folder}"]), tmp_path)
    assert table["layer"].tolist() == [1]


def test_estimated_baselines_keep_the_source_directions(tmp_path):
    das_cli.run(das_cli.compose(GRID + ["intervention=mean_diff"]), tmp_path / "src")
    das_cli.run(das_cli.compose(GRID + ["dataset.seed=7", f"from_run={tmp_path / 'src'}"]), tmp_path / "new")
    for cell_id in layout.cell_ids(tmp_path / "src"):
        before = load_file(layout.subspace_file(tmp_path / "src", cell_id))["basis"]
        after = load_file(layout.subspace_file(tmp_path / "new", cell_id))["basis"]
        assert torch.equal(before, after)  # not re-estimated on the new prompts


def test_another_dataset_is_evaluated(tmp_path, source):
    folder, _ = source
    other = [o for o in GRID if not o.startswith("dataset.")] + ["dataset=ioi_file", f"from_run={folder}"]
    table = das_cli.run(das_cli.compose(other), tmp_path)
    assert len(table) == 2 and (table["steps"] == 0).all() and table["n_test"].iloc[0] > 0


@pytest.mark.slow
def test_a_cell_that_does_not_fit_the_model_is_named(tmp_path):
    das_cli.run(das_cli.compose(GRID + ["stream=mlp_activation", "layers=[0]"]), tmp_path / "src")
    result = run_cli(["model=tiny_llama", *GRID[1:], f"from_run={tmp_path / 'src'}", f"hydra.run.dir={tmp_path / 'o'}"])
    assert result.returncode == 2
    line = next(x for x in result.stderr.splitlines() if x.startswith("das-cli: error"))
    assert "cell mlp_activation__L00__Plast was trained on width 256; its site here is 128 wide" in line


def test_a_folder_that_is_no_run_is_refused(tmp_path):
    with pytest.raises(DasError, match="not a das-cli run folder"):
        das_cli.run(das_cli.compose(GRID + [f"from_run={tmp_path}"]), tmp_path / "o")


# --- the transfer table (das-cli-report over evaluations: trained on x tested on) ----------------------

REWORDED = conf_dir() / "examples" / "ioi_pairs_reworded.jsonl"
NO_DATASET_KEYS = [o for o in GRID if not o.startswith("dataset.")]


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory, source):
    """The source run evaluated on a file dataset written here and on ioi with another seed, under one folder."""
    folder, _ = source
    parent = tmp_path_factory.mktemp("evaluations")
    pairs = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    pairs.write_text(REWORDED.read_text())
    tables = {
        str(pairs): das_cli.run(das_cli.compose(NO_DATASET_KEYS + ["dataset=file", f"dataset.path={pairs}", f"from_run={folder}"]),
                                parent / "on_file"),
        "ioi (seed=7)": das_cli.run(das_cli.compose(GRID + ["dataset.seed=7", f"from_run={folder}"]), parent / "on_seed7"),
    }
    return parent, tables


def mark(folder, first: float) -> dict[str, float]:
    """Give each cell of a run folder its own iia (first, first + 0.01, ...): the tiny model's are all 0,
    so a table that took a value from the wrong folder or cell would still look right."""
    marks = {}
    for k, cell_id in enumerate(layout.cell_ids(folder)):
        path = layout.metrics_file(folder, cell_id)
        record = json.loads(path.read_text())
        record["iia"] = marks[cell_id] = round(first + 0.01 * k, 2)
        path.write_text(json.dumps(record))
    return marks


def test_the_report_writes_the_transfer_table(evaluations, source, tmp_path):
    """Over the source run and its evaluations: each value is the iia of its folder's cell; the diagonal the source's."""
    parent, tables = evaluations
    folder, trained = source
    shutil.copytree(parent, tmp_path / "all", ignore=shutil.ignore_patterns("transfer.*"))
    shutil.copytree(folder, tmp_path / "all" / "source")
    marks = {"ioi (seed=0)": mark(tmp_path / "all" / "source", 0.5), str(next(iter(tables))): mark(tmp_path / "all" / "on_file", 0.3),
             "ioi (seed=7)": mark(tmp_path / "all" / "on_seed7", 0.1)}
    report = aggregate(tmp_path / "all")
    table = pd.read_csv(tmp_path / "all" / "transfer.csv")
    assert list(table.columns) == ["cell", "trained_on", "tested_on", "iia", "iia_lo", "iia_hi", "n_test"]
    assert set(table["trained_on"]) == {"ioi (seed=0)"} and len(table) == 3 * 2
    tables["ioi (seed=0)"] = trained
    for tested_on, rows in tables.items():
        part = table[table["tested_on"] == tested_on].merge(rows, on="cell", suffixes=("", "_run"))
        assert dict(zip(part["cell"], part["iia"])) == marks[tested_on]
        for column in ("iia_lo", "iia_hi", "n_test"):
            assert part[column].tolist() == part[f"{column}_run"].tolist()
    assert (tmp_path / "all" / "transfer.png").stat().st_size > 0
    best = trained.loc[trained["iia_val"].idxmax(), "cell"]
    assert f"{best} (best cell of ioi (seed=0) on validation IIA" in report.text()
    assert report.transfer.frame.equals(table.astype({"n_test": "Int64"}))


def test_the_diagonal_is_read_from_the_source_folder(evaluations, source):
    """The source run is not among the folders reported on: its rows come from its folder (`trained_in`)."""
    parent, _ = evaluations
    _, trained = source
    table = aggregate(parent, plots=False).transfer.frame
    diagonal = table[table["tested_on"] == "ioi (seed=0)"].merge(trained, on="cell", suffixes=("", "_run"))
    assert len(diagonal) == 2 and diagonal["n_test"].tolist() == diagonal["n_test_run"].tolist()
    assert diagonal["iia"].tolist() == diagonal["iia_run"].tolist()


def test_a_normal_report_writes_no_transfer_table(source, tmp_path):
    folder, _ = source
    shutil.copytree(folder, tmp_path / "run")
    report = aggregate(tmp_path / "run")
    assert report.transfer is None and not (tmp_path / "run" / "transfer.csv").exists()
    assert "transfer" not in report.text()


def test_source_runs_of_two_configurations_are_two_rows(evaluations, source, tmp_path):
    folder, _ = source
    other = tmp_path / "dim1"
    das_cli.run(das_cli.compose(GRID + ["intervention=das", "intervention.dim=1"]), other)
    for name, run in (("a", folder), ("b", other)):
        das_cli.run(das_cli.compose(GRID + ["dataset.seed=7", f"from_run={run}"]), tmp_path / "evals" / name)
    table = aggregate(tmp_path / "evals", plots=False).transfer.frame
    assert set(table["trained_on"]) == {f"ioi (seed=0) @ {folder.resolve()}", f"ioi (seed=0) @ {other.resolve()}"}
    assert len(table) == 2 * 2 * 2  # 2 rows x 2 columns x 2 cells, nothing merged


def test_a_source_run_split_over_two_folders_is_one_row(source, tmp_path):
    """Layer chunks of one configuration (a multirun's jobs) are one source: one row, its diagonal from both folders."""
    folder, _ = source
    das_cli.run(das_cli.compose(GRID[:1] + GRID[2:] + ["layers=[2]", "intervention=das", "intervention.dim=2"]), tmp_path / "chunk")
    for name, run in (("a", folder), ("b", tmp_path / "chunk")):
        das_cli.run(das_cli.compose(GRID[:1] + GRID[2:] + ["dataset.seed=7", f"from_run={run}"]), tmp_path / "evals" / name)
    table = aggregate(tmp_path / "evals", plots=False).transfer.frame
    assert set(table["trained_on"]) == {"ioi (seed=0)"}
    assert sorted(table.loc[table["tested_on"] == "ioi (seed=0)", "cell"]) == [f"block_output__L0{k}__Plast" for k in range(3)]


def test_an_evaluation_of_an_evaluation_is_trained_on_the_first_source(evaluations, source, tmp_path):
    parent, _ = evaluations
    das_cli.run(das_cli.compose(GRID + ["dataset.seed=3", f"from_run={parent / 'on_seed7'}"]), tmp_path / "again")
    table = aggregate(tmp_path / "again", plots=False).transfer.frame
    assert set(table["trained_on"]) == {"ioi (seed=0)"} and set(table["tested_on"]) == {"ioi (seed=0)", "ioi (seed=3)"}


def test_a_file_name_shared_by_two_files_is_told_apart():
    same = {"dataset": {"name": "file", "path": "pairs.jsonl"}, "model": {"name": "m"}}
    keys = [json.dumps({**same, "data": h * 64}, sort_keys=True) for h in "ab"]
    names = generalisation.labels(keys + [json.dumps({"dataset": {"name": "ioi", "seed": 0}})])
    assert list(names.values()) == ["pairs.jsonl (data=aaaaaaaa)", "pairs.jsonl (data=bbbbbbbb)", "ioi"]


@pytest.mark.slow
def test_one_command_evaluates_a_list_of_datasets(source, tmp_path):
    folder, trained = source
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", f"from_run={folder}", "dataset=ioi,ioi_file", *NO_DATASET_KEYS, f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(sweep / "transfer.csv")
    assert set(table["tested_on"]) == {"ioi (n_test=12, n_train=24, n_val=8)", "ioi (n_test=100, n_train=200, n_val=50)",
                                       "ioi_pairs.jsonl"}
    assert "transfer: test IIA of 2 cells" in result.stdout
    # iia.csv's pivots and summary: one per dataset, though the datasets' configs have different keys
    assert len([f for f in sweep.iterdir() if re.fullmatch(r"pivot_block_output_config-[0-9a-f]{8}\.csv", f.name)]) == 2 and result.stdout.count("== data=") == 2
    diagonal = table[table["tested_on"] == "ioi (n_test=12, n_train=24, n_val=8)"].merge(trained, on="cell")
    assert diagonal["iia_x"].tolist() == diagonal["iia_y"].tolist()
