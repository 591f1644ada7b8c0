"""`data.augmentation`: random changes to training batches, built from config.

The data option receives an `Augmentation` (Hydra builds the nested node) and puts its
`build()` into `DataBundle.augmentation`; the train stage applies that to training batches
only. Keras is imported in `build()`, so config checks stay TensorFlow-free.
"""

from __future__ import annotations

from typing import Any, Literal

from pipeline.errors import ConfigError

Flip = Literal["none", "horizontal", "vertical", "horizontal_and_vertical"]
FLIPS = ("none", "horizontal", "vertical", "horizontal_and_vertical")
# key -> (largest sensible value, what the value means); 0 turns the change off.
RANGES = {
    "rotation": (0.5, "a fraction of a full turn: 0.05 rotates up to +-18 degrees"),
    "zoom": (0.9, "the largest zoom in or out, as a fraction: 0.1 is +-10%"),
    "crop": (0.9, "the largest fraction of each side cut off before resizing back: 0.2"),
    "brightness": (1.0, "the largest shift as a fraction of 0-255: 0.1 is +-25 levels"),
    "contrast": (1.0, "the largest contrast change as a fraction: 0.2"),
}


class Augmentation:
    """Random flips, rotations, zooms, crops, brightness and contrast on raw 0-255 images.

    Each change draws new random values per image and per batch; in inference (and on
    validation or test data) the model never sees it.

    Args:
        flip: none, horizontal, vertical or horizontal_and_vertical (mirror images).
        rotation: largest rotation as a fraction of a full turn (0.05 is +-18 degrees).
        zoom: largest zoom in or out as a fraction of the image size (0.1 is +-10%).
        crop: largest fraction of each side cut off at a random place; the crop is resized
            back to the image size (a "random resized crop").
        brightness: largest brightness shift as a fraction of the 0-255 range.
        contrast: largest contrast change as a fraction.
        seed: seeds the random layers; the same seed repeats the same sequence.

    Example:
        >>> augment = Augmentation(flip="horizontal", rotation=0.05, seed=0).build()
        >>> batch = augment(images, training=True)   # images: (batch, H, W, C) in 0-255
    """

    def __init__(
        self,
        flip: Flip = "none",
        rotation: float = 0.0,
        zoom: float = 0.0,
        crop: float = 0.0,
        brightness: float = 0.0,
        contrast: float = 0.0,
        seed: int = 0,
    ):
        if flip not in FLIPS:
            raise ConfigError(
                f"data.augmentation.flip={flip!r}: expected one of {', '.join(FLIPS)}"
            )
        values = {"rotation": rotation, "zoom": zoom, "crop": crop,
                  "brightness": brightness, "contrast": contrast}
        for key, value in values.items():
            largest, meaning = RANGES[key]
            if isinstance(value, bool) or not 0.0 <= float(value) <= largest:
                raise ConfigError(
                    f"data.augmentation.{key}={value!r}: expected a number from 0 (off) to "
                    f"{largest}; it is {meaning}."
                )
        self.flip = flip
        self.rotation = float(rotation)
        self.zoom = float(zoom)
        self.crop = float(crop)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.seed = seed

    @property
    def enabled(self) -> bool:
        return self.flip != "none" or any(
            (self.rotation, self.zoom, self.crop, self.brightness, self.contrast)
        )

    def build(self) -> Any:
        """A `keras.Sequential` of the random layers that are on, or None when all are off."""
        if not self.enabled:
            return None
        import keras

        from pipeline.data.layers import RandomResizedCrop

        # Each layer its own seed: one shared seed would correlate, say, flips and rotations.
        seeds = iter(range(self.seed, self.seed + 6))
        layers = []
        if self.flip != "none":
            layers.append(keras.layers.RandomFlip(self.flip, seed=next(seeds)))
        if self.crop:
            layers.append(RandomResizedCrop(self.crop, seed=next(seeds)))
        if self.rotation:
            layers.append(keras.layers.RandomRotation(self.rotation, seed=next(seeds)))
        if self.zoom:
            layers.append(keras.layers.RandomZoom(self.zoom, seed=next(seeds)))
        if self.brightness:
            layers.append(keras.layers.RandomBrightness(self.brightness, (0, 255), seed=next(seeds)))
        if self.contrast:
            layers.append(keras.layers.RandomContrast(self.contrast, (0, 255), seed=next(seeds)))
        return keras.Sequential(layers, name="augmentation")

    def __repr__(self) -> str:
        return (f"Augmentation(flip={self.flip!r}, rotation={self.rotation}, zoom={self.zoom}, "
                f"crop={self.crop}, brightness={self.brightness}, contrast={self.contrast}, "
                f"seed={self.seed})")
