"""Mid-cell checkpoints on tiny models: a cell stopped during training (SIGTERM, Ctrl-C) is saved to
cells/<id>/checkpoint.pt and the rerun resumes it to the numbers and tensors of an uninterrupted run,
bit for bit; checkpoints that cannot be used are ignored with one warning; a finished cell has none."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pandas as pd
import pytest
import torch
from conftest import TINY, handled_by, raising, run_cli
from safetensors.torch import load_file

import das_cli
from das_cli import folder as layout
from das_cli.interrupts import WholeSteps

CELL = "block_output__L01__Plast"
# One cell of 30 steps (10 epochs of 3 batches).
LONG = ["model=tiny_gpt2", "layers=[1]", "positions=[last]"] + [a for a in TINY if not a.startswith("train.epochs=")] + ["train.epochs=10"]
# das-cli whose steps each end with a line on stderr (and a short pause), so a test knows that training
# has reached some step before it sends a signal, whatever the speed of the machine.
REPORTING_STEPS = """
import sys, time
from contextlib import contextmanager
from das_cli.cli import main
from das_cli.interrupts import WholeSteps

update = WholeSteps.update

@contextmanager
def reporting_update(self):
    with update(self):
        yield
    print("step done", file=sys.stderr, flush=True)
    time.sleep(0.05)

WholeSteps.update = reporting_update
sys.argv[0] = "das-cli"
main()
"""
NUMBERS = ["iia", "train_iia", "loss", "test_loss", "penalty", "p_label", "logit_diff", "steps"]


def numbers(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "iia.csv")[NUMBERS]


def tensors(folder) -> dict:
    return load_file(layout.subspace_file(folder, CELL))


def assert_same_cell(folder, reference) -> None:
    pd.testing.assert_frame_equal(numbers(folder), numbers(reference), check_exact=True)
    curve = layout.curve_file(folder, CELL).read_text()  # a resumed cell continues its training curve
    assert curve == layout.curve_file(reference, CELL).read_text() and len(curve.splitlines()) > 1
    ours, theirs = tensors(folder), tensors(reference)
    assert sorted(ours) == sorted(theirs) and ours
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(LONG + [f"hydra.run.dir={out}"])
    assert result.returncode == 0, result.stderr
    return out


def stop_during_training(args: list[str], sig: int, after_steps: int = 3) -> tuple[int, str]:
    """Run das-cli; once `after_steps` training steps are done, send `sig`; returns (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", REPORTING_STEPS] + args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while "".join(stderr).count("step done") < after_steps:
            assert proc.poll() is None, f"das-cli ended before {after_steps} steps: {''.join(stderr)}"
            assert time.monotonic() < deadline, f"training did not reach step {after_steps} in 300 s"
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        proc.kill()
    return proc.returncode, "".join(stderr)


@pytest.mark.slow
@pytest.mark.parametrize("sig,status,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
                         ids=["sigterm", "ctrl-c"])
def test_a_cell_stopped_mid_training_resumes_to_the_same_numbers(sig, status, word, uninterrupted, tmp_path):
    out = tmp_path / "run"
    args = LONG + [f"hydra.run.dir={out}"]
    returncode, stderr = stop_during_training(args, sig)
    assert returncode == status, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("das-cli:")]
    assert len(lines) == 1 and word in lines[0], stderr
    assert f"cell {CELL} checkpointed at step " in lines[0] and f"hydra.run.dir={out}" in lines[0], lines[0]
    step, total = map(int, lines[0].split("checkpointed at step ")[1].split(";")[0].split("/"))
    assert 3 <= step < total == 30, lines[0]
    assert layout.checkpoint_file(out, CELL).exists() and not layout.metrics_file(out, CELL).exists()

    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"cell {CELL} resumes from its checkpoint at step {step}/{total}" in rerun.stdout + rerun.stderr
    assert not layout.checkpoint_file(out, CELL).exists()
    assert_same_cell(out, uninterrupted)


@pytest.mark.slow
def test_a_damaged_checkpoint_is_ignored_and_the_cell_trains_from_the_start(uninterrupted, tmp_path):
    out = tmp_path / "run"
    args = LONG + [f"hydra.run.dir={out}"]
    returncode, stderr = stop_during_training(args, signal.SIGTERM)
    assert returncode == 143, stderr
    path = layout.checkpoint_file(out, CELL)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr
    warnings = [line for line in (rerun.stdout + rerun.stderr).splitlines() if "checkpoint.pt is not used" in line]
    assert len(warnings) == 1 and "damaged" in warnings[0] and "training it from the start" in warnings[0], rerun.stderr
    assert "resumes from its checkpoint" not in rerun.stdout + rerun.stderr
    assert not path.exists()
    assert_same_cell(out, uninterrupted)


