"""MLflow tracking: the only module that imports mlflow.

A run is opened by `MlflowTracker.run(...)` and always closed with a final status:
FINISHED, FAILED (with the traceback as an artifact) or KILLED (interrupted).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, ExportError

_MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value
# The pyfunc that MLflow runs to serve an export (logged as code, see that module).
_MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# What serving the logged model needs: no pipeline code, just these.
_MODEL_REQUIREMENTS = ("tensorflow", "numpy", "pandas")


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

    def log_model(self, export_root: Path) -> str:
        """Logs the export's SavedModel as this run's MLflow model `model`; returns its URI.

        A pyfunc (`pipeline/mlflow_model.py`) with a tensor signature (float32 raw images,
        any size) and the export's `input_example.npy`, so that `mlflow.pyfunc.load_model`
        and `mlflow models predict` work. With `tracking.register_as=NAME` it is also
        registered, and the URI returned is `models:/NAME/<version>`; otherwise
        `runs:/<run_id>/model`.
        """
        import mlflow
        import numpy as np
        from mlflow.models import Model

        root = Path(export_root)
        if not (root / "saved_model" / "saved_model.pb").is_file():
            raise ExportError(
                f"{root} holds no saved_model/, which the MLflow model serves. Add it to the "
                "export, for example export.formats=[saved_model,tflite]."
            )
        example = np.load(root / "input_example.npy")[:1].astype("float32")
        experiment_id = self._client.get_run(self.run_id).info.experiment_id
        with _tracking_uri(self.tracking_uri):
            # Created here, in the run's experiment: left to itself MLflow would use the
            # process's active experiment, which is not ours.
            logged = mlflow.initialize_logged_model(
                name="model", source_run_id=self.run_id, experiment_id=experiment_id
            )
            info = Model.log(
                artifact_path=None,
                name="model",
                flavor=mlflow.pyfunc,
                run_id=self.run_id,
                model_id=logged.model_id,
                python_model=str(_MODEL_CODE),
                artifacts={"saved_model": str(root / "saved_model"), "labels": str(root / "labels.txt")},
                signature=_model_signature(),
                input_example=example,
                pip_requirements=_requirements(),
                registered_model_name=self.register_as,
            )
        if self.register_as:
            return f"models:/{self.register_as}/{info.registered_model_version}"
        return f"runs:/{self.run_id}/model"

    @property
    def ui_command(self) -> str:
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"open {self.tracking_uri}/#/experiments in a browser"
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
        register_as: also register the logged model under this name in the Model
            Registry (a new version each run); null only logs it with the run.

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
    ):
        if not uri:
            raise ConfigError("tracking.uri is empty: set it, for example tracking.uri=sqlite:///mlflow.db")
        if register_as is not None and (not register_as.strip() or "/" in register_as or ":" in register_as):
            raise ConfigError(
                f"tracking.register_as={register_as!r} is not a usable model name: expected a "
                "non-empty name without '/' or ':', for example tracking.register_as=digits-classifier"
            )
        self.uri = absolute_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.artifact_location = artifact_location
        self.register_as = register_as

    def _client(self):
        return _RetryingClient(self.uri)

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
            yield _SilentRun()
            return
        from mlflow.entities import Param

        client = self._client()
        tags = {key: str(value) for key, value in tags.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        if resume_run_id:
            client.update_run(resume_run_id, status="RUNNING")
            for key, value in tags.items():
                client.set_tag(resume_run_id, key, value)
            run_id, params = resume_run_id, {}
        else:
            created = client.create_run(self._experiment_id(client), run_name=self.run_name, tags=tags)
            run_id = created.info.run_id
        run = TrackedRun(client, run_id, self.uri, self.experiment, self.register_as)
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

    def find_resumable(self, config_sha256: str) -> tuple[str, str] | None:
        """The newest run of this config that was killed (or whose process died), if any."""
        from pipeline.provenance import is_alive

        client = self._client()
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
        """Create a sweep's parent run; its children name it in `mlflow.parentRunId`."""
        client = self._client()
        created = client.create_run(self._experiment_id(client), run_name=name, tags=dict(tags))
        return created.info.run_id

    def close_parent(self, run_id: str, objective: str | None, jobs: Sequence[Mapping[str, Any]]) -> SweepReport:
        """Finish a sweep's parent run from its jobs' outcomes (`jobs.jsonl`) and its children."""
        client = self._client()
        parent = client.get_run(run_id)
        children = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
        )
        failed = [(str(j["job"]), j["overrides"], j["error"]) for j in jobs if j["status"] == "FAILED"]
        report = SweepReport(run_id, self.experiment, max(len(jobs), len(children)), failed)
        metrics = {"jobs": float(report.jobs), "failed_jobs": float(len(failed))}
        values = [c.data.metrics[objective] for c in children if objective and objective in c.data.metrics]
        if values:
            metrics[f"best_{objective}"] = max(values)
            report.best = (objective, max(values))
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
        return report


