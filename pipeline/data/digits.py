"""`data=digits`: scikit-learn's handwritten digits (ships with the package; works offline)."""

from __future__ import annotations

from pipeline.data.splits import stratified_split
from pipeline.errors import ConfigError
from pipeline.types import DataBundle


class DigitsData:
    """The 8x8 grayscale digits of scikit-learn, as raw 0-255 images.

    Args:
        classes: which digits to keep; they become classes `0..n-1` named by the digit.
        val_split: fraction of each class held out for validation.
        test_split: fraction of each class held out for the final test.
        seed: the split's seed; the same seed gives the same split.

    Example:
        >>> bundle = DigitsData(classes=[5, 6, 7, 8, 9]).load()
        >>> bundle.class_names
        ('5', '6', '7', '8', '9')
    """

    def __init__(
        self,
        classes: list[int],
        val_split: float = 0.2,
        test_split: float = 0.2,
        seed: int = 0,
    ):
        unknown = sorted(set(classes) - set(range(10)))
        repeated = sorted({c for c in classes if list(classes).count(c) > 1})
        if unknown or repeated or len(set(classes)) < 2:
            raise ConfigError(
                f"data.classes={list(classes)!r}: expected at least two distinct digits from 0-9"
                + (f"; {unknown} are not digits" if unknown else "")
                + (f"; {repeated} appear more than once (each digit is one class)" if repeated else "")
            )
        self.classes = [int(c) for c in classes]
        self.val_split = val_split
        self.test_split = test_split
        self.seed = seed

    def load(self) -> DataBundle:
        import numpy as np
        import tensorflow as tf
        from sklearn.datasets import load_digits

        digits = load_digits()
        keep = np.isin(digits.target, self.classes)
        # 0-16 intensities to the raw 0-255 range every source expects.
        images = (digits.images[keep] * (255.0 / 16.0)).astype("float32")[..., None]
        lookup = {digit: index for index, digit in enumerate(self.classes)}
        labels = np.array([lookup[d] for d in digits.target[keep]], dtype="int64")
        train, val, test = stratified_split(labels, self.val_split, self.test_split, self.seed)
        positions = np.flatnonzero(keep)  # each kept image's index in load_digits()

        def dataset(indices):
            return tf.data.Dataset.from_tensor_slices((images[indices], labels[indices]))

        return DataBundle(
            train=dataset(train),
            val=dataset(val),
            test=dataset(test),
            class_names=tuple(str(c) for c in self.classes),
            input_shape=images.shape[1:],
            task="multiclass",
            num_examples={"train": len(train), "val": len(val), "test": len(test)},
            fingerprint=_fingerprint(images, labels, (train, val, test)),
            resizable=False,  # 8x8x1 arrays: only source.input_shape can change to match
            example_ids={split: [str(i) for i in positions[indices]]
                         for split, indices in zip(("train", "val", "test"), (train, val, test))},
        )


def _fingerprint(images, labels, splits) -> str:
    """The pixels, labels and split membership: what caches and reruns must match."""
    import hashlib

    digest = hashlib.sha256(images.tobytes())
    digest.update(labels.tobytes())
    for indices in splits:
        digest.update(indices.tobytes())
    return digest.hexdigest()
