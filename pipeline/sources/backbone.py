"""Puts a source's preprocessing and feature extractor into one Keras model named `backbone`."""

from __future__ import annotations

import keras

from pipeline.sources.preprocess import PreprocessLayer
from pipeline.types import SourceModel


def build_backbone(
    extractor: keras.layers.Layer,
    input_shape: tuple[int, ...],
    preprocess: str,
    description: str,
) -> SourceModel:
    """`images (raw 0-255) -> preprocess -> extractor -> features`, as one Keras model."""
    images = keras.Input(shape=input_shape, name="images")
    features = extractor(PreprocessLayer(preprocess, name="preprocess")(images))
    backbone = keras.Model(images, features, name="backbone")
    return SourceModel(
        backbone=backbone,
        input_shape=tuple(input_shape),
        feature_shape=tuple(features.shape[1:]),
        preprocess=preprocess,
        description=description,
    )
