"""The SavedModel a client serves: raw images or encoded image files in, probabilities and names out.

Signatures (all return `probabilities` `[batch, num_classes]`, one per class name, `class_name`
`[batch]`, the most probable class, and `class_names` `[batch, num_classes]`, the class of
each probability column):

- `serving_default`: `images`, float32 `[batch, height, width, channels]`, raw 0-255
  pixels of any size and 1-4 channels.
- `serving_uint8`: the same for uint8 images (what image decoders return).
- `serving_bytes`: `images`, a string `[batch]` of encoded JPEG, PNG, BMP, GIF or WebP files
  (models on 1 or 3 channels).

A text model has one signature, `serving_default`: `text`, a string `[batch]` of raw UTF-8
texts, with the same outputs; its tokenizer is part of the model.

Every image takes the data stage's own pixel path (`pipeline.data.decode`): files are decoded
by `decode_bytes`, pixels of another size or channel count go through `serving_pixels`, so
they are resized by the `data.resize` policy the model was trained and evaluated with.
Binary models give both classes' probabilities (`pipeline.heads.class_probabilities`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.types import InputKind, Task


def serving_model(model: Any, input_shape: tuple[int, ...], resize: str, input_kind: InputKind = "image",
                  max_chars: int | None = None) -> Any:
    """`model` behind the data stage's pixel path: raw pixels of any size and channels in.

    The exported `.keras` file is this model; the SavedModel's float and uint8 signatures
    call it. At the training size it computes exactly what `model` does. A text model
    takes raw strings already and is served as it is, behind the cut of each text to
    `max_chars` characters when it was trained on cut texts (`data.max_chars`).
    """
    import keras

    if input_kind == "text":
        if max_chars is None:
            return model
        from pipeline.data.layers import ServingTexts

        texts = keras.Input(shape=(), dtype="string", name="text")
        return keras.Model(texts, model(ServingTexts(max_chars, name="serving_texts")(texts)), name="served")

    from pipeline.data.layers import ServingImages

    images = keras.Input(shape=(None, None, None), name="images")
    pixels = ServingImages(input_shape, resize, name="serving_images")(images)
    return keras.Model(images, model(pixels), name="served")


def write_saved_model(
    model: Any,
    class_names: tuple[str, ...],
    task: Task,
    input_shape: tuple[int, ...],
    resize: str,
    path: Path,
    max_pixels: int = 100_000_000,
    features: bool = False,
    input_kind: InputKind = "image",
    call: Any = None,
    max_chars: int | None = None,
) -> Path:
    """Writes `model` (raw 0-255 images of `input_shape` -> head outputs) with the signatures above.

    `serving_bytes` refuses a file whose header declares more than `max_pixels` pixels
    (an InvalidArgumentError naming the limit), before decoding it. With `features=True`
    `model` ends before the classifier, and each signature returns its output as `features`
    instead (the backbone a scikit-learn head's export serves, see `pipeline.estimators`).
    A text model (`input_kind="text"`) gets `serving_default` on a batch of strings, each
    cut to its first `max_chars` characters when given (the `data.max_chars` it was trained with).
    `call(images)`, when given, computes `model(images, training=False)` for images of
    `input_shape` (the export's composition of an already traced backbone and the head).
    """
    import tensorflow as tf

    names = tf.constant([str(name) for name in class_names])

    def outputs_of(outputs):
        return {"features": outputs} if features else _outputs(outputs, names, task)

    if input_kind == "text":
        from pipeline.data.text import cut_texts

        def serve_text(text):
            return outputs_of(model(cut_texts(text, max_chars), training=False))

        endpoints = {"serving_default": (serve_text, tf.TensorSpec((None,), tf.string, name="text"))}
        return _save(model, endpoints, path)

    from pipeline.data.decode import decode_bytes, declared_pixels, serving_pixels

    height, width, channels = input_shape

    # The model is traced once, at its own input size; the endpoints call that one function
    # (a call op, not a copy of the graph), so writing and loading trace the network once.
    if call is None:
        def call(images):
            return model(images, training=False)

    @tf.function(input_signature=[tf.TensorSpec((None, *input_shape), tf.float32)], autograph=False)
    def outputs_at_size(images):
        return outputs_of(call(images))

    def serve_float(images):
        return outputs_at_size(serving_pixels(images, input_shape, resize))

    def serve_uint8(images):
        return serve_float(tf.cast(images, tf.float32))

    def decode_checked(contents):
        within = tf.debugging.assert_less_equal(
            declared_pixels(contents), tf.constant(max_pixels, tf.int64),
            message=f"an image's header declares more than {max_pixels} pixels (width x height), the "
                    "limit this model was exported with (data.max_pixels); it was not decoded. Send a "
                    "smaller image",
        )
        with tf.control_dependencies([within]):
            return decode_bytes(contents, channels, (height, width), resize)

    def serve_bytes(images):
        decoded = tf.map_fn(
            decode_checked,
            images,
            fn_output_signature=tf.TensorSpec((height, width, channels), tf.uint8),
        )
        return outputs_at_size(tf.cast(decoded, tf.float32))

    any_image = (None, None, None, None)
    endpoints = {
        "serving_default": (serve_float, tf.TensorSpec(any_image, tf.float32, name="images")),
        "serving_uint8": (serve_uint8, tf.TensorSpec(any_image, tf.uint8, name="images")),
    }
    if channels in (1, 3):
        endpoints["serving_bytes"] = (serve_bytes, tf.TensorSpec((None,), tf.string, name="images"))
    return _save(model, endpoints, path)


def served_input_kind(saved_model: Path) -> str | None:
    """What the SavedModel's `serving_default` takes: `text` (a batch of strings) or `image`.

    Read from `saved_model.pb` without restoring the model (milliseconds, where a load
    takes seconds). None when there is no such signature of one input, or no readable file.
    """
    from google.protobuf.message import DecodeError
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((Path(saved_model) / "saved_model.pb").read_bytes())
    except (OSError, DecodeError):
        return None
    for graph in proto.meta_graphs:
        if "serving_default" in graph.signature_def and len(graph.signature_def["serving_default"].inputs) == 1:
            (tensor,) = graph.signature_def["serving_default"].inputs.values()
            return "text" if tensor.dtype == types_pb2.DT_STRING else "image"
    return None


def _save(model: Any, endpoints: dict[str, tuple[Any, Any]], path: Path) -> Path:
    """Traces each endpoint `(function, input spec)` once and saves them as the signatures.

    The signatures are given as concrete functions, traced here, and the module saved holds
    only what they capture, not the Keras model: `tf.saved_model.save` traces a
    `tf.function` signature again under its save context (a second trace of the whole
    network, ~1.5 s for MobileNetV2 at 96x96 on 2 cores), and serializes and `load` restores
    every `tf.function` attribute of the module besides the signatures (~1 s each way).
    Keras' `ExportArchive` tracks every layer: ~10 s more of a MobileNetV2 export.
    """
    import tensorflow as tf

    signatures = {name: tf.function(function, input_signature=[spec], autograph=False).get_concrete_function()
                  for name, (function, spec) in endpoints.items()}
    tf.saved_model.save(_served_module(model, signatures), str(path), signatures=signatures)
    return Path(path)


def _served_module(model: Any, signatures: dict[str, Any]) -> Any:
    """A `tf.Module` holding what the traced `signatures` capture: the variables they read and
    the SavedModels that the model's layers call (their resources and assets: `SavedModelLayer`s
    of TF Hub and SavedModel sources)."""
    import tensorflow as tf

    from pipeline.sources.saved_model_layer import SavedModelLayer

    captured = {}
    for signature in signatures.values():
        for variable in signature.variables:
            captured[id(variable)] = variable
    module = tf.Module(name="served")
    module.model_variables = list(captured.values())
    module.saved_models = [loaded for layer in _all_layers(model) if isinstance(layer, SavedModelLayer)
                           for loaded in layer.loaded_models]
    return module


def _all_layers(model: Any) -> list[Any]:
    found = []
    for layer in getattr(model, "layers", ()):
        found.append(layer)
        found.extend(_all_layers(layer))
    return found


def write_fixed_size(model: Any, task: Task, input_shape: tuple[int, ...], path: Path) -> Path:
    """A probabilities-only SavedModel on images of exactly `input_shape`: what TFLite converts."""
    import keras
    import tensorflow as tf

    from pipeline.heads import class_probabilities

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        lambda images: {"probabilities": class_probabilities(model(images, training=False), task)},
        [tf.TensorSpec((None, *input_shape), tf.float32, name="images")],
    )
    archive.write_out(str(path), verbose=False)
    return Path(path)


def _outputs(outputs: Any, names: Any, task: Task) -> dict[str, Any]:
    import tensorflow as tf

    from pipeline.heads import class_probabilities

    probabilities = class_probabilities(outputs, task)
    batch = tf.shape(probabilities)[0]
    return {
        "probabilities": probabilities,
        # For multilabel, the most probable label; every label's probability is in the row.
        "class_name": tf.gather(names, tf.argmax(probabilities, axis=-1)),
        "class_names": tf.tile(names[None, :], [batch, 1]),
    }
