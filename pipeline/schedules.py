"""Learning-rate schedules for `train.lr_schedule`; each builds a Keras schedule per run.

Steps per epoch are a runtime fact (they depend on the data), so each option is a small
object whose `build` the train stage calls once it knows them.
"""

from __future__ import annotations

from typing import Any


class Constant:
    """The learning rate stays at `train.learning_rate`.

    Example:
        >>> Constant().build(1e-3, steps_per_epoch=100, epochs=10)
    """

    def build(self, learning_rate: float, steps_per_epoch: int, epochs: int) -> Any:
        return learning_rate


class Cosine:
    """Linear warmup from `warmup_start` x the rate, then cosine decay to `min_ratio` x the rate.

    Args:
        warmup_epochs: epochs (fractions allowed) of linear warmup; 0 for none.
        min_ratio: the final rate as a fraction of `train.learning_rate`.
        warmup_start: the first rate of the warmup as a fraction of `train.learning_rate`.

    Example:
        >>> Cosine(warmup_epochs=1).build(1e-3, steps_per_epoch=100, epochs=10)
    """

    def __init__(self, warmup_epochs: float = 1.0, min_ratio: float = 0.0, warmup_start: float = 0.0):
        self.warmup_epochs = warmup_epochs
        self.min_ratio = min_ratio
        self.warmup_start = warmup_start

    def build(self, learning_rate: float, steps_per_epoch: int, epochs: int) -> Any:
        import keras

        warmup_steps = int(round(self.warmup_epochs * steps_per_epoch))
        decay_steps = max(steps_per_epoch * epochs - warmup_steps, 1)
        if warmup_steps == 0:
            return keras.optimizers.schedules.CosineDecay(
                learning_rate, decay_steps, alpha=self.min_ratio
            )
        return keras.optimizers.schedules.CosineDecay(
            learning_rate * self.warmup_start,
            decay_steps,
            alpha=self.min_ratio,
            warmup_target=learning_rate,
            warmup_steps=warmup_steps,
        )


class Step:
    """Multiply the rate by `factor` every `every_epochs` epochs.

    Args:
        every_epochs: epochs between drops.
        factor: the multiplier at each drop, for example 0.1.

    Example:
        >>> Step(every_epochs=5, factor=0.1).build(1e-3, steps_per_epoch=100, epochs=15)
    """

    def __init__(self, every_epochs: int = 5, factor: float = 0.1):
        self.every_epochs = every_epochs
        self.factor = factor

    def build(self, learning_rate: float, steps_per_epoch: int, epochs: int) -> Any:
        import keras

        return keras.optimizers.schedules.ExponentialDecay(
            learning_rate,
            decay_steps=self.every_epochs * steps_per_epoch,
            decay_rate=self.factor,
            staircase=True,
        )
