"""Is training input-bound? Compare the input pipeline's images/s with a train step's.

    python scripts/benchmark_input.py                    # 256 synthetic JPEGs in a temp dir
    python scripts/benchmark_input.py /data/flowers --image-size 224 --model mobilenet_v2
    python scripts/benchmark_input.py --model tiny       # a small CNN: shows an input-bound case

The input side is `data=image_folder` as training uses it (read, decode, resize in
parallel, batched, prefetched; cache off unless --cache memory), timed over whole passes
after a warm-up batch. The train side is `model.train_on_batch` on one in-memory batch, so
it measures compute alone. Both are measured separately on the same machine; in a real run
they share the CPU, so the true rate is below the smaller of the two. A ratio
input/train below 1 means the accelerator (or CPU) waits for data: cache, use more cores
for decoding, or store smaller images.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def synthetic_folder(root: Path, num_images: int, size: tuple[int, int], classes: int = 2) -> Path:
    """`num_images` photo-sized JPEGs (smooth gradients plus noise) in `classes` folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    height, width = size
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
    for i in range(num_images):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ramp + rng.normal(0, 20, (height, width, 3)) + 20 * (i % classes)
        Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def input_rate(train, batch_size: int, min_images: int) -> tuple[float, float]:
    """Images/s of the batched, prefetched training split, and the first batch's latency."""
    import tensorflow as tf

    batches = train.repeat().batch(batch_size).prefetch(tf.data.AUTOTUNE)
    iterator = iter(batches)
    start = time.perf_counter()
    next(iterator)  # builds the pipeline and fills the prefetch buffer
    first = time.perf_counter() - start
    steps = max(2, -(-min_images // batch_size))
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * batch_size / (time.perf_counter() - start), first


def tiny_cnn(input_shape, num_classes):
    import keras

    layers = keras.layers
    return keras.Sequential([
        keras.Input(input_shape),
        layers.Rescaling(1 / 255),
        layers.Conv2D(16, 3, strides=2, activation="relu"),
        layers.Conv2D(32, 3, strides=2, activation="relu"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(num_classes, activation="softmax"),
    ])


def train_rate(model_name: str, input_shape, num_classes: int, batch_size: int, steps: int) -> float:
    """Images/s of `train_on_batch` on one fixed batch, after two warm-up steps."""
    import keras
    import numpy as np

    if model_name == "tiny":
        model = tiny_cnn(input_shape, num_classes)
    else:
        model = keras.applications.MobileNetV2(
            weights=None, input_shape=input_shape, classes=num_classes, classifier_activation="softmax"
        )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch_size, *input_shape)).astype("float32")
    labels = rng.integers(0, num_classes, batch_size)
    for _ in range(2):  # traces the step function
        model.train_on_batch(images, labels)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(images, labels)
    return steps * batch_size / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="an image folder with class subfolders; default: synthetic")
    parser.add_argument("--num-images", type=int, default=256, help="synthetic images to write")
    parser.add_argument("--source-size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"),
                        help="synthetic images' size (a typical photo data set's)")
    parser.add_argument("--image-size", type=int, default=160, help="the size images are resized to")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", choices=["mobilenet_v2", "tiny"], default="mobilenet_v2")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps (after 2 warm-up steps)")
    parser.add_argument("--cache", choices=["off", "memory"], default="off",
                        help="memory: time the cached pipeline (after one pass fills it)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder
        if folder is None:
            start = time.perf_counter()
            folder = str(synthetic_folder(Path(scratch) / "images", args.num_images, tuple(args.source_size)))
            print(f"wrote {args.num_images} synthetic {args.source_size[0]}x{args.source_size[1]} JPEGs "
                  f"to {folder} in {time.perf_counter() - start:.1f} s")
        run(folder, args)


def run(folder: str, args) -> None:
    import tensorflow as tf

    from pipeline.data.image_folder import ImageFolderData

    size = [args.image_size, args.image_size]
    start = time.perf_counter()
    data = ImageFolderData(train_dir=folder, val_split=0.05, test_split=0.05, image_size=size,
                           cache=None if args.cache == "off" else "memory").load()
    scanned = sum(data.num_examples.values()) + len(data.skipped_files)
    print(f"load (list, pre-scan with Pillow, hash): {scanned} files in {time.perf_counter() - start:.1f} s")
    train = data.train
    if args.cache == "memory":
        for _ in train:  # fill the cache: the timed passes read from memory
            pass
    images = data.num_examples["train"]
    pipeline, first = input_rate(train, args.batch_size, min_images=max(2 * images, 256))
    training = train_rate(args.model, data.input_shape, data.num_classes, args.batch_size, args.steps)
    ratio = pipeline / training
    stages = "decode + resize" if args.cache == "off" else "from the memory cache"
    stages += " + batch + prefetch"
    verdict = "input-bound: the model waits for data" if ratio < 1 else "compute-bound: input keeps up"
    print(
        f"\ncores {os.cpu_count()}, devices {[d.device_type for d in tf.config.list_logical_devices()]}, "
        f"image {args.image_size}x{args.image_size}, batch {args.batch_size}, cache {args.cache}\n"
        f"input pipeline : {pipeline:9.1f} images/s  ({stages}; first batch {first:.2f} s)\n"
        f"train step     : {training:9.1f} images/s  ({args.model}, train_on_batch)\n"
        f"ratio          : {ratio:9.2f}  input/train -> {verdict}"
    )


if __name__ == "__main__":
    main()