# --- in one process: a signal at a chosen step ---------------------------------------------------

def signal_at_step(n: int, sig: int, monkeypatch) -> None:
    """`sig` raised inside the optimiser update of step `n`: WholeSteps lets the update end first."""
    update, calls = WholeSteps.update, []

    @contextmanager
    def signalled_update(self):
        with update(self):
            calls.append(1)
            if len(calls) == n:
                signal.raise_signal(sig)
            yield

    monkeypatch.setattr(WholeSteps, "update", signalled_update)


@contextmanager
def ctrl_c_at_step(n: int, monkeypatch):
    with monkeypatch.context() as m:
        signal_at_step(n, signal.SIGINT, m)
        yield


SMALL = ["model=tiny_gpt2", "layers=[1]", "positions=[last]"] + [a for a in TINY if not a.startswith("train.epochs=")] + ["train.epochs=3"]


@pytest.mark.parametrize("intervention,step,extra", [("das", 1, []), ("das", 3, []), ("boundless_das", 5, []), ("dbm", 4, []),
                                                     ("das", 3, ["eval.every_epoch=true"]), ("das", 4, ["eval.every_epoch=true"])],
                         ids=["das-mid-epoch", "das-epoch-end", "boundless-later-epoch", "dbm-second-epoch",
                              "validated-epoch-end", "validated-mid-epoch"])
def test_resuming_in_process_is_bitwise_the_uninterrupted_run(intervention, step, extra, tmp_path, monkeypatch, one_thread):
    cfg = das_cli.compose(SMALL + [f"intervention={intervention}"] + extra)
    das_cli.run(cfg, tmp_path / "whole")
    with ctrl_c_at_step(step, monkeypatch), pytest.raises(KeyboardInterrupt, match=f"checkpointed at step {step}/9"):
        das_cli.run(cfg, tmp_path / "stopped")
    assert layout.checkpoint_file(tmp_path / "stopped", CELL).exists()
    das_cli.run(cfg, tmp_path / "stopped")
    assert_same_cell(tmp_path / "stopped", tmp_path / "whole")
    assert not layout.checkpoint_file(tmp_path / "stopped", CELL).exists()


def assert_rerun_resumes(cfg, folder, reference, step: str, caplog) -> None:
    """The rerun into `folder` resumes the cell from its checkpoint at `step` ("s/S") to the numbers and tensors
    of `reference`, and leaves no checkpoint."""
    caplog.clear()
    caplog.set_level(logging.INFO, logger="das_cli")
    das_cli.run(cfg, folder)
    assert f"cell {CELL} resumes from its checkpoint at step {step}" in caplog.text
    assert_same_cell(folder, reference)
    assert not layout.checkpoint_file(folder, CELL).exists()


def stopped_in_evaluation(monkeypatch):
    """Ctrl-C during the first evaluation of trained cells (a lone cell's, or its bundle's)."""
    from das_cli import cell

    def interrupted(run, ready):
        raise KeyboardInterrupt

    monkeypatch.setattr(cell, "evaluations", interrupted)


def test_a_stop_after_training_checkpoints_the_cell_at_its_last_step(tmp_path, monkeypatch, one_thread, caplog):
    """A trained cell stopped in its evaluation is not trained again: the rerun resumes it at its last step."""
    cfg = das_cli.compose(SMALL)
    das_cli.run(cfg, tmp_path / "whole")
    with monkeypatch.context() as m:
        stopped_in_evaluation(m)
        with pytest.raises(KeyboardInterrupt, match=f"cell {CELL} checkpointed at step 9/9"):
            das_cli.run(cfg, tmp_path / "stopped")
    assert not layout.metrics_file(tmp_path / "stopped", CELL).exists()
    assert_rerun_resumes(cfg, tmp_path / "stopped", tmp_path / "whole", "9/9", caplog)


