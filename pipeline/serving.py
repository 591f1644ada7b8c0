"""The SavedModel a client serves: raw images or encoded image files in, probabilities and names out.

Signatures (all return `probabilities` `[batch, columns]`, `class_name` `[batch]`, the most
probable class, and `class_names` `[batch, columns]`, the class of each probability column):

- `serving_default`: `images`, float32 `[batch, height, width, channels]`, raw 0-255
  pixels of any size; resized inside to the model's input size.
- `serving_uint8`: the same for uint8 images (what image decoders return).
- `serving_bytes`: `images`, a string `[batch]` of encoded JPEG, PNG, BMP or GIF files,
  decoded and resized inside (models on 1 or 3 channels).

Binary models have one column: the probability of the last class name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.types import Task

SIGNATURES = ("serving_default", "serving_uint8", "serving_bytes")


def write_saved_model(
    model: Any,
    class_names: tuple[str, ...],
    task: Task,
    input_shape: tuple[int, ...],
    path: Path,
) -> Path:
    """Writes `model` (raw 0-255 images of `input_shape` -> probabilities) with the signatures above."""
    import keras
    import tensorflow as tf

    height, width, channels = input_shape
    names = tf.constant([str(name) for name in class_names])

    # The model is traced once, at its own input size; the endpoints call that one function
    # (a call op, not a copy of the graph), so writing and loading trace the network once.
    @tf.function(input_signature=[tf.TensorSpec((None, *input_shape), tf.float32)], autograph=False)
    def probabilities(images):
        return model(images, training=False)

    def serve_float(images):
        resized = tf.image.resize(images, (height, width))  # the identity at the model's size
        return _outputs(probabilities(resized), names, task)

    def serve_uint8(images):
        return serve_float(tf.cast(images, tf.float32))

    def serve_bytes(images):
        decoded = tf.map_fn(
            lambda contents: decode_image(contents, input_shape),
            images,
            fn_output_signature=tf.TensorSpec((height, width, channels), tf.float32),
        )
        return _outputs(probabilities(decoded), names, task)

    any_size = (None, None, None, channels)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", serve_float, [tf.TensorSpec(any_size, tf.float32, name="images")]
    )
    archive.add_endpoint("serving_uint8", serve_uint8, [tf.TensorSpec(any_size, tf.uint8, name="images")])
    if channels in (1, 3):
        archive.add_endpoint("serving_bytes", serve_bytes, [tf.TensorSpec((None,), tf.string, name="images")])
    archive.write_out(str(path), verbose=False)
    return Path(path)


def write_fixed_size(model: Any, input_shape: tuple[int, ...], path: Path) -> Path:
    """A probabilities-only SavedModel on images of exactly `input_shape`: what TFLite converts."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        lambda images: {"probabilities": model(images, training=False)},
        [tf.TensorSpec((None, *input_shape), tf.float32, name="images")],
    )
    archive.write_out(str(path), verbose=False)
    return Path(path)


def decode_image(contents: Any, input_shape: tuple[int, ...]) -> Any:
    """Encoded image bytes to float32 0-255 pixels of `input_shape` (bilinear resize)."""
    import tensorflow as tf

    height, width, channels = input_shape
    # RGB first: the one request every decoder accepts (GIF refuses channels=1).
    image = tf.io.decode_image(contents, channels=3, expand_animations=False, dtype=tf.uint8)
    if channels == 1:
        image = tf.image.rgb_to_grayscale(image)
    resized = tf.image.resize(tf.cast(image, tf.float32), (height, width))
    return tf.ensure_shape(resized, (height, width, channels))


def _outputs(probabilities: Any, names: Any, task: Task) -> dict[str, Any]:
    import tensorflow as tf

    if task == "binary":  # one sigmoid column: the probability of the last class
        top = tf.where(probabilities > 0.5, names[-1], names[0])[:, 0]
        columns = names[-1:]
    else:  # multiclass, and for multilabel the most probable label
        top = tf.gather(names, tf.argmax(probabilities, axis=-1))
        columns = names
    batch = tf.shape(probabilities)[0]
    return {
        "probabilities": probabilities,
        "class_name": top,
        "class_names": tf.tile(columns[None, :], [batch, 1]),
    }
