"""SLURM sweeps: interruptions are no cell failures, the launch-time signal check, and (marked `slurm`)
array sweeps on a real cluster (`bash .ci/slurm_cluster.sh up`): the merged table, a requeue mid-sweep,
a cell checkpointed by the time-limit signal and resumed by the requeued job, a cell checkpointed by a plain
scancel and resumed by the rerun, a job out of requeues."""

import json
import os
import re
import signal
import subprocess
import time

import pandas as pd
import pytest
import torch
from conftest import TINY, das_cli_command, handled_by, raising, run_cli
from safetensors.torch import load_file
from test_cluster import CELLS, GRID, RESULT, SETTINGS, results

# A SLURM job runs torch on the CPUs it was given (one here); local runs it is compared with bit for bit do too.
ONE_CPU = {"OMP_NUM_THREADS": "1"}

# The shipped profile, fitted to a small CPU node: the rest (array, requeues, signal) stays as shipped.
NODE_FIT = ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=30"]


# --- without SLURM -------------------------------------------------------------------------------


@pytest.fixture
def raising_handler():
    """SIGUSR2 (submitit's pre-emption/time-limit signal) handled by a function that raises, as submitit's does."""
    with handled_by(signal.SIGUSR2, raising("pre-empted")):
        yield


def requeues_used_up(*args):
    from submitit.core.utils import UncompletedJobError

    raise UncompletedJobError("Job not requeued because: timed-out too many times.")


def signalled(*args):
    signal.raise_signal(signal.SIGUSR2)


def fails(*args):
    raise RuntimeError("an ordinary cell failure")


@pytest.mark.parametrize("run_cell,interrupts", [(requeues_used_up, True), (signalled, True), (fails, False)],
                         ids=["requeues-used-up", "raised-in-signal-handler", "ordinary-failure"])
def test_an_interruption_is_no_cell_failure(run_cell, interrupts, raising_handler, tmp_path, monkeypatch, one_thread):
    pytest.importorskip("submitit", reason="submitit is not installed")
    import das_cli
    from das_cli import cell

    monkeypatch.setattr(cell, "set_up", run_cell)
    cfg = das_cli.compose(["model=tiny_gpt2", "layers=[0]", "positions=[last]"] + TINY)
    metrics = tmp_path / "cells" / "block_output__L00__Plast" / "metrics.json"
    if interrupts:
        with pytest.raises(RuntimeError, match="timed-out too many times|pre-empted"):
            das_cli.run(cfg, tmp_path)
        assert not metrics.exists()  # the cell will rerun when the job resumes
    else:
        das_cli.run(cfg, tmp_path)
        assert json.loads(metrics.read_text())["error"] == "an ordinary cell failure"


@pytest.mark.parametrize("overrides,refused", [
    (["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=60"], True),
    (["hydra.launcher.timeout_min=2"], True),  # the profile's signal_delay_s: 120
    (["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=59"], False),
    ([], False),
])
def test_signal_delay_must_be_shorter_than_the_time_limit(overrides, refused, capsys):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    from das_cli.cli import check_signal_delay

    if not refused:
        check_signal_delay(["hydra/launcher=slurm", "sweep.shard=0,1"] + overrides)
        return
    with pytest.raises(SystemExit) as exit_:
        check_signal_delay(["hydra/launcher=slurm", "sweep.shard=0,1"] + overrides)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("das-cli: error: hydra.launcher.signal_delay_s=") and "timeout_min" in err


@pytest.mark.parametrize("env,threads", [({"SLURM_CPUS_PER_TASK": "3"}, 3), ({"SLURM_CPUS_PER_TASK": "3", "OMP_NUM_THREADS": "2"}, None),
                                         ({}, None), ({"SLURM_CPUS_PER_TASK": "x"}, None)])
def test_a_slurm_job_uses_the_cpus_it_was_given(env, threads, monkeypatch):
    from das_cli.cli import use_allocated_cpus

    before = torch.get_num_threads()
    for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        use_allocated_cpus()
        assert torch.get_num_threads() == (threads or before)
    finally:
        torch.set_num_threads(before)


