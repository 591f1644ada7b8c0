"""MLflow tracking: every run ends with the right status, params, tags, metrics and artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
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
    started = int(time.time() * 1000)
    with tracker.run(params=params, tags={"command": "python -m pipeline seed=1"}) as run:
        run.log_metrics({"test_accuracy": 0.75}, step=3)
        assert _client(store).get_run(run.run_id).info.status == "RUNNING"
    ended = int(time.time() * 1000) + 1

    finished = _client(store).get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    assert started <= finished.info.start_time <= finished.info.end_time <= ended  # milliseconds
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


def test_a_run_context_let_go_without_being_left_stays_running(store):
    import gc

    opened = _tracker(store, "dropped").run(params={}, tags={})
    run = opened.__enter__()
    del opened  # no outcome: as when the process dies, resume=auto takes the run
    gc.collect()
    assert _client(store).get_run(run.run_id).info.status == "RUNNING"


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


@pytest.fixture(scope="module")
def logged_model(store, hub_model_dir, tmp_path_factory):
    """`(adapted, export_root, run_id, model_uri)`: an export logged and registered as 'tiny'."""
    from test_export import _adapted, _data, _images, _spread

    from pipeline.export import Exporter

    adapted = _adapted(hub_model_dir)
    _spread(adapted, seed=1)
    root = Exporter().export(adapted, _data(_images()), tmp_path_factory.mktemp("logged") / "export").root
    with _tracker(store, "models", register_as="tiny").run(params={}, tags={}) as run:
        model_uri = run.log_model(root)
    return adapted, root, run.run_id, model_uri


def test_log_model_registers_a_pyfunc_with_signature_and_input_example(store, logged_model):
    import mlflow

    adapted, root, run_id, model_uri = logged_model
    assert model_uri == "models:/tiny/1"
    client = _client(store)
    (version,) = client.search_model_versions("name='tiny'")
    assert str(version.version) == "1" and version.run_id == run_id
    assert client.get_run(run_id).info.status == "FINISHED"

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    try:
        for uri in (model_uri, f"runs:/{run_id}/model"):
            model = mlflow.pyfunc.load_model(uri)
            inputs = model.metadata.get_input_schema().inputs[0]
            assert inputs.type.name == "float32" and inputs.shape == (-1, -1, -1, -1)  # any size, channels
            assert model.metadata.get_output_schema().input_names() == [
                "class_name", "probability", "probabilities"
            ]
            example = model.input_example
            np.testing.assert_array_equal(example, np.load(root / "input_example.npy")[:1])
            pins = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
            assert {f"{name}=={metadata.version(name)}" for name in ("tensorflow", "numpy", "pandas", "mlflow")} <= set(pins)
            images = _images_for_model()
            frame = model.predict(images)
            expected = adapted.model.predict(images, verbose=0)
            np.testing.assert_allclose(np.stack(frame["probabilities"]), expected, atol=1e-5)
            assert list(frame["class_name"]) == [("cat", "dog", "eel")[i] for i in expected.argmax(1)]
            np.testing.assert_allclose(frame["probability"], expected.max(1), atol=1e-5)
    finally:
        mlflow.set_tracking_uri(None)


def _images_for_model():
    from test_export import _images

    return _images(6, seed=20)


def test_mlflow_models_predict_serves_the_logged_model(store, logged_model, tmp_path):
    import json

    adapted, root, run_id, _ = logged_model
    images = _images_for_model()
    (tmp_path / "input.json").write_text(json.dumps({"inputs": images.tolist()}))
    cli = Path(sys.executable).parent / "mlflow"
    done = subprocess.run(
        [str(cli), "models", "predict", "-m", f"runs:/{run_id}/model", "-i", str(tmp_path / "input.json"),
         "-t", "json", "-o", str(tmp_path / "output.json"), "--env-manager", "local"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = json.loads((tmp_path / "output.json").read_text())["predictions"]
    expected = adapted.model.predict(images, verbose=0)
    np.testing.assert_allclose([p["probabilities"] for p in predictions], expected, atol=1e-5)


def test_log_model_needs_a_saved_model(store, tmp_path):
    from pipeline.errors import ExportError

    (tmp_path / "export").mkdir()
    with pytest.raises(ExportError, match=r"no saved_model/.*export\.formats"):
        with _tracker(store, "no-model").run(params={}, tags={}) as run:
            run.log_model(tmp_path / "export")


def test_a_bad_register_as_names_the_key():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tracking\.register_as='a/b'"):
        MlflowTracker(uri="sqlite:///x.db", register_as="a/b")


def test_a_sqlite_store_gets_a_busy_timeout_and_other_stores_stay_as_given(tmp_path, monkeypatch):
    from pipeline.tracking.store import SQLITE_BUSY_TIMEOUT_S, store_uri

    monkeypatch.chdir(tmp_path)
    assert store_uri("sqlite:///m.db") == f"sqlite:///{tmp_path / 'm.db'}?timeout={SQLITE_BUSY_TIMEOUT_S}"
    for unchanged in ("sqlite:////abs/m.db?timeout=5", "sqlite:///:memory:", "http://127.0.0.1:5000"):
        assert store_uri(unchanged) == unchanged


@pytest.mark.slow
def test_processes_that_open_a_new_store_at_once_all_log_their_run(tmp_path):
    """MLflow creates a new store's tables on first use; unlocked, all but one process fail."""
    from conftest import PROJECT_ROOT

    uri = f"sqlite:///{tmp_path / 'new.db'}"
    code = (
        "import sys\nfrom pipeline.tracking import MlflowTracker\n"
        "tracker = MlflowTracker(uri=sys.argv[1], experiment='new', artifact_location=sys.argv[2])\n"
        "with tracker.run(params={'a': 1}, tags={}) as run:\n    run.log_metrics({'m': 1.0})\n"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", code, uri, str(tmp_path / "art")], cwd=PROJECT_ROOT,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [process.communicate(timeout=600)[1] for process in processes]
    assert [p.returncode for p in processes] == [0] * 4, "\n".join(e[-2000:] for e in errors)
    assert not any("database is locked" in e for e in errors)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.search_runs([client.get_experiment_by_name("new").experiment_id])
    assert [r.info.status for r in found] == ["FINISHED"] * 4


def test_an_unreachable_server_fails_fast_with_what_to_do(silent_server):
    """A server that accepts and never answers: one clear error within tracking.timeout."""
    import time

    from pipeline.errors import TrackingError

    port, accepted = silent_server
    tracker = MlflowTracker(uri=f"http://127.0.0.1:{port}", timeout=1.5)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"tracking.uri='http://127.0.0.1:\d+' does not answer .*tracking\.timeout.*"
                                            r"mlflow server .*tracking.uri=sqlite:///mlflow.db"):
        tracker.find_resumable("any-config")
    assert 1.4 <= time.monotonic() - started < 6
    assert accepted  # it reached the server and waited for it


def test_a_closed_port_fails_at_once(tmp_path):
    import socket
    import time

    from pipeline.errors import TrackingError

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(TrackingError, match="does not answer"):
        MlflowTracker(uri=f"http://127.0.0.1:{port}", timeout=10).find_resumable("any-config")
    assert time.monotonic() - started < 5


def test_the_command_stops_before_training_with_one_line_and_exit_2(tmp_path):
    from cli import run_pipeline

    done = run_pipeline(tmp_path, "tracking.uri=http://127.0.0.1:9", "tracking.timeout=2", timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: tracking.uri='http://127.0.0.1:9' does not answer")
    assert not (tmp_path / "feature_cache").exists()  # nothing was trained or computed
