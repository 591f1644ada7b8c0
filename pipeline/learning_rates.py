"""Per-variable learning-rate factors on any Keras optimizer (backbone multiplier, layer decay).

Keras optimizers have one learning rate. Scaling gradients instead would be a no-op for
Adam-style optimizers (they normalize the gradient), so the factor is applied where the
rate is used: each variable's `update_step` receives `learning_rate * factor`.
"""

from __future__ import annotations

from typing import Any

from pipeline import compat


def scale_learning_rates(optimizer: Any, factors: list[tuple[Any, float]]) -> None:
    """Make `optimizer` update each variable in `factors` at `factor` x its learning rate.

    Variables are matched by the optimizer's own key (`compat.var_key`), which is stable
    across the Keras variable, its `tf.Variable` and distributed copies. Weight decay
    (AdamW) keeps the unscaled rate.
    """
    if not factors:
        return
    by_key = {compat.var_key(optimizer, variable): factor for variable, factor in factors}
    original = optimizer.update_step

    def update_step(gradient, variable, learning_rate):
        factor = by_key.get(compat.var_key(optimizer, variable))
        if factor is not None:
            learning_rate = learning_rate * factor
        return original(gradient, variable, learning_rate)

    optimizer.update_step = update_step