def test_a_stop_in_a_bundles_evaluation_checkpoints_every_cell_at_its_last_step(tmp_path, monkeypatch, one_thread, caplog):
    """Both cells of a bundle are checkpointed at their last step; each rerun cell resumes there, alone, to the
    bundle's hits and training loss (its evaluation alone may differ from the bundled one in the last bits)."""
    cfg = das_cli.compose([a for a in SMALL if not a.startswith("layers=")] + ["layers=[1,2]"])
    das_cli.run(cfg, tmp_path / "whole")
    with monkeypatch.context() as m:
        stopped_in_evaluation(m)
        with pytest.raises(KeyboardInterrupt, match="cells block_output__L01__Plast, block_output__L02__Plast checkpointed at step 9/9"):
            das_cli.run(cfg, tmp_path / "stopped")
    caplog.set_level(logging.INFO, logger="das_cli")
    das_cli.run(cfg, tmp_path / "stopped")
    assert caplog.text.count("resumes from its checkpoint at step 9/9") == 2
    whole, rerun = pd.read_csv(tmp_path / "whole" / "iia.csv"), pd.read_csv(tmp_path / "stopped" / "iia.csv")
    exact = ["cell", "iia", "train_iia", "loss", "steps"]
    pd.testing.assert_frame_equal(rerun[exact], whole[exact], check_exact=True)
    pd.testing.assert_frame_equal(rerun[["test_loss", "p_label"]], whole[["test_loss", "p_label"]], atol=1e-5, rtol=0)


def test_a_checkpoint_of_another_configuration_or_length_is_ignored(tmp_path, caplog):
    path = tmp_path / "cells" / CELL / "checkpoint.pt"
    curve = [(k, 1, 0.5, 0.0, 0.1) for k in range(1, 5)]
    state = {"intervention": {"w": torch.ones(2)}, "losses": [torch.tensor(0.5)], "curve": curve}
    layout.Checkpoint(path, CELL, {"train": {"lr": 0.1}, "seed": 0}).save(state, 4, 9)

    loaded = layout.Checkpoint(path, CELL, {"train": {"lr": 0.1}, "seed": 0}).load(9)
    assert loaded[0] == 4 and torch.equal(loaded[1]["intervention"]["w"], torch.ones(2))
    caplog.clear()
    assert layout.Checkpoint(path, CELL, {"train": {"lr": 0.2}, "seed": 0}).load(9) is None
    assert layout.Checkpoint(path, CELL, {"train": {"lr": 0.1}, "seed": 0}).load(12) is None
    layout.Checkpoint(path, CELL, {"train": {"lr": 0.1}, "seed": 0}).save({**state, "curve": curve[:3]}, 4, 9)
    assert layout.Checkpoint(path, CELL, {"train": {"lr": 0.1}, "seed": 0}).load(9) is None  # a curve that stops short
    path.write_text("not a checkpoint")
    assert layout.Checkpoint(path, CELL, {"train": {"lr": 0.1}, "seed": 0}).load(9) is None
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(messages) == 4 and all("training it from the start" in m for m in messages), messages
    assert "another configuration (changed: train.lr)" in messages[0]
    assert "does not fit this cell's 12 steps" in messages[1] and "damaged" in messages[3]
    assert "its training curve does not cover its 4 steps" in messages[2]
    assert layout.Checkpoint(tmp_path / "none.pt", CELL, {}).load(9) is None


def test_a_signal_inside_an_update_is_handled_after_it():
    handled = []

    def handler(signum, frame):
        handled.append(signum)

    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        with WholeSteps() as whole:
            with whole.update():
                signal.raise_signal(signal.SIGUSR2)
                assert handled == []  # noted, not handled, in the middle of the update
            assert handled == [signal.SIGUSR2]
            signal.raise_signal(signal.SIGUSR2)  # outside an update: at once
            assert handled == [signal.SIGUSR2] * 2
        assert signal.getsignal(signal.SIGUSR2) is handler  # restored on leaving
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_stop_signal_whose_handler_returns_warns_once_after_its_update(ignored_sigterm):
    with WholeSteps() as whole:
        assert not whole.warned()
        with whole.update():
            signal.raise_signal(signal.SIGTERM)
            assert ignored_sigterm == [] and not whole.warned()  # noted, not handled, in the middle of the update
        assert ignored_sigterm == [signal.SIGTERM]
        assert whole.warned() and not whole.warned()  # once
        signal.raise_signal(signal.SIGTERM)  # outside an update: at once
        assert whole.warned()


def test_a_stop_signal_whose_handler_raises_is_no_warning(raising_sigterm):
    with WholeSteps() as whole:
        with pytest.raises(RuntimeError, match="stop"):
            with whole.update():
                signal.raise_signal(signal.SIGTERM)
        assert not whole.warned()


@pytest.fixture
def raising_sigterm():
    with handled_by(signal.SIGTERM, raising("stop")):
        yield


class Killed(BaseException):
    """What SIGKILL does to a job: it ends at once, and nothing of it runs after."""


