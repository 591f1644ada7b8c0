"""Every kill point is recoverable: SIGKILL at each stage boundary, then the same command.

The injector is `scripts/fault_injection.py`'s child mode (it patches one boundary to SIGKILL
its own process, then runs the pipeline's entry point); what is checked here is read from the
MLflow store and the run directory, against a run that was never interrupted.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys

import pytest

from cli import client, runs
from conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow


def _injector():
    spec = importlib.util.spec_from_file_location("fault_injection", PROJECT_ROOT / "scripts" / "fault_injection.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(command):
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)


def test_sigkill_at_every_stage_boundary_then_the_same_command_finishes_the_same_run(tmp_path):
    faults = _injector()
    settings = (*faults.SETTINGS, "tracking.register_as=faults")
    assert faults.KILL_POINTS == ("data", "epoch:1", "epoch:2", "evaluation", "export", "mlflow_model", "registry")

    reference_store = tmp_path / "reference"
    reference = _run(faults.pipeline_command(reference_store, reference_store / "run", *settings))
    assert reference.returncode == 0, reference.stderr[-3000:]
    (expected,) = runs(reference_store)

    store = tmp_path / "killed"
    first_dir = store / "run0"
    run_ids = []
    for number, point in enumerate(faults.KILL_POINTS):
        killed = _run(faults.pipeline_command(store, store / f"run{number}", *settings, kill_at=point))
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-3000:])
        if number:
            assert "resuming run" in killed.stdout + killed.stderr, point
        (run,) = runs(store)  # never a second run: each kill is continued, even before a checkpoint
        assert run.info.status == "RUNNING", point  # SIGKILL leaves no chance to close it
        run_ids.append(run.info.run_id)
    assert len(set(run_ids)) == 1

    finished = _run(faults.pipeline_command(store, store / "final", *settings))  # the same command
    assert finished.returncode == 0, finished.stderr[-3000:]
    (run,) = runs(store)
    assert run.info.run_id == run_ids[0] and run.info.status == "FINISHED"
    assert run.data.tags["weights_sha256"] == expected.data.tags["weights_sha256"]  # deterministic mode
    assert run.data.metrics["test_accuracy"] == expected.data.metrics["test_accuracy"]
    assert run.data.metrics["epochs_completed"] == 2

    # One export, in the run's own directory, with no staging folders left beside it.
    assert sorted(p.name for p in first_dir.iterdir() if "export" in p.name) == ["export"]
    assert (first_dir / "export" / "saved_model" / "saved_model.pb").is_file()
    for later in range(1, len(faults.KILL_POINTS)):
        assert not (store / f"run{later}" / "export").exists()
    # One MLflow model and one registered version, though the run logged and registered before.
    from mlflow.entities import LoggedModelStatus

    mlflow = client(store)
    logged = mlflow.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [(m.name, m.status) for m in logged] == [("model", LoggedModelStatus.READY)]
    versions = mlflow.search_model_versions("name = 'faults'")
    assert [(int(v.version), v.source) for v in versions] == [(1, f"models:/{logged[0].model_id}")]
