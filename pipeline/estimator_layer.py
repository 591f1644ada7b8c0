"""`EstimatorLayer`: a fitted scikit-learn classifier as the last layer of the model.

The estimator is the layer's state: a `.keras` checkpoint stores it in skops format
(`save_own_variables`), `load_weights` restores it, and the export writes it beside a
SavedModel of the backbone (`pipeline.export.EstimatorFormat`). See `pipeline.estimators`.
"""

from __future__ import annotations

from typing import Any

import keras

from pipeline.errors import ExportError
from pipeline.estimators import dump_estimator, estimator_digest, estimator_probabilities, load_estimator
from pipeline.types import Task


@keras.saving.register_keras_serializable(package="pipeline")
class EstimatorLayer(keras.layers.Layer):
    """Pooled features in, the fitted classifier's outputs (`estimator_probabilities`) out.

    The classifier runs in NumPy (`tf.numpy_function`), so a model holding this layer is
    evaluated and checked in-process but cannot be written as a SavedModel: the export
    writes the backbone's SavedModel and `estimator.skops` instead. Untrained (no
    estimator yet), calling it is an error.

    Args:
        num_classes: the number of class names.
        task: `multiclass` or `binary` (a classifier takes one class per example).
    """

    def __init__(self, num_classes: int, task: Task, **kwargs):
        super().__init__(dtype="float32", **{k: v for k, v in kwargs.items() if k != "dtype"})
        self.num_classes = int(num_classes)
        self.task = task
        self.estimator = None

    @property
    def estimator(self) -> Any:
        """The fitted classifier (None before the fit)."""
        return self._estimator

    @estimator.setter
    def estimator(self, estimator: Any) -> None:
        # Its state as fitted, taken now: some estimators count their queries in their
        # state (KNN's trees), which must not change what is saved or its digest.
        self._estimator = estimator
        self.saved = None if estimator is None else dump_estimator(estimator)
        self.digest = None if estimator is None else estimator_digest(estimator)

    def call(self, features):
        import tensorflow as tf

        def probabilities(x):
            if self.estimator is None:
                raise ValueError(f"layer {self.name!r}: the scikit-learn head has not been fitted yet")
            return estimator_probabilities(self.estimator, x, self.num_classes, self.task)

        outputs = tf.numpy_function(probabilities, [features], tf.float32, stateful=False)
        outputs.set_shape(self.compute_output_shape(features.shape))
        return outputs

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1 if self.task == "binary" else self.num_classes)

    def save_own_variables(self, store):
        import numpy as np

        if self.saved is not None:
            store["0"] = np.frombuffer(self.saved, dtype="uint8")

    def load_own_variables(self, store):
        import numpy as np

        if "0" in store:
            data = np.asarray(store["0"], dtype="uint8").tobytes()
            self.estimator = load_estimator(data, f"the saved state of layer {self.name!r}")

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "task": self.task}


def served_estimator(model: Any) -> Any:
    """The `EstimatorLayer` inside `model` (searched through nested models), or None."""
    for layer in getattr(model, "layers", ()):
        if isinstance(layer, EstimatorLayer):
            return layer
        found = served_estimator(layer)
        if found is not None:
            return found
    return None


def feature_model(adapted: Any) -> Any:
    """The adapted model up to its estimator: raw images of its size in, pooled features out."""
    layer = served_estimator(adapted.head)
    if layer is None:
        raise ExportError("the model's head holds no scikit-learn estimator")
    pooled = keras.Model(adapted.head.inputs, layer.input, name="pooled")
    images = keras.Input(shape=adapted.model.input_shape[1:], name="images")
    return keras.Model(images, pooled(adapted.backbone(images)), name="features")
