"""Which earlier run a run continues: `resume=auto`, a run directory, a run id, or none.

`auto` finds this config's killed run (its process is gone) in the store; a directory or
run id names one. The run continues in its own MLflow run and directory from its last
checkpoint, or from the first epoch when it was killed before one was written (while the
data loaded, say): a kill at any point leaves one run, never an abandoned one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipeline.errors import ConfigError
from pipeline.files import in_use

log = logging.getLogger("pipeline")
RUN_FILE = "mlflow_run.json"  # in each run directory: the MLflow run id and store


@dataclass(frozen=True)
class ResumeTarget:
    """The run to continue: its MLflow run id and its run directory."""

    run_id: str
    run_dir: Path


class Store(Protocol):
    uri: str

    def find_resumable(self, config_sha256: str) -> tuple[str, str] | None: ...


def resume_target(value: str | None, store: Store, identity: str, multi_worker: bool = False) -> ResumeTarget | None:
    """The run that `resume=value` continues, or None for a fresh run.

    Args:
        value: `auto`, `never` (or null), a run directory, or an MLflow run id.
        store: the tracker, which finds killed runs of this config and looks up run ids.
        identity: the config fingerprint that the same command produces again.
        multi_worker: `auto` is off for multi-worker runs: every worker must agree and only
            the chief may ask the store, so they resume only when the run is named.

    Raises:
        ConfigError: a named run that is not a run directory.
    """
    if value in (None, "never") or (value == "auto" and multi_worker):
        return None
    if value == "auto":
        found = store.find_resumable(identity)
        if found is None:
            return None
        run_id, run_dir = found
        if _recorded_run(Path(run_dir)) != run_id:  # removed since, or the tag names another run's
            log.info("run %s: its directory %s is gone or holds another run; starting a new run", run_id, run_dir)
            return None
        if in_use(Path(run_dir)):  # its process is alive, on this host or another
            log.info("run %s in %s is still running; starting a new run", run_id, run_dir)
            return None
        log.info("resuming run %s (killed before it finished) in %s", run_id, run_dir)
        return ResumeTarget(run_id, Path(run_dir))
    if Path(value).is_dir():
        run_id, run_dir = _recorded_run(Path(value)), Path(value)
        if run_id is None:
            raise ConfigError(
                f"resume={value!r}: the directory has no readable {RUN_FILE}; is it a run directory? "
                "Name the directory of an earlier run (outputs/runs/<date_time>), or its MLflow run id."
            )
        return ResumeTarget(run_id, run_dir)
    from pipeline.tracking import run_directory

    run_id, run_dir = value, Path(run_directory(store.uri, value))
    # The directory comes from the run's `run_dir` tag, which anyone who can write the store
    # can change: only a directory that records this very run is continued.
    if _recorded_run(run_dir) != run_id:
        raise ConfigError(
            f"resume={value!r}: the run's directory {run_dir} (its run_dir tag) does not exist here "
            f"or its {RUN_FILE} records another run. Name the run's directory itself, like "
            "resume=outputs/runs/<date_time>, or resume=never to start fresh."
        )
    return ResumeTarget(run_id, run_dir)


def _recorded_run(run_dir: Path) -> str | None:
    """The MLflow run id that `run_dir/mlflow_run.json` records, or None if unreadable."""
    try:
        recorded = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    run_id = recorded.get("run_id") if isinstance(recorded, dict) else None
    return run_id if isinstance(run_id, str) else None
