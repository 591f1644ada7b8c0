"""An export logged as an MLflow model, and loaded back for `pipeline.predict`.

The model is a pyfunc "from code": MLflow runs `pipeline/mlflow_model.py` with the export's
`saved_model/` and `labels.txt` as artifacts, so serving it needs no pipeline code.
`pipeline.predict` reads those artifacts as data instead and never runs the stored code.
An image model takes float32 images; a text model (its export holds `input_example.json`)
takes strings.
"""

from __future__ import annotations

import json
from dataclasses import astuple, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline import compat
from pipeline.errors import ExportError
from pipeline.estimators import SKOPS_FILE
from pipeline.export import TEXT_EXAMPLE
from pipeline.sources.signatures import load_with_text_ops, text_ops
from pipeline.tracking import store

# The pyfunc that MLflow runs to serve an export (logged as code, see that module).
_MODEL_CODE = Path(__file__).parent.parent / "mlflow_model.py"
# What serving the logged model needs: no pipeline code, just these.
_MODEL_REQUIREMENTS = ("tensorflow", "numpy", "pandas")
_ESTIMATOR_REQUIREMENTS = ("scikit-learn", "skops")  # a non-linear head=sklearn's, besides
_NAME = "model"  # the run's MLflow model, `runs:/<run_id>/model`
_WEIGHTS_TAG = "weights_sha256"  # on the logged model: the trained weights it serves


@dataclass(frozen=True)
class ServedModel:
    """What the MLflow model of an export serves, read from the export's files (TensorFlow's
    protocol buffers): its `artifacts` (name to path), its pip `requirements` (distribution
    names) and whether it takes texts. Plain values, so that the tracker's own process,
    which never imports TensorFlow, can log it (`pipeline.tracking.process`)."""

    artifacts: dict[str, str]
    requirements: tuple[str, ...]
    text: bool


def served_model(export_root: Path) -> ServedModel:
    """The `ServedModel` of the export at `export_root`.

    Raises:
        ExportError: when the export holds no SavedModel, or its example file and its
            SavedModel disagree on what the model takes (images or texts).
    """
    root = Path(export_root)
    if (root / SKOPS_FILE).is_file() and (root / "backbone" / "saved_model.pb").is_file():
        # A scikit-learn head: the backbone's features through the classifier.
        served = root / "backbone"
        artifacts = {"backbone": served, "estimator": root / SKOPS_FILE}
        requirements = (*_MODEL_REQUIREMENTS, *_ESTIMATOR_REQUIREMENTS)
    elif (root / "saved_model" / "saved_model.pb").is_file():
        served = root / "saved_model"
        artifacts, requirements = {"saved_model": served}, _MODEL_REQUIREMENTS
    else:
        raise ExportError(
            f"{root} holds no saved_model/, which the MLflow model serves. Add it to the "
            "export, for example export.formats=[saved_model,tflite]."
        )
    text = _is_text_export(root, served)
    if text_ops(served):  # a tokenizer of TF.Text's (BERT preprocessors, KerasHub presets)
        requirements = (*requirements, "tensorflow-text")
    artifacts = {name: str(path) for name, path in {**artifacts, "labels": root / "labels.txt"}.items()}
    return ServedModel(artifacts, tuple(requirements), text)


