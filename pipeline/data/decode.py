"""The one path for pixels: image bytes or raw pixels to what the model was trained on.

Decoding, channel conversion and the resize policy are written here once. The data stage
maps them over its files (`decode_bytes`), and the export puts the very same functions into
the served graph (`serving_pixels`, through `pipeline.data.layers.ServingImages`), so that a
served image is treated exactly as a training and evaluation image was.

These are graph functions for `tf.data.Dataset.map` and `tf.function`; TensorFlow is
imported inside them so that importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any, Literal

Resize = Literal["resize", "crop_or_pad", "aspect_preserving"]
RESIZE_POLICIES = ("resize", "crop_or_pad", "aspect_preserving")
MAX_PIXELS = 100_000_000  # width x height read from a file, by default (100 MP: 300 MB decoded)


def decode_bytes(contents: Any, channels: int, image_size: tuple[int, int], resize: Resize) -> Any:
    """JPEG, PNG, BMP, GIF (first frame) or WebP bytes to a uint8 `(H, W, channels)` image.

    Every format is decoded to RGB first (gray is repeated, alpha dropped), which is the one
    request TensorFlow's decoders all accept; `channels=1` then takes the luma.
    """
    return fit(match_channels(read_pixels(contents), channels), image_size, resize)


def read_pixels(contents: Any) -> Any:
    """Encoded image bytes to uint8 RGB pixels `(H, W, 3)` at the file's own size."""
    import tensorflow as tf

    return tf.io.decode_image(contents, channels=3, expand_animations=False, dtype=tf.uint8)


def serving_pixels(images: Any, input_shape: tuple[int, int, int], resize: Resize) -> Any:
    """A batch of raw 0-255 pixels of any size and 1-4 channels to float32 `input_shape`.

    Images already of `input_shape` pass unchanged (every policy is the identity there, and
    pixels the data stage gives, such as the digits' fractional values, are left as they
    are). Any other batch takes the data stage's own path: whole 0-255 values in uint8,
    `match_channels`, then `fit` by the `resize` policy the model was trained with.
    """
    import tensorflow as tf

    height, width, channels = input_shape
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    same = tf.reduce_all(tf.equal(shape[1:], [height, width, channels]))

    def unchanged():
        return tf.cast(images, tf.float32)

    def converted():
        pixels = tf.cast(tf.clip_by_value(tf.round(tf.cast(images, tf.float32)), 0.0, 255.0), tf.uint8)
        return tf.cast(fit(match_channels(pixels, channels), (height, width), resize), tf.float32)

    out = tf.cond(same, unchanged, converted)
    return tf.ensure_shape(out, (None, height, width, channels))


def match_channels(image: Any, channels: int) -> Any:
    """An image with 1, 2 (gray + alpha), 3 or 4 (RGBA) channels as `channels` (1 or 3)."""
    import tensorflow as tf

    have = image.shape[-1]
    if have is None:  # decided per image: a TFDS feature of unknown depth, a served batch
        # The same choices as for a known depth below: alpha dropped, gray kept as gray.
        depth = tf.shape(image)[-1]
        if channels == 1:
            return tf.cond(depth >= 3, lambda: tf.image.rgb_to_grayscale(image[..., :3]), lambda: image[..., :1])
        return tf.cond(depth >= 3, lambda: image[..., :3], lambda: tf.repeat(image[..., :1], 3, -1))
    if have in (2, 4):
        image = image[..., : have - 1]  # alpha carries no class information here
        have -= 1
    if have == channels:
        return image
    if channels == 3:
        return tf.image.grayscale_to_rgb(image)
    return tf.image.rgb_to_grayscale(image)


def fit(image: Any, image_size: tuple[int, int], resize: Resize) -> Any:
    """A uint8 image (or a batch of them) of any size to exactly `image_size`, by the chosen policy.

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
    return tf.ensure_shape(out, (*image.shape[:-3], height, width, image.shape[-1]))


def declared_pixels(contents: Any) -> Any:
    """Width x height that an encoded image's header declares (int64), read without decoding.

    JPEG, PNG, GIF, BMP and WebP headers; 0 for anything else (the decoder then refuses it).
    The graph twin of the pre-scan's check, so that a server never decodes a 48 KB file
    that declares 20000 x 20000 pixels.
    """
    import tensorflow as tf

    head = tf.io.decode_raw(tf.strings.substr(contents, 0, 32), tf.uint8)
    head = tf.cast(tf.pad(head, [[0, 32 - tf.shape(head)[0]]]), tf.int64)

    def number(start, size, big_endian=False):
        digits = head[start : start + size]
        weights = tf.constant([256**i for i in range(size)], tf.int64)
        return tf.reduce_sum(digits * (weights[::-1] if big_endian else weights))

    def starts(magic: bytes, at: int = 0):
        return tf.reduce_all(tf.equal(head[at : at + len(magic)], list(magic)))

    def jpeg():
        shape = tf.image.extract_jpeg_shape(contents, output_type=tf.int64)
        return shape[0] * shape[1]

    def webp():
        vp8x = (number(24, 3) + 1) * (number(27, 3) + 1)
        lossless = number(21, 4)
        vp8l = (lossless % 16384 + 1) * ((lossless // 16384) % 16384 + 1)
        vp8 = (number(26, 2) % 16384) * (number(28, 2) % 16384)
        return tf.case([(starts(b"VP8X", 12), lambda: vp8x), (starts(b"VP8L", 12), lambda: vp8l)], default=lambda: vp8)

    def signed(value):  # BMP heights are negative for top-down files
        return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

    return tf.case(
        [
            (starts(b"\xff\xd8"), jpeg),
            (starts(b"\x89PNG"), lambda: number(16, 4, True) * number(20, 4, True)),
            (starts(b"GIF8"), lambda: number(6, 2) * number(8, 2)),
            (starts(b"BM"), lambda: signed(number(18, 4)) * signed(number(22, 4))),
            (tf.logical_and(starts(b"RIFF"), starts(b"WEBP", 8)), webp),
        ],
        default=lambda: tf.constant(0, tf.int64),
    )
