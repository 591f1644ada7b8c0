"""An export logged as an MLflow model, and loaded back for `pipeline.predict`.

The model is a pyfunc "from code": MLflow runs `pipeline/mlflow_model.py` with the export's
`saved_model/` and `labels.txt` as artifacts, so serving it needs no pipeline code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ExportError
from pipeline.tracking import store

# The pyfunc that MLflow runs to serve an export (logged as code, see that module).
_MODEL_CODE = Path(__file__).parent.parent / "mlflow_model.py"
# What serving the logged model needs: no pipeline code, just these.
_MODEL_REQUIREMENTS = ("tensorflow", "numpy", "pandas")
_NAME = "model"  # the run's MLflow model, `runs:/<run_id>/model`
_WEIGHTS_TAG = "weights_sha256"  # on the logged model: the trained weights it serves


def log_model(client: Any, run_id: str, tracking_uri: str, export_root: Path, register_as: str | None) -> str:
    """Logs the export's SavedModel as run `run_id`'s MLflow model `model`; returns its URI.

    A pyfunc (`pipeline/mlflow_model.py`) with a tensor signature (float32 raw images,
    any size) and the export's `input_example.npy`, so that `mlflow.pyfunc.load_model`
    and `mlflow models predict` work. With `register_as=NAME` (`tracking.register_as`) it
    is also registered, and the URI returned is `models:/NAME/<version>`; otherwise
    `runs:/<run_id>/model`.

    Idempotent for a resumed run: a model this run already logged from the same weights
    (its `weights_sha256` tag) is kept, not logged again, and a version already registered
    from it is returned, not registered again; a leftover of a killed attempt (pending, or
    from other weights) is deleted. So a kill anywhere in here leaves one model, one version.

    Raises:
        ExportError: when the export holds no SavedModel.
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
    run = client.get_run(run_id)
    experiment_id = run.info.experiment_id
    weights = run.data.tags.get("weights_sha256", "")
    model_id = _earlier_model(client, experiment_id, run_id, weights)
    if model_id is None:
        example = np.load(root / "input_example.npy")[:1].astype("float32")
        with store.active_store(tracking_uri):
            # Created here, in the run's experiment: left to itself MLflow would use the
            # process's active experiment, which is not ours.
            logged = mlflow.initialize_logged_model(
                name=_NAME, source_run_id=run_id, experiment_id=experiment_id, tags={_WEIGHTS_TAG: weights}
            )
            Model.log(
                artifact_path=None,
                name=_NAME,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                python_model=str(_MODEL_CODE),
                artifacts={"saved_model": str(root / "saved_model"), "labels": str(root / "labels.txt")},
                signature=_model_signature(),
                input_example=example,
                pip_requirements=_requirements(),
            )
        model_id = logged.model_id
    if register_as:
        return f"models:/{register_as}/{_registered_version(client, tracking_uri, register_as, model_id)}"
    return f"runs:/{run_id}/model"


def _earlier_model(client: Any, experiment_id: str, run_id: str, weights: str) -> str | None:
    """The id of a ready model this run logged from `weights`; deletes any other it logged."""
    from mlflow.entities import LoggedModelStatus

    kept = None
    earlier = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{_NAME}'"
    )
    for logged in earlier:
        same = logged.status == LoggedModelStatus.READY and logged.tags.get(_WEIGHTS_TAG) == weights and weights
        if same and kept is None:
            kept = logged.model_id
        else:  # a killed attempt's, or an earlier stage's weights: not this run's result
            client.delete_logged_model(logged.model_id)
    return kept


def _registered_version(client: Any, tracking_uri: str, name: str, model_id: str) -> str:
    """The registry version of `model_id` under `name`: the existing one, or a new one."""
    import mlflow

    for version in client.search_model_versions(f"name = '{name}'"):
        if model_id in (version.model_id, version.source.removeprefix("models:/")):  # a store fills one
            return version.version
    with store.active_store(tracking_uri):
        return mlflow.register_model(f"models:/{model_id}", name).version


def load_model(model_uri: str, tracking_uri: str):
    """A model that `log_model` logged, as `(probabilities, class_names)`.

    `probabilities(images)` takes one float32 image batch `[batch, height, width, channels]`
    (any size, 1-4 channels) and returns the model's probabilities, one column per class name.

    Raises:
        ExportError: naming the URI and the store when the model cannot be loaded.
    """
    import mlflow
    import numpy as np

    try:
        with store.active_store(tracking_uri):
            model = mlflow.pyfunc.load_model(model_uri)
    except Exception as error:
        raise ExportError(
            f"MLflow model {model_uri!r} could not be loaded from the tracking store "
            f"{store.absolute_uri(tracking_uri)} ({type(error).__name__}: {str(error)[:500]}). Check the "
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