def log_model(client: Any, run_id: str, tracking_uri: str, export_root: Path, register_as: str | None,
              served: ServedModel | None = None) -> str:
    """Logs the export's SavedModel as run `run_id`'s MLflow model `model`; returns its URI.

    A pyfunc (`pipeline/mlflow_model.py`) with a tensor signature (float32 raw images,
    any size) and the export's `input_example.npy`, so that `mlflow.pyfunc.load_model`
    and `mlflow models predict` work. A text export (it holds `input_example.json`, and its
    `serving_default` takes strings) gets a signature of one column of strings instead
    (`_text_signature`) and the texts of `input_example.json` as its example. With
    `register_as=NAME` (`tracking.register_as`) it is also registered, and the URI returned
    is `models:/NAME/<version>`; otherwise `runs:/<run_id>/model`. `served`: the export's
    `served_model`, when read already.

    Idempotent for a resumed run: a model this run already logged from the same weights
    (its `weights_sha256` tag) is kept, not logged again, and a version already registered
    from it is returned, not registered again; a leftover of a killed attempt (pending, or
    from other weights) is deleted. So a kill anywhere in here leaves one model, one version.

    Raises:
        ExportError: as `served_model`.
    """
    import mlflow
    import numpy as np
    from mlflow.models import Model

    root = Path(export_root)
    artifacts, requirements, text = astuple(served or served_model(root))
    run = client.get_run(run_id)
    experiment_id = run.info.experiment_id
    weights = run.data.tags.get("weights_sha256", "")
    model_id = _earlier_model(client, experiment_id, run_id, weights)
    if model_id is None:
        if text:
            example = _example_texts(root / TEXT_EXAMPLE)
        else:
            example = np.load(root / "input_example.npy")[:1].astype("float32")
        with store.active_store(tracking_uri), compat.pins_checked_by_metadata():
            # Created here, in the run's experiment: left to itself MLflow would use the
            # process's active experiment, which is not ours.
            logged = mlflow.initialize_logged_model(
                name=_NAME, source_run_id=run_id, experiment_id=experiment_id, tags={_WEIGHTS_TAG: weights}
            )
            Model.log(
                artifact_path=None,
                name=_NAME,
                flavor=_PYFUNC_UNVALIDATED,
                validate_serving_input=False,
                run_id=run_id,
                model_id=logged.model_id,
                python_model=str(_MODEL_CODE),
                artifacts=artifacts,
                signature=_text_signature() if text else _model_signature(),
                input_example=example,
                pip_requirements=_requirements(requirements),
            )
        model_id = logged.model_id
    if register_as:
        return f"models:/{register_as}/{_registered_version(client, tracking_uri, register_as, model_id)}"
    return f"runs:/{run_id}/model"


def _save_pyfunc(validate_serving_input: bool = True, **kwargs: Any) -> None:
    import mlflow

    mlflow.pyfunc.save_model(**kwargs)


# `mlflow.pyfunc`, as `Model.log`'s flavor, but taking `validate_serving_input`. MLflow
# then skips loading the model it just saved to run the input example (seconds: a second
# `tf.saved_model.load` and trace), which would only have warned. What replaces it: the
# export's own check runs `serving_default`, what the pyfunc calls, on the test images, and
# the oracle tests load the logged pyfunc and compare it with the reported metrics.
_PYFUNC_UNVALIDATED = SimpleNamespace(__name__="mlflow.pyfunc", save_model=_save_pyfunc)


def _is_text_export(root: Path, saved_model: Path) -> bool:
    """Whether the export is a text model's: it holds `input_example.json` (an image model's
    holds `input_example.npy`), checked against what `saved_model`'s `serving_default` takes.

    Raises:
        ExportError: when the two disagree (a half-replaced or hand-edited export).
    """
    from pipeline.serving import served_input_kind

    text = (root / TEXT_EXAMPLE).is_file()
    served = served_input_kind(saved_model)
    if served is not None and (served == "text") != text:
        raise ExportError(
            f"{root} {'holds' if text else 'lacks'} {TEXT_EXAMPLE} (the example texts of a text model), "
            f"but the serving_default signature of {saved_model} takes {'strings' if served == 'text' else 'images'}: "
            "the export is not one this pipeline wrote whole. Export the run again."
        )
    return text


def _example_texts(path: Path) -> list[str]:
    """The example texts of a text export (a JSON list of strings), for the MLflow model."""
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        texts = error
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
        raise ExportError(
            f"{path} holds {str(texts)[:200]!r}, not a JSON list of example texts such as "
            '["a first review", "a second"]; export the run again.'
        )
    return texts


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


