"""Puts a source's preprocessing and feature extractor into one Keras model named `backbone`."""

from __future__ import annotations

import keras

from pipeline.errors import SourceError
from pipeline.sources.pin import Pinnable
from pipeline.sources.preprocess import PreprocessLayer
from pipeline.types import InputKind, SourceModel


@keras.saving.register_keras_serializable(package="pipeline")
class PinnedModel(Pinnable, keras.layers.Wrapper):
    """Calls a Keras model as a layer; `trainable=False` at construction pins it.

    Args:
        layer: the model (or layer) to call.
        trainable: false pins it: frozen, in inference mode, whatever is set later.

    Example:
        >>> PinnedModel(keras.applications.MobileNetV2(weights=None), trainable=False)
    """

    def __init__(self, layer, **kwargs):
        super().__init__(layer, **kwargs)
        self._pin_if_frozen()
        self.layer.trainable = self.trainable
        self.built = self.layer.built

    def call(self, inputs, training=None):
        return self.layer(inputs, training=bool(training) and self.trainable)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


def pin(model: keras.layers.Layer, name: str) -> PinnedModel:
    """`model` as a frozen layer named `name` that no later `trainable = True` unfreezes.

    Keras propagates `backbone.trainable = True` (what `freeze=none` does) to every
    sublayer, which would undo `source.trainable=false`; the wrapper refuses it, and runs
    the model in inference mode so BatchNorm statistics and dropout stay fixed.
    """
    return PinnedModel(model, trainable=False, name=name)


def walk_layers(model):
    """Every layer inside `model`, depth first: nested models and models inside wrappers."""
    inner = getattr(model, "layers", None) or ([model.layer] if hasattr(model, "layer") else [])
    for layer in inner:
        yield layer
        yield from walk_layers(layer)


def model_input(kind: InputKind, input_shape: tuple[int, ...]) -> keras.KerasTensor:
    """The Keras input of a model taking `kind`: float32 `images` of `input_shape`, or a batch
    of `text` (one string per example)."""
    if kind == "text":
        return keras.Input(shape=(), dtype="string", name="text")
    return keras.Input(shape=input_shape, name="images")


def build_backbone(
    extractor: keras.layers.Layer,
    input_shape: tuple[int, ...],
    preprocess: str,
    description: str,
    input_kind: InputKind = "image",
) -> SourceModel:
    """`images (raw 0-255) -> preprocess -> extractor -> features`, as one Keras model.

    For text (`input_kind="text"`) the model takes a batch of strings, `input_shape` is `()`
    and the extractor holds its own tokenizer: `text -> extractor -> features`.
    """
    inputs = model_input(input_kind, tuple(input_shape))
    try:
        if input_kind == "text":
            features = extractor(inputs)
        else:
            features = extractor(PreprocessLayer(preprocess, name="preprocess")(inputs))
    except ValueError as error:  # Keras or a SavedModel could not take inputs of this shape
        if input_kind == "text":
            raise SourceError(f"the source model {description} cannot be called on a batch of strings "
                              f"({str(error).strip().splitlines()[0][:300]}); is it a text model? For an "
                              "image model leave source.input=image") from error
        raise SourceError(_shape_mismatch(description, list(input_shape), error)) from error
    backbone = keras.Model(inputs, features, name="backbone")
    return SourceModel(
        backbone=backbone,
        input_shape=tuple(input_shape),
        feature_shape=tuple(features.shape[1:]),
        preprocess=preprocess,
        description=description,
        input_kind=input_kind,
    )


def _shape_mismatch(description: str, shape: list[int], error: ValueError) -> str:
    """What a source that cannot be called on `source.input_shape` takes instead, if it says."""
    import re

    text = str(error)
    reasons = re.findall(r"(?:ValueError|TypeError): ([^\n]+)", text)
    reason = (reasons[-1] if reasons else text.strip().splitlines()[0]).removesuffix(" Got:").strip()
    specs = re.findall(r"TensorSpec\(shape=\(None, ([0-9, ]+)\)", text)
    accepted = sorted({dims.replace(" ", "") for dims in specs})
    if accepted:
        takes = " or ".join(f"[{dims}]" for dims in accepted)
        fix = f"it takes {takes}: set source.input_shape=[{accepted[0]}]"
    else:
        fix = "set source.input_shape to the [height, width, channels] the model takes"
    return (
        f"source.input_shape={shape} does not fit the source model {description} "
        f"({reason[:300]}); {fix}, or leave source.input_shape at the option's default"
    )
