"""decode.py and scan.py: every format, channels both ways, the resize policies, the pre-scan."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from image_files import image_bytes
from pipeline.data import scan
from pipeline.data.decode import decode_bytes, fit, match_channels

RED = (200, 30, 30)


def _decode(data: bytes, channels=3, size=(12, 16), resize="resize") -> np.ndarray:
    import tensorflow as tf

    return decode_bytes(tf.constant(data), channels, size, resize).numpy()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "WEBP"])
@pytest.mark.parametrize("gray", [False, True], ids=["rgb", "gray"])
def test_every_format_decodes_to_rgb_uint8_of_the_right_colour(fmt, gray):
    image = _decode(image_bytes(shape=(12, 16), colour=RED, fmt=fmt, gray=gray))
    assert image.shape == (12, 16, 3) and image.dtype == np.uint8
    mean = image.reshape(-1, 3).mean(axis=0)
    if gray:  # a gray file becomes three equal channels at its luma (81 for this red)
        spread = image.astype(int).max(axis=-1) - image.astype(int).min(axis=-1)
        assert spread.max() <= (4 if fmt == "WEBP" else 0)  # lossy WebP stores gray as YUV
        assert abs(mean[0] - 81) < 12
    else:
        assert np.allclose(mean, RED, atol=14), mean


def test_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    image = _decode(buffer.getvalue(), size=(6, 8))
    assert image.shape == (6, 8, 3)
    assert image[..., 0].mean() > 200 and image[..., 2].mean() < 50  # red, not the blue frame


def test_rgb_to_one_channel_is_the_luma():
    image = _decode(image_bytes(colour=RED, fmt="PNG"), channels=1)
    assert image.shape == (12, 16, 1)
    assert abs(image.mean() - (0.299 * 200 + 0.587 * 30 + 0.114 * 30)) < 6


def test_gray_stays_exact_with_one_channel():
    data = image_bytes(shape=(12, 16), fmt="PNG", gray=True, seed=3)
    original = np.array(Image.open(io.BytesIO(data)))
    image = _decode(data, channels=1, resize="crop_or_pad")  # same size: no interpolation
    np.testing.assert_array_equal(image[..., 0], original)


def test_alpha_is_dropped():
    import tensorflow as tf

    rgba = tf.constant(np.full((4, 4, 4), 100, dtype="uint8"))
    assert match_channels(rgba, 3).shape == (4, 4, 3)
    gray_alpha = tf.constant(np.full((4, 4, 2), 100, dtype="uint8"))
    assert match_channels(gray_alpha, 3).shape == (4, 4, 3)
    assert match_channels(gray_alpha, 1).shape == (4, 4, 1)


def _ramp(height: int, width: int):
    import tensorflow as tf

    values = np.arange(1, height * width + 1, dtype="float32").reshape(height, width, 1)
    return tf.constant((values * (250 / values.max())).astype("uint8"))


def test_resize_stretches_to_the_size():
    out = fit(_ramp(10, 20), (8, 8), "resize").numpy()
    assert out.shape == (8, 8, 1) and out.dtype == np.uint8
    assert (out > 0).all()  # stretched: no padding anywhere


def test_crop_or_pad_pads_small_and_centre_crops_big_images():
    small = _ramp(4, 6)
    padded = fit(small, (8, 8), "crop_or_pad").numpy()
    assert padded.shape == (8, 8, 1)
    np.testing.assert_array_equal(padded[2:6, 1:7], small.numpy())  # unscaled, centred
    assert padded[:2].sum() == 0 and padded[:, :1].sum() == 0
    big = _ramp(10, 12)
    cropped = fit(big, (8, 8), "crop_or_pad").numpy()
    np.testing.assert_array_equal(cropped, big.numpy()[1:9, 2:10])


def test_aspect_preserving_scales_to_fit_and_pads_the_rest():
    out = fit(_ramp(10, 20), (8, 8), "aspect_preserving").numpy()
    assert out.shape == (8, 8, 1)
    # 10x20 scaled by 0.4 is 4x8: two zero rows above and below, no column padding.
    assert out[:2].sum() == 0 and out[6:].sum() == 0
    assert (out[2:6] > 0).all()


def test_unknown_resize_policy_is_refused():
    with pytest.raises(ValueError, match="stretch"):
        fit(_ramp(4, 4), (8, 8), "stretch")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "WEBP"])
def test_prescan_accepts_the_formats_tensorflow_decodes(fmt):
    assert scan.image_problem(image_bytes(fmt=fmt)) is None
    assert scan.image_problem(image_bytes(fmt=fmt, gray=True)) is None


def test_prescan_finds_broken_and_foreign_files():
    jpeg = image_bytes(shape=(128, 128), fmt="JPEG")
    assert "cannot be decoded" in scan.image_problem(jpeg[: len(jpeg) // 2])
    assert scan.image_problem(b"just some text\n").startswith("not an image")
    assert "TIFF" in scan.image_problem(image_bytes(fmt="TIFF"))
    palette = io.BytesIO()
    Image.new("RGB", (4, 4), RED).convert("P").save(palette, "BMP")
    assert "palette" in scan.image_problem(palette.getvalue())


def test_fingerprint_covers_files_and_settings_not_their_order():
    files = [("a/1.jpg", 10, "aa"), ("b/2.jpg", 20, "bb")]
    digest = scan.fingerprint(files, {"seed": 0})
    assert digest == scan.fingerprint(files[::-1], {"seed": 0})
    assert digest != scan.fingerprint(files, {"seed": 1})
    assert digest != scan.fingerprint([files[0], ("b/2.jpg", 20, "bc")], {"seed": 0})
    assert digest != scan.fingerprint([files[0], ("b/3.jpg", 20, "bb")], {"seed": 0})
