"""Keras layers that Keras lacks: a random crop for augmentation and the served pixel path.

Keras and TensorFlow are imported at the top: import this module only where they are used."""

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


@keras.saving.register_keras_serializable(package="pipeline")
class ServingImages(keras.layers.Layer):
    """The data stage's pixel path as the first layer of an exported model.

    Takes raw 0-255 pixels of any size and 1-4 channels and gives float32 images of
    `image_shape`, by `pipeline.data.decode.serving_pixels`: unchanged at the training
    size, otherwise rounded to whole values, channels converted and resized by the
    `resize` policy the model was trained with (the functions the data stage used).

    Args:
        image_shape: `(height, width, channels)` the model takes.
        resize: `resize`, `crop_or_pad` or `aspect_preserving`, as `data.resize`.

    Example:
        >>> ServingImages((8, 8, 1), "aspect_preserving")(np.zeros((2, 30, 10, 3))).shape
        TensorShape([2, 8, 8, 1])
    """

    def __init__(self, image_shape, resize: str = "resize", **kwargs):
        super().__init__(**kwargs)
        self.image_shape = tuple(int(v) for v in image_shape)
        self.resize = resize

    def call(self, images):
        from pipeline.data.decode import serving_pixels

        return serving_pixels(images, self.image_shape, self.resize)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.image_shape)

    def get_config(self):
        return {**super().get_config(), "image_shape": list(self.image_shape), "resize": self.resize}


@keras.saving.register_keras_serializable(package="pipeline")
class ServingTexts(keras.layers.Layer):
    """The data stage's cut of each text (`data.max_chars`) as the first layer of an exported
    text model: each string's first `max_chars` characters (`pipeline.data.text.cut_texts`).

    Example:
        >>> ServingTexts(4)(tf.constant(["Crème brûlée"]))
        <tf.Tensor: shape=(1,), dtype=string, numpy=array([b'Cr\xc3\xa8m'], dtype=object)>
    """

    def __init__(self, max_chars: int, **kwargs):
        super().__init__(**kwargs)
        self.max_chars = int(max_chars)

    def call(self, texts):
        from pipeline.data.text import cut_texts

        return cut_texts(texts, self.max_chars)

    def compute_output_spec(self, texts):
        return keras.KerasTensor(texts.shape, dtype="string")

    def get_config(self):
        return {**super().get_config(), "max_chars": self.max_chars}
