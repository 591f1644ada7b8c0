"""MLflow tracking: the only module that imports mlflow.

A run is opened by `MlflowTracker.run(...)` and always closed with a final status:
FINISHED, FAILED (with the traceback as an artifact) or KILLED (interrupted).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

_MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value


def absolute_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` relative to the working directory becomes an absolute URI."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = uri[len(prefix) :]
        if path and path != ":memory:":
            return prefix + str(Path(path).resolve())
    return uri


class TrackedRun:
    """An open MLflow run; stages report to it through the runner."""

    def __init__(self, client: Any, run_id: str, tracking_uri: str, experiment: str):
        self._client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment = experiment

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Per-epoch metrics with step = epoch (Keras' 0-based epoch index)."""
        self.log_metrics(metrics, step=epoch)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
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
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, value)

    @property
    def ui_command(self) -> str:
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"


class MlflowTracker:
    """Opens MLflow runs in one experiment of one tracking store.

    Args:
        uri: the tracking store: `sqlite:///mlflow.db` (MLflow's embedded default, in the
            directory you run from), another database URI, or a server `http://host:5000`.
        experiment: the MLflow experiment the runs are grouped under; created if missing.
        run_name: the run's display name; MLflow picks one when null.
        artifact_location: where a *new* experiment stores artifacts; null takes the
            store's default (`./mlruns` beside a local database).

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
    ):
        if not uri:
            raise ConfigError("tracking.uri is empty: set it, for example tracking.uri=sqlite:///mlflow.db")
        self.uri = absolute_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.artifact_location = artifact_location

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

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

    @contextmanager
    def run(
        self, params: Mapping[str, str], tags: Mapping[str, str], record: bool = True
    ) -> Iterator[TrackedRun]:
        """Open a run, log `params` and `tags`, and close it with the right status.

        With `record=False` (a non-chief worker) nothing is logged anywhere.
        """
        if not record:
            yield _SilentRun()
            return
        from mlflow.entities import Param

        client = self._client()
        experiment_id = self._experiment_id(client)
        created = client.create_run(
            experiment_id,
            run_name=self.run_name,
            tags={key: str(value) for key, value in tags.items()},
        )
        run = TrackedRun(client, created.info.run_id, self.uri, self.experiment)
        try:
            params_list = [Param(k, str(v)[:_MAX_PARAM_LENGTH]) for k, v in params.items()]
            for start in range(0, len(params_list), 100):  # MLflow takes 100 params a batch
                client.log_batch(run.run_id, params=params_list[start : start + 100])
            client.set_tag(run.run_id, "mlflow.source.type", "LOCAL")
            yield run
        except KeyboardInterrupt:
            client.set_terminated(run.run_id, status="KILLED")
            raise
        except BaseException as error:
            _log_traceback(client, run.run_id, error)
            client.set_terminated(run.run_id, status="FAILED")
            raise
        else:
            client.set_terminated(run.run_id, status="FINISHED")


def _log_traceback(client, run_id: str, error: BaseException) -> None:
    import tempfile

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "traceback.txt")
        with open(path, "w") as handle:
            handle.write(text)
        try:
            client.log_artifact(run_id, path)
        except Exception:  # the status below matters more than the artifact
            pass
    client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])


class _SilentRun(TrackedRun):
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


def run_directory(uri: str, run_id: str) -> Path:
    """The local run directory of an earlier run, from its `run_dir` tag.

    Raises:
        ConfigError: when the run or its directory cannot be found, naming both.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=absolute_uri(uri)).get_run(run_id)
    except MlflowException as error:
        raise ConfigError(
            f"run {run_id!r} is not in the MLflow store {uri} ({error}); check the id with "
            f"`mlflow ui --backend-store-uri {absolute_uri(uri)}` or set tracking.uri"
        ) from error
    directory = run.data.tags.get("run_dir")
    if not directory or not Path(directory).is_dir():
        raise ConfigError(
            f"run {run_id!r} has no local run directory (tag run_dir={directory!r}); "
            "point at the run's directory instead (outputs/runs/<date_time>)"
        )
    return Path(directory)
