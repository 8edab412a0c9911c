"""`das-cli`: a thin Hydra entry point over `das_cli.sweep.run`.

Mistakes in the command line end in one line on stderr naming the key and the valid choices,
and exit status 2; a sweep with failed cells exits with status 1.

In a multirun (`-m`) failures stay local: a job with failed cells, or one that fails outright,
is logged and the other jobs go on; at the end `das_cli.callbacks.AggregateResults` merges every
job's cells into one table in the sweep folder and lists the failures, and the exit status is 1.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import config as C
from . import grid
from .errors import DasError
from .interrupts import raise_terminated

log = logging.getLogger(__name__)
MULTIRUN_FLAGS = ("-m", "--multirun")
JOB_PROBLEMS: list[str] = []  # multirun jobs of this process that failed or had failed cells
NON_OVERRIDE_FLAGS = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve", "--version", "--shell-completion", "-sc", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")


def fail(message: str) -> None:
    print(f"das-cli: error: {message}", file=sys.stderr)
    sys.exit(2)


def overrides_of(argv: list[str]) -> list[str] | None:
    """The key=value overrides, or None when Hydra is asked for something other than a plain run."""
    if any(a.split("=")[0] in NON_OVERRIDE_FLAGS for a in argv if a.startswith("-")):
        return None
    return [a for a in argv if not a.startswith("-")]


def check_groups(overrides: list[str], multirun: bool) -> None:
    """`model=foo` and friends: name the valid choices (multirun: each comma-separated value)."""
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key not in C.GROUPS:
            continue
        choices = C.group_choices(key)
        several = re.findall(r"[^\[\],\s]+", value) if key in C.LIST_GROUPS else None  # logger=[tensorboard,mlflow]
        for choice in several if several is not None else value.split(",") if multirun else [value]:
            if choice not in choices:
                fail(f"{key}={choice}: unknown {key}; valid choices: {', '.join(choices)}")


def check_shards(overrides: list[str]) -> None:
    """Multirun: every `sweep.shard` value must fit every `sweep.num_shards` value (one line, exit 2);
    warn when the listed shards leave some out (their cells would be missing from the table)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra reports grammar errors itself
        return
    defaults = OmegaConf.load(C.conf_dir() / "config.yaml").get("sweep") or {}
    values = {"sweep.shard": [defaults.get("shard", 0)], "sweep.num_shards": [defaults.get("num_shards", 1)]}
    for o in parsed:
        if o.key_or_group in values:
            values[o.key_or_group] = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
    shards = [s for s in values["sweep.shard"] if isinstance(s, int)]
    for n in (n for n in values["sweep.num_shards"] if isinstance(n, int)):
        for s in shards:
            for error in grid.shard_errors(s, n):
                fail(error)
        left_out = sorted(set(range(n)) - set(shards))
        if left_out and n > 1:
            print(f"das-cli: warning: sweep.num_shards={n} but shards {left_out} are not in this multirun; "
                  "their cells will be missing from the merged table", file=sys.stderr)


def check_signal_delay(overrides: list[str]) -> None:
    """SLURM sends its time-limit signal `signal_delay_s` before `timeout_min` ends: a delay as long as the
    limit means a signal at once and a job that checkpoints and requeues from its first second."""
    launcher = [o for o in overrides if o.lstrip("+~").startswith(("hydra/launcher=", "hydra.launcher."))]
    if not any(o.startswith("hydra/launcher=") for o in launcher):
        return
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(C.conf_dir()), version_base="1.3"):
            options = compose("config", overrides=launcher, return_hydra_config=True).hydra.launcher
        delay, timeout = options.get("signal_delay_s"), options.get("timeout_min")
    except Exception:  # not a SLURM launcher, or an error Hydra reports itself
        return
    if isinstance(delay, int) and isinstance(timeout, int) and delay >= timeout * 60:
        fail(f"hydra.launcher.signal_delay_s={delay}: must be less than hydra.launcher.timeout_min*60={timeout * 60} "
             "(else SLURM signals the time limit as soon as a job starts)")


def preflight(argv: list[str]) -> list[str]:
    """Compose and validate the config before Hydra runs it, so every mistake fits on one line and
    none waits for the model to load. Returns argv for Hydra (a schema key a preset leaves out gets `+`).
    A single run's checked config is kept in CHECKED for the job, which then does not check it again."""
    overrides = overrides_of(argv)
    if overrides is None:
        return argv
    multirun = any(a in MULTIRUN_FLAGS for a in argv)
    check_groups(overrides, multirun)
    if multirun:
        check_output_folder(overrides, multirun)
        if "mode=plan" in overrides:
            fail("mode=plan: plans one run; drop -m (for one job of a sharded sweep add sweep.shard=K sweep.num_shards=N)")
        try:
            renamed = dict(zip(overrides, C.check_override_keys(overrides)))
        except DasError as e:
            fail(str(e))
        check_shards(overrides)
        check_signal_delay(overrides)
        return [renamed.get(a, a) for a in argv]
    hydra_keys = [o for o in overrides if o.startswith(("hydra.", "hydra/"))]
    plain = [o for o in overrides if o not in hydra_keys]
    try:
        cfg, composed = C.compose_keys(plain)
        if not cfg.get("from_run"):  # a from_run config is checked once the source run's intervention is in it
            CHECKED[OmegaConf.to_yaml(cfg)] = C.checked(cfg)
        if cfg.get("mode") == "plan":
            show_plan(cfg, hydra_keys)
        check_output_folder(overrides, multirun)  # made here, after the checks; a plan makes none
    except DasError as e:
        fail(str(e))
    except Exception as e:  # Hydra's composition and override-grammar errors
        fail(" ".join(str(e).split()).split(" Config search path")[0])
    renamed = dict(zip(plain, composed))
    return [renamed.get(a, a) for a in argv]


