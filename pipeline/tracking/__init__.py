"""MLflow tracking: the only package that imports mlflow (besides `pipeline/mlflow_model.py`,
the file MLflow itself runs to serve a logged model).

- `store`: the tracking store's URI and client; how a busy SQLite store is waited for.
- `tracker`: `MlflowTracker` opens runs; `TrackedRun` is what stages report to.
- `process`: the same, answered by a process of its own that imports MLflow while a
  command's run imports TensorFlow (`in_own_process`).
- `model`: logging an export as an MLflow model, and loading it back for `pipeline.predict`.
- `report`: a sweep's parent run closed with its report.
- `runs`: an earlier run read back (its config and tags, its run directory).
"""

from pipeline.tracking.model import load_model
from pipeline.tracking.report import SweepReport
from pipeline.tracking.runs import RunRecord, run_directory, run_record
from pipeline.tracking.store import absolute_uri
from pipeline.tracking.tracker import MlflowTracker, TrackedRun

__all__ = [
    "MlflowTracker",
    "RunRecord",
    "SweepReport",
    "TrackedRun",
    "absolute_uri",
    "load_model",
    "run_directory",
    "run_record",
]
