"""Earlier runs read back from the store: their config and tags, their run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.tracking import store


@dataclass(frozen=True)
class RunRecord:
    """An earlier run's resolved config (YAML text) and tags, for `pipeline.rerun`."""

    config_yaml: str
    tags: dict[str, str]


def run_record(uri: str, run_id: str) -> RunRecord:
    """Read a run's `config.yaml` artifact and tags. Raises ConfigError naming the run."""
    import tempfile

    from mlflow.exceptions import MlflowException

    client = store.client(uri)
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


def run_directory(uri: str, run_id: str) -> Path:
    """The local run directory of an earlier run, from its `run_dir` tag.

    Raises:
        ConfigError: when the run or its directory cannot be found, naming both.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = store.client(uri).get_run(run_id)
    except MlflowException as error:
        raise ConfigError(
            f"run {run_id!r} is not in the MLflow store {uri} ({error}); check the id with "
            f"`mlflow ui --backend-store-uri {store.absolute_uri(uri)}` or set tracking.uri"
        ) from error
    directory = run.data.tags.get("run_dir")
    if not directory or not Path(directory).is_dir():
        raise ConfigError(
            f"run {run_id!r} has no local run directory (tag run_dir={directory!r}); "
            "point at the run's directory instead (outputs/runs/<date_time>)"
        )
    return Path(directory)
