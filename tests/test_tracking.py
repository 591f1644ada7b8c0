"""MLflow tracking: every run ends with the right status, params, tags, metrics and artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.tracking import MlflowTracker, absolute_uri


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One sqlite store for the module (creating its tables takes seconds)."""
    return tmp_path_factory.mktemp("mlflow")


def _tracker(store: Path, experiment: str, **kwargs) -> MlflowTracker:
    return MlflowTracker(
        uri=f"sqlite:///{store / 'mlflow.db'}",
        experiment=experiment,
        artifact_location=str(store / "art" / experiment),
        **kwargs,
    )


def _client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def test_a_clean_run_finishes_with_all_params_and_tags(store):
    params = {f"group.key_{i:03d}": i for i in range(250)}  # three batches of 100
    params["long"] = "x" * 7000  # over MLflow's 6000-character limit
    tracker = _tracker(store, "clean", run_name="first-try")
    with tracker.run(params=params, tags={"command": "python -m pipeline seed=1"}) as run:
        run.log_metrics({"test_accuracy": 0.75}, step=3)
        assert _client(store).get_run(run.run_id).info.status == "RUNNING"

    finished = _client(store).get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.info.end_time is not None
    assert finished.info.run_name == "first-try"
    logged = finished.data.params
    assert len(logged) == 251
    assert logged["group.key_000"] == "0" and logged["group.key_249"] == "249"
    assert logged["long"] == "x" * 6000
    assert finished.data.tags["command"] == "python -m pipeline seed=1"
    assert "error" not in finished.data.tags
    assert finished.data.metrics["test_accuracy"] == 0.75
    assert run.experiment == "clean"
    assert run.ui_command == f"mlflow ui --backend-store-uri sqlite:///{store / 'mlflow.db'}"


def test_an_exception_marks_the_run_failed_with_its_traceback(store, tmp_path):
    tracker = _tracker(store, "failing")
    with pytest.raises(ValueError, match="the data is odd"):
        with tracker.run(params={"a": 1}, tags={}) as run:
            raise ValueError("the data is odd")

    client = _client(store)
    failed = client.get_run(run.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"] == "ValueError: the data is odd"
    assert "traceback.txt" in {a.path for a in client.list_artifacts(run.run_id)}
    text = Path(client.download_artifacts(run.run_id, "traceback.txt", str(tmp_path))).read_text()
    assert "Traceback" in text and "ValueError: the data is odd" in text
    assert str(store / "art" / "failing") in failed.info.artifact_uri


def test_an_interrupt_marks_the_run_killed(store):
    tracker = _tracker(store, "interrupted")
    with pytest.raises(KeyboardInterrupt):
        with tracker.run(params={}, tags={}) as run:
            raise KeyboardInterrupt
    assert _client(store).get_run(run.run_id).info.status == "KILLED"


def test_log_epoch_uses_the_epoch_as_step_and_artifacts_upload(store, tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "labels.txt").write_text("a\nb\n")
    (tmp_path / "metrics.json").write_text("{}")
    with _tracker(store, "epochs").run(params={}, tags={}) as run:
        for epoch, loss in enumerate([1.0, 0.5, 0.25]):
            run.log_epoch(epoch, {"loss": loss, "val_loss": loss * 2})
        run.log_artifact(tmp_path / "metrics.json")
        run.log_artifact(tmp_path / "export", "export")
        run.set_tags({"git.dirty": "False"})

    client = _client(store)
    history = client.get_metric_history(run.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "val_loss")) == [0, 1, 2]
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"metrics.json", "export"}
    assert [a.path for a in client.list_artifacts(run.run_id, "export")] == ["export/labels.txt"]
    assert client.get_run(run.run_id).data.tags["git.dirty"] == "False"


def test_an_existing_experiment_is_reused(store):
    runs = []
    for _ in range(2):
        with _tracker(store, "shared").run(params={}, tags={}) as run:
            runs.append(run.run_id)
    client = _client(store)
    experiments = [e for e in client.search_experiments() if e.name == "shared"]
    assert len(experiments) == 1
    found = client.search_runs([experiments[0].experiment_id])
    assert {r.info.run_id for r in found} == set(runs)


def test_a_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert MlflowTracker(uri="sqlite:///mlflow.db").uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_uri("sqlite:///sub/m.db") == f"sqlite:///{tmp_path / 'sub' / 'm.db'}"
    for unchanged in ("sqlite:////abs/m.db", "sqlite:///:memory:", "http://127.0.0.1:5000"):
        assert absolute_uri(unchanged) == unchanged


def test_an_empty_uri_names_the_key():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tracking\.uri"):
        MlflowTracker(uri="")