# --- on a real cluster ---------------------------------------------------------------------------


def default_partition() -> str:
    names = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout.split()
    return next(n for n in names if n.endswith("*")).rstrip("*")


def slurm_args(folder, *extra: str, settings: list[str] = SETTINGS) -> list[str]:
    launcher = ["hydra/launcher=slurm", f"hydra.launcher.partition={default_partition()}"] + NODE_FIT
    return ["-m", *launcher, *extra, "sweep.shard=0,1", "sweep.num_shards=2", f"hydra.sweep.dir={folder}"] + GRID + settings


# Cells of 1200 steps (several seconds each): a requeued job runs on for SLURM's KillWait after the requeue (submitit
# ignores the SIGTERM), so a job's remaining cells must take longer than that for the requeue to land mid-sweep.
LONG_SETTINGS = [a for a in SETTINGS if not a.startswith("train.epochs=")] + ["train.epochs=400"]


def launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(das_cli_command() + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def first_cell_then(proc: subprocess.Popen, folder, action, jobs: int = 2) -> tuple[str, dict]:
    """Once every one of the `jobs` jobs has listed its cells (grid*.json) and some job has finished its first
    cell: `action(array job id)`; returns the id and the cells finished when the action returned. (A job signalled
    before it lists its cells ran no cell, and the report cannot name its cells as missing.)"""
    deadline = time.monotonic() + 300
    while len(list(folder.glob("*/grid*.json"))) < jobs or not list(folder.glob("*/cells/*/metrics.json")):
        assert proc.poll() is None, f"das-cli ended before its first cell: {proc.communicate()}"
        assert time.monotonic() < deadline, "the jobs did not list their cells and finish one in 300 s"
        time.sleep(0.05)
    job = array_job(folder)
    action(job)
    return job, {p: p.stat().st_mtime_ns for p in folder.glob("*/cells/*/metrics.json")}


def training_began(proc: subprocess.Popen, folder) -> None:
    """Returns once a job's log shows its progress bar over training steps."""
    deadline = time.monotonic() + 300
    while not any("steps:" in p.read_text() for p in folder.glob(".submitit/*/*_log.err")):
        assert proc.poll() is None, f"das-cli ended before training: {proc.communicate()}"
        assert time.monotonic() < deadline, "training did not begin in 300 s"
        time.sleep(0.05)


def array_job(folder) -> str:
    """The SLURM id of the sweep's array job (submitit's folders are named <array id>_<task>)."""
    return next(p.name.split("_")[0] for p in (folder / ".submitit").iterdir() if p.name[0].isdigit())


ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED_PENDING", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED")


def job_states(job: str, settle_s: float = 60.0) -> list[str]:
    """Every run of every task of the array job, from accounting (requeued runs included). slurmdbd records a
    run's end a little after the job ends, so read again (up to `settle_s`) while a run still shows as active."""
    deadline = time.monotonic() + settle_s
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job, "-o", "State"], capture_output=True, text=True, check=True)
        states = out.stdout.split()
        if not any(s.startswith(ACTIVE_STATES) for s in states) or time.monotonic() > deadline:
            return states
        time.sleep(1)


def requeue(job: str) -> None:
    """Requeue the array job; returns once its first run has ended and the requeued one is told to start."""
    subprocess.run(["scontrol", "requeue", job], check=True)
    start_again(job)


def start_again(job: str) -> None:
    """Once the requeued job is back in the queue, start it now."""
    # SLURM holds a requeued job back (reason BeginTime) for a couple of minutes; let it start again now.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.split()
        if states and all(s == "PENDING" for s in states):
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            return
        time.sleep(0.5)
    raise AssertionError(f"array job {job} did not return to the queue after scontrol requeue")


