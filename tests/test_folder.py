"""The run folder on tiny models: damaged cells are retrained, never trusted; cells of another
configuration are never reused; one table from every finished cell on disk; unusable output
folders; Ctrl-C; resuming heads=cumulative head_order=ranked; two processes on one folder."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, das_cli_command, run_cli

from das_cli import folder as layout
from das_cli.report import aggregate

GRID = ["model=tiny_gpt2", "layers=[0,1,2,3]", "positions=[last]"]
CELLS = [f"block_output__L{layer:02d}__Plast" for layer in range(4)]
RESULT = ["cell", "iia", "train_iia", "loss", "test_loss"]


def table(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "iia.csv").sort_values("cell").reset_index(drop=True)


def mtimes(folder) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in folder.glob("cells/*/metrics.json")}


def report_command() -> list[str]:
    exe = shutil.which("das-cli-report")
    return [exe] if exe else [sys.executable, "-m", "das_cli.report"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("das-cli: error:")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    result = run_cli(GRID + TINY + [f"hydra.run.dir={out}"])
    assert result.returncode == 0, result.stderr
    return out


def copy_of(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


@pytest.mark.slow
def test_damaged_cells_are_reported_then_retrained(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    metrics = {cell: out / "cells" / cell / "metrics.json" for cell in CELLS}
    metrics[CELLS[0]].write_text(metrics[CELLS[0]].read_text()[:40])  # truncated
    metrics[CELLS[1]].write_text("null")
    metrics[CELLS[2]].write_text("")
    subspace = out / "cells" / CELLS[3] / "subspace.safetensors"
    subspace.write_bytes(subspace.read_bytes()[:50])  # truncated subspace
    (out / "run.json").write_text('{"fingerprint": {')

    report = aggregate(out, plots=False)
    assert sorted(p.rpartition("/")[2] for p, _ in report.damaged) == CELLS and not report.ok
    assert "damaged" in report.text() and len(report.frame) == 0

    before = mtimes(out)
    rerun = run_cli(GRID + TINY + [f"hydra.run.dir={out}"])
    assert rerun.returncode == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    for cell in CELLS:
        assert f"cell {cell} is damaged" in rerun.stdout + rerun.stderr, rerun.stdout
    assert all(mtimes(out)[c] != before[c] for c in CELLS)  # all four trained again
    pd.testing.assert_frame_equal(table(out)[RESULT], table(finished)[RESULT])
    assert json.loads((out / "run.json").read_text())["fingerprint"]["data"]
    assert aggregate(out, plots=False).ok


@pytest.mark.slow
def test_missing_subspace_is_retrained_and_report_never_tracebacks(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "cells" / CELLS[2] / "subspace.safetensors").unlink()
    result = subprocess.run(report_command() + [str(out), "--no-plots"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"damaged cells/{CELLS[2]}: subspace.safetensors is missing" in result.stdout
    rerun = run_cli(GRID + TINY + [f"hydra.run.dir={out}"])
    assert rerun.returncode == 0 and (out / "cells" / CELLS[2] / "subspace.safetensors").exists()


@pytest.mark.slow
def test_changed_config_is_refused_even_without_run_json(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "run.json").unlink()
    before = mtimes(out)
    result = run_cli(GRID + TINY + [f"hydra.run.dir={out}", "train.lr=0.5"])
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "changed: train.lr" in lines[0] and "Traceback" not in result.stderr
    assert mtimes(out) == before


@pytest.mark.slow
def test_edited_data_file_is_refused(tmp_path):
    data = tmp_path / "pairs.jsonl"
    lines = (Path(__file__).parents[1] / "conf" / "examples" / "ioi_pairs.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines) + "\n")
    args = ["model=tiny_gpt2", "layers=[0]", "positions=[last]", "dataset=file", f"dataset.path={data}",
            "train.epochs=1", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    first = run_cli(args)
    assert first.returncode == 0, first.stderr
    data.write_text("\n".join(lines[:20] + lines[42:]) + "\n")  # edited in place: 20 of 42 train pairs left
    second = run_cli(args)
    assert second.returncode == 2, second.stderr
    assert "changed: data" in error_lines(second.stderr)[0]
    assert pd.read_csv(tmp_path / "run" / "iia.csv")["n_train"].tolist() == [34]  # 8 of the 42 training pairs validate


@pytest.mark.slow
def test_changed_eval_batch_size_is_refused(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    result = run_cli(GRID + TINY + [f"hydra.run.dir={out}", "eval.batch_size=7"])
    assert result.returncode == 2 and "changed: eval.batch_size" in result.stderr


@pytest.mark.slow
def test_seed_and_seeds_name_one_cell_once(tmp_path):
    out = tmp_path / "run"
    grid = ["model=tiny_gpt2", "layers=[1]", "positions=[last]"] + TINY + [f"hydra.run.dir={out}"]
    assert run_cli(grid).returncode == 0  # seed=0
    before = mtimes(out)
    second = run_cli(grid + ["seeds=2"])  # seeds 0 and 1: seed 0 is the cell already there
    assert second.returncode == 0, second.stderr
    assert sorted(mtimes(out)) == ["block_output__L01__Plast", "block_output__L01__Plast__S1"]
    assert mtimes(out)["block_output__L01__Plast"] == before["block_output__L01__Plast"]
    assert pd.read_csv(out / "iia_seeds.csv")["n_seeds"].tolist() == [2]
    alone = tmp_path / "alone"
    assert run_cli(["model=tiny_gpt2", "layers=[1]", "positions=[last]", "seed=1"] + TINY + [f"hydra.run.dir={alone}"]).returncode == 0
    assert mtimes(alone) == {"block_output__L01__Plast__S1": mtimes(alone)["block_output__L01__Plast__S1"]}
    pd.testing.assert_frame_equal(table(alone)[RESULT], table(out)[RESULT].iloc[[1]].reset_index(drop=True))


@pytest.mark.slow
def test_shards_run_one_after_another_into_one_folder_give_one_table(finished, tmp_path):
    out = tmp_path / "run"
    for shard in (0, 1):
        result = run_cli(GRID + TINY + [f"hydra.run.dir={out}", f"sweep.shard={shard}", "sweep.num_shards=2"])
        assert result.returncode == 0, result.stderr
    assert sorted(table(out)["cell"]) == CELLS
    pd.testing.assert_frame_equal(table(out)[RESULT], table(finished)[RESULT])


@pytest.mark.slow
def test_multirun_over_a_hyperparameter_merges_with_a_column(tmp_path):
    args = ["-m", "intervention.dim=1,2", "model=tiny_gpt2", "layers=[0,1]", "positions=[last]", f"hydra.sweep.dir={tmp_path}"]
    result = run_cli(args + TINY)
    assert result.returncode == 0, result.stderr
    merged = pd.read_csv(tmp_path / "iia.csv")
    assert sorted(zip(merged["intervention.dim"], merged["cell"])) == [
        (dim, f"block_output__L0{layer}__Plast") for dim in (1, 2) for layer in (0, 1)]
    assert (merged["dim"] == merged["intervention.dim"]).all()
    for dim in (1, 2):
        assert (tmp_path / f"pivot_block_output_intervention.dim-{dim}.csv").exists()
        assert (tmp_path / f"heatmap_block_output_intervention.dim-{dim}.png").exists()
    assert "configurations differ in: intervention.dim" in result.stdout
    # the same cell and configuration with other numbers in two jobs is still refused
    path = tmp_path / "1" / "cells" / "block_output__L00__Plast" / "metrics.json"
    twin = tmp_path / "copy" / "cells" / "block_output__L00__Plast"
    twin.mkdir(parents=True)
    (twin / "metrics.json").write_text(json.dumps({**json.loads(path.read_text()), "iia": 0.123, "subspace": None}))
    report = subprocess.run(report_command() + [str(tmp_path), "--no-plots"], capture_output=True, text=True, timeout=300)
    assert report.returncode == 2 and "block_output__L00__Plast" in report.stderr and "same configuration" in report.stderr


@pytest.mark.slow
@pytest.mark.parametrize("where", ["proc", "file", "under_file"])
def test_unusable_output_folder_is_one_line(where, tmp_path):
    (tmp_path / "blocker").write_text("a file")
    folder = {"proc": "/proc/das-cli-x", "file": str(tmp_path / "blocker"), "under_file": str(tmp_path / "blocker" / "run")}[where]
    result = run_cli(["model=tiny_gpt2", "layers=[0]"] + TINY + [f"hydra.run.dir={folder}"])
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "hydra.run.dir=" in lines[0] and "Traceback" not in result.stderr, result.stderr
    multirun = run_cli(["-m", "model=tiny_gpt2", "layers=[0]"] + TINY + [f"hydra.sweep.dir={folder}"])
    assert multirun.returncode == 2 and len(error_lines(multirun.stderr)) == 1 and "Traceback" not in multirun.stderr


def test_make_folder_names_the_file_in_the_way(tmp_path):
    from das_cli.errors import DasError

    (tmp_path / "blocker").write_text("")
    with pytest.raises(DasError, match="blocker is a file"):
        layout.make_folder(tmp_path / "blocker" / "a" / "b")


def wait_for_cells(out, proc, n: int, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while len(list(out.glob("cells/*/metrics.json"))) < n:
        assert proc.poll() is None, f"das-cli ended early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no cell finished in time"
        time.sleep(0.01)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = GRID + TINY + [f"hydra.run.dir={out}", "train.cells_per_step=1"]  # cells end one by one, not as one bundle
    proc = subprocess.Popen(das_cli_command() + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    try:
        wait_for_cells(out, proc, 1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and f"hydra.run.dir={out}" in lines[0] and "finished cells are kept" in lines[0], stderr
    kept = mtimes(out)
    assert 1 <= len(kept) < len(CELLS), kept
    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(table(out)["cell"]) == CELLS
    assert {c: mtimes(out)[c] for c in kept} == kept


def test_a_lock_held_by_a_live_process_blocks_and_a_dead_ones_does_not(tmp_path):
    path = tmp_path / "cells" / "x" / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from das_cli.folder import CellLock; "
         f"lock = CellLock(Path({str(path)!r})); assert lock.acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = layout.CellLock(path)
        assert not lock.acquire()
        assert f"pid {holder.pid}" in lock.holder()
        holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays, the lock does not
        holder.wait()
        assert path.exists() and lock.acquire()
        lock.release()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_processes_on_one_folder_never_train_one_cell_twice(tmp_path):
    out = tmp_path / "run"
    args = ["model=tiny_gpt2", "layers=[0,1,2,3]", "positions=[s2,last]"] + TINY + [f"hydra.run.dir={out}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    procs = [subprocess.Popen(das_cli_command() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trained = [m for out_, _ in outputs for m in re.findall(r"cell (\S+) trained", out_)]
    assert len(trained) == len(set(trained)) == 8, outputs  # each cell trained by exactly one of them
    assert len(table(out)) == 8


def test_ranked_cumulative_resumes_in_its_second_phase(tmp_path):
    import das_cli

    cfg = das_cli.compose(["stream=head_key_output", "heads=cumulative", "head_order=ranked", "layers=[1,2]",
                           "positions=[last]", "model=tiny_llama"] + TINY)
    first = das_cli.run(cfg, tmp_path).sort_values("cell").reset_index(drop=True)
    heads = dict(zip(first["cell"], first["heads"].astype(str)))
    assert sorted(heads.values()).count("0") == 2 and sum("+" in h for h in heads.values()) == 2
    # killed in the second phase: layer 1 lost a single-head cell, layer 2 its cumulative cell
    lost = [c for c, h in heads.items() if (c.startswith("head_key_output__L01") and h == "0")
            or (c.startswith("head_key_output__L02") and "+" in h)]
    for cell in lost:
        (tmp_path / "cells" / cell / "metrics.json").unlink()
    again = das_cli.run(cfg, tmp_path).sort_values("cell").reset_index(drop=True)
    assert all((tmp_path / "cells" / cell / "metrics.json").exists() for cell in lost)
    pd.testing.assert_frame_equal(again[RESULT + ["heads"]], first[RESULT + ["heads"]])


@pytest.mark.slow
def test_report_ctrl_c_is_one_line(finished, monkeypatch, capsys):
    from das_cli import report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "aggregate", interrupted)
    with pytest.raises(SystemExit) as exit_:
        report.main([str(finished)])
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and len(err.strip().splitlines()) == 1 and "interrupted" in err, err


def test_ctrl_c_while_the_tables_are_written_keeps_the_cells_and_says_how_to_resume(tmp_path, monkeypatch):
    import das_cli
    import das_cli.report as report
    from das_cli.interrupts import Interrupted

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "aggregate", interrupted)
    cfg = das_cli.compose(GRID + TINY)
    with pytest.raises(Interrupted) as stop:
        das_cli.run(cfg, tmp_path)
    assert str(stop.value).startswith(f"interrupted; 4 finished cells are kept in {tmp_path}; ")
    assert str(stop.value).endswith(f"to resume, run the same command with hydra.run.dir={tmp_path}")
