"""The train stage: fit the adapted model, validating, logging and checkpointing each epoch."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pipeline.types import AdaptedModel, DataBundle, TrainResult

EpochHook = Callable[[int, dict[str, float]], None]
Strategy = Literal["default", "one_device", "mirrored", "multi_worker", "tpu"]
Precision = Literal["mixed_float16", "mixed_bfloat16"]


class Trainer:
    """Compiles and fits the model with Keras under a `tf.distribute` strategy.

    Args:
        epochs: passes over the training split.
        batch_size: examples per step on each replica (the global batch is this times the
            number of replicas).
        learning_rate: the head's learning rate (the peak of the schedule).
        optimizer: a Keras optimizer class or partial (`_partial_: true`), called with the
            learning rate or schedule: Adam, AdamW, SGD with momentum, ...
        lr_schedule: a `pipeline.schedules` option (`train/lr_schedule=cosine`).
        backbone_lr_multiplier: the backbone's rate as a fraction of the head's.
        backbone_lr_decay: per backbone unit below the top, multiply the rate again by this
            (layer-wise decay; 1.0 gives all units the same rate).
        label_smoothing: mix each target with the uniform distribution by this much.
        early_stopping_patience: stop after this many epochs without `val_loss` improving
            (the best weights are restored); null never stops early.
        checkpoint: save the model and optimizer state after each epoch.
        mixed_precision: null (float32), `mixed_float16` (GPUs) or `mixed_bfloat16` (TPUs,
            recent CPUs); outputs stay float32.
        jit_compile: compile the train step with XLA; `auto` lets Keras decide.
        steps_per_execution: train steps per call into TensorFlow; more cuts overhead on
            small models and accelerators.
        strategy: `default`, `one_device`, `mirrored` (all local GPUs), `multi_worker`
            (reads TF_CONFIG) or `tpu`.
        shuffle_buffer: examples shuffled together; at least the split size shuffles fully.
        seed: seeds Python, NumPy and TensorFlow (weights, dropout, shuffling).
        verbose: Keras progress output: 0 silent, 1 bar, 2 one line per epoch.

    Example:
        >>> trainer = Trainer(epochs=5, batch_size=32, learning_rate=1e-3,
        ...                   optimizer=keras.optimizers.Adam, lr_schedule=Constant())
        >>> with trainer.distribute():
        ...     result = trainer.fit(adapted, data, on_epoch_end=print)
    """

    def __init__(
        self,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        optimizer: Any,
        lr_schedule: Any,
        backbone_lr_multiplier: float = 1.0,
        backbone_lr_decay: float = 1.0,
        label_smoothing: float = 0.0,
        early_stopping_patience: int | None = None,
        checkpoint: bool = True,
        mixed_precision: Precision | None = None,
        jit_compile: bool | Literal["auto"] = "auto",
        steps_per_execution: int = 1,
        strategy: Strategy = "default",
        shuffle_buffer: int = 10_000,
        seed: int = 0,
        verbose: int = 2,
    ):
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.backbone_lr_multiplier = backbone_lr_multiplier
        self.backbone_lr_decay = backbone_lr_decay
        self.label_smoothing = label_smoothing
        self.early_stopping_patience = early_stopping_patience
        self.checkpoint = checkpoint
        self.mixed_precision = mixed_precision
        self.jit_compile = jit_compile
        self.steps_per_execution = steps_per_execution
        self.strategy = strategy
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.verbose = verbose
        self.is_chief = True
        self._strategy: Any = None

    @property
    def copies_to_evaluate(self) -> bool:
        """Whether evaluation and export need a local copy of the trained model.

        Keras' `predict` and SavedModel export are not multi-worker safe (predictions come
        back in shard order), so a multi-worker run evaluates and exports a plain copy.
        """
        return self.strategy == "multi_worker"

    @contextmanager
    def distribute(self) -> Iterator[Trainer]:
        """Seed, set the precision policy and enter the strategy's scope.

        Build the source and the model inside it. `is_chief` tells whether this process
        is the one that logs and exports (false only for non-chief multi-worker tasks).
        """
        import keras

        from pipeline.distribute import is_chief, make_strategy

        self._strategy = make_strategy(self.strategy)  # first: multi-worker needs it early
        self.is_chief = is_chief(self.strategy)
        keras.utils.set_random_seed(self.seed)
        previous = keras.mixed_precision.dtype_policy()
        keras.mixed_precision.set_dtype_policy(self.mixed_precision or "float32")
        try:
            with self._strategy.scope():
                yield self
        finally:
            keras.mixed_precision.set_dtype_policy(previous)

    def fit(
        self,
        adapted: AdaptedModel,
        data: DataBundle,
        on_epoch_end: EpochHook,
        checkpoint_dir: Path | None = None,
    ) -> TrainResult:
        import tensorflow as tf

        from pipeline.callbacks import AtomicCheckpoint, EpochHookCallback, UnfreezeCallback

        replicas = self._strategy.num_replicas_in_sync if self._strategy else 1
        global_batch = self.batch_size * replicas
        steps_per_epoch = max(math.ceil(data.num_examples.get("train", 1) / global_batch), 1)
        optimizer = self._optimizer(adapted, steps_per_epoch)
        adapted.model.compile(
            optimizer=optimizer,
            loss=_loss(adapted.task, len(adapted.class_names), self.label_smoothing),
            metrics=_metrics(adapted.task),
            jit_compile=self.jit_compile,
            steps_per_execution=self.steps_per_execution,
        )
        train = data.train.shuffle(self.shuffle_buffer, seed=self.seed, reshuffle_each_iteration=True)
        train = _batches(train, global_batch, adapted.task, data.augmentation)
        val = _batches(data.val, global_batch, adapted.task, None)

        if self.strategy == "multi_worker":
            from pipeline.distribute import prepare_multi_worker_fit

            prepare_multi_worker_fit(adapted.model, self._strategy, next(iter(train.take(1))))
        callbacks = [EpochHookCallback(on_epoch_end, optimizer)]
        if adapted.freeze.on_epoch_begin is not None:
            callbacks.insert(0, UnfreezeCallback(adapted.freeze.on_epoch_begin))
        if self.early_stopping_patience is not None:
            import keras

            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor="val_loss",
                    patience=self.early_stopping_patience,
                    restore_best_weights=True,
                )
            )
        scratch = None
        if self.checkpoint and checkpoint_dir is not None:
            if not self.is_chief:  # saving is collective: every worker saves, non-chiefs to scratch
                scratch = tempfile.TemporaryDirectory(prefix="pipeline-worker-checkpoint-")
                checkpoint_dir = Path(scratch.name)
            callbacks.append(AtomicCheckpoint(Path(checkpoint_dir)))
        try:
            history = self._fit(adapted, train, val, callbacks)
        finally:
            if scratch is not None:
                scratch.cleanup()
        values = {k: [float(v) for v in vs] for k, vs in history.history.items()}
        return TrainResult(values, len(history.epoch), weights_sha256(adapted.model))

    def _fit(self, adapted: AdaptedModel, train: Any, val: Any, callbacks: list[Any]) -> Any:
        import tensorflow as tf

        return adapted.model.fit(
            train.prefetch(tf.data.AUTOTUNE),
            validation_data=val.prefetch(tf.data.AUTOTUNE),
            epochs=self.epochs,
            callbacks=callbacks,
            verbose=self.verbose,
            shuffle=False,  # the dataset is already shuffled, with the seed
        )

    def _optimizer(self, adapted: AdaptedModel, steps_per_epoch: int) -> Any:
        import keras

        from pipeline.learning_rates import scale_learning_rates

        schedule = self.lr_schedule.build(self.learning_rate, steps_per_epoch, self.epochs)
        optimizer = self.optimizer(learning_rate=schedule)
        factors = _backbone_factors(adapted, self.backbone_lr_multiplier, self.backbone_lr_decay)
        scale_learning_rates(optimizer, factors)
        # Built on every variable that may ever train, so a gradual schedule keeps one
        # optimizer (and its state and iteration count) for the whole run. Keras' own order
        # first, as `keras.saving.load_model` rebuilds it, so checkpoints restore the state.
        trainable = list(adapted.model.trainable_weights)
        seen = {id(v) for v in trainable}
        optimizer.build(trainable + [v for v in adapted.freeze.candidates if id(v) not in seen])
        if self.mixed_precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        return optimizer


def weights_sha256(model: Any) -> str:
    """A digest of all the model's weights, in order, bit for bit."""
    import hashlib

    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(variable.numpy().tobytes())
    return digest.hexdigest()


