"""The new head that maps backbone features to the target task's classes."""

from __future__ import annotations

from typing import Any, Literal

from pipeline.types import Task

Activation = Literal["relu", "gelu", "swish", "tanh", "elu"]


def class_probabilities(outputs: Any, task: Task) -> Any:
    """The head's outputs as one probability per class name, in `class_names` order.

    A binary head has one sigmoid column, the probability of the second (last) class; this
    is the one place that turns it into both classes' probabilities `[1 - p, p]`, for the
    served signatures, the export's checks and the evaluation's decisions alike. Multiclass
    (softmax) and multilabel (one sigmoid per label) outputs already have a column per class.
    Works on NumPy arrays and TensorFlow tensors (returns a tensor).

    Example:
        >>> class_probabilities(np.array([[0.8]]), "binary")  # [[0.2, 0.8]]
    """
    from keras import ops

    if task == "binary":
        return ops.concatenate([1.0 - outputs, outputs], axis=-1)
    return ops.convert_to_tensor(outputs)


def predicted_classes(outputs: Any, task: Task) -> Any:
    """The decision for each example: a class index (multiclass, binary) or 0/1 per label (multilabel).

    Binary picks the last class when its probability is above 0.5 (the argmax of
    `class_probabilities`, ties to the first class); multilabel thresholds each label at 0.5.
    """
    from keras import ops

    if task == "multilabel":
        return ops.cast(ops.convert_to_tensor(outputs) > 0.5, "int64")
    return ops.argmax(class_probabilities(outputs, task), axis=-1)


def _output_layer(num_classes: int, task: Task) -> Any:
    import keras

    if task == "binary":
        # float32 outputs keep probabilities exact under mixed precision.
        return keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="probabilities")
    activation = "sigmoid" if task == "multilabel" else "softmax"
    return keras.layers.Dense(num_classes, activation=activation, dtype="float32", name="probabilities")


def _features_input(feature_shape: tuple[int, ...]) -> tuple[Any, Any]:
    import keras

    features = keras.Input(shape=feature_shape, name="features")
    x = features
    if len(feature_shape) == 3:  # spatial feature maps from a backbone without pooling
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    elif len(feature_shape) != 1:
        x = keras.layers.Flatten(name="flatten")(x)
    return features, x


class LinearHead:
    """Dropout then one Dense layer: logistic regression on the backbone's features.

    Args:
        dropout: fraction of features dropped while training; more helps tiny datasets.

    Example:
        >>> head = LinearHead(dropout=0.2).build((1280,), num_classes=5, task="multiclass")
    """

    def __init__(self, dropout: float = 0.0):
        self.dropout = dropout

    def build(self, feature_shape: tuple[int, ...], num_classes: int, task: Task) -> Any:
        import keras

        features, x = _features_input(feature_shape)
        if self.dropout:
            x = keras.layers.Dropout(self.dropout, name="dropout")(x)
        return keras.Model(features, _output_layer(num_classes, task)(x), name="head")


class MLPHead:
    """Hidden Dense layers (optionally batch-normalized) with dropout, then the output layer.

    Args:
        units: width of each hidden layer, for example `[256, 128]`.
        dropout: dropout after each hidden layer.
        activation: activation of the hidden layers.
        batch_norm: add BatchNormalization after each hidden Dense layer.

    Example:
        >>> MLPHead(units=[128]).build((64,), num_classes=10, task="multiclass")
    """

    def __init__(
        self,
        units: list[int],
        dropout: float = 0.2,
        activation: Activation = "relu",
        batch_norm: bool = False,
    ):
        self.units = list(units)
        self.dropout = dropout
        self.activation = activation
        self.batch_norm = batch_norm

    def build(self, feature_shape: tuple[int, ...], num_classes: int, task: Task) -> Any:
        import keras

        features, x = _features_input(feature_shape)
        for index, width in enumerate(self.units):
            x = keras.layers.Dense(width, name=f"dense_{index}")(x)
            if self.batch_norm:
                x = keras.layers.BatchNormalization(name=f"batch_norm_{index}")(x)
            x = keras.layers.Activation(self.activation, name=f"{self.activation}_{index}")(x)
            if self.dropout:
                x = keras.layers.Dropout(self.dropout, name=f"dropout_{index}")(x)
        return keras.Model(features, _output_layer(num_classes, task)(x), name="head")
