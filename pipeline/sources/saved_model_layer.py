"""A Keras 3 layer over a TF2 SavedModel (TF Hub format) that trains for real.

`hub.KerasLayer` is a tf_keras layer that Keras 3 models refuse, and
`keras.layers.TFSMLayer` copies the SavedModel's variables into new Keras variables, so the
optimizer updates the copies while the restored functions keep reading the originals.
This layer makes Keras track the very `tf.Variable`s that the restored functions read:
each is wrapped in a Keras variable whose storage *is* the restored variable. Gradients,
optimizer updates, BatchNorm moving statistics, checkpoints and exports then all see one
set of weights.

A `.keras` file of a model holding this layer is self-contained: the SavedModel is stored
inside the archive (`save_assets`) and the trained values beside it, as for any layer, so
the file loads after the source directory has moved or gone. Its graph is code that came
with the file, so `pipeline.sources.graph_check` reads it before it is restored.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import keras
import tensorflow as tf

from pipeline import compat
from pipeline.sources.graph_check import check_saved_model
from pipeline.sources.pin import Pinnable
from pipeline.sources.signatures import load_with_text_ops

# `_AliasVariable` overrides a private method of `keras.Variable`, so it stays a class here;
# fail at import, naming the patch, if the installed Keras no longer has what it overrides.
compat.check_saved_model_layer()


class _AliasVariable(keras.Variable):
    """A Keras variable that uses an existing `tf.Variable` as its storage (no copy).

    Overrides `keras.Variable._initialize`, a private method: see `pipeline.compat`
    (SAVED_MODEL_LAYER), which checks it at import of this module.
    """

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


# `from_config` passes this as `loaded`: the SavedModel arrives later, from the archive.
_DEFERRED = object()
# Where a `.keras` archive keeps a text model's preprocessing SavedModel, beside the model's.
_PREPROCESSOR_DIR = "pipeline_preprocessor"


def _keras_name(variable: tf.Variable) -> str:
    return variable.name.split(":")[0].replace("/", "__")


@keras.saving.register_keras_serializable(package="pipeline")
class SavedModelLayer(Pinnable, keras.layers.Layer):
    """Calls a loaded TF2 SavedModel as a Keras 3 layer whose variables Keras trains.

    Args:
        handle: where the SavedModel was loaded from (kept for `get_config`).
        signature: call `loaded.signatures[signature]` instead of `loaded.__call__`; such
            functions take no `training` argument, so BatchNorm and dropout stay in
            inference mode.
        output_key: the key to take when the called function returns a dict.
        loaded: the object from `tf.saved_model.load`; loaded from `handle` when omitted.
            Keras rebuilding the layer from a `.keras` file restores the SavedModel stored
            in the file instead, so the file works without `handle`.
        output_shape, output_dtype: one feature output (without the batch axis), written to
            the config so that Keras can rebuild the model before the SavedModel is back.
        preprocessor: a text model's preprocessing SavedModel (BERT-style pairs: strings in,
            the encoder's input dict out), called before the model; never trained. Stored
            in `.keras` files beside the model.
        preprocessor_loaded: that SavedModel, already loaded; loaded from `preprocessor`
            when omitted.
        seq_length: with a preprocessor that has `tokenize` and `bert_pack_inputs` (TF Hub's
            BERT preprocessors), pack the tokens to this many positions instead of the
            preprocessor's default.
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
        output_shape: list[int | None] | None = None,
        output_dtype: str = "float32",
        preprocessor: str | None = None,
        preprocessor_loaded: Any = None,
        seq_length: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._pin_if_frozen()  # `trainable=False` here: no freeze setting unfreezes it
        # Set by `freeze.batchnorm: frozen`: train the variables but call the model in
        # inference mode, so its BatchNorm moving statistics stay fixed.
        self.inference_mode = False
        self.handle = handle
        self.signature = signature
        self.output_key = output_key
        # One feature output's shape (no batch axis), recorded when the layer is first
        # called symbolically; lets Keras rebuild the model before the SavedModel is back.
        self._output_shape = tuple(output_shape) if output_shape is not None else None
        self._output_dtype = output_dtype
        self.preprocessor = preprocessor
        self.seq_length = seq_length
        self._loaded = None
        self._preprocessor = None
        self._pending_values = None
        if loaded is not _DEFERRED:
            if preprocessor is not None and preprocessor_loaded is None:
                preprocessor_loaded = load_with_text_ops(preprocessor)
            self._attach(loaded if loaded is not None else tf.saved_model.load(handle), preprocessor_loaded)
        self.built = True

    @classmethod
    def from_config(cls, config):
        if config.get("output_shape") is None:  # a file from before the SavedModel was embedded
            handle = config["handle"]  # a directory the file names: as untrusted as the file
            if os.path.isdir(handle):
                check_saved_model(handle, f"the SavedModel {handle} that layer {config.get('name')!r} names")
            return super().from_config(config)
        return super().from_config({**config, "loaded": _DEFERRED})

    def _attach(self, loaded: Any, preprocessor: Any = None) -> None:
        """Call `loaded` (after `preprocessor`) from now on and track the variables its functions read."""
        self._loaded = loaded
        self._preprocessor = preprocessor
        if self.signature is None:
            self._function = loaded
            self._accepts_training = True
        else:
            self._function = loaded.signatures[self.signature]
            self._input_name = _single_input_name(self._function)
            self._accepts_training = False
        variables = getattr(loaded, "variables", None)
        if variables is None or self.signature is not None:
            variables = self._function.variables
        with compat.unlocked(self):  # also after the layer is built (`load_assets`)
            for variable in _unique(variables):
                compat.track_variable(self, _AliasVariable(variable, _keras_name(variable)))

    @property
    def loaded(self) -> Any:
        """The restored SavedModel object (for inspection and export)."""
        return self._loaded

    @property
    def loaded_models(self) -> list[Any]:
        """Every restored SavedModel this layer calls: the model and its preprocessor (for
        export, which keeps their resources: vocabulary tables, assets)."""
        return [model for model in (self._preprocessor, self._loaded) if model is not None]

    def call(self, inputs, training=None):
        if self._loaded is None:
            raise ValueError(
                f"SavedModelLayer {self.name!r} (handle {self.handle!r}) was rebuilt from its "
                "config without its SavedModel; load the whole model with "
                "`keras.saving.load_model`, which restores the SavedModel stored in the file."
            )
        training = bool(training) and self.trainable and not self.inference_mode
        if self._preprocessor is not None:
            inputs = self._preprocess(inputs)
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

    def _preprocess(self, text):
        """The encoder's inputs for a batch of strings, by the preprocessing SavedModel."""
        if self.seq_length is None:
            return self._preprocessor(text)
        tokens = self._preprocessor.tokenize(text)
        return self._preprocessor.bert_pack_inputs([tokens], seq_length=self.seq_length)

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
        if self._loaded is None:  # rebuilt from a config; the SavedModel is not back yet
            return keras.KerasTensor((inputs.shape[0], *self._output_shape), dtype=self._output_dtype)
        # Keras traces symbolic calls itself; the SavedModel's functions need TF tensors.
        # Tracing (not running) the call also works on distributed variables, which may
        # only be read inside a replica context.
        spec = tf.TensorSpec(shape=(None, *inputs.shape[1:]), dtype=inputs.dtype)
        traced = tf.function(lambda x: self.call(x, training=False)).get_concrete_function(spec)
        outputs = traced.structured_outputs
        self._output_shape = tuple(outputs.shape[1:])
        self._output_dtype = outputs.dtype.name
        return keras.KerasTensor((inputs.shape[0], *outputs.shape[1:]), dtype=outputs.dtype.name)

    def get_config(self):
        return {
            **super().get_config(),
            "handle": self.handle,
            "signature": self.signature,
            "output_key": self.output_key,
            "output_shape": list(self._output_shape) if self._output_shape is not None else None,
            "output_dtype": self._output_dtype,
            "preprocessor": self.preprocessor,
            "seq_length": self.seq_length,
        }

    # The .keras format: the SavedModel goes into the archive's assets and the trained
    # values into its weights file (as for any layer), so the file needs no source folder.

    def save_assets(self, dir_path):
        _store(self.handle, self._loaded, dir_path)
        if self._preprocessor is not None:
            _store(self.preprocessor, self._preprocessor, os.path.join(dir_path, _PREPROCESSOR_DIR))

    def load_own_variables(self, store):
        if self._loaded is None:  # called before `load_assets` brings the SavedModel back
            self._pending_values = [store[str(i)] for i in range(len(store.keys()))]
        else:
            super().load_own_variables(store)

    def load_assets(self, dir_path):
        if self._loaded is not None:
            return  # an old file, built from its handle
        check_saved_model(dir_path, f"the SavedModel stored for layer {self.name!r} (saved from {self.handle})")
        preprocessor = None
        if self.preprocessor is not None:
            stored = os.path.join(dir_path, _PREPROCESSOR_DIR)
            check_saved_model(stored, f"the preprocessing SavedModel stored for layer {self.name!r} "
                                      f"(saved from {self.preprocessor})")
            preprocessor = load_with_text_ops(stored)
        self._attach(tf.saved_model.load(dir_path), preprocessor)
        values = self._pending_values or []
        variables = self.weights  # the order Keras saved them in: trainable, then not
        if len(values) != len(variables):
            raise ValueError(
                f"SavedModelLayer {self.name!r}: the file holds {len(values)} values but its "
                f"embedded SavedModel has {len(variables)} variables; the file is damaged."
            )
        for variable, value in zip(variables, values):
            variable.assign(value)
        self._pending_values = None


def _store(handle: str | None, loaded: Any, dir_path: str) -> None:
    """Puts a SavedModel into a `.keras` archive's assets: a copy of its folder, or saved anew."""
    if handle and os.path.isfile(os.path.join(handle, "saved_model.pb")):
        # A file copy: cheap enough for a checkpoint after every epoch.
        shutil.copytree(handle, dir_path, dirs_exist_ok=True)
    else:  # the source folder is gone (this layer came from a .keras file itself)
        tf.saved_model.save(loaded, dir_path)


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
