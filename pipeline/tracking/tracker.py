"""The tracker, which opens MLflow runs, and the run that stages report to.

A run is opened by `MlflowTracker.run(...)` and always closed with a final status:
FINISHED, FAILED (with the traceback as an artifact) or KILLED: stopped for a reason outside
the model (a signal, a full disk, a permission, the store itself), with the reason in its
`killed_reason` tag. A trial that a sweep's pruner stopped (`TrialPruned`) ends FINISHED. `resume=auto` continues KILLED runs, so the same command resumes them.
A store that refuses a write raises TrackingError, naming the store and the fix.
"""

from __future__ import annotations

import logging
import os
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, TrialPruned, outside_the_model
from pipeline.tracking import model, report, store
from pipeline.tracking.store import refusals

_MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value
KILLED_REASON = "killed_reason"  # tag of a KILLED run: why it stopped (removed when resumed)
SWEEP_KEY = "sweep_sha256"  # tag of a sweep's parent run: the command that started the sweep
log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Ending:
    """How a run ends: its status and what is kept with it. Plain strings, so that it can be
    sent to the tracker's own process (`pipeline.tracking.process`).

    `FINISHED`: it ran to its end, or a sweep's pruner stopped it (`TrialPruned`).
    `KILLED`: stopped from outside the model (`reason`: a signal, the disk, the store); the
    same command resumes it. `FAILED`: its own error (`traceback`, and `error` as a tag).
    """

    status: str
    reason: str | None = None
    traceback: str | None = None
    error: str = ""

    @classmethod
    def of(cls, error: BaseException | None) -> Ending:
        """The ending of a run that raised `error` (None: it did not)."""
        if error is None or isinstance(error, TrialPruned):
            return cls("FINISHED")
        reason = outside_the_model(error)
        if reason is not None:
            return cls("KILLED", reason=reason)
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        return cls("FAILED", traceback=text, error=f"{type(error).__name__}: {error}")


