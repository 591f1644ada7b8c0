"""Which earlier run a run continues: `resume=auto`, a run directory, a run id, or none.

`auto` finds this config's killed run (its process is gone) in the store; a directory or
run id names one. Either way the run must have a checkpoint to continue from.
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
        ConfigError: a named run that is not a run directory or has no checkpoint.
    """
    if value in (None, "never") or (value == "auto" and multi_worker):
        return None
    if value == "auto":
        found = store.find_resumable(identity)
        if found is None:
            return None
        run_id, run_dir = found
        if not _has_checkpoint(Path(run_dir)):
            return None
        if in_use(Path(run_dir)):  # its process is alive, on this host or another
            log.info("run %s in %s is still running; starting a new run", run_id, run_dir)
            return None
        log.info("resuming run %s (killed before it finished) in %s", run_id, run_dir)
        return ResumeTarget(run_id, Path(run_dir))
    if Path(value).is_dir():
        run_file = Path(value) / RUN_FILE
        if not run_file.exists():
            raise ConfigError(f"resume={value!r}: the directory has no {RUN_FILE}; is it a run directory?")
        run_id, run_dir = json.loads(run_file.read_text())["run_id"], Path(value)
    else:
        from pipeline.tracking import run_directory

        run_id, run_dir = value, run_directory(store.uri, value)
    if not _has_checkpoint(run_dir):
        raise ConfigError(
            f"resume={value!r}: {run_dir / 'checkpoints'} holds no checkpoint to continue from "
            "(was the run trained with train.checkpoint=true?)"
        )
    return ResumeTarget(run_id, run_dir)


def _has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "state.json").exists()
