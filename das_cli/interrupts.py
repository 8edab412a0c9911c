"""Exceptions that end a job rather than fail a cell.

On SLURM, submitit's handler for the pre-emption/time-limit signal checkpoints and requeues the job,
or, when its requeues are used up, raises `UncompletedJobError` (a RuntimeError) from inside whatever
the job is running. Recording that as a failed cell would mark a good cell failed and keep the job
running until SLURM kills it; it must propagate, as must anything else a signal handler raises.
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DasError
from .folder import Checkpoint, count_finished

log = logging.getLogger(__name__)


def is_interruption(error: BaseException) -> bool:
    """True for submitit's UncompletedJobError and for any exception raised inside a signal handler."""
    try:
        from submitit.core.utils import UncompletedJobError
    except ImportError:  # submitit is an optional dependency (the `cluster` extra)
        pass
    else:
        if isinstance(error, UncompletedJobError):
            return True
    handlers = _signal_handler_codes()
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in handlers:
            return True
        tb = tb.tb_next
    return False


def _signal_handler_codes() -> set:
    """The code objects of the Python functions (or bound methods) installed as signal handlers."""
    codes = set()
    for sig in signal.valid_signals():
        handler = signal.getsignal(sig)
        code = getattr(getattr(handler, "__func__", handler), "__code__", None)
        if code is not None:
            codes.add(code)
    return codes


class Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. `kill`, a local scheduler): stops like Ctrl-C, with the shell's status for it."""

    status = 143


def raise_terminated(signum, frame) -> None:
    raise Terminated("terminated (SIGTERM)")


def stops_the_job(error: BaseException) -> bool:
    """Ctrl-C, SIGTERM, an exit, or an interruption: the job ends, the work in flight is worth keeping."""
    return isinstance(error, (KeyboardInterrupt, SystemExit)) or is_interruption(error)


class WholeSteps:
    """While training, the job's stop signals (SIGINT, SIGTERM, SIGUSR2) wait for the optimiser update
    they arrive in: inside `update()` a signal is noted and its handler runs when the update ends, so
    whatever it raises leaves the parameters, the optimiser and the schedule at the end of a whole step.
    Outside the main thread (where Python cannot set handlers) nothing is deferred.

    A stop signal whose handler returns (submitit ignores SIGTERM, which a plain `scancel` sends a few
    seconds before SIGKILL) is a warning: `warned()` is true once, after the update, so the loop can
    save its state while the job goes on."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

    def __init__(self) -> None:
        self.previous: dict = {}
        self.pending: list[int] = []
        self.updating = False
        self._warned = False

    def __enter__(self) -> "WholeSteps":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._arrived)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @contextmanager
    def update(self) -> Iterator[None]:
        self.updating = True
        try:
            yield
        finally:
            self.updating = False
            while self.pending:
                self._forward(self.pending.pop(0), None)

    def warned(self) -> bool:
        """Whether a stop signal came, and its handler let the job go on, since the last call."""
        warned, self._warned = self._warned, False
        return warned

    def _arrived(self, signum, frame) -> None:
        if self.updating:
            self.pending.append(signum)
        else:
            self._forward(signum, frame)

    def _forward(self, signum: int, frame) -> None:
        handler = self.previous.get(signum)
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:  # what the signal would have done: end the process
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        log.warning("%s: the job goes on, and the cells in training are checkpointed in case a kill follows",
                    signal.Signals(signum).name)
        self._warned = True


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during the cells: finished cells are kept, the cell in flight is checkpointed;
    the message says how to resume; `status` is the exit status (130, or 143 for SIGTERM)."""

    def __init__(self, message: str, status: int = 130) -> None:
        super().__init__(message)
        self.status = status


def interrupted(stop: KeyboardInterrupt, folder: Path, in_flight: list[Checkpoint]) -> Interrupted:
    """The one line Ctrl-C or SIGTERM ends with: what is kept, which cells are checkpointed, how to resume."""
    saved = [c for c in in_flight if c.saved]
    steps = {c.saved for c in saved}
    if len(saved) == 1:
        checkpointed = f"cell {saved[0].cell_id} checkpointed at step {saved[0].saved[0]}/{saved[0].saved[1]}; "
    elif len(steps) == 1:  # a bundle stops all its cells at one step
        (step, total), = steps
        checkpointed = f"cells {', '.join(c.cell_id for c in saved)} checkpointed at step {step}/{total}; "
    else:
        checkpointed = "cells " + ", ".join(f"{c.cell_id} at step {c.saved[0]}/{c.saved[1]}" for c in saved) + " checkpointed; "
    return Interrupted(f"{str(stop) or 'interrupted'}; {count_finished(folder)} finished cells are kept in {folder}; "
                       f"{checkpointed if saved else ''}to resume, run the same command with hydra.run.dir={folder}",
                       getattr(stop, "status", 130))


# The folder stopped taking files: a full disk or quota, a file system remounted read-only, permissions taken away.
UNWRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def unwritable(error: OSError, folder: Path) -> DasError | None:
    """The one line a run ends with when its folder stops taking files (None for any other OSError): what failed,
    that the finished cells are kept (each was written whole or not at all), and how to resume."""
    if error.errno not in UNWRITABLE:
        return None
    where = f" writing {error.filename}" if error.filename else ""
    return DasError(f"hydra.run.dir={folder}: {error.strerror or error}{where}; {count_finished(folder)} finished cells are kept "
                    f"there; make room (or make it writable) and run the same command to resume")
