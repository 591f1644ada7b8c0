"""Pinning: a source loaded with `trainable=False` stays frozen whatever freeze setting follows."""

from __future__ import annotations

import keras


class Pinnable:
    """A mixin for Keras layers: `trainable=False` at construction pins the layer.

    A pinned layer's `trainable` stays False when set later (by a freeze schedule, say)
    until `unpin()` is called. Put it before the Keras base class.

    Example:
        >>> class Frozen(Pinnable, keras.layers.Layer): ...
    """

    def _pin_if_frozen(self) -> None:
        """Call at the end of `__init__`, after Keras has read the `trainable` argument."""
        self._pinned = not self.trainable

    @property
    def trainable(self) -> bool:
        return keras.layers.Layer.trainable.fget(self)

    @trainable.setter
    def trainable(self, value: bool) -> None:
        keras.layers.Layer.trainable.fset(self, bool(value) and not getattr(self, "_pinned", False))

    def unpin(self) -> None:
        """Undo a pin read back from a saved model, so that `trainable` may be set again."""
        self._pinned = False
