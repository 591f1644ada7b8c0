"""A Keras 3 layer over a TF2 SavedModel (TF Hub format) that trains for real.

`hub.KerasLayer` is a tf_keras layer that Keras 3 models refuse, and
`keras.layers.TFSMLayer` copies the SavedModel's variables into new Keras variables, so the
optimizer updates the copies while the restored functions keep reading the originals.
This layer makes Keras track the very `tf.Variable`s that the restored functions read:
each is wrapped in a Keras variable whose storage *is* the restored variable. Gradients,
optimizer updates, BatchNorm moving statistics, checkpoints and exports then all see one
set of weights.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


class _AliasVariable(keras.Variable):
    """A Keras variable that uses an existing `tf.Variable` as its storage (no copy)."""

    def __init__(self, variable: tf.Variable, name: str):
        self._alias = variable
        super().__init__(
            initializer=_no_initializer,
            shape=tuple(variable.shape),
            dtype=variable.dtype.name,
            trainable=variable.trainable,
            name=name,
        )

    def _initialize(self, value):  # called by Keras instead of creating a new tf.Variable
        self._value = self._alias


def _no_initializer(shape, dtype=None):  # never called: _initialize keeps the alias
    raise AssertionError("an aliased variable is never initialized")


def _keras_name(variable: tf.Variable) -> str:
    return variable.name.split(":")[0].replace("/", "__")


@keras.saving.register_keras_serializable(package="pipeline")
class SavedModelLayer(keras.layers.Layer):
    """Calls a loaded TF2 SavedModel as a Keras 3 layer whose variables Keras trains.

    Args:
        handle: where the SavedModel was loaded from (kept for `get_config`).
        signature: call `loaded.signatures[signature]` instead of `loaded.__call__`; such
            functions take no `training` argument, so BatchNorm and dropout stay in
            inference mode.
        output_key: the key to take when the called function returns a dict.
        loaded: the object from `tf.saved_model.load`; loaded from `handle` when omitted
            (as when Keras rebuilds the layer from its config).
        trainable: whether the optimizer may change the SavedModel's trainable variables.
            When false, the model is also called in inference mode, so BatchNorm moving
            statistics stay fixed, and the layer is pinned: setting `trainable` later (as
            freeze schedules do) cannot unfreeze it.

    Example:
        >>> layer = SavedModelLayer("/models/feature_vector", loaded=tf.saved_model.load(path))
        >>> features = layer(images, training=True)  # updates BatchNorm statistics
    """

    def __init__(
        self,
        handle: str,
        signature: str | None = None,
        output_key: str | None = None,
        loaded: Any = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # `trainable=False` at construction pins the layer: no freeze setting unfreezes it.
        self._pinned = not self.trainable
        # Set by `freeze.batchnorm: frozen`: train the variables but call the model in
        # inference mode, so its BatchNorm moving statistics stay fixed.
        self.inference_mode = False
        self.handle = handle
        self.signature = signature
        self.output_key = output_key
        self._loaded = loaded if loaded is not None else tf.saved_model.load(handle)
        if signature is None:
            self._function = self._loaded
            self._accepts_training = True
        else:
            self._function = self._loaded.signatures[signature]
            self._input_name = _single_input_name(self._function)
            self._accepts_training = False
        variables = getattr(self._loaded, "variables", None)
        if variables is None or signature is not None:
            variables = self._function.variables
        for variable in _unique(variables):
            self._track_variable(_AliasVariable(variable, _keras_name(variable)))
        self.built = True

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        keras.layers.Layer.trainable.fset(self, bool(value) and not getattr(self, "_pinned", False))

    @property
    def loaded(self) -> Any:
        """The restored SavedModel object (for inspection and export)."""
        return self._loaded

    def call(self, inputs, training=None):
        training = bool(training) and self.trainable and not self.inference_mode
        if self.signature is not None:
            outputs = self._function(**{self._input_name: inputs})
        elif self._accepts_training:
            try:
                outputs = self._function(inputs, training=training)
            except (TypeError, ValueError):
                # SavedModels traced without a `training` argument.
                self._accepts_training = False
                outputs = self._function(inputs)
        else:
            outputs = self._function(inputs)
        return self._select(outputs)

    def _select(self, outputs):
        if isinstance(outputs, dict):
            if self.output_key is None:
                if len(outputs) == 1:
                    return next(iter(outputs.values()))
                raise ValueError(
                    f"the SavedModel at {self.handle} returns several outputs "
                    f"({', '.join(sorted(outputs))}); set source.output_key to one of them"
                )
            if self.output_key not in outputs:
                raise ValueError(
                    f"source.output_key={self.output_key!r} is not an output of {self.handle}; "
                    f"its outputs are: {', '.join(sorted(outputs))}"
                )
            return outputs[self.output_key]
        return outputs

    def compute_output_spec(self, inputs, training=None):
        # Keras traces symbolic calls itself; the SavedModel's functions need TF tensors.
        # Tracing (not running) the call also works on distributed variables, which may
        # only be read inside a replica context.
        spec = tf.TensorSpec(shape=(None, *inputs.shape[1:]), dtype=inputs.dtype)
        traced = tf.function(lambda x: self.call(x, training=False)).get_concrete_function(spec)
        outputs = traced.structured_outputs
        return keras.KerasTensor((inputs.shape[0], *outputs.shape[1:]), dtype=outputs.dtype.name)

    def get_config(self):
        return {
            **super().get_config(),
            "handle": self.handle,
            "signature": self.signature,
            "output_key": self.output_key,
        }


def _single_input_name(function) -> str:
    _, inputs = function.structured_input_signature
    if len(inputs) != 1:
        raise ValueError(
            f"signature takes {len(inputs)} inputs ({', '.join(inputs)}); "
            "an image source must take exactly one image tensor"
        )
    return next(iter(inputs))


def _unique(variables):
    seen: set[int] = set()
    for variable in variables:
        key = id(variable)
        if key not in seen:
            seen.add(key)
            yield variable
