"""Builds the pre-trained source model that the default experiment transfers from.

    python scripts/build_demo_source.py [--output pipeline/assets/digits_0to4]

A small CNN is trained with tf_keras on scikit-learn's handwritten digits 0-4 (the source
task) and its feature extractor is written with `tf.saved_model.save`: the TF Hub
reusable-SavedModel format, the same format as a TF Hub `feature_vector` model, so the
default experiment loads it through exactly the code path of a model from TF Hub. The
default experiment then transfers it to digits 5-9, which it has never seen.

`--epochs 0 --output DIR` writes the same network untrained, the baseline that shows what
the pre-training is worth (README, "Does the transfer work?").

Like TF Hub image models it takes images scaled to 0-1 (`preprocess: unit`) of shape
8x8x1, and its `__call__` takes `training`, so BatchNorm and dropout follow the mode.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SOURCE_CLASSES = (0, 1, 2, 3, 4)
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "digits_0to4"


def build(output: Path, epochs: int = 40, seed: int = 0) -> float:
    """Train on digits 0-4, save the feature extractor to `output`; returns held-out accuracy."""
    import numpy as np
    import tensorflow as tf
    import tf_keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    tf_keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    digits = load_digits()
    keep = np.isin(digits.target, SOURCE_CLASSES)
    images = (digits.images[keep] / 16.0).astype("float32")[..., None]
    labels = digits.target[keep]
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=seed
    )

    layers = tf_keras.layers
    inputs = tf_keras.Input(shape=(8, 8, 1), name="images")
    x = inputs
    for filters in (32, 64):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    features = layers.Dropout(0.1)(x)
    extractor = tf_keras.Model(inputs, features, name="digits_0to4_feature_vector")

    classifier = tf_keras.Sequential(
        [extractor, layers.Dense(len(SOURCE_CLASSES), activation="softmax")]
    )
    classifier.compile(
        optimizer=tf_keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    if epochs:  # --epochs 0 writes the untrained network: the no-transfer baseline
        classifier.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    _, accuracy = classifier.evaluate(x_test, y_test, verbose=0)

    # Write next to the target and swap in, so an interrupted build never leaves half a model.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=output.parent))
    try:
        tf.saved_model.save(extractor, str(staging / "model"))
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging / "model", output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return float(accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    accuracy = build(args.output, args.epochs, args.seed)
    size = sum(f.stat().st_size for f in args.output.rglob("*") if f.is_file())
    print(f"source task (digits 0-4) held-out accuracy: {accuracy:.4f}")
    print(f"wrote {args.output} ({size / 1e6:.2f} MB, TF Hub reusable SavedModel)")


if __name__ == "__main__":
    main()