def local_run(folder, settings: list[str]) -> pd.DataFrame:
    """The same grid in one local job: the reference a SLURM sweep must reproduce."""
    result = run_cli(GRID + settings + [f"hydra.run.dir={folder}"], env=ONE_CPU)
    assert result.returncode == 0, result.stderr
    return results(folder)[RESULT]


@pytest.fixture(scope="module")
def local_table(tmp_path_factory):
    return local_run(tmp_path_factory.mktemp("local"), SETTINGS)


@pytest.mark.slow
@pytest.mark.slurm
def test_array_sweep_merges_to_the_local_table(local_table, tmp_path):
    result = run_cli(slurm_args(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "6 cells from 2 job folders; 0 failed, 0 missing" in result.stdout
    job = array_job(tmp_path)
    assert job_states(job) == ["COMPLETED", "COMPLETED"]
    pd.testing.assert_frame_equal(results(tmp_path)[RESULT], local_table)


@pytest.fixture(scope="module")
def long_local_table(tmp_path_factory):
    return local_run(tmp_path_factory.mktemp("local_long"), LONG_SETTINGS)


@pytest.mark.slurm
def test_requeue_mid_sweep_loses_and_duplicates_nothing(long_local_table, tmp_path):
    proc = launch(slurm_args(tmp_path, settings=LONG_SETTINGS))
    job, before = first_cell_then(proc, tmp_path, requeue)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert len(before) < len(CELLS), f"the requeue came too late to test anything: {sorted(before)}"
    assert job_states(job).count("REQUEUED") == 2 and job_states(job).count("COMPLETED") == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before  # cells finished before the requeue: not rerun
    assert sorted(p.parent.name for p in tmp_path.glob("*/cells/*/metrics.json")) == sorted(CELLS)  # each once
    pd.testing.assert_frame_equal(results(tmp_path)[RESULT], long_local_table)


# One cell of 120 steps (40 epochs of 3 batches), its progress bar in the job's log.
ONE_LONG_CELL = ["model=tiny_gpt2", "layers=[1]", "positions=[last]", "progress=true", "train.epochs=40"] + [
    a for a in TINY if not a.startswith(("train.epochs=", "progress="))]


@pytest.mark.slow
@pytest.mark.slurm
def test_time_limit_signal_mid_cell_checkpoints_and_the_requeued_job_resumes_it(tmp_path):
    """SLURM's time-limit signal (USR2, sent by hand) once the cell trains: submitit requeues the job, the cell is
    checkpointed on the way out; the requeued job resumes it from that step to the numbers of a local run."""
    local = tmp_path / "local"
    assert run_cli(ONE_LONG_CELL + [f"hydra.run.dir={local}"], env=ONE_CPU).returncode == 0
    folder = tmp_path / "slurm"
    launcher = ["hydra/launcher=slurm", f"hydra.launcher.partition={default_partition()}"] + NODE_FIT
    proc = launch(["-m", *launcher, f"hydra.sweep.dir={folder}"] + ONE_LONG_CELL)
    training_began(proc, folder)
    job = array_job(folder)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    start_again(job)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert job_states(job).count("REQUEUED") == 1  # (accounting may not show the second run ended yet)
    logs = "".join(p.read_text() for p in (folder / ".submitit").glob("*/*_log.out"))
    saved = re.search(r"cell (\S+) checkpointed at step (\d+)/(\d+)", logs)
    assert saved and int(saved[2]) < int(saved[3]) == 120, logs
    assert f"cell {saved[1]} resumes from its checkpoint at step {saved[2]}/120" in logs
    cell = folder / "0" / "cells" / saved[1]
    assert (cell / "metrics.json").exists() and not (cell / "checkpoint.pt").exists()
    numbers = ["iia", "train_iia", "loss", "test_loss", "steps"]
    pd.testing.assert_frame_equal(pd.read_csv(folder / "0" / "iia.csv")[numbers], pd.read_csv(local / "iia.csv")[numbers],
                                  check_exact=True)
    ours, theirs = load_file(cell / "subspace.safetensors"), load_file(local / "cells" / saved[1] / "subspace.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# One cell of 1800 steps (600 epochs of 3 batches, about 30 s): it still trains when SIGKILL follows the SIGTERM
# (KillWait, 5 s on the test cluster).
ONE_LONGER_CELL = [a for a in ONE_LONG_CELL if not a.startswith("train.epochs=")] + ["train.epochs=600"]


@pytest.mark.slow
@pytest.mark.slurm
def test_plain_scancel_mid_cell_checkpoints_and_the_rerun_resumes_it(tmp_path):
    """A plain scancel once the cell trains: SIGTERM (which submitit ignores), SIGKILL after KillWait. The cell is
    checkpointed at the end of the step the SIGTERM arrives in; rerunning the command resumes it from that step to
    the numbers of a local run."""
    local = tmp_path / "local"
    assert run_cli(ONE_LONGER_CELL + [f"hydra.run.dir={local}"], env=ONE_CPU).returncode == 0
    folder = tmp_path / "slurm"
    launcher = ["hydra/launcher=slurm", f"hydra.launcher.partition={default_partition()}"] + NODE_FIT
    args = ["-m", *launcher, f"hydra.sweep.dir={folder}"] + ONE_LONGER_CELL
    proc = launch(args)
    training_began(proc, folder)
    job = array_job(folder)
    subprocess.run(["scancel", job], check=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr
    assert "CANCELLED" in " ".join(job_states(job))
    logs = "".join(p.read_text() for p in (folder / ".submitit").glob("*/*_log.out"))
    assert "SIGTERM: the job goes on" in logs, logs
    saved = re.search(r"cell (\S+) checkpointed at step (\d+)/(\d+)", logs)
    assert saved and int(saved[2]) < int(saved[3]) == 1800, logs
    cell = folder / "0" / "cells" / saved[1]
    assert (cell / "checkpoint.pt").exists() and not (cell / "metrics.json").exists()
    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr
    logs = "".join(p.read_text() for p in (folder / ".submitit").glob("*/*_log.out"))
    assert f"cell {saved[1]} resumes from its checkpoint at step {saved[2]}/1800" in logs
    assert (cell / "metrics.json").exists() and not (cell / "checkpoint.pt").exists()
    numbers = ["iia", "train_iia", "loss", "test_loss", "steps"]
    pd.testing.assert_frame_equal(pd.read_csv(folder / "0" / "iia.csv")[numbers], pd.read_csv(local / "iia.csv")[numbers],
                                  check_exact=True)


@pytest.mark.slow
@pytest.mark.slurm
def test_out_of_requeues_stops_the_job_and_fails_no_cell(long_local_table, tmp_path):
    """max_num_timeout=0 and SLURM's time-limit signal (USR2, sent by hand): submitit does not requeue, the
    job stops at once; the report lists the unfinished cells as missing; rerunning the command resumes."""
    args = slurm_args(tmp_path, "hydra.launcher.max_num_timeout=0", settings=LONG_SETTINGS)
    proc = launch(args)
    job, before = first_cell_then(proc, tmp_path, lambda job: subprocess.run(["scancel", "--signal=USR2", job], check=True))
    stdout, stderr = proc.communicate(timeout=600)
    assert len(before) < len(CELLS), f"the signal came too late to test anything: {sorted(before)}"
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    rows = [json.loads(p.read_text()) for p in tmp_path.glob("*/cells/*/metrics.json")]
    assert rows and not [r["cell"] for r in rows if r.get("error")]  # no good cell marked failed
    assert f"; 0 failed, {len(CELLS) - len(rows)} missing" in stdout
    assert "TIMEOUT" not in job_states(job)  # it stopped itself, SLURM did not have to kill it
    logs = "".join(p.read_text() for p in (tmp_path / ".submitit").glob("*/*_log.out"))
    assert "failed: Job not requeued because: timed-out too many times" in logs  # das-cli's job log line
    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr
    pd.testing.assert_frame_equal(results(tmp_path)[RESULT], long_local_table)
