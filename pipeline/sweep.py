"""Groups the jobs of a Hydra multirun under one MLflow parent run, and reports failures.

Hydra calls this in the process that launches the jobs (`hydra.callbacks` in
conf/hydra/default.yaml). The parent run's id reaches each job through the environment
of the job's process, which `on_job_start` sets there: launchers send the callback along
with the job (joblib, submitit, Ray), so it also reaches processes on other machines.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline import compat
from pipeline.errors import TrialPruned
from pipeline.tracking.tracker import SWEEP_KEY

PARENT_RUN_ENV = "PIPELINE_PARENT_RUN_ID"
JOBS_FILE = "jobs.jsonl"  # one line per finished job, in the sweep directory
log = logging.getLogger("pipeline")


def minimizes(config: DictConfig) -> bool:
    """Whether the sweep's best `optimized_metric` is its smallest value: as the sweeper's
    `direction` says (Optuna's), else when the metric is a loss or an error (`val_loss`)."""
    direction = config.hydra.sweeper.get("direction")
    if direction is not None:
        return str(direction) == "minimize"
    objective = str(config.get("optimized_metric") or "")
    return any(word in objective for word in ("loss", "error"))


def sweep_key(config: DictConfig) -> str:
    """A digest of what makes a sweep this sweep: the command's overrides and the sweeper's settings.

    The same `-m` command gives the same key, so a sweep that was killed (or had failed jobs)
    is continued by running its command again (`MlflowTracker.open_parent`); where its
    output goes (`hydra.sweep.dir`, by default a new timestamped folder) does not count.
    """
    import hashlib

    from omegaconf import OmegaConf

    hydra_overrides = [o for o in config.hydra.overrides.hydra if not o.startswith(("hydra.sweep.", "hydra.run."))]
    what = {
        "overrides": sorted(config.hydra.overrides.task),
        "hydra": sorted(hydra_overrides),
        "sweeper": OmegaConf.to_container(config.hydra.sweeper, resolve=False),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


class MlflowSweep(Callback):
    """Opens a parent run before a multirun's jobs and closes it, with a report, after them.

    Each job's own run is a child (`mlflow.parentRunId`), so the MLflow UI shows the sweep
    as one expandable group. Each job's outcome is also appended to `jobs.jsonl` in the
    sweep directory, so jobs that failed before opening a run (a bad config value) count
    too. After the last job the parent gets the best value of `optimized_metric`, the
    numbers of jobs, failed jobs and pruned trials, and FINISHED (or FAILED if any job
    failed); the failed jobs and pruned trials are listed with their overrides, and a failed
    job makes the command exit 1.

    Example:
        >>> # conf/hydra/default.yaml
        >>> # callbacks: {mlflow_sweep: {_target_: pipeline.sweep.MlflowSweep}}
    """

    def __init__(self) -> None:
        self._parent: str | None = None
        self._tracker: Any = None
        self._objective: str | None = None
        self._minimize = False
        self._report: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import atexit

        from hydra.utils import instantiate

        from pipeline.provenance import environment_tags

        self._tracker = instantiate(config.tracking)
        self._objective = config.get("optimized_metric")
        self._minimize = minimizes(config)
        self._jobs_file = Path(str(config.hydra.sweep.dir)) / JOBS_FILE
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        tags = {**environment_tags(), "sweep_dir": str(sweep_dir), "sweep": "true", SWEEP_KEY: sweep_key(config)}
        self._parent = self._tracker.open_parent(name=f"sweep {sweep_dir.name}", tags=tags)
        os.environ[PARENT_RUN_ENV] = self._parent
        log.info("sweep parent run %s", self._parent)
        # The basic sweeper re-raises a failed job's error after the batch, and Ctrl-C stops
        # the sweep, both skipping on_multirun_end; the parent run is then closed as the
        # process exits, FAILED or KILLED, so the same command continues the sweep.
        atexit.register(self._close, True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Hand the parent run's id to the job, also in a process that did not inherit it.

        Launchers send this callback to the job's process with the job (a Ray worker on
        another machine, a SLURM job submitted without `--export=ALL` get no environment
        from the launching process), so its `_parent` is set there.
        """
        if self._parent is not None:
            os.environ[PARENT_RUN_ENV] = self._parent

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Record each job's outcome, also of jobs that failed before opening an MLflow run."""
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        error = compat.job_error(job_return)
        line = {
            "job": config.hydra.job.num,
            "overrides": " ".join(config.hydra.overrides.task),
            # A trial stopped by an Optuna pruner is not a failure.
            "status": "PRUNED" if isinstance(error, TrialPruned) else job_return.status.name,
            "error": f"{type(error).__name__}: {error}" if error is not None else "",
        }
        path = Path(str(config.hydra.sweep.dir)) / JOBS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:  # one short append per job: safe across processes
            handle.write(json.dumps(line) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report = self._close()
        if report is not None and report.failed:
            raise SystemExit(1)

    def _close(self, interrupted: bool = False) -> Any:
        if self._parent is not None and self._report is None:
            os.environ.pop(PARENT_RUN_ENV, None)
            jobs = []
            if self._jobs_file.exists():
                jobs = [json.loads(line) for line in self._jobs_file.read_text().splitlines() if line]
            self._report = self._tracker.close_parent(self._parent, self._objective, jobs, interrupted,
                                                      self._minimize)
            print(self._report.text(), flush=True)
        return self._report

