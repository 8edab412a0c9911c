"""Exceptions that end a job rather than fail a cell.

On SLURM, submitit's handler for the pre-emption/time-limit signal checkpoints and requeues the job,
or, when its requeues are used up, raises `UncompletedJobError` (a RuntimeError) from inside whatever
the job is running. Recording that as a failed cell would mark a good cell failed and keep the job
running until SLURM kills it; it must propagate, as must anything else a signal handler raises.
"""

from __future__ import annotations

import signal


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
