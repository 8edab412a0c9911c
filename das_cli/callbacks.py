"""Hydra callbacks wired in conf/config.yaml (`hydra.callbacks`)."""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

# What went wrong in the last multirun of this process (failed or missing cells, jobs that ran no
# cell); `das-cli` exits with status 1 when it is not empty.
PROBLEMS: list[str] = []


class AggregateResults(Callback):
    """At the end of every multirun, merge all jobs' cells into <hydra.sweep.dir>/iia.csv, pivots and
    heatmaps, and print the summary: what `das-cli-report <hydra.sweep.dir>` does. Runs in the
    launching process, whatever the launcher (basic, joblib, submitit local or SLURM)."""

    def __init__(self, plots: bool = True) -> None:
        self.plots = bool(plots)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .errors import DasError
        from .report import aggregate

        folder = str(config.hydra.sweep.dir)
        try:  # a multirun over hyperparameters (-m train.lr=0.01,0.1) merges too, the swept keys as columns
            report = aggregate(folder, plots=self.plots)
        except DasError as e:
            log.error("no merged table: %s", e)
            PROBLEMS.append(str(e))
            return
        print(report.text())
        if not report.ok:
            PROBLEMS.append(f"{len(report.failed)} failed, {len(report.missing)} missing and {len(report.damaged)} damaged cells, "
                            f"{len(report.not_started)} job(s) that ran no cell")
            log.error("sweep %s: %s; see %s/iia.csv", folder, PROBLEMS[-1], folder)
