"""The train stage: fit the adapted model on the training split, validating each epoch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.types import AdaptedModel, DataBundle, TrainResult

EpochHook = Callable[[int, dict[str, float]], None]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow before any weight is created."""
    import keras

    keras.utils.set_random_seed(seed)


def _loss(task: str) -> Any:
    import keras

    if task == "multiclass":
        return keras.losses.SparseCategoricalCrossentropy()
    return keras.losses.BinaryCrossentropy()


def _metrics(task: str) -> list[Any]:
    import keras

    if task == "multiclass":
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    return [keras.metrics.BinaryAccuracy(name="accuracy")]


class Trainer:
    """Compiles and fits the model with Keras.

    Args:
        epochs: passes over the training split.
        batch_size: examples per step.
        learning_rate: the optimizer's learning rate.
        optimizer: a Keras optimizer class or partial (`_partial_: true` in the YAML); it is
            called with `learning_rate`.
        shuffle_buffer: examples shuffled together; at least the split size shuffles fully.
        seed: the shuffle order's seed.
        verbose: Keras progress output: 0 silent, 1 bar, 2 one line per epoch.

    Example:
        >>> Trainer(epochs=5, batch_size=32, learning_rate=1e-3, optimizer=keras.optimizers.Adam)
    """

    def __init__(
        self,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        optimizer: Any,
        shuffle_buffer: int = 10_000,
        seed: int = 0,
        verbose: int = 2,
    ):
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.optimizer = optimizer
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.verbose = verbose

    def fit(self, adapted: AdaptedModel, data: DataBundle, on_epoch_end: EpochHook) -> TrainResult:
        import keras
        import tensorflow as tf

        model = adapted.model
        model.compile(
            optimizer=self.optimizer(learning_rate=self.learning_rate),
            loss=_loss(adapted.task),
            metrics=_metrics(adapted.task),
        )
        train = (
            data.train.shuffle(self.shuffle_buffer, seed=self.seed, reshuffle_each_iteration=True)
            .batch(self.batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )
        val = data.val.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)
        hook = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: on_epoch_end(
                epoch, {k: float(v) for k, v in (logs or {}).items()}
            )
        )
        history = model.fit(
            train,
            validation_data=val,
            epochs=self.epochs,
            callbacks=[hook],
            verbose=self.verbose,
            shuffle=False,  # the dataset is already shuffled, with the seed
        )
        values = {k: [float(v) for v in vs] for k, vs in history.history.items()}
        return TrainResult(history=values, epochs_completed=len(history.epoch))
