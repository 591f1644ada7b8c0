"""Transfer learning in plain Keras, written the way a user would: the baseline that
scripts/benchmark_transfer.py times the pipeline against.

    python scripts/plain_keras_transfer.py /data/flowers --image-size 96 --epochs 10
    python scripts/plain_keras_transfer.py /data/flowers --fine-tune --epochs 5
    python scripts/plain_keras_transfer.py /data/flowers --fine-tune --batchnorm trainable

A `keras.applications.MobileNetV2` backbone (random weights by default, so it runs
offline; `--weights imagenet` downloads them) with a Dense softmax head, images from
`keras.utils.image_dataset_from_directory` with `cache()` and `prefetch`, `model.fit`,
`model.evaluate` on the test images and `model.save`. The backbone is frozen unless
`--fine-tune`. With `--fine-tune`, `--batchnorm` says what its BatchNorm layers do:
`frozen` (the default, what the pipeline's `freeze=none` does by default) sets each of
them `trainable = False`, so they run in inference mode with fixed statistics and fixed
scale/offset; `trainable` lets them train (batch statistics, moving statistics updated,
scale/offset learned), like the pipeline's `freeze.batchnorm=trainable`.

Not `base(x, training=False)`: in Keras 3, `model.fit` calls the outer model with
`training=True` and the functional graph passes that on to every nested call, overriding
the `training=False` written at construction (keras-team/keras#20285), so the BatchNorm
layers of an unfrozen base would still train. Setting their `trainable` is the switch
Keras 3 honours.

It prints one `work:` line (`describe_work`) with what `fit` will train: variables,
parameters, BatchNorm layers in training mode, XLA and steps per execution, so
scripts/benchmark_transfer.py can check that both sides do the same work.

The folder is split like the pipeline's `data=image_folder`: `--val-split` and
`--test-split` of the images are held out (here at random, seeded, not per class).
Each epoch's end is printed with a wall-clock timestamp, so epoch times can be compared.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def datasets(folder: str, image_size: int, batch_size: int, val_split: float, test_split: float, seed: int):
    """Train, validation and test batches, decoded once and cached in memory."""
    import keras
    import tensorflow as tf

    train, held_out = keras.utils.image_dataset_from_directory(
        folder,
        image_size=(image_size, image_size),
        batch_size=batch_size,
        validation_split=val_split + test_split,
        subset="both",
        seed=seed,
    )
    class_names = train.class_names
    # Keras keeps the held-out images in one seeded order (it shuffles only the training
    # subset on each pass), so taking and skipping images gives disjoint splits; images, not
    # batches, so that a small folder still gets a test split.
    held = len(held_out.file_paths)
    val_images = min(held - 1, max(1, round(held * val_split / (val_split + test_split))))
    images = held_out.unbatch()
    val, test = images.take(val_images).batch(batch_size), images.skip(val_images).batch(batch_size)
    autotune = tf.data.AUTOTUNE
    return (
        train.cache().prefetch(autotune),
        val.cache().prefetch(autotune),
        test.prefetch(autotune),
        class_names,
    )


def build_model(image_size: int, num_classes: int, weights: str | None, fine_tune: bool, dropout: float,
                batchnorm: str = "frozen"):
    import keras

    base = keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3), include_top=False, weights=weights, pooling="avg"
    )
    base.trainable = fine_tune
    if fine_tune and batchnorm == "frozen":
        # Keras 3: a non-trainable BatchNormalization runs in inference mode (moving
        # statistics, fixed gamma/beta), whatever `training` fit passes down.
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.applications.mobilenet_v2.preprocess_input(inputs)
    x = base(x)
    x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def _leaf_layers(layer):
    inner = getattr(layer, "layers", None) or ([layer.layer] if hasattr(layer, "layer") else [])
    if not inner:
        yield layer
    for child in inner:
        yield from _leaf_layers(child)


def describe_work(model) -> str:
    """One line: what `fit` trains on this compiled model, and how Keras will run it.

    The same function describes the pipeline's model in scripts/benchmark_transfer.py.
    A BatchNormalization layer uses batch statistics (and moves its moving statistics)
    in `fit` exactly when it is trainable: `training=True` reaches every nested call.
    """
    import keras
    import numpy as np

    trainable = model.trainable_weights
    params = sum(int(np.prod(v.shape)) for v in trainable)
    norms = [layer for layer in _leaf_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    training = sum(1 for layer in norms if layer.trainable)
    return (f"work: {len(trainable)} trainable variables, {params} trainable parameters; BatchNorm layers in "
            f"training mode {training} of {len(norms)}; jit_compile {model.jit_compile}; "
            f"steps_per_execution {model.steps_per_execution}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="images in one subfolder per class")
    parser.add_argument("--image-size", type=int, default=96, help="images are resized to this square size")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fine-tune", action="store_true", help="train every backbone weight, not just the head")
    parser.add_argument("--batchnorm", choices=("frozen", "trainable"), default="frozen",
                        help="with --fine-tune: frozen BatchNorm layers run in inference mode with fixed "
                             "gamma/beta (the pipeline's default); trainable ones train")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--val-split", type=float, default=0.2)
    parser.add_argument("--test-split", type=float, default=0.2)
    parser.add_argument("--weights", default=None, type=lambda v: None if v.lower() in ("none", "null") else v,
                        help="none (random, offline; the default), imagenet, or a weights file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="plain_model.keras", help="where the trained model is saved")
    args = parser.parse_args(argv)

    import keras

    keras.utils.set_random_seed(args.seed)
    train, val, test, class_names = datasets(
        args.folder, args.image_size, args.batch_size, args.val_split, args.test_split, args.seed
    )
    model = build_model(args.image_size, len(class_names), args.weights, args.fine_tune, args.dropout,
                        args.batchnorm)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    print(describe_work(model), flush=True)
    epoch_end = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: print(f"epoch_end {epoch} {time.time():.3f}", flush=True)
    )
    model.fit(train, validation_data=val, epochs=args.epochs, callbacks=[epoch_end], verbose=2)
    loss, accuracy = model.evaluate(test, verbose=0)
    print(f"test accuracy {accuracy:.4f}  loss {loss:.4f}")
    model.save(args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
