"""Preprocessing that belongs to the source model, applied inside it on raw 0-255 pixels."""

from __future__ import annotations

from typing import get_args

import keras
from keras import ops

from pipeline.types import Preprocess

PREPROCESS_MODES: tuple[str, ...] = get_args(Preprocess)

_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="pipeline")
class PreprocessLayer(keras.layers.Layer):
    """Maps raw 0-255 pixels to what a source model expects, as `keras.applications` does.

    Args:
        mode: `unit` (0-1), `tf` (-1 to 1), `torch` (0-1 then ImageNet mean/std),
            `caffe` (RGB to BGR, minus the ImageNet mean), or `none`.

    Example:
        >>> PreprocessLayer("tf")(np.full((1, 2, 2, 3), 255.0))  # all ones
    """

    def __init__(self, mode: str = "none", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"preprocess={mode!r}: expected one of {', '.join(PREPROCESS_MODES)}")
        self.mode = mode

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=x.dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=x.dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=x.dtype)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
