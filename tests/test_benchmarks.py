"""The engine benchmark runs end to end on a tiny model, and the cell it hands to the pyvene peer
holds the same batches das-cli trains on."""

import subprocess
import sys

import torch

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # end to end: subprocesses, a wheel, the embedded model

BENCH = ROOT / "benchmarks" / "bench_engines.py"
TINY = ["model=tiny_gpt2", "dataset.n_train=24", "dataset.n_test=12", "train.batch_size=8"]


def test_benchmark_sweep_row(tmp_path):
    out = tmp_path / "results.md"
    args = ["--skip-cells", "--epochs", "1", "--layers", "0,2", "--out", str(out), "--overrides", *TINY]
    result = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    header, rule, row = out.read_text().splitlines()[:3]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert header.startswith("| measurement | cells | bundled s/cell | fast s/cell") and cells[1] == "2"
    assert all(c.startswith("**") and c.endswith("×**") for c in cells[5:7])  # the bundled speed-ups
    assert float(cells[-1]) <= 0.01  # IIA gap to the reference engine


def das_cli_pairs(overrides):
    import das_cli
    from das_cli import config as C
    from das_cli.models import load_model
    from das_cli.datasets import build_pairs

    cfg = C.typed(das_cli.compose(overrides))
    return build_pairs(cfg, load_model(cfg.model, "cpu", "float32"))


def test_exported_cell_has_das_clis_batches(tmp_path):
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench_engines
    finally:
        sys.path.remove(str(BENCH.parent))
    (cell_id, path), = bench_engines.export_cells(TINY + ["train.epochs=2", "layers=[1]", "positions=[last]"], tmp_path)
    assert cell_id == "block_output__L01__Plast" and path.parent == tmp_path
    cell = torch.load(path, weights_only=False)
    assert cell["layer"] == 1 and cell["dim"] == 1
    assert len(cell["steps"]) == 2 * 3  # 24 pairs in batches of 8, two epochs
    test_kinds = [k for g in das_cli_pairs(TINY)["test"].groups for k in g.kinds]
    assert "isolate" in test_kinds  # the peer scores what das-cli's `iia` counts: the cause pairs only
    assert sum(len(g["labels"]) for g in cell["test"]) == test_kinds.count("cause")
    rows = sorted((g, int(i)) for batch in cell["steps"][:3] for g, r in batch for i in r)
    assert rows == sorted((g, i) for g, group in enumerate(cell["train"]) for i in range(len(group["labels"])))


def test_gpu_scripts_parse():
    for script in ("gpu_check.sh", "gpu_prepare.sh"):
        result = subprocess.run(["bash", "-n", str(BENCH.parent / script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_a_sweep_without_the_reference_shows_dashes(tmp_path):
    out = tmp_path / "results.md"
    args = ["--skip-cells", "--epochs", "1", "--layers", "0,2", "--engines", "bundled,fast", "--out", str(out), "--overrides", *TINY]
    result = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    cells = [c.strip() for c in out.read_text().splitlines()[2].strip("|").split("|")]
    assert cells[4] == cells[5] == cells[7] == "—" and cells[6].endswith("×**")  # no reference; bundled vs fast
    assert float(cells[-1]) <= 0.01  # the IIA gap, to the fast engine
    bad = subprocess.run([sys.executable, str(BENCH), "--skip-cells", "--engines", "turbo", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--engines: unknown engine 'turbo'; valid choices: bundled, fast, reference" in bad.stderr


def test_search_benchmark_reports_the_three_runs(tmp_path):
    """benchmarks/bench_search.py on a tiny grid: the three runs, their rungs, and the full sweep's best cells."""
    out = tmp_path / "search.md"
    args = ["--work", str(tmp_path / "work"), "--out", str(out), "--", "model=tiny_llama", "layers=[0,1,2,3]", "positions=[last]",
            "train.epochs=2", "dataset.n_train=24", "dataset.n_test=12", "train.batch_size=8", "search.eta=2"]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_search.py"), *args], capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "| halving |" in text and "trained per rung: 4 → 2" in text  # rungs end at epochs 1 and 2
    assert "| cut |" in text and "trained per rung: 2 → 1" in text  # the prescan's top 0.34 of 4 cells: 2
    assert text.count("block_output__L0") >= 3 and "In the prescan's top 10: 3 of 3." in text
