"""Transfer learning in plain Keras, written the way a user would: the baseline that
scripts/benchmark_transfer.py times the pipeline against.

    python scripts/plain_keras_transfer.py /data/flowers --image-size 96 --epochs 10
    python scripts/plain_keras_transfer.py /data/flowers --fine-tune --epochs 5

A `keras.applications.MobileNetV2` backbone (random weights by default, so it runs
offline; `--weights imagenet` downloads them) with a Dense softmax head, images from
`keras.utils.image_dataset_from_directory` with `cache()` and `prefetch`, `model.fit`,
`model.evaluate` on the test images and `model.save`. The backbone is frozen unless
`--fine-tune`; in both cases it is called with `training=False`, so its BatchNorm layers
keep their statistics (what the pipeline's `freeze=none` does by default).

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
    held_batches = int(held_out.cardinality())
    val_batches = max(1, round(held_batches * val_split / (val_split + test_split)))
    val, test = held_out.take(val_batches), held_out.skip(val_batches)
    autotune = tf.data.AUTOTUNE
    return (
        train.cache().prefetch(autotune),
        val.cache().prefetch(autotune),
        test.prefetch(autotune),
        class_names,
    )


def build_model(image_size: int, num_classes: int, weights: str | None, fine_tune: bool, dropout: float):
    import keras

    base = keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3), include_top=False, weights=weights, pooling="avg"
    )
    base.trainable = fine_tune
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.applications.mobilenet_v2.preprocess_input(inputs)
    x = base(x, training=False)  # BatchNorm in inference mode, also when fine-tuning
    x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="images in one subfolder per class")
    parser.add_argument("--image-size", type=int, default=96, help="images are resized to this square size")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fine-tune", action="store_true", help="train every backbone weight, not just the head")
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
    model = build_model(args.image_size, len(class_names), args.weights, args.fine_tune, args.dropout)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
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
