"""The new head that maps backbone features to the target task's classes."""

from __future__ import annotations

from typing import Any, Literal

from pipeline.errors import ConfigError, DataError
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


# scikit-learn classifiers whose decision is one affine map of the features, so the fitted
# estimator is exactly a Dense layer: every export format serves it unchanged.
_LINEAR_ESTIMATORS = ("LogisticRegression", "LinearSVC", "RidgeClassifier")
_SCALERS = ("StandardScaler",)


def is_linear(estimator: Any) -> bool:
    """Whether `head=sklearn` folds the classifier into a Dense layer (else it is served as skops)."""
    steps = [step for _, step in estimator.steps] if hasattr(estimator, "steps") else [estimator]
    return type(steps[-1]).__name__ in _LINEAR_ESTIMATORS and all(
        step in (None, "passthrough") or type(step).__name__ in _SCALERS for step in steps[:-1]
    )


def linear_config(estimator: dict) -> bool:
    """`is_linear` of the estimator that config node `head.estimator` would build (nothing built)."""
    steps = [estimator]
    if str(estimator.get("_target_", "")).endswith(".Pipeline"):
        steps = [step[1] if isinstance(step, (list, tuple)) else step for step in estimator.get("steps") or ()]
    names = [str(step.get("_target_", step)).rsplit(".", 1)[-1] if isinstance(step, dict) else str(step)
             for step in steps]
    return bool(names) and names[-1] in _LINEAR_ESTIMATORS and all(
        name in ("None", "passthrough", *_SCALERS) for name in names[:-1]
    )


class SklearnHead:
    """A scikit-learn classifier fitted on the frozen backbone's features.

    The backbone runs once per split (through the feature cache); the estimator is fitted
    on the training features. How it is served depends on the estimator:

    - Linear ones are written into the head's Dense layer, so evaluation, every export
      format and the MLflow model serve exactly the fitted estimator: `LogisticRegression`
      gives its own `predict_proba` (softmax, or a sigmoid for two classes); `LinearSVC`
      and `RidgeClassifier`, which have no probabilities, give a softmax (sigmoid) of their
      decision function: the same decisions, uncalibrated. A `Pipeline` may put
      `StandardScaler`s before the classifier (folded into the layer).
    - Any other classifier (`SVC`, `KNeighborsClassifier`, a forest, a `Pipeline` ending in
      one) becomes the head's `pipeline.estimators.EstimatorLayer`: its `predict_proba`
      (else a softmax of `decision_function`) on the pooled features. The export writes the
      backbone as a SavedModel beside `estimator.skops`, which the MLflow model and
      `pipeline.predict` serve (`export.formats=[saved_model]` only).

    Spatial features are averaged first, as the Keras heads do. Multilabel tasks are not
    supported, and `freeze` must be `all` (the config check says so before any work).

    Args:
        estimator: the scikit-learn classifier, built by Hydra from its `_target_` and keys
            (`head.estimator.C=0.1` in a sweep).

    Example:
        >>> SklearnHead(LogisticRegression(C=1.0, max_iter=1000))
        >>> SklearnHead(KNeighborsClassifier(n_neighbors=5))
    """

    def __init__(self, estimator: Any):
        from sklearn.base import is_classifier

        name = type(estimator).__name__
        if not is_classifier(estimator):
            raise ConfigError(
                f"head.estimator._target_ builds {type(estimator).__module__}.{name}, which is not a "
                "scikit-learn classifier. Use one, for example "
                "head.estimator._target_=sklearn.linear_model.LogisticRegression."
            )
        final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
        if not (hasattr(type(final), "predict_proba") or hasattr(type(final), "decision_function")):
            raise ConfigError(
                f"head.estimator: {type(final).__name__} has neither predict_proba nor decision_function, "
                "so it gives no score per class to evaluate and serve. Choose another classifier, "
                "for example head.estimator._target_=sklearn.neighbors.KNeighborsClassifier."
            )
        self.estimator = estimator
        self.linear = is_linear(estimator)

    def build(self, feature_shape: tuple[int, ...], num_classes: int, task: Task) -> Any:
        import keras

        from pipeline.estimator_layer import EstimatorLayer

        if task == "multilabel":
            raise ConfigError(
                "head=sklearn fits one scikit-learn classifier, which takes one class per example; "
                "data.task=multilabel needs a Keras head: use head=linear or head=mlp."
            )
        features, x = _features_input(feature_shape)
        if self.linear:
            output = _output_layer(num_classes, task)
        else:
            output = EstimatorLayer(num_classes, task, name="probabilities")
        return keras.Model(features, output(x), name="head")

    def fit(self, head: Any, features: Any, labels: Any, task: Task) -> None:
        """Fit the estimator on `features` (the backbone's outputs) and put it into `head`."""
        import keras
        import numpy as np
        from sklearn.base import clone

        output = head.get_layer("probabilities")
        pooled = keras.Model(head.inputs, output.input)  # what the output layer sees
        x = np.asarray(pooled.predict(features, verbose=0, batch_size=1024), dtype="float64")
        labels = np.asarray(labels).astype("int64")
        num_classes = head.output_shape[-1] if task != "binary" else 2
        if len(np.unique(labels)) < 2:
            raise DataError(
                "head=sklearn: the training split holds one class only; a classifier needs two or more"
            )
        self.fitted = clone(self.estimator).fit(x, labels)
        if not self.linear:
            output.estimator = self.fitted
            return
        kernel, bias = _affine(self.fitted, x.shape[1], num_classes, task)
        output.set_weights([kernel.astype("float32"), bias.astype("float32")])


def _affine(estimator: Any, width: int, num_classes: int, task: Task) -> tuple[Any, Any]:
    """`(kernel, bias)` of the Dense layer whose pre-activation is the estimator's decision."""
    import numpy as np

    steps = [step for _, step in estimator.steps] if hasattr(estimator, "steps") else [estimator]
    final = steps[-1]
    coef, intercept = np.atleast_2d(final.coef_), np.atleast_1d(final.intercept_)
    kernel = np.zeros((width, num_classes))
    bias = np.zeros(num_classes)
    classes = [int(c) for c in final.classes_]
    if task == "binary":  # classes [0, 1]: sigmoid(z) is the second class's probability
        kernel, bias = coef.T, intercept
    else:
        bias[:] = -1e9  # a class the training split lacks never wins
        if coef.shape[0] == 1:  # two classes, one decision: softmax([-z/2, z/2]) = [sigmoid(-z), sigmoid(z)]
            for sign, label in ((-0.5, classes[0]), (0.5, classes[1])):
                kernel[:, label], bias[label] = sign * coef[0], sign * intercept[0]
        else:  # one decision per class
            for row, label in enumerate(classes):
                kernel[:, label], bias[label] = coef[row], intercept[row]
    for scaler in reversed(steps[:-1]):  # decision(scale(x)) = kernel.T (x - mean) / std + bias
        if scaler is None or scaler == "passthrough":
            continue
        scale = scaler.scale_ if scaler.with_std else np.ones(width)
        mean = scaler.mean_ if scaler.with_mean else np.zeros(width)
        kernel = kernel / scale[:, None]
        bias = bias - mean @ kernel
    return kernel, bias