def _backbone_factors(adapted: AdaptedModel, multiplier: float, decay: float) -> list[tuple[Any, float]]:
    factors = []
    units = list(adapted.freeze.units)
    for depth, unit in enumerate(reversed(units)):  # depth 0 is the top unit
        factor = multiplier * decay**depth
        if factor != 1.0:
            factors.extend((variable, factor) for variable in unit.variables)
    return factors


def _batches(dataset: Any, batch_size: int, task: str, augmentation: Any) -> Any:
    import tensorflow as tf

    dataset = dataset.batch(batch_size)
    if task == "binary":
        dataset = dataset.map(lambda x, y: (x, tf.cast(tf.reshape(y, [-1, 1]), tf.float32)))
    if augmentation is not None:
        dataset = dataset.map(
            lambda x, y: (augmentation(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
        )
    return dataset


def _loss(task: str, num_classes: int, label_smoothing: float) -> Any:
    import keras

    if task != "multiclass":
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy()

    def smoothed_sparse_crossentropy(y_true, y_pred):
        from keras import ops

        one_hot = ops.one_hot(ops.cast(ops.reshape(y_true, [-1]), "int32"), num_classes)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=label_smoothing)

    return smoothed_sparse_crossentropy


def _metrics(task: str) -> list[Any]:
    import keras

    if task == "multiclass":
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    return [keras.metrics.BinaryAccuracy(name="accuracy")]