@contextmanager
def sigterm_at_step_then_killed(n: int, monkeypatch):
    """SIGTERM inside the optimiser update of step `n` (its handler returns, as submitit's does); the process is
    killed as soon as that has written a checkpoint."""
    save = layout.Checkpoint.save

    def save_then_die(self, *args):
        save(self, *args)
        raise Killed

    with monkeypatch.context() as m:
        signal_at_step(n, signal.SIGTERM, m)
        m.setattr(layout.Checkpoint, "save", save_then_die)
        yield


def test_a_sigterm_the_job_outlives_checkpoints_the_cell_so_a_kill_after_it_loses_nothing(
        tmp_path, monkeypatch, one_thread, ignored_sigterm, caplog):
    """A plain scancel under submitit: SIGTERM (ignored), SIGKILL a few seconds later. The cell is saved at the end of
    the step the SIGTERM arrives in; after the kill, the rerun resumes there to the uninterrupted run's numbers."""
    cfg = das_cli.compose(SMALL)
    das_cli.run(cfg, tmp_path / "whole")
    with sigterm_at_step_then_killed(4, monkeypatch), pytest.raises(Killed):
        das_cli.run(cfg, tmp_path / "killed")
    assert ignored_sigterm == [signal.SIGTERM]
    assert any("SIGTERM: the job goes on" in r.getMessage() for r in caplog.records)
    assert not layout.metrics_file(tmp_path / "killed", CELL).exists()
    record = torch.load(layout.checkpoint_file(tmp_path / "killed", CELL), weights_only=True)
    assert (record["step"], record["total"]) == (4, 9)
    assert_rerun_resumes(cfg, tmp_path / "killed", tmp_path / "whole", "4/9", caplog)


def test_a_sigterm_the_job_outlives_leaves_training_as_it_was(tmp_path, monkeypatch, one_thread, ignored_sigterm):
    """Not killed after all: the cell trains on to the numbers of a run that saw no signal, and keeps no checkpoint."""
    cfg = das_cli.compose(SMALL)
    das_cli.run(cfg, tmp_path / "whole")
    signal_at_step(2, signal.SIGTERM, monkeypatch)
    das_cli.run(cfg, tmp_path / "warned")
    assert ignored_sigterm == [signal.SIGTERM]
    assert_same_cell(tmp_path / "warned", tmp_path / "whole")
    assert not layout.checkpoint_file(tmp_path / "warned", CELL).exists()


def test_torch_random_state_is_saved_and_restored():
    from das_cli.train import TrainingState

    def state():
        layer = torch.nn.Linear(2, 2)
        optimizer = torch.optim.Adam(layer.parameters())
        return TrainingState(layer, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), torch.device("cpu"))

    saved = state().saved()  # torch's random state as it was here
    expected = torch.rand(3)
    torch.rand(5)
    assert state().resume((4, saved)) == 4
    assert torch.equal(torch.rand(3), expected)


def test_the_stop_line_names_every_checkpointed_cell_of_a_bundle(tmp_path):
    from das_cli.folder import Checkpoint
    from das_cli.interrupts import interrupted as _interrupted

    def checkpoint(cell_id, saved):
        made = Checkpoint(tmp_path / cell_id, cell_id, {})
        made.saved = saved
        return made

    bundle = [checkpoint("a", (2, 6)), checkpoint("b", None), checkpoint("c", (2, 6))]  # b finished before the stop
    line = str(_interrupted(KeyboardInterrupt(), tmp_path, bundle))
    assert line.startswith("interrupted; 0 finished cells are kept") and "; cells a, c checkpointed at step 2/6; to resume" in line
    apart = str(_interrupted(KeyboardInterrupt(), tmp_path, [checkpoint("a", (2, 6)), checkpoint("d", (5, 9))]))
    assert "; cells a at step 2/6, d at step 5/9 checkpointed; to resume" in apart
    assert "checkpointed" not in str(_interrupted(KeyboardInterrupt(), tmp_path, [checkpoint("b", None)]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_checkpoint_holding_nan_or_inf_is_not_resumed(tmp_path, caplog, bad):
    path = tmp_path / "cells" / CELL / "checkpoint.pt"
    fingerprint = {"train": {"lr": 0.1}, "seed": 0}
    state = {"intervention": {"w": torch.tensor([1.0, bad])}, "losses": [torch.tensor(0.5)], "rng": {"cpu": torch.get_rng_state()}}
    layout.Checkpoint(path, CELL, fingerprint).save(state, 4, 9)
    caplog.clear()
    assert layout.Checkpoint(path, CELL, fingerprint).load(9) is None
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "holds NaN or Inf values (state.intervention.w)" in message and "training it from the start" in message