@dataclass
class SweepReport:
    """What a sweep did: its jobs, the failed ones (job number, overrides, error), the best value."""

    parent_run_id: str
    experiment: str
    jobs: int
    failed: list[tuple[str, str, str]]
    best: tuple[str, float] | None = None

    def text(self) -> str:
        lines = [f"Sweep: {self.jobs} job(s) under parent run {self.parent_run_id} "
                 f"(experiment '{self.experiment}'), {len(self.failed)} failed"]
        if self.best:
            lines.append(f"Best {self.best[0]}: {self.best[1]:.4f}")
        for job, overrides, error in self.failed:
            lines.append(f"  FAILED job #{job}: {overrides}\n    {error}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RunRecord:
    """An earlier run's resolved config (YAML text) and tags, for `pipeline.rerun`."""

    config_yaml: str
    tags: dict[str, str]


def run_record(uri: str, run_id: str) -> RunRecord:
    """Read a run's `config.yaml` artifact and tags. Raises ConfigError naming the run."""
    import tempfile

    client = _RetryingClient(absolute_uri(uri))
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
        with tempfile.TemporaryDirectory() as directory:
            path = client.download_artifacts(run_id, "config.yaml", directory)
            text = Path(path).read_text()
    except (MlflowException, OSError) as error:
        raise ConfigError(
            f"run {run_id!r} or its config.yaml artifact is not in {uri} ({error}); pass the "
            "store with --tracking-uri, as used by the run"
        ) from error
    return RunRecord(text, dict(run.data.tags))


class _RetryingClient:
    """An MlflowClient whose calls retry while a SQLite store is locked by another process.

    Parallel sweep jobs share one SQLite file; SQLite lets one writer in at a time and the
    others fail with "database is locked" (or race to create the tables). Retrying with a
    growing, jittered wait makes four or more concurrent jobs finish cleanly.
    """

    _TRANSIENT = (
        "database is locked",
        "database table is locked",
        "already exists",
        "UNIQUE constraint",
        "duplicate column",  # two processes creating a new store's tables at once
        "Online migration expected",
    )

    def __init__(self, uri: str, attempts: int = 12):
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=uri)
        self._attempts = attempts

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def retrying(*args, **kwargs):
            import random
            import time

            for attempt in range(self._attempts):
                try:
                    return method(*args, **kwargs)
                except Exception as error:  # mlflow and sqlalchemy wrap the sqlite error
                    transient = any(t in str(error) for t in self._TRANSIENT)
                    if not transient or attempt == self._attempts - 1 or name == "create_experiment":
                        raise
                    time.sleep(min(0.05 * 2**attempt, 2.0) * (0.5 + random.random()))

        return retrying


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's model logging reads the global tracking URI; point it at our store meanwhile."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _model_signature():
    """float32 raw images of any size and channels in; the top class, its probability and all out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, -1, -1))]),
        outputs=Schema(
            [
                ColSpec("string", "class_name"),
                ColSpec("double", "probability"),
                ColSpec(Array("double"), "probabilities"),
            ]
        ),
    )


def _requirements() -> list[str]:
    from importlib import metadata

    return [f"{name}=={metadata.version(name)}" for name in _MODEL_REQUIREMENTS]


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

    def log_model(self, export_root: Path) -> str:
        return ""


def load_model(model_uri: str, tracking_uri: str):
    """A model that `TrackedRun.log_model` logged, as `(probabilities, class_names)`.

    `probabilities(images)` takes one float32 image batch `[batch, height, width, channels]`
    (any size, 1-4 channels) and returns the model's probabilities, one column per class name.

    Raises:
        ExportError: naming the URI and the store when the model cannot be loaded.
    """
    import mlflow
    import numpy as np

    try:
        with _tracking_uri(absolute_uri(tracking_uri)):
            model = mlflow.pyfunc.load_model(model_uri)
    except Exception as error:
        raise ExportError(
            f"MLflow model {model_uri!r} could not be loaded from the tracking store "
            f"{absolute_uri(tracking_uri)} ({type(error).__name__}: {str(error)[:500]}). Check the "
            "URI (runs:/<run_id>/model, models:/<name>/<version>) and pass --tracking-uri "
            "or set MLFLOW_TRACKING_URI to the store the run was logged to."
        ) from error
    python_model = model.unwrap_python_model() if hasattr(model, "unwrap_python_model") else None
    class_names = getattr(python_model, "class_names", None)
    inputs = model.metadata.get_input_schema() if model.metadata else None
    if class_names is None or inputs is None or not inputs.is_tensor_spec():
        raise ExportError(
            f"MLflow model {model_uri!r} is not an image classifier logged by this pipeline "
            "(no class names or no image tensor input); use the URI of a run's `model`."
        )

    def probabilities(images):
        frame = model.predict(np.asarray(images, dtype="float32"))
        return np.asarray(list(frame["probabilities"]), dtype="float32")

    return probabilities, list(class_names)


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
