"""Keras layers that Keras lacks; imported only when augmentation is built (Keras at top)."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="pipeline")
class RandomResizedCrop(keras.layers.Layer):
    """Crop a random window of each image and resize it back; the identity in inference.

    Keras's `RandomCrop` changes the output size and centre-crops in inference, which would
    make validation images differ from what serving sees; this one keeps both unchanged.

    Args:
        crop: the largest fraction of each side cut off; the window's side is drawn from
            `[1 - crop, 1]` of the image's, at a random place, with the aspect ratio kept.
        seed: the random stream's seed.

    Example:
        >>> RandomResizedCrop(0.2, seed=0)(images, training=True).shape == images.shape
        True
    """

    def __init__(self, crop: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.crop = crop
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):
        if not training or not self.crop:
            return images
        batch = tf.shape(images)[0]
        size = tf.shape(images)[1:3]
        side = keras.random.uniform((batch, 1), 1.0 - self.crop, 1.0, seed=self.seed_generator)
        start = keras.random.uniform((batch, 2), 0.0, 1.0, seed=self.seed_generator) * (1.0 - side)
        boxes = tf.concat([start, start + side], axis=1)  # normalised [y1, x1, y2, x2]
        cropped = tf.image.crop_and_resize(images, boxes, tf.range(batch), size)
        return tf.cast(cropped, images.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "crop": self.crop, "seed": self.seed}
