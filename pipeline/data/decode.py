"""Decoding image bytes into fixed-size raw pixels: formats, channels and the resize policy.

These are graph functions for `tf.data.Dataset.map`; TensorFlow is imported inside them so
that importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any, Literal

Resize = Literal["resize", "crop_or_pad", "aspect_preserving"]
RESIZE_POLICIES = ("resize", "crop_or_pad", "aspect_preserving")


def decode_bytes(contents: Any, channels: int, image_size: tuple[int, int], resize: Resize) -> Any:
    """JPEG, PNG, BMP, GIF (first frame) or WebP bytes to a uint8 `(H, W, channels)` image.

    Every format is decoded to RGB first (gray is repeated, alpha dropped), which is the one
    request TensorFlow's decoders all accept; `channels=1` then takes the luma.
    """
    import tensorflow as tf

    image = tf.io.decode_image(contents, channels=3, expand_animations=False, dtype=tf.uint8)
    return fit(match_channels(image, channels), image_size, resize)


def match_channels(image: Any, channels: int) -> Any:
    """An image with 1, 2 (gray + alpha), 3 or 4 (RGBA) channels as `channels` (1 or 3)."""
    import tensorflow as tf

    have = image.shape[-1]
    if have is None:  # decided per image, e.g. a TFDS feature of unknown depth
        depth = tf.shape(image)[-1]
        image = tf.cond(depth >= 3, lambda: image[..., :3], lambda: tf.repeat(image[..., :1], 3, -1))
        have = 3
    elif have in (2, 4):
        image = image[..., : have - 1]  # alpha carries no class information here
        have -= 1
    if have == channels:
        return image
    if channels == 3:
        return tf.image.grayscale_to_rgb(image)
    return tf.image.rgb_to_grayscale(image)


def fit(image: Any, image_size: tuple[int, int], resize: Resize) -> Any:
    """A uint8 image of any size to exactly `image_size`, by the chosen policy.

    `resize` stretches (aspect ratio changes, nothing is lost); `crop_or_pad` keeps the
    pixels' scale and centre-crops or zero-pads (cheap, no interpolation, loses borders of
    big images); `aspect_preserving` scales to fit and zero-pads the rest (letterbox).
    """
    import tensorflow as tf

    height, width = image_size
    if resize == "crop_or_pad":
        out = tf.image.resize_with_crop_or_pad(image, height, width)
    elif resize == "aspect_preserving":
        out = tf.image.resize_with_pad(tf.cast(image, tf.float32), height, width)
    elif resize == "resize":
        out = tf.image.resize(image, (height, width))
    else:
        raise ValueError(f"unknown resize policy {resize!r}; expected one of {RESIZE_POLICIES}")
    # Cached as uint8: a quarter of float32's memory, and identical with the cache on or off.
    out = tf.cast(tf.clip_by_value(tf.round(tf.cast(out, tf.float32)), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(out, (height, width, image.shape[-1]))