class TrackedRun:
    """An open MLflow run; stages report to it through the runner."""

    def __init__(
        self,
        client: Any,
        run_id: str,
        tracking_uri: str,
        experiment: str,
        register_as: str | None = None,
    ):
        self._client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.register_as = register_as

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Per-epoch metrics with step = epoch (Keras' 0-based epoch index)."""
        self.log_metrics(metrics, step=epoch)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        with refusals(self.tracking_uri):
            self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        with refusals(self.tracking_uri):  # a local artifact store's OSError passes unchanged
            if Path(path).is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_skipped_files(self, paths: Sequence[str]) -> None:
        """The files the data stage could not decode: a count metric and a list artifact."""
        import tempfile

        self.log_metrics({"data_skipped_files": float(len(paths))})
        with tempfile.TemporaryDirectory() as directory:
            listing = Path(directory) / "skipped_files.txt"
            listing.write_text("\n".join(paths) + "\n")
            self.log_artifact(listing)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        with refusals(self.tracking_uri):
            for key, value in tags.items():
                self._client.set_tag(self.run_id, key, value)

    def log_model(self, export_root: Path) -> str:
        """Logs the export's SavedModel as this run's MLflow model `model`; returns its URI.

        See `pipeline.tracking.model.log_model`: `models:/NAME/<version>` when registered
        (`tracking.register_as=NAME`), otherwise `runs:/<run_id>/model`.
        """
        with refusals(self.tracking_uri):
            return model.log_model(
                self._client, self.run_id, self.tracking_uri, Path(export_root), self.register_as
            )

    def end(self, ending: Ending) -> None:
        """Closes the run with `ending`'s status: FINISHED (a refusal raises TrackingError), or
        FAILED with the traceback as an artifact, or KILLED with the reason as a tag (a
        refusal of these is only logged: the error that ended the run is the one to report)."""
        if ending.status == "FINISHED":
            with refusals(self.tracking_uri):
                self._client.set_terminated(self.run_id, status="FINISHED")
            return
        if ending.traceback is not None:
            _log_traceback(self._client, self.run_id, ending.traceback, ending.error)
        _end(self._client, self.run_id, ending.status, ending.reason)

    @property
    def ui_command(self) -> str:
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"open {self.tracking_uri}/#/experiments in a browser"
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"


class Opens(ABC):
    """`run`, the context of an MLflow run, for a tracker that has `open(params, tags,
    resume_run_id, parent_run_id) -> TrackedRun`."""

    @contextmanager
    def run(
        self,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        record: bool = True,
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> Iterator[TrackedRun]:
        """Open a run, log `params` and `tags`, and close it with the right status.

        Args:
            record: false (a non-chief worker) logs nothing anywhere.
            resume_run_id: reopen this run instead of creating one (its params stay).
            parent_run_id: make the run a child of this one (a sweep's parent run).
        """
        if not record:
            yield SilentRun()
            return
        run = self.open(params, tags, resume_run_id, parent_run_id)
        try:
            yield run
        except GeneratorExit:
            # The context was let go without being left (a caller dropped it, or the process
            # is ending): no outcome to record, so the run stays RUNNING, as when its process
            # dies, and `resume=auto` takes it.
            raise
        except BaseException as error:
            run.end(Ending.of(error))
            raise
        run.end(Ending.of(None))

    @abstractmethod
    def open(self, params: Mapping[str, str], tags: Mapping[str, str], resume_run_id: str | None = None,
             parent_run_id: str | None = None) -> TrackedRun:
        """A new run (or `resume_run_id` reopened) with `params` and `tags`, for `run` to end."""


class MlflowTracker(Opens):
    """Opens MLflow runs in one experiment of one tracking store.

    Args:
        uri: the tracking store: `sqlite:///mlflow.db` (MLflow's embedded default, in the
            directory you run from), another database URI, or a server `http://host:5000`.
            A SQLite store is shared by parallel jobs, each waiting its turn to write for
            up to `store.SQLITE_BUSY_TIMEOUT_S` (or `?timeout=SECONDS` given in the URI).
        experiment: the MLflow experiment the runs are grouped under; created if missing.
        run_name: the run's display name; MLflow picks one when null.
        artifact_location: where a *new* experiment stores artifacts; null takes the
            store's default (`./mlruns` beside a local database).
        register_as: also register the logged model under this name in the Model
            Registry (a new version each run); null only logs it with the run.
        timeout: seconds a tracking server may take to answer before the run stops, before
            any training, with what to do (MLflow's own retries would take minutes).

    Example:
        >>> with MlflowTracker("sqlite:///mlflow.db", "digits").run(params, tags) as run:
        ...     run.log_metrics({"test_accuracy": 0.97})
    """

    def __init__(
        self,
        uri: str = "sqlite:///mlflow.db",
        experiment: str = "transfer",
        run_name: str | None = None,
        artifact_location: str | None = None,
        register_as: str | None = None,
        timeout: float = 10.0,
    ):
        if not uri:
            raise ConfigError("tracking.uri is empty: set it, for example tracking.uri=sqlite:///mlflow.db")
        if register_as is not None and (not register_as.strip() or "/" in register_as or ":" in register_as):
            raise ConfigError(
                f"tracking.register_as={register_as!r} is not a usable model name: expected a "
                "non-empty name without '/' or ':', for example tracking.register_as=digits-classifier"
            )
        self.uri = store.absolute_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.artifact_location = artifact_location
        self.register_as = register_as
        self.timeout = timeout

    def settings(self) -> dict[str, Any]:
        """The arguments that make this tracker again: `MlflowTracker(**tracker.settings())`
        (plain values: the tracker's own process is made from them)."""
        return {"uri": self.uri, "experiment": self.experiment, "run_name": self.run_name,
                "artifact_location": self.artifact_location, "register_as": self.register_as,
                "timeout": self.timeout}

    def open_store(self) -> None:
        """Opens the store now (a SQLite file's tables checked or made, a server asked for its
        health), ahead of the first call: MLflow keeps it open for the calls after."""
        self._client()

    def _client(self):
        return store.client(self.uri, self.timeout)

    def _experiment_id(self, client) -> str:
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(self.experiment, artifact_location=self.artifact_location)
        except MlflowException:
            # Another process created it between our look-up and our create.
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def open(
        self,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> TrackedRun:
        """What `run` opens: a new run (or `resume_run_id` reopened) with `params` and `tags`.
        The caller ends it (`TrackedRun.end`); a failure here ends it before raising."""
        from mlflow.entities import Param

        client = self._client()
        tags = {key: str(value) for key, value in tags.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        with refusals(self.uri):
            if resume_run_id:
                client.update_run(resume_run_id, status="RUNNING")
                if KILLED_REASON in client.get_run(resume_run_id).data.tags:
                    client.delete_tag(resume_run_id, KILLED_REASON)
                for key, value in tags.items():
                    client.set_tag(resume_run_id, key, value)
                run_id, params = resume_run_id, {}
            else:
                created = client.create_run(self._experiment_id(client), run_name=self.run_name, tags=tags)
                run_id = created.info.run_id
        run = TrackedRun(client, run_id, self.uri, self.experiment, self.register_as)
        try:
            params_list = [Param(k, str(v)[:_MAX_PARAM_LENGTH]) for k, v in params.items()]
            with refusals(self.uri):
                for start in range(0, len(params_list), 100):  # MLflow takes 100 params a batch
                    client.log_batch(run.run_id, params=params_list[start : start + 100])
                client.set_tag(run.run_id, "mlflow.source.type", "LOCAL")
        except BaseException as error:
            run.end(Ending.of(error))
            raise
        return run

    def find_resumable(self, config_sha256: str) -> tuple[str, str] | None:
        """The newest run of this config that was killed (or whose process died), if any."""
        from pipeline.provenance import is_alive

        client = self._client()
        with refusals(self.uri):
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                return None
            runs = client.search_runs(
                [found.experiment_id],
                filter_string=f"tags.config_sha256 = '{config_sha256}'",
                order_by=["attributes.start_time DESC"],
                max_results=20,
            )
        for candidate in runs:
            status, tags = candidate.info.status, candidate.data.tags
            if status == "KILLED" or (status == "RUNNING" and not is_alive(tags)):
                if tags.get("run_dir"):
                    return candidate.info.run_id, tags["run_dir"]
        return None

    def open_parent(self, name: str, tags: Mapping[str, str]) -> str:
        """Create a sweep's parent run; its children name it in `mlflow.parentRunId`.

        With a `sweep_sha256` tag (the command that started the sweep), the newest parent of
        the same sweep that did not finish (killed, interrupted, or with failed jobs) and whose
        process is gone is reopened instead: the same command continues its sweep.
        """
        from pipeline.provenance import is_alive

        client = self._client()
        key = tags.get(SWEEP_KEY)
        with refusals(self.uri):
            experiment_id = self._experiment_id(client)
            earlier = client.search_runs(
                [experiment_id], filter_string=f"tags.{SWEEP_KEY} = '{key}'",
                order_by=["attributes.start_time DESC"], max_results=1,
            ) if key else []
            for run in earlier:
                status = run.info.status
                if status == "FINISHED" or (status == "RUNNING" and is_alive(run.data.tags)):
                    break  # done, or still running: a new sweep
                client.update_run(run.info.run_id, status="RUNNING")
                for tag in ("host", "pid", "command"):  # the process that owns it now
                    if tag in tags:
                        client.set_tag(run.info.run_id, tag, tags[tag])
                log.info("continuing the sweep of parent run %s (%s before): jobs that finished "
                         "there are not run again", run.info.run_id, status)
                return run.info.run_id
            created = client.create_run(experiment_id, run_name=name, tags=dict(tags))
        return created.info.run_id

    def finished_child(self, parent_run_id: str, config_sha256: str) -> tuple[str, dict[str, float]] | None:
        """`(run id, metrics)` of a FINISHED run of this config in sweep `parent_run_id`, if any.

        A trial that a pruner stopped is not a result, so it does not count.
        """
        client = self._client()
        with refusals(self.uri):
            parent = client.get_run(parent_run_id)
            runs = client.search_runs(
                [parent.info.experiment_id],
                filter_string=(f"tags.mlflow.parentRunId = '{parent_run_id}' AND "
                               f"tags.config_sha256 = '{config_sha256}' AND attributes.status = 'FINISHED'"),
                order_by=["attributes.start_time DESC"], max_results=10,
            )
        for run in runs:
            if run.data.tags.get("trial_state") != "PRUNED":
                return run.info.run_id, dict(run.data.metrics)
        return None

    def close_parent(
        self, run_id: str, objective: str | None, jobs: Sequence[Mapping[str, Any]], interrupted: bool = False,
        minimize: bool = False,
    ) -> report.SweepReport:
        """Finish a sweep's parent run from its jobs' outcomes (`jobs.jsonl`) and its children.

        `interrupted`: the sweep stopped before its last job; the parent ends KILLED (FAILED
        if a job failed), so that the same command continues it. `minimize`: the best
        objective is the smallest.
        """
        return report.close_sweep(self._client(), run_id, self.experiment, objective, jobs, interrupted, minimize)


def _end(client, run_id: str, status: str, reason: str | None) -> None:
    """Ends a run that raised. A store that refuses this too is only logged: the error that
    ended the run is the one to report, and a RUNNING run whose process is gone is resumed
    by `resume=auto` all the same."""
    try:
        if reason:
            client.set_tag(run_id, KILLED_REASON, reason[:5000])
        client.set_terminated(run_id, status=status)
    except Exception as error:
        log.warning("MLflow run %s could not be marked %s in the store (%s)", run_id, status,
                    str(error).splitlines()[0][:300] if str(error) else type(error).__name__)


def _log_traceback(client, run_id: str, text: str, error: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "traceback.txt")
        with open(path, "w") as handle:
            handle.write(text)
        try:
            client.log_artifact(run_id, path)
        except Exception:  # the status set after this matters more than the artifact
            pass
    try:
        client.set_tag(run_id, "error", error[:5000])
    except Exception:  # and more than the tag
        pass


class SilentRun(TrackedRun):
    """Stands in for a run on processes that must not log (non-chief workers)."""

    def __init__(self):
        super().__init__(client=None, run_id="", tracking_uri="", experiment="")

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_skipped_files(self, paths: Sequence[str]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_model(self, export_root: Path) -> str:
        return ""

    def end(self, ending: Ending) -> None:
        pass
