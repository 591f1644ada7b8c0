"""The MLflow model of an export: a pyfunc over its SavedModel ("models from code").

`pipeline.tracking` logs this file with the export's `saved_model/` and `labels.txt` as
artifacts; MLflow runs it when the model is loaded, so serving needs TensorFlow, NumPy and
pandas but not this package. Nothing in the package imports it.

Input: float32 raw 0-255 images `[batch, height, width, channels]` of any size (resized
inside), or an object array of differently sized images. Output: a DataFrame with one row
per image: `class_name` (the most probable class), `probability` (its probability) and
`probabilities` (one per class, in the order of `labels.txt`; binary models give one, the
probability of the last class).

Example:
    >>> model = mlflow.pyfunc.load_model("runs:/<run_id>/model")
    >>> model.predict(images.astype("float32"))  # class_name, probability, probabilities
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class ImageClassifier(PythonModel):
    """Calls the SavedModel's `serving_default` signature on batches of raw images."""

    def load_context(self, context):
        import tensorflow as tf

        self._serving = tf.saved_model.load(context.artifacts["saved_model"]).signatures["serving_default"]
        self.class_names = Path(context.artifacts["labels"]).read_text().splitlines()

    def predict(self, context, model_input: np.ndarray, params=None):
        import pandas as pd

        images = np.asarray(model_input)
        if images.dtype == object:  # images of different sizes: one call each
            parts = [self._probabilities(np.asarray(image, dtype="float32")[None]) for image in images]
            probabilities = np.concatenate(parts) if parts else np.zeros((0, 1), "float32")
        else:
            probabilities = self._probabilities(images.astype("float32"))
        if probabilities.shape[1] == 1:  # binary: P(last class)
            positive = probabilities[:, 0] > 0.5
            names = np.where(positive, self.class_names[-1], self.class_names[0])
            top = np.where(positive, probabilities[:, 0], 1.0 - probabilities[:, 0])
        else:
            names = np.asarray(self.class_names)[np.argmax(probabilities, axis=1)]
            top = probabilities.max(axis=1)
        return pd.DataFrame(
            {
                "class_name": names.astype(str),
                "probability": top.astype("float64"),
                "probabilities": [row.astype("float64").tolist() for row in probabilities],
            }
        )

    def _probabilities(self, images):
        import tensorflow as tf

        return self._serving(images=tf.constant(images))["probabilities"].numpy()


mlflow.models.set_model(ImageClassifier())
