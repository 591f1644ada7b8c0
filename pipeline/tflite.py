"""TFLite conversion and inference: float32, float16 or int8 models for phones and edge devices.

The model takes float32 raw 0-255 images of exactly the training size (any batch) and its
`serving_default` signature returns `probabilities`; the class names are in `labels.txt`
beside it. Quantized models keep float32 input and output, so clients feed the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

Quantization = Literal["none", "float16", "int8"]
QUANTIZATIONS = ("none", "float16", "int8")


def convert(saved_model_dir: Path, quantization: Quantization, calibration: Iterable[Any] = ()) -> bytes:
    """The `.tflite` flatbuffer of a SavedModel's `serving_default` signature.

    Args:
        saved_model_dir: a SavedModel whose signature takes a fixed-size image batch.
        quantization: `none` (float32), `float16` (weights in half precision: half the
            size) or `int8` (weights and activations in int8: a quarter the size, faster
            on CPUs and accelerators; activation ranges come from `calibration`).
        calibration: single images (`[height, width, channels]` float32) for `int8`.
    """
    import numpy as np
    import tensorflow as tf

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    if quantization != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        images = [np.asarray(image, dtype="float32")[None] for image in calibration]
        if not images:
            raise ValueError("int8 quantization needs calibration images; none were given")
        converter.representative_dataset = lambda: ([image] for image in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def predict(path: Path, images: Any, batch_size: int = 64) -> Any:
    """Probabilities from a `.tflite` file for float32 raw images, as `tf.lite.Interpreter` runs it."""
    import warnings

    import numpy as np
    import tensorflow as tf

    with warnings.catch_warnings():  # its successor, ai-edge-litert, is not a dependency
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        interpreter = tf.lite.Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner("serving_default")
    images = np.asarray(images, dtype="float32")
    outputs = [
        runner(images=images[start : start + batch_size])["probabilities"]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs)
