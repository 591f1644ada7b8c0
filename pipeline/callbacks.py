"""Keras callbacks of the train stage: MLflow epoch hook, gradual unfreezing, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path

import keras

log = logging.getLogger("pipeline")


class EpochHookCallback(keras.callbacks.Callback):
    """Hands each epoch's logs, plus the current learning rate, to `hook(epoch, metrics)`."""

    def __init__(self, hook, optimizer):
        super().__init__()
        self._hook = hook
        self._optimizer = optimizer

    def on_epoch_end(self, epoch, logs=None):
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(self._optimizer.learning_rate))
        self._hook(epoch, metrics)


class StopOnNaN(keras.callbacks.Callback):
    """Fails the run with a clear reason when the loss stops being a finite number."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            from pipeline.errors import TrainingDiverged

            raise TrainingDiverged(
                f"the training loss became {float(loss)} at epoch {self._epoch}, batch {batch}: "
                "training diverged. Lower train.learning_rate, add train/lr_schedule=cosine "
                "warmup, or check the data for broken labels or images."
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


class UnfreezeCallback(keras.callbacks.Callback):
    """Applies a gradual freeze schedule at the start of each epoch, keeping the optimizer."""

    def __init__(self, on_epoch_begin):
        super().__init__()
        self._on_epoch_begin = on_epoch_begin

    def on_epoch_begin(self, epoch, logs=None):
        if self._on_epoch_begin(epoch):
            # The train step was traced with the old trainable set; trace it again.
            self.model.make_train_function(force=True)
            log.info(
                "epoch %d: unfroze more of the backbone; %d trainable weights now",
                epoch,
                len(self.model.trainable_weights),
            )


class AtomicCheckpoint(keras.callbacks.Callback):
    """After each epoch, writes `last.keras` (model + optimizer state) and `state.json`.

    Each file is written beside its final name and renamed into place, so a process killed
    mid-write leaves the previous complete checkpoint.
    """

    def __init__(self, directory: Path, model):
        super().__init__()
        self.directory = Path(directory)
        self._full_model = model  # the whole model, also while a cached phase fits the head

    def on_epoch_end(self, epoch, logs=None):
        if self.model is not self._full_model and epoch + 1 < self.params["epochs"]:
            # A head-only epoch on cached features takes milliseconds, saving the whole
            # model far longer: save the cached phase's last epoch only. A resume then
            # repeats at most those cheap epochs.
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        unique = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # two writers never share a temp file
        partial = self.directory / f".last.partial-{unique}.keras"
        self._full_model.save(partial)
        os.replace(partial, self.directory / "last.keras")
        iterations = int(keras.ops.convert_to_numpy(self._full_model.optimizer.iterations))
        state = {"epochs_completed": epoch + 1, "iterations": iterations}
        partial_state = self.directory / f".state.partial-{unique}.json"
        partial_state.write_text(json.dumps(state))
        os.replace(partial_state, self.directory / "state.json")
