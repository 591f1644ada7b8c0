"""Sweeps: parent and child runs, failures that do not stop the sweep, Optuna, concurrency."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from cli import client, run_pipeline, runs
from conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow


def _parent_and_children(tmp_path):
    everything = runs(tmp_path)
    parents = [r for r in everything if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def test_basic_sweep_groups_jobs_under_a_parent_and_reports_failed_ones(tmp_path):
    from conftest import PROJECT_ROOT as root

    good = root / "pipeline" / "assets" / "digits_0to4"
    done = run_pipeline(
        tmp_path, "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"source.handle={good},/nope",  # /nope fails inside its run
        "data.classes=[5,6,7],[5,5]",  # [5,5] fails the data check, before any run opens
        "train.epochs=2", "optimized_metric=val_accuracy",
    )
    assert done.returncode == 1, done.stderr[-3000:]
    parent, children = _parent_and_children(tmp_path)
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    (failed,) = [c for c in children if c.info.status == "FAILED"]
    assert "source.handle='/nope'" in failed.data.tags["error"]
    assert "source.handle=/nope" in failed.data.tags["overrides"]
    assert "traceback.txt" in {a.path for a in client(tmp_path).list_artifacts(failed.info.run_id)}
    assert parent.info.status == "FAILED"
    assert parent.data.metrics["jobs"] == 4 and parent.data.metrics["failed_jobs"] == 3
    (finished,) = [c for c in children if c.info.status == "FINISHED"]
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(finished.data.metrics["val_accuracy"])
    report = done.stdout[done.stdout.index("Sweep: 4 job(s)"):]
    assert "3 failed" in report and report.count("data.classes=[5,5]") == 2
    assert report.count("FAILED job #") == 3 and "not a directory" in report


def test_optuna_search_runs_trials_and_continues_its_stored_study(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # n_trials counts the study's trials in all: the second invocation adds two (a killed
    # sweep's continuation is tests/test_sweep_resume.py's).
    for call, n_trials in enumerate((2, 4)):
        done = run_pipeline(
            tmp_path, "-m", "hparams_search=digits_optuna", f"hydra.sweep.dir={tmp_path / f'sweep{call}'}",
            f"hydra.sweeper.storage={storage}", f"hydra.sweeper.n_trials={n_trials}", "train.epochs=2",
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert "2 of n_trials=4 trials done" in done.stderr + done.stdout
    study = optuna.load_study(study_name="digits-transfer", storage=storage)
    assert len(study.trials) == 4
    # train.epochs=2 ends every trial within the overlay's pruner warm-up (n_warmup_steps=2).
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert all(t.intermediate_values.keys() == {0, 1} for t in study.trials)  # each epoch reported
    child_runs = [r for r in runs(tmp_path) if "mlflow.parentRunId" in r.data.tags]
    assert len(child_runs) == 4
    assert {r.data.tags["trial_state"] for r in child_runs} == {"COMPLETE"}
    # Each trial's value is its run's val_accuracy, and the study maximizes it.
    reported = sorted(r.data.metrics["val_accuracy"] for r in child_runs)
    assert sorted(t.value for t in study.trials) == pytest.approx(reported)
    assert study.best_value == pytest.approx(reported[-1])
    assert study.best_value > 0.7  # five classes: chance is 0.2; these trials reach about 0.85 in 2 epochs


def test_four_parallel_jobs_share_the_local_sqlite_store(tmp_path):
    done = run_pipeline(
        tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=0,1,2,3", "train.epochs=1", "data.classes=[5,6]",
        "export.formats=[keras]",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "database is locked" not in done.stderr
    parent, children = _parent_and_children(tmp_path)
    assert len(children) == 4 and parent.info.status == "FINISHED"
    mlflow = client(tmp_path)
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"config.yaml", "metrics.json", "export"} <= {a.path for a in mlflow.list_artifacts(child.info.run_id)}
        assert "test_accuracy" in child.data.metrics
    assert len({c.data.tags["pid"] for c in children}) > 1  # really in separate processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_four_parallel_jobs_log_to_a_real_tracking_server(tmp_path):
    """The README's switch for jobs on several machines: tracking.uri=http://host:5000."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
             f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=0,1,2,3", f"tracking.uri={uri}", "train.epochs=1",
             "train.verbose=0", "data.classes=[5,6]", "export=none",
             f"train.feature_cache_dir={tmp_path / 'cache'}"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        from mlflow.tracking import MlflowClient

        remote = MlflowClient(tracking_uri=uri)
        everything = remote.search_runs([remote.get_experiment_by_name("transfer").experiment_id])
        (parent,) = [r for r in everything if r.data.tags.get("sweep") == "true"]
        children = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert parent.info.status == "FINISHED" and parent.data.metrics["jobs"] == 4
        assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
        assert len({c.data.tags["pid"] for c in children}) > 1  # really in parallel processes
        for child in children:  # artifacts went through the server (--artifacts-destination)
            assert {"metrics.json", "config.yaml"} <= {a.path for a in remote.list_artifacts(child.info.run_id)}
        assert any((tmp_path / "server-artifacts").rglob("metrics.json"))
        assert f"open {uri}/#/experiments" in done.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize(("sweeper", "objective", "best"), [
    ({"direction": "minimize"}, "val_accuracy", 0.2),  # Optuna's direction decides
    ({"direction": "maximize"}, "val_loss", 0.9),
    ({}, "val_loss", 0.2),  # the basic sweeper: a loss is minimized
    ({}, "val_accuracy", 0.9),
])
def test_the_sweeps_best_value_follows_its_direction(tmp_path, sweeper, objective, best):
    import mlflow
    from omegaconf import OmegaConf

    from pipeline.sweep import minimizes
    from pipeline.tracking.report import close_sweep

    config = OmegaConf.create({"optimized_metric": objective, "hydra": {"sweeper": sweeper}})
    OmegaConf.set_struct(config, True)
    store = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = store.create_experiment("sweep")
    parent = store.create_run(experiment).info.run_id
    for value in (0.5, 0.2, 0.9):
        child = store.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
        store.log_metric(child, objective, value)
    jobs = [{"job": i, "status": "COMPLETED", "overrides": "", "error": ""} for i in range(3)]
    report = close_sweep(store, parent, "sweep", objective, jobs, minimize=minimizes(config))
    assert report.best == (objective, best)
    assert store.get_run(parent).data.metrics[f"best_{objective}"] == best
