"""Tiny image files for the data tests: every format, gray and RGB, and broken ones.

Each image is a flat colour that encodes its class (red-ish, green-ish, ...), so a test can
tell from the decoded pixels which file an element came from.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = {"jpg": "JPEG", "png": "PNG", "bmp": "BMP", "gif": "GIF"}
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


def image_bytes(shape=(12, 16), colour=(200, 30, 30), fmt="PNG", gray=False, seed=0) -> bytes:
    """An image of `shape` (H, W) in `fmt`; a flat colour with a little noise."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.integers(-8, 8, (*shape, 3)), 0, 255)
    image = Image.fromarray(pixels.astype("uint8"))
    if gray:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def write_image(path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = FORMATS[path.suffix.lstrip(".").lower()]
    path.write_bytes(image_bytes(fmt=fmt, **kwargs))
    return path


def truncated_jpeg(path: Path) -> Path:
    data = image_bytes(shape=(128, 128), fmt="JPEG", seed=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_folder(root: Path, per_class: int = 10, classes=("cat", "dog", "emu")) -> Path:
    """`root/<class>/<i>.<fmt>`: the four formats in turn, every third one grayscale."""
    suffixes = list(FORMATS)
    for c, name in enumerate(classes):
        for i in range(per_class):
            suffix = suffixes[i % len(suffixes)]
            write_image(root / name / f"{i:02d}.{suffix}", colour=COLOURS.get(name, (90, 90, 90)),
                        shape=(10 + i, 14 + c), gray=(i % 3 == 2), seed=100 * c + i)
    return root


def dataset_arrays(dataset):
    pairs = list(dataset.as_numpy_iterator())
    return np.stack([x for x, _ in pairs]), np.array([y for _, y in pairs])


def class_of(images: np.ndarray) -> list[str]:
    """Which COLOURS entry each decoded image came from, by its mean luma.

    Luma tells the classes apart (81, 130, 49) for RGB and grayscale files alike.
    """
    weights = np.array([0.299, 0.587, 0.114])
    means = images.reshape(len(images), -1, images.shape[-1]).mean(axis=1)
    lumas = means @ weights if images.shape[-1] == 3 else means[:, 0]
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names]) @ weights
    return [names[int(np.argmin(np.abs(palette - luma)))] for luma in lumas]
