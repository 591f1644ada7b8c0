"""The train stage: fit the adapted model, validating, logging and checkpointing each epoch."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pipeline.distribute import Cluster
from pipeline.features import FeatureCache
from pipeline.types import AdaptedModel, DataBundle, TrainResult

log = logging.getLogger("pipeline")

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
            (the workers of `cluster`) or `tpu`.
        cluster: where `multi_worker` finds its workers: `tf_config` (the TF_CONFIG variable,
            as a Kubernetes TFJob sets it) or `slurm` (the tasks of the srun job step).
        cluster_port: with `cluster=slurm`, the port of a node's first task (the next task
            on that node takes the next port).
        feature_cache: while the backbone is frozen and nothing augments the data, compute
            its outputs once (cached on disk across epochs, runs and sweep jobs) and train
            the head on them.
        feature_cache_dir: where cached backbone outputs live.
        shuffle_buffer: examples shuffled together; at least the split size shuffles fully.
        seed: seeds Python, NumPy and TensorFlow (weights, dropout, shuffling); epoch `e`
            is shuffled with `seed + e`, so a resumed run sees the same batches.
        deterministic: make TensorFlow's ops deterministic (slower), so reruns and resumed
            runs on the same CPU end with bit-identical weights and metrics.
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
        cluster: Cluster = "tf_config",
        cluster_port: int = 8888,
        feature_cache: bool = True,
        feature_cache_dir: str = "outputs/feature_cache",
        shuffle_buffer: int = 10_000,
        seed: int = 0,
        deterministic: bool = False,
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
        self.cluster = cluster
        self.cluster_port = cluster_port
        self.feature_cache = feature_cache
        self.feature_cache_dir = feature_cache_dir
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.deterministic = deterministic
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

        # First: a multi-worker strategy must exist before any other TensorFlow op.
        self._strategy = make_strategy(self.strategy, self.cluster, self.cluster_port)
        self.is_chief = is_chief(self.strategy, self.cluster)
        keras.utils.set_random_seed(self.seed)
        if self.deterministic:
            import tensorflow as tf

            tf.config.experimental.enable_op_determinism()
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
        resume: Path | None = None,
    ) -> TrainResult:
        """Train for `epochs`: the head alone on cached features while the backbone is frozen
        (when the cache applies), then the whole model; one optimizer throughout.

        Args:
            checkpoint_dir: where `last.keras` and `state.json` go after each epoch.
            resume: a checkpoint directory to continue from: its weights, optimizer state
                and epoch count are restored and training carries on from the next epoch
                (from the first when it holds no checkpoint yet).
        """
        from pipeline.callbacks import (
            AtomicCheckpoint,
            EpochHookCallback,
            StopOnNaN,
            UnfreezeCallback,
        )

        self._backbone_seconds = 0.0  # set by _cached_features when it computes the cache
        self._backbone_function = None  # likewise: the traced backbone that computed it
        global_batch, steps_per_epoch = self._steps(data)
        optimizer = self._optimizer(adapted, steps_per_epoch)
        self._compile(adapted.model, adapted, optimizer)
        first_epoch = self._restore(adapted, resume) if resume is not None else 0
        if adapted.fit_head is not None:
            return self._fit_head_once(adapted, data, on_epoch_end, checkpoint_dir, first_epoch, optimizer)
        cached_epochs, cache_status = self._cache_plan(adapted, data)
        log.info("feature cache: %s", cache_status)

        callbacks = [StopOnNaN(), EpochHookCallback(on_epoch_end, optimizer)]
        if self.early_stopping_patience is not None:
            import keras

            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor="val_loss", patience=self.early_stopping_patience, restore_best_weights=True
                )
            )
        scratch = None
        if self.checkpoint and checkpoint_dir is not None:
            if not self.is_chief:  # saving is collective: every worker saves, non-chiefs to scratch
                scratch = tempfile.TemporaryDirectory(prefix="pipeline-worker-checkpoint-")
                checkpoint_dir = Path(scratch.name)
            callbacks.append(AtomicCheckpoint(Path(checkpoint_dir), adapted.model))
        histories = []
        features = None
        try:
            if first_epoch < cached_epochs:
                features, cache_status = self._cached_features(adapted, data)
                if features is None:  # the cache is optional: train the whole model instead
                    cached_epochs = 0
            if first_epoch < cached_epochs:
                self._compile(adapted.head, adapted, optimizer)
                histories.append(self._fit(adapted.head, features["train"], features["val"], adapted.task,
                                           None, callbacks, first_epoch, cached_epochs, data))
            stopped = bool(histories) and len(histories[0].epoch) < cached_epochs - first_epoch
            if max(cached_epochs, first_epoch) < self.epochs and not stopped:
                train = data.train
                if self.strategy == "multi_worker":
                    from pipeline.distribute import prepare_multi_worker_fit

                    sample = next(iter(_prepared(train.batch(global_batch), adapted.task, None)))
                    prepare_multi_worker_fit(adapted.model, self._strategy, sample)
                extra = []
                if adapted.freeze.on_epoch_begin is not None:
                    extra = [UnfreezeCallback(adapted.freeze.on_epoch_begin)]
                histories.append(self._fit(adapted.model, train, data.val, adapted.task, data.augmentation,
                                           extra + callbacks, max(cached_epochs, first_epoch), self.epochs, data))
        finally:
            if scratch is not None:
                scratch.cleanup()
        values: dict[str, list[float]] = {}
        for history in histories:
            for key, series in history.history.items():
                values.setdefault(key, []).extend(float(v) for v in series)
        epochs = first_epoch + sum(len(h.epoch) for h in histories)
        # The cached outputs still describe the model's backbone only if it never trained.
        head_only = features is not None and epochs <= cached_epochs
        return TrainResult(values, epochs, weights_sha256(adapted.model), cache_status,
                           features if head_only else None, self._backbone_seconds, self._backbone_function)

    def _fit_head_once(self, adapted: AdaptedModel, data: DataBundle, on_epoch_end: EpochHook,
                       checkpoint_dir: Path | None, first_epoch: int, optimizer: Any) -> TrainResult:
        """`head=sklearn`: the head fitted in one step on the backbone's training features.

        The features come from the feature cache (the backbone runs once per split, and not
        at all for later jobs of a sweep); without a usable cache they are computed in
        memory. The fit counts as the run's one epoch: its train and validation metrics are
        logged, and it is checkpointed, so a resumed run does not fit again.
        """
        import numpy as np

        from pipeline.callbacks import AtomicCheckpoint
        from pipeline.errors import ConfigError

        if adapted.backbone.trainable_weights or adapted.freeze.on_epoch_begin is not None:
            raise ConfigError(
                "head=sklearn fits a classifier on the frozen backbone's features, but the freeze "
                "setting trains backbone weights: set freeze=all."
            )
        if data.augmentation is not None:
            raise ConfigError(
                "head=sklearn fits once on the features of the unaugmented images; turn the "
                "augmentation off (the data.augmentation values at 0 and flip=none) or use a Keras head."
            )
        if self.feature_cache:
            features, status = self._cached_features(adapted, data)
        else:
            features, status = None, "off (train.feature_cache=false)"
        cached = features is not None
        if not cached:
            backbone = adapted.backbone
            features = {split: getattr(data, split).batch(self.batch_size)
                        .map(lambda x, y: (backbone(x, training=False), y)).unbatch()
                        for split in ("train", "val", "test")}
        history: dict[str, list[float]] = {}
        if first_epoch < 1:
            batches = list(features["train"].batch(4096).as_numpy_iterator())
            x = np.concatenate([b[0] for b in batches])
            y = np.concatenate([b[1] for b in batches])
            log.info("head=sklearn: fitting %s on %d training features of shape %s",
                     type(adapted.fit_head.__self__.estimator).__name__, len(x), x.shape[1:])
            adapted.fit_head(adapted.head, x, y, adapted.task)
            metrics = {}
            self._compile(adapted.head, adapted, optimizer)  # for its loss and metrics
            for split, prefix in (("train", ""), ("val", "val_")):
                batched = _prepared(features[split].batch(self.batch_size), adapted.task, None)
                scores = adapted.head.evaluate(batched, verbose=0, return_dict=True)
                metrics.update({f"{prefix}{name}": float(value) for name, value in scores.items()})
            history = {name: [value] for name, value in metrics.items()}
            on_epoch_end(0, metrics)
            if self.checkpoint and checkpoint_dir is not None:
                checkpoint = AtomicCheckpoint(Path(checkpoint_dir), adapted.model)
                checkpoint.set_model(adapted.model)
                checkpoint.set_params({"epochs": 1})
                checkpoint.on_epoch_end(0)
        return TrainResult(history, 1, weights_sha256(adapted.model), status, features if cached else None,
                           self._backbone_seconds, self._backbone_function)

    def _restore(self, adapted: AdaptedModel, checkpoint_dir: Path) -> int:
        """Load weights and optimizer state; replay the freeze schedule; the next epoch."""
        import json

        checkpoint_dir = Path(checkpoint_dir)
        if not (checkpoint_dir / "state.json").is_file():  # killed before its first epoch ended
            log.info("resuming from the first epoch: %s holds no checkpoint yet", checkpoint_dir)
            return 0
        state = json.loads((checkpoint_dir / "state.json").read_text())
        first_epoch = int(state["epochs_completed"])
        schedule = adapted.freeze.on_epoch_begin
        for epoch in range(first_epoch if schedule is not None else 0):
            schedule(epoch)  # reach the trainable set the run had
        adapted.model.load_weights(checkpoint_dir / "last.keras")
        log.info("resuming after epoch %d from %s", first_epoch, checkpoint_dir)
        return first_epoch

    def _steps(self, data: DataBundle) -> tuple[int, int]:
        """The global batch (per-replica batch x replicas) and the steps per epoch."""
        replicas = self._strategy.num_replicas_in_sync if self._strategy else 1
        batch = self.batch_size * replicas
        return batch, max(math.ceil(data.num_examples.get("train", 1) / batch), 1)

    def _cache_plan(self, adapted: AdaptedModel, data: DataBundle) -> tuple[int, str]:
        """How many leading epochs train the head on cached features, and why (not)."""
        if not self.feature_cache:
            return 0, "off (train.feature_cache=false)"
        if adapted.backbone.trainable_weights:
            return 0, "bypassed: backbone weights train from the first epoch"
        if data.augmentation is not None:
            return 0, "bypassed: augmentation changes every epoch's images"
        if not data.fingerprint:
            return 0, "bypassed: the data source gives no fingerprint to key the cache"
        if self.strategy not in ("default", "one_device"):
            return 0, f"bypassed: train.strategy={self.strategy}"
        frozen = min(adapted.freeze.unfreeze_epochs, default=self.epochs)
        return min(frozen, self.epochs), f"used for epochs 0-{min(frozen, self.epochs) - 1}"

    def _compile(self, model: Any, adapted: AdaptedModel, optimizer: Any) -> None:
        model.compile(
            optimizer=optimizer,
            loss=_loss(adapted.task, len(adapted.class_names), self.label_smoothing),
            metrics=_metrics(adapted.task),
            jit_compile=self.jit_compile,
            steps_per_execution=self.steps_per_execution,
        )

    def _cached_features(self, adapted: AdaptedModel, data: DataBundle) -> tuple[Any, str]:
        """The cached backbone outputs and `hit`/`computed`, or None and why the cache failed.

        An unwritable or full `train.feature_cache_dir` costs speed, never the run.
        """
        cache = FeatureCache(Path(self.feature_cache_dir))
        start = time.perf_counter()
        try:
            features, hit = cache.load_or_compute(adapted.backbone, data, batch_size=self.batch_size)
            self._backbone_seconds = 0.0 if hit else time.perf_counter() - start
            self._backbone_function = cache.backbone_function
        except OSError as error:
            reason = f"{type(error).__name__}: {error.strerror or error}"
            log.warning(
                "feature cache: train.feature_cache_dir=%r is not usable (%s); training without "
                "it, the backbone runs every epoch. Point train.feature_cache_dir at a writable "
                "folder with free space, or set train.feature_cache=false.",
                str(self.feature_cache_dir), reason,
            )
            return None, f"unusable ({reason})"
        return features, "hit" if hit else "computed"

    def _fit(self, model, train, val, task, augmentation, callbacks, initial_epoch, epochs, data) -> Any:
        import tensorflow as tf

        batch, steps = self._steps(data)

        # Epoch e is shuffled with seed + e, whatever ran before it in this process, so a
        # resumed run sees the batches an uninterrupted one would. One flat stream: Keras
        # takes `steps` batches from it per epoch.
        remaining = list(range(initial_epoch, epochs))
        per_epoch = [
            train.shuffle(self.shuffle_buffer, seed=self.seed + e, reshuffle_each_iteration=False).batch(batch)
            for e in remaining
        ]
        order = tf.data.Dataset.range(len(remaining)).flat_map(
            lambda i: tf.data.Dataset.from_tensors(i).repeat(steps)
        )
        stream = _prepared(tf.data.Dataset.choose_from_datasets(per_epoch, order), task, augmentation)
        return model.fit(
            stream.prefetch(tf.data.AUTOTUNE),
            validation_data=_prepared(val.batch(batch), task, None).prefetch(tf.data.AUTOTUNE),
            steps_per_epoch=steps,
            initial_epoch=initial_epoch,
            epochs=epochs,
            callbacks=callbacks,
            verbose=self.verbose,
            shuffle=False,  # the stream is already shuffled, with the seed
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
    """A digest of all the model's weights, in order, bit for bit (and of a scikit-learn head's state)."""
    import hashlib

    from pipeline.estimator_layer import served_estimator

    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(variable.numpy().tobytes())
    layer = served_estimator(model)
    if layer is not None and layer.digest is not None:  # head=sklearn's classifier, as fitted
        digest.update(layer.digest)
    return digest.hexdigest()


def _backbone_factors(adapted: AdaptedModel, multiplier: float, decay: float) -> list[tuple[Any, float]]:
    factors = []
    units = list(adapted.freeze.units)
    for depth, unit in enumerate(reversed(units)):  # depth 0 is the top unit
        factor = multiplier * decay**depth
        if factor != 1.0:
            factors.extend((variable, factor) for variable in unit.variables)
    return factors


def _prepared(batches: Any, task: str, augmentation: Any) -> Any:
    """Labels in the loss's shape and, for training batches, the augmentation."""
    import tensorflow as tf

    if task == "binary":
        batches = batches.map(lambda x, y: (x, tf.cast(tf.reshape(y, [-1, 1]), tf.float32)))
    if augmentation is not None:
        batches = batches.map(
            lambda x, y: (augmentation(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
        )
    return batches


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
