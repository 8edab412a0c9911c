"""Cluster-scale sweeps on tiny_gpt2: sharding, multirun launchers, kill and resume, one merged
table (`das-cli-report` and the end-of-multirun callback), failures that stay local."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from conftest import TINY, das_cli_command, run_cli

pytestmark = pytest.mark.slow  # end to end: subprocesses, a wheel, the embedded model

GRID = ["model=tiny_gpt2", "layers=[0,1,2]", "positions=[s2,last]"]  # 3 sites x 2 positions
SETTINGS = [a for a in TINY if not a.startswith("train.epochs=")] + ["train.epochs=4"]
CELLS = {f"block_output__L{layer:02d}__P{p}" for layer in range(3) for p in ("s2", "last")}
RESULT = ["cell", "iia", "train_iia", "loss", "test_loss", "cell_seed", "dim"]


def report_command() -> list[str]:
    exe = shutil.which("das-cli-report")
    return [exe] if exe else [sys.executable, "-m", "das_cli.report"]


def results(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "iia.csv").sort_values("cell").reset_index(drop=True)


def cells_in(folder) -> list[str]:
    return sorted(p.parent.name for p in folder.glob("cells/*/metrics.json"))


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The whole grid in one job, SIGKILLed after its first finished cell, then rerun into the same folder."""
    out = tmp_path_factory.mktemp("killed")
    args = GRID + SETTINGS + [f"hydra.run.dir={out}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen(das_cli_command() + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while not list(out.glob("cells/*/metrics.json")):
            assert proc.poll() is None, f"das-cli ended before its first cell: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no cell finished in 300 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("cells/*/metrics.json")}
    from das_cli.report import aggregate

    interrupted = aggregate(out, plots=False)  # the report of the killed run names what is missing
    rerun = run_cli(args)
    return out, before, rerun, interrupted


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The same grid as two shards of one multirun (basic launcher); the callback merges them."""
    out = tmp_path_factory.mktemp("sharded")
    args = ["-m", "sweep.shard=0,1", "sweep.num_shards=2", f"hydra.sweep.dir={out}"] + GRID + SETTINGS
    result = run_cli(args)
    assert result.returncode == 0, result.stderr
    return out, args, result


def test_kill_and_rerun_finishes_the_grid_without_retraining(killed):
    out, before, rerun, interrupted = killed
    assert rerun.returncode == 0, rerun.stderr
    assert 1 <= len(before) < len(CELLS), f"the kill came too late to test anything: {sorted(before)}"
    assert sorted(interrupted.missing) == sorted(CELLS - set(before)) and not interrupted.ok
    table = pd.read_csv(out / "iia.csv")
    assert sorted(table["cell"]) == sorted(CELLS)  # no duplicated, no missing rows
    assert cells_in(out) == sorted(CELLS)
    after = {cell: (out / "cells" / cell / "metrics.json").stat().st_mtime_ns for cell in before}
    assert after == before  # cells finished before the kill were not retrained


def test_shards_partition_the_grid_by_site(sharded):
    out, _, _ = sharded
    shard0, shard1 = cells_in(out / "0"), cells_in(out / "1")
    assert set(shard0) | set(shard1) == CELLS and not set(shard0) & set(shard1)
    # whole sites round-robin in grid order: layers 0 and 2 -> shard 0, layer 1 -> shard 1
    assert {c.split("__")[1] for c in shard0} == {"L00", "L02"} and {c.split("__")[1] for c in shard1} == {"L01"}
    for job, cells in (("0", shard0), ("1", shard1)):
        assert sorted(pd.read_csv(out / job / "iia.csv")["cell"]) == cells
        assert sorted(json.loads((out / job / f"grid.shard{job}of2.json").read_text())["cells"]) == cells


def test_callback_writes_the_merged_table(sharded):
    out, _, result = sharded
    assert sorted(pd.read_csv(out / "iia.csv")["cell"]) == sorted(CELLS)
    assert (out / "pivot_block_output.csv").exists() and (out / "heatmap_block_output.png").exists()
    assert "6 cells from 2 job folders; 0 failed, 0 missing" in result.stdout


def test_report_merges_shards_into_the_single_job_table(sharded, killed):
    out, _, _ = sharded
    (out / "iia.csv").unlink()
    result = subprocess.run(report_command() + [str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "best:" in result.stdout and "mean over layers" in result.stdout
    # the same cells with the same numbers, whichever job ran them (seeds come from the cell id)
    pd.testing.assert_frame_equal(results(out)[RESULT], results(killed[0])[RESULT])


def test_rerunning_the_multirun_resumes_every_job(sharded):
    out, args, _ = sharded
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/cells/*/metrics.json")}
    result = run_cli(args)
    assert result.returncode == 0, result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/cells/*/metrics.json")} == before
    assert sorted(pd.read_csv(out / "iia.csv")["cell"]) == sorted(CELLS)


def test_submitit_local_multirun_runs_a_cell_alone(killed, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    pytest.importorskip("submitit", reason="submitit is not installed")
    args = ["-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}", "model=tiny_gpt2", "layers=[1]", "positions=[last]"]
    result = run_cli(args + SETTINGS)
    if result.returncode != 0 and "submitit" in result.stderr and "Traceback" in result.stderr:
        pytest.skip(f"the submitit local launcher cannot run here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    alone = results(tmp_path)[RESULT]
    assert list(alone["cell"]) == ["block_output__L01__Plast"]
    in_sweep = results(killed[0])[RESULT]
    pd.testing.assert_frame_equal(alone, in_sweep[in_sweep["cell"] == "block_output__L01__Plast"].reset_index(drop=True))


def test_slurm_profile_makes_a_valid_sbatch_script(tmp_path, monkeypatch):
    """The keys of conf/hydra/launcher/slurm.yaml, passed the way the plugin passes them, are ones
    submitit knows (no cluster needed: a fake `srun` on PATH)."""
    submitit = pytest.importorskip("submitit", reason="submitit is not installed")
    base_conf = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.config").BaseQueueConf
    from das_cli.config import conf_dir
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    overrides = ["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", "hydra.job.name=t", "hydra.launcher.partition=gpu"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(base_conf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("das-cli", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=1", "--time=240", "--mem=64GB", "--cpus-per-task=8", "export PYTHONUNBUFFERED=1"):
        assert line in script, script


def test_failures_stay_local_in_a_multirun(tmp_path):
    # job 0: its cell fails (the learning rate overflows); job 1: a bad layer chunk fails the whole job.
    # With joblib the jobs run in worker processes: the exit status comes from the merged report.
    try:
        import hydra_plugins.hydra_joblib_launcher  # noqa: F401

        launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    except ImportError:
        launcher = []
    args = ["-m", "layers=[0],[9]", "positions=[last]", "model=tiny_gpt2", "train.lr=1e38", f"hydra.sweep.dir={tmp_path}"] + launcher
    result = run_cli(args + SETTINGS)
    assert result.returncode == 1, result.stderr
    assert "layers: [9] out of range" in result.stderr and "Traceback" not in result.stderr
    row = json.loads((tmp_path / "0" / "cells" / "block_output__L00__Plast" / "metrics.json").read_text())
    assert row["error"]
    merged = pd.read_csv(tmp_path / "iia.csv")
    assert list(merged["cell"]) == ["block_output__L00__Plast"] and merged["error"].notna().all()
    assert "failed  block_output__L00__Plast" in result.stdout and "job 1 ran no cell" in result.stdout


def test_shard_cells_partition_every_grid():
    from das_cli.grid import Cell, layer_key, shard_cells

    grid = [Cell("block_output", layer, (p,), None) for layer in range(5) for p in ("s2", "last", -1)]
    for n in range(1, 20):
        shards = [shard_cells(grid, s, n) for s in range(n)]
        assert sorted(c.id for s in shards for c in s) == sorted(c.id for c in grid), n
        if n <= 5:  # enough sites: whole sites, round-robin
            assert all(len(s) == 3 * len({c.layer for c in s}) for s in shards)
        else:  # more shards than sites: contiguous runs of the grid
            assert [c for s in shards for c in s] == grid
    assert shard_cells(grid, 1, 2, layer_key, split_units=False) == [c for c in grid if c.layer in (1, 3)]


def test_report_errors_are_one_line(tmp_path, capsys):
    from das_cli.report import main

    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(SystemExit) as exit_:
            main([str(folder)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("das-cli-report: error:") and len(err.strip().splitlines()) == 1, err
        assert str(folder) in err


def test_report_deduplicates_and_refuses_conflicts(killed, tmp_path, capsys):
    from das_cli.report import main

    for job in ("a", "b"):
        shutil.copytree(killed[0] / "cells", tmp_path / job / "cells")
        shutil.copy(killed[0] / "run.json", tmp_path / job / "run.json")
    with pytest.raises(SystemExit) as exit_:  # identical duplicates: kept once
        main([str(tmp_path), "--no-plots"])
    assert exit_.value.code == 0 and sorted(pd.read_csv(tmp_path / "iia.csv")["cell"]) == sorted(CELLS)
    capsys.readouterr()
    path = tmp_path / "b" / "cells" / "block_output__L01__Ps2" / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "loss": 1.0}))
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--no-plots"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "block_output__L01__Ps2" in err, err
    shutil.rmtree(tmp_path / "b" / "cells")
    # job b ran another configuration (train.lr): its cells are kept apart, the changed key becomes a column
    shutil.copytree(killed[0] / "cells", tmp_path / "b" / "cells", ignore=lambda d, names: [n for n in names if "L00" in n])
    for path in (tmp_path / "b" / "cells").glob("*/metrics.json"):
        record = json.loads(path.read_text())
        record["fingerprint"]["train"]["lr"] = 0.5
        path.write_text(json.dumps(record))
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--no-plots"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "configurations differ in: train.lr" in out, out
    merged = pd.read_csv(tmp_path / "iia.csv")
    assert sorted(merged["train.lr"].value_counts().items()) == [(0.01, 6), (0.5, 4)]
    assert (tmp_path / "pivot_block_output_train.lr-0.5.csv").exists()


@pytest.mark.parametrize(
    "args,key",
    [
        (["sweep.shard=2", "sweep.num_shards=2"], "sweep.shard=2"),
        (["-m", "sweep.shard=0,2", "sweep.num_shards=2"], "sweep.shard=2"),
        (["sweep.num_shards=0"], "sweep.num_shards=0"),
    ],
    ids=["run", "multirun", "num_shards"],
)
def test_shard_validation_is_one_line(args, key, tmp_path):
    result = run_cli(["model=tiny_gpt2", "layers=[0]"] + args + TINY + [f"hydra.run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}"])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("das-cli: error:")]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not list(tmp_path.glob("**/cells"))
