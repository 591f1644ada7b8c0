"""Running `python -m pipeline` in a subprocess against a private MLflow store, for tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import PROJECT_ROOT


def pipeline_command(tmp_path: Path, *overrides: str, module: str = "pipeline") -> list[str]:
    flags = [o for o in overrides if o.startswith("-")]  # Hydra wants -m before overrides
    overrides = tuple(o for o in overrides if not o.startswith("-"))
    return [
        sys.executable, "-m", module, *flags,
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_location={tmp_path / 'mlartifacts'}",
        f"train.feature_cache_dir={tmp_path / 'feature_cache'}",
        "train.verbose=0",
        *overrides,
    ]


def run_pipeline(tmp_path: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        pipeline_command(tmp_path, *overrides), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout
    )


def client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def runs(tmp_path: Path, experiment: str = "transfer"):
    mlflow = client(tmp_path)
    found = mlflow.get_experiment_by_name(experiment)
    return [] if found is None else mlflow.search_runs([found.experiment_id])