def show_plan(cfg: DictConfig, hydra_keys: list[str]) -> None:
    """mode=plan: print the plan (cells, finished ones in hydra.run.dir, estimated time and memory) and exit 0;
    no folder is made and no weight is read."""
    from .plan import make_plan

    if cfg.get("from_run"):
        fail("mode=plan: plans a training sweep; from_run= evaluates a finished run's cells and trains nothing")
    given = [o.partition("=")[2] for o in hydra_keys if o.startswith("hydra.run.dir=")]
    folder = Path(given[-1]) if given and "${" not in given[-1] else None
    print(make_plan(CHECKED[OmegaConf.to_yaml(cfg)], folder).text())
    sys.exit(0)


CHECKED: dict[str, DictConfig] = {}  # a single run's composed config (as YAML) -> the same, typed and validated


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Config warnings on one line of stderr, each once (the config is checked before and during the run);
    any other warning as Python shows it."""
    if issubclass(category, C.ConfigWarning):
        if str(message) not in SHOWN_WARNINGS:
            print(f"das-cli: warning: {message}", file=sys.stderr)
        SHOWN_WARNINGS.add(str(message))
    else:
        PYTHON_SHOW_WARNING(message, category, filename, lineno, file, line)


PYTHON_SHOW_WARNING = warnings.showwarning
SHOWN_WARNINGS: set[str] = set()


def check_output_folder(overrides: list[str], multirun: bool) -> None:
    """hydra.run.dir / hydra.sweep.dir must be a folder we can write (one line, exit 2, before Hydra tries)."""
    from .folder import make_folder

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    for item in overrides:
        name, _, value = item.partition("=")
        if name == key and value and "${" not in value:
            try:
                make_folder(value, key)
            except DasError as e:
                fail(str(e))


def interrupted(error: KeyboardInterrupt) -> None:
    """Ctrl-C or SIGTERM: one line (the sweep's says how many cells are kept, which cell is checkpointed
    and how to resume), exit 130 (SIGTERM: 143)."""
    print(f"das-cli: {str(error) or 'interrupted'}", file=sys.stderr)
    sys.exit(getattr(error, "status", 130))


def use_allocated_cpus() -> None:
    """Inside a SLURM job, torch's threads match the CPUs the job was given: by default torch starts one per
    core of the node, and jobs sharing a node then oversubscribe it (each step waits on the others' threads).
    An explicit OMP_NUM_THREADS wins."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and int(cpus) > 0 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(int(cpus))


@hydra.main(version_base="1.3", config_path=str(C.conf_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from .sweep import run

    use_allocated_cpus()
    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    try:
        known = CHECKED.get(OmegaConf.to_yaml(cfg))  # the config preflight checked, unless Hydra composed another
        frame = run(cfg if known is None else known, hc.runtime.output_dir, checked=known is not None)
    except DasError as e:
        if not multirun:
            fail(str(e))
        print(f"das-cli: error: job {hc.job.num} ({' '.join(hc.overrides.task)}): {e}", file=sys.stderr)
        log.error("job %s failed: %s", hc.job.num, e)  # also into the job's log file
        JOB_PROBLEMS.append(f"job {hc.job.num}: {e}")
        return
    except Exception as e:  # a multirun job's crash stays local: the other jobs and the merged table go on
        if not multirun:
            raise
        log.exception("job %s failed: %s", hc.job.num, e)
        JOB_PROBLEMS.append(f"job {hc.job.num}: {type(e).__name__}: {e}")
        return
    failed = int(frame["error"].notna().sum()) if "error" in frame else 0
    if failed:
        log.error("%d cell(s) failed; see the error column of iia.csv", failed)
        if not multirun:
            sys.exit(1)
        JOB_PROBLEMS.append(f"job {hc.job.num}: {failed} cell(s) failed")


def main() -> None:
    warnings.showwarning = show_warning
    logging.raiseExceptions = False  # a log file on a full disk: the run's own one-line error says so, not a traceback per record
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # SIGTERM stops like Ctrl-C (checkpoint, one line)
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        sys.argv[1:] = preflight(sys.argv[1:])
        _hydra_main()
    except KeyboardInterrupt as e:
        interrupted(e)
    from .callbacks import PROBLEMS

    if JOB_PROBLEMS or PROBLEMS:  # a multirun with failures (a single run exits from _hydra_main)
        sys.exit(1)


if __name__ == "__main__":
    main()
