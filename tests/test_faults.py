"""Faults a run must survive, on tiny models: a disk that fills during the run (a small tmpfs), a folder that is
read-only, `kill -9` at random moments, and a `from_run` source damaged in each of its files. Each ends in one
clear line (or a warning naming what was skipped), loses no finished cell, and a resumed run's table equals an
uninterrupted run's. SIGINT/SIGTERM mid-cell are in test_checkpoint.py, two processes on one folder in
test_folder.py."""

import os
import random
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, das_cli_command, run_cli

import das_cli
from das_cli import folder as layout
from das_cli.errors import DasError

GRID = ["model=tiny_gpt2", "stream=[block_output,mlp_output]", "layers=[0,1,2]", "positions=[s2,last]"]
ARGS = GRID + TINY
TIMINGS = ("trained_in", "seconds", "train_seconds", "eval_seconds")


def numbers(folder: Path) -> pd.DataFrame:
    """iia.csv without its timings, one row per cell in cell order."""
    table = pd.read_csv(folder / "iia.csv")
    return table.drop(columns=[c for c in table if c in TIMINGS or c.endswith("_s")]).sort_values("cell").reset_index(drop=True)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("das-cli: error:")]


def finished_cells(folder: Path) -> dict[str, int]:
    """Every cell that reads back whole and unfailed, with its metrics.json's modification time."""
    out = {}
    for cell_id in layout.cell_ids(folder):
        stored = layout.read_cell(folder, cell_id, verify=False)
        if stored is not None and not stored.damaged and not stored.failed:
            out[cell_id] = (folder / layout.CELLS / cell_id / layout.METRICS).stat().st_mtime_ns
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(ARGS + [f"hydra.run.dir={out}"])
    assert result.returncode == 0, result.stderr
    return out


@contextmanager
def small_disk(where: Path, size: str):
    """A tmpfs of `size` mounted at `where` (skips where this machine cannot mount one)."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True, capture_output=True)


@pytest.mark.slow
def test_a_disk_that_fills_stops_with_one_line_and_resumes_to_the_same_table(uninterrupted, tmp_path):
    with small_disk(tmp_path / "disk", "64k") as disk:
        out = disk / "run"
        full = run_cli(ARGS + [f"hydra.run.dir={out}"])
        assert full.returncode == 2 and "Traceback" not in full.stderr and "Logging error" not in full.stderr, full.stderr
        line, = error_lines(full.stderr)
        assert f"hydra.run.dir={out}: No space left on device writing " in line and "finished cells are kept" in line, line
        kept = finished_cells(out)
        assert 0 < len(kept) < 12, kept  # the disk filled between cells: some are finished, every one reads back whole
        assert not list(out.rglob("*.tmp")), "a half-written file was left behind"
        remount(disk, "size=64m")
        resumed = run_cli(ARGS + [f"hydra.run.dir={out}"])
        assert resumed.returncode == 0, resumed.stderr
        assert {c: t for c, t in finished_cells(out).items() if c in kept} == kept  # not retrained
        pd.testing.assert_frame_equal(numbers(out), numbers(uninterrupted))


@pytest.mark.slow
def test_a_read_only_folder_is_one_line_and_keeps_every_cell(uninterrupted, tmp_path):
    with small_disk(tmp_path / "disk", "64m") as disk:
        out = disk / "run"
        shutil.copytree(uninterrupted, out)
        before = finished_cells(out)
        remount(disk, "ro")
        again = run_cli(ARGS + [f"hydra.run.dir={out}"])
        assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr
        line, = error_lines(again.stderr)
        assert f"hydra.run.dir={out}: cannot write the output folder there (Read-only file system)" in line, line
        remount(disk, "rw")
        assert finished_cells(out) == before
        resumed = run_cli(ARGS + [f"hydra.run.dir={out}"])
        assert resumed.returncode == 0 and finished_cells(out) == before, resumed.stderr  # nothing retrained


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_table(uninterrupted, tmp_path):
    """Three SIGKILLs at random moments of a run (seeded), each followed by a resume that is killed in turn; the last
    resume finishes. No finished cell is lost, none is retrained, and the table equals the uninterrupted run's."""
    out, moments = tmp_path / "run", random.Random(7)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    kept: dict[str, int] = {}
    for _ in range(3):
        proc = subprocess.Popen(das_cli_command() + ARGS + [f"hydra.run.dir={out}"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(moments.uniform(3.0, 12.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        now = finished_cells(out) if out.exists() else {}
        assert {c: t for c, t in now.items() if c in kept} == kept  # a finished cell is never redone
        kept = now
    resumed = run_cli(ARGS + [f"hydra.run.dir={out}"])
    assert resumed.returncode == 0, resumed.stderr
    assert {c: t for c, t in finished_cells(out).items() if c in kept} == kept
    pd.testing.assert_frame_equal(numbers(out), numbers(uninterrupted))


# ---- a from_run source damaged in each of its files ----

SOURCE = ["model=tiny_gpt2", "layers=[0,1]", "positions=[last]", "intervention.dim=2"] + TINY


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("source")
    das_cli.run(das_cli.compose(SOURCE), out)
    return out


def evaluate_from(folder: Path, out: Path) -> pd.DataFrame:
    return das_cli.run(das_cli.compose(SOURCE + [f"from_run={folder}"]), out)


DAMAGES = {
    "emptied": lambda path: path.write_bytes(b""),
    "garbage": lambda path: path.write_bytes(b"\x00\xffnot what was written\x00"),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
    "deleted": lambda path: path.unlink(),
}
CELL = "block_output__L00__Plast"
OTHER = "block_output__L01__Plast"


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("name", [layout.RUN_FILE, f"{layout.CELLS}/{CELL}/{layout.METRICS}", f"{layout.CELLS}/{CELL}/subspace.safetensors"])
def test_a_damaged_from_run_source_is_named_or_skipped_never_a_wrong_number(source, name, damage, tmp_path, recwarn):
    """A damaged run.json refuses the whole evaluation (one line naming it); a damaged cell (its metrics.json or its
    subspace) is left out with a warning naming the cell and why, and the other cells are evaluated as before."""
    folder = tmp_path / "source"
    shutil.copytree(source, folder)
    DAMAGES[damage](folder / name)
    reference = pd.read_csv(source / "iia.csv").set_index("cell")
    try:
        table = evaluate_from(folder, tmp_path / "eval").set_index("cell")
    except DasError as e:  # the whole run refused: one line naming the damaged file
        assert name == layout.RUN_FILE and "\n" not in str(e) and layout.RUN_FILE in str(e) and str(folder) in str(e), str(e)
        return
    # the run went on: the damaged cell was skipped with a warning naming it, the others evaluated as before
    assert name != layout.RUN_FILE
    assert CELL not in table.index and OTHER in table.index
    left_out = [str(w.message) for w in recwarn if f"cell {CELL} is left out: " in str(w.message)]
    assert len(left_out) == 1 and name.split("/")[-1] in left_out[0] and "\n" not in left_out[0], [str(w.message) for w in recwarn]
    assert table.loc[OTHER, "iia"] == reference.loc[OTHER, "iia"]