def load_model(model_uri: str, tracking_uri: str, allow_unsafe: bool = False):
    """A model that `log_model` logged, as `(probabilities, class_names)`, read as data.

    `probabilities(images)` takes one float32 image batch `[batch, height, width, channels]`
    (any size, 1-4 channels) and returns the model's probabilities, one column per class name.
    For a text model, `probabilities(texts)` takes a list of strings instead. What the model
    takes is `probabilities.input_kind`, `image` or `text`.

    The model's files come from the store, which anyone who can write it can change, so they
    are not run as MLflow would (`mlflow.pyfunc.load_model` executes the Python file stored
    with the model): the SavedModel and `labels.txt` are downloaded, the SavedModel's graph
    is checked for ops that touch files, the network or Python (`graph_check`), and its
    `serving_default` signature (what the pyfunc calls) is called directly.

    Raises:
        ExportError: naming the URI and the store when the model cannot be loaded, is not
            one of this pipeline's, or its graph runs such ops (unless `allow_unsafe`).
    """
    import tempfile

    import mlflow
    import numpy as np

    where = tempfile.TemporaryDirectory(prefix="pipeline-model-")
    try:
        with store.active_store(tracking_uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=where.name))
    except Exception as error:
        where.cleanup()
        raise ExportError(
            f"MLflow model {model_uri!r} could not be loaded from the tracking store "
            f"{store.absolute_uri(tracking_uri)} ({type(error).__name__}: {str(error)[:500]}). Check the "
            "URI (runs:/<run_id>/model, models:/<name>/<version>) and pass --tracking-uri "
            "or set MLFLOW_TRACKING_URI to the store the run was logged to."
        ) from error
    artifacts = local / "artifacts"
    saved_model, labels, estimator_file = artifacts / "saved_model", artifacts / "labels.txt", artifacts / SKOPS_FILE
    if estimator_file.is_file():
        saved_model = artifacts / "backbone"
    if not (saved_model / "saved_model.pb").is_file() or not labels.is_file():
        where.cleanup()
        raise ExportError(
            f"MLflow model {model_uri!r} is not a classifier logged by this pipeline "
            "(no artifacts/saved_model or artifacts/labels.txt); use the URI of a run's `model`."
        )
    try:
        serving = _serving_function(model_uri, saved_model, allow_unsafe)
        input_name, input_kind = _served_input(model_uri, serving)
        class_names = labels.read_text().splitlines()
        estimator = None
        if estimator_file.is_file():
            from pipeline.estimators import load_estimator

            estimator = load_estimator(estimator_file.read_bytes(), f"MLflow model {model_uri!r}: {SKOPS_FILE}",
                                       allow_unsafe)
    except BaseException:
        where.cleanup()
        raise

    def probabilities(batch):
        import tensorflow as tf

        if input_kind == "text":
            values = tf.constant([str(text) for text in batch], dtype=tf.string)
        else:
            values = tf.constant(np.asarray(batch, dtype="float32"))
        outputs = serving(**{input_name: values})
        if estimator is None:
            return outputs["probabilities"].numpy().astype("float32")
        from pipeline.estimators import estimator_probabilities

        return estimator_probabilities(estimator, outputs["features"].numpy(), len(class_names), "multiclass")

    probabilities.files = where  # the SavedModel's assets stay on disk while it is in use
    probabilities.input_kind = input_kind
    return probabilities, class_names


def _serving_function(model_uri: str, saved_model: Path, allow_unsafe: bool):
    """The SavedModel's `serving_default`, after its graph passed `graph_check` (unless trusted)."""
    from pipeline.sources.graph_check import unsafe_ops

    ops = [] if allow_unsafe else unsafe_ops(saved_model)
    if ops:
        raise ExportError(
            f"MLflow model {model_uri!r}: its SavedModel runs TensorFlow ops that read or write files, "
            f"reach the network or run Python ({', '.join(ops)}), which no export of this pipeline "
            "holds. Pass --allow-unsafe only if you trust the tracking store and whoever writes it."
        )
    import tensorflow as tf

    try:
        return load_with_text_ops(str(saved_model)).signatures["serving_default"]
    except (KeyError, OSError, ValueError, tf.errors.OpError) as error:
        raise ExportError(
            f"MLflow model {model_uri!r}: its SavedModel cannot be served ({type(error).__name__}: "
            f"{str(error)[:300]}); use the URI of a run's `model` logged by this pipeline."
        ) from error


def _served_input(model_uri: str, serving: Any) -> tuple[str, str]:
    """The name of `serving`'s one input and what it takes: `text` for strings, else `image`."""
    import tensorflow as tf

    inputs = serving.structured_input_signature[1]
    if len(inputs) != 1:
        raise ExportError(
            f"MLflow model {model_uri!r}: its serving_default takes {sorted(inputs)}, not one batch of "
            "images or texts; use the URI of a run's `model` logged by this pipeline."
        )
    ((name, spec),) = inputs.items()
    return name, "text" if spec.dtype == tf.string else "image"


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


def _text_signature():
    """One unnamed column of strings in; the same outputs as for images.

    What MLflow infers for a `predict(model_input: list[str])`: it takes a list, Series or
    array of strings, a one-column DataFrame of any name, and `{"inputs": [...]}`,
    `dataframe_split` or `dataframe_records` requests. Of a wider DataFrame MLflow passes the
    first column only. A named column (`ColSpec("string", "text")`) would pick `text` out of
    it, but MLflow 3.17 then refuses a list, Series or array and `{"inputs": [...]}`
    ("Model is missing inputs ['text']").
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=_model_signature().outputs)


def _requirements(names) -> list[str]:
    from importlib import metadata

    return [f"{name}=={metadata.version(name)}" for name in names]
