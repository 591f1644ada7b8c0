"""The MLflow model of an export: a pyfunc over its SavedModel ("models from code").

`pipeline.tracking` logs this file with the export's `saved_model/` and `labels.txt` as
artifacts; MLflow runs it when the model is loaded, so serving needs TensorFlow, NumPy and
pandas but not this package. Nothing in the package imports it.

Input, image models: float32 raw 0-255 images `[batch, height, width, channels]` of any
size and 1-4 channels (brought to the training size inside, by the training's resize
policy), or an object array of differently sized images. Text models (their
`serving_default` takes strings): a list, pandas Series or NumPy array of strings, or a
DataFrame of one column of strings (called directly, outside MLflow, a wider DataFrame's
`text` column is used; MLflow's signature check passes only a DataFrame's first column).
Output: a DataFrame with one row per image or text: `class_name` (the most probable class),
`probability` (its probability) and `probabilities` (one per class, in the order of
`labels.txt`).

A non-linear scikit-learn head (`head=sklearn`) is logged as `backbone` (a SavedModel whose
signatures give the features) and `estimator` (`estimator.skops`); then serving also needs
scikit-learn and skops, and the skops file is loaded with scikit-learn's own types only.

Example:
    >>> model = mlflow.pyfunc.load_model("runs:/<run_id>/model")
    >>> model.predict(images.astype("float32"))  # class_name, probability, probabilities
    >>> model.predict(["a gripping, well-acted film", "dull"])  # a text model
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

TEXT_BATCH = 256  # texts per call of a text model: bounds the memory a long request takes


class Classifier(PythonModel):
    """Calls the SavedModel's `serving_default` signature on batches of raw images or texts."""

    def load_context(self, context):
        import tensorflow as tf

        self._estimator = None
        if "estimator" in context.artifacts:  # a scikit-learn head on the backbone's features
            import skops.io

            data = Path(context.artifacts["estimator"]).read_bytes()
            untrusted = skops.io.get_untrusted_types(data=data)
            foreign = [name for name in untrusted if not name.startswith("sklearn.")]
            if foreign:
                raise ValueError(f"estimator.skops names types outside scikit-learn: {', '.join(foreign)}")
            self._estimator = skops.io.loads(data, trusted=untrusted)
        saved_model = context.artifacts["backbone" if self._estimator is not None else "saved_model"]
        self._serving = _load(saved_model).signatures["serving_default"]
        ((self._input_name, spec),) = self._serving.structured_input_signature[1].items()
        self._text = spec.dtype == tf.string  # `text`, a batch of strings; else `images`
        self.class_names = Path(context.artifacts["labels"]).read_text().splitlines()

    def predict(self, context, model_input: np.ndarray, params=None):
        import pandas as pd

        if self._text:
            texts = _texts(model_input)
            parts = [self._serve(texts[start : start + TEXT_BATCH]) for start in range(0, len(texts), TEXT_BATCH)]
        else:
            images = np.asarray(model_input)
            if images.dtype == object:  # images of different sizes: one call each
                parts = [self._serve(np.asarray(image, dtype="float32")[None]) for image in images]
            else:
                parts = [self._serve(images.astype("float32"))]
        probabilities = np.concatenate([p for p, _ in parts]) if parts else np.zeros((0, len(self.class_names)))
        names = np.concatenate([n for _, n in parts]) if parts else np.zeros((0,), str)
        return pd.DataFrame(
            {
                "class_name": names.astype(str),
                "probability": probabilities.max(axis=1).astype("float64"),
                "probabilities": [row.astype("float64").tolist() for row in probabilities],
            }
        )

    def _serve(self, batch):
        """The signature's per-class probabilities and top class names for one batch."""
        import tensorflow as tf

        values = tf.constant(batch, dtype=tf.string) if self._text else tf.constant(batch)
        outputs = self._serving(**{self._input_name: values})
        if self._estimator is None:
            names = np.array([name.decode() for name in outputs["class_name"].numpy()])
            return outputs["probabilities"].numpy(), names
        probabilities = self._classify(outputs["features"].numpy().astype("float64"))
        return probabilities, np.array(self.class_names)[probabilities.argmax(axis=1)]

    def _classify(self, features):
        """The estimator's probability per class name (pipeline.estimators.estimator_probabilities).

        `predict_proba`, else a softmax (two classes: a sigmoid) of `decision_function`; a
        class that training lacked has probability 0.
        """
        estimator = self._estimator
        if hasattr(estimator, "predict_proba"):
            known = estimator.predict_proba(features)
        else:
            decision = estimator.decision_function(features)
            if decision.ndim == 1:
                decision = np.stack([-decision / 2, decision / 2], axis=1)  # softmax: [sigmoid(-z), sigmoid(z)]
            known = np.exp(decision - decision.max(axis=1, keepdims=True))
            known /= known.sum(axis=1, keepdims=True)
        probabilities = np.zeros((len(features), len(self.class_names)), dtype="float32")
        probabilities[:, np.asarray(estimator.classes_).astype("int64")] = known
        return probabilities


def _texts(model_input) -> list:
    """The strings of a list, Series, 1-D array or DataFrame (its `text` column, or its only one)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            model_input = model_input["text"]
        elif len(model_input.columns) == 1:
            model_input = model_input.iloc[:, 0]
        else:
            raise ValueError(
                f"a DataFrame with columns {list(model_input.columns)}: a text model takes a `text` "
                "column or a DataFrame of one column; select it, for example frame[['text']]"
            )
    if isinstance(model_input, (str, bytes)):
        model_input = [model_input]
    values = np.asarray(model_input, dtype=object)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise ValueError(f"an array of shape {values.shape}: a text model takes a list or 1-D array of strings")
    for row, value in enumerate(values):
        if not isinstance(value, (str, bytes)):
            raise TypeError(f"row {row} is {value!r} ({type(value).__name__}): a text model takes strings; "
                            "drop or fill the missing texts")
    return values.tolist()


mlflow.models.set_model(Classifier())


def _load(path):
    """`tf.saved_model.load`; a text model whose tokenizer runs TF.Text ops loads once
    `tensorflow_text` (in this model's requirements then) has registered them."""
    import tensorflow as tf

    try:
        return tf.saved_model.load(path)
    except Exception as error:
        if "Op type not registered" not in str(error):
            raise
        import tensorflow_text  # noqa: F401

        return tf.saved_model.load(path)
