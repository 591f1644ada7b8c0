"""`source.layer` and `source.pooling` of the Keras sources: cut a model at a layer, pool its output.

A cut is a new Keras model from the model's input to the named layer's output: the layers
after it are not part of it (their weights are not trained, in the feature cache's key, or
exported). `pooling` then applies to whatever output the cut gives: `avg` or `max` reduce
every axis between the batch and the channels (height and width of an image's feature map),
`flatten` makes one vector of the whole output, and `null` keeps it; an output that is
already a vector is left as it is by all of them.
"""

from __future__ import annotations

import difflib
import weakref
from typing import Any, Literal

from pipeline.errors import ConfigError

Pooling = Literal["avg", "max", "flatten"]

# Global pooling per `source.pooling` and rank of the output (batch, ..., channels).
_GLOBAL_POOLING = {
    ("avg", 3): "GlobalAveragePooling1D",
    ("avg", 4): "GlobalAveragePooling2D",
    ("avg", 5): "GlobalAveragePooling3D",
    ("max", 3): "GlobalMaxPooling1D",
    ("max", 4): "GlobalMaxPooling2D",
    ("max", 5): "GlobalMaxPooling3D",
}
# The pooling layers `cut` added, so that listing the cut points leaves them out.
_ADDED = weakref.WeakSet()


def cut(model: Any, layer: str | None, pooling: Pooling | None, name: str, what: str, inspect_command: str) -> Any:
    """`model` (one input) from its input to `layer`'s output, pooled as `pooling` says.

    Args:
        model: a Keras functional model with one image input.
        layer: the name of a layer of `model`; `None` takes the model's (single) output.
        pooling: `avg`, `max`, `flatten` or `None`, applied to the output of the cut.
        name: the name of the returned model.
        what: the model as the user knows it (`keras.applications.VGG16`, a path), for errors.
        inspect_command: the command that lists the model's layers, for the error.

    Raises:
        ConfigError: `layer` names no layer that can be cut at; one line, with the
            closest names and `inspect_command`.

    Example:
        >>> vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
        >>> cut(vgg, "block4_pool", "avg", "keras_app", "VGG16", "python -m pipeline.inspect ...")
    """
    import keras

    output = model.outputs[0] if layer is None else _layer_output(model, layer, what, inspect_command)
    if pooling is not None and len(output.shape) > 2:
        taken = {each.name for each in model.layers}
        pool = _pooling_layer(pooling, len(output.shape), "pooling" if "pooling" not in taken else None)
        _ADDED.add(pool)
        output = pool(output)
    return keras.Model(model.inputs[0], output, name=name)


def keras_extractor(backbone: Any) -> Any:
    """The Keras model inside `backbone` that a cut made (a pinned one unwrapped), or `None`
    when the backbone holds no Keras model (a SavedModel)."""
    import keras

    inner = [getattr(layer, "layer", layer) for layer in backbone.layers]
    models = [each for each in inner if isinstance(each, keras.Model)]
    return models[-1] if models else None


def cut_points(model: Any) -> list[tuple[str, tuple]]:
    """`(name, output shape without the batch axis)` of the layers of `model` that
    `source.layer` can name, bottom to top, without the pooling `source.pooling` added."""
    import keras

    points = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or layer in _ADDED:
            continue
        try:
            points.append((layer.name, tuple(layer.output.shape[1:])))
        except (AttributeError, ValueError):  # not called in this graph: no output to cut at
            continue
    return points


def block_ends(model: Any) -> set[str]:
    """Names of the layers of `model` whose output feeds several layers: where blocks end
    (`mixed7` of InceptionV3, `conv4_block6_out` of ResNet50) and branches begin."""
    consumers: dict[int, int] = {}
    for layer in model.layers:
        try:
            inputs = layer.input
        except (AttributeError, ValueError):
            continue
        for tensor in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    ends = set()
    for layer in model.layers:
        try:
            if consumers.get(id(layer.output), 0) > 1:
                ends.add(layer.name)
        except (AttributeError, ValueError):
            continue
    return ends


def _layer_output(model: Any, layer: str, what: str, inspect_command: str) -> Any:
    import keras

    names = [each.name for each in model.layers if not isinstance(each, keras.layers.InputLayer)]
    if layer not in names:
        close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
        closest = f"closest: {', '.join(close)}" if close else "no name is close"
        raise ConfigError(
            f"source.layer={layer!r} is not a layer of {what} ({closest}); all "
            f"{len(names)} with their output shapes: {inspect_command}"
        )
    try:  # a layer called several times (shared weights) gives its first call's output
        output = model.get_layer(layer).output
    except (AttributeError, ValueError) as error:
        raise ConfigError(
            f"source.layer={layer!r} has no output to cut at ({error}); choose another: {inspect_command}"
        ) from error
    if isinstance(output, (list, tuple, dict)):
        raise ConfigError(
            f"source.layer={layer!r} has {len(output)} outputs; choose a layer with one: {inspect_command}"
        )
    return output


def _pooling_layer(pooling: Pooling, rank: int, name: str | None) -> Any:
    import keras

    if pooling == "flatten":
        return keras.layers.Flatten(name=name)
    kind = _GLOBAL_POOLING.get((pooling, rank))
    if kind is None:
        raise ConfigError(
            f"source.pooling={pooling!r}: expected avg, max, flatten or null, for an output of "
            f"rank {rank}; avg and max pool outputs of rank 3 to 5. Set source.pooling=flatten or null."
        )
    return getattr(keras.layers, kind)(name=name)


def refuse_saved_model_cut(layer: str | None) -> None:
    """Fail at construction when a SavedModel source is given `source.layer`.

    A SavedModel holds traced functions, not a layer graph: a Keras 3 export keeps no layers
    at all, and a tf_keras one keeps each layer's own function but not which layer feeds
    which, so calling them in order equals the model only for a plain chain.
    """
    if layer is None:
        return
    raise ConfigError(
        f"source.layer={layer!r}: a SavedModel cannot be cut at a layer, as it stores traced "
        "functions, not a layer graph (a Keras 3 export keeps no layers; a tf_keras one keeps "
        "each layer's function but not which layer feeds which). Take another output of a "
        "signature with source.output_key (`python -m pipeline.inspect` lists them), or save "
        "the Keras model with model.save('model.keras') and use source=keras_file with "
        "source.layer; else set source.layer=null."
    )
