"""What the image options share: their settings' checks and the tf.data chain they build.

The chain is `decode in parallel -> cache -> cast to float32`, unbatched; the train stage
shuffles, batches and prefetches. Decoded images are cached as uint8 (a quarter of the
memory of float32) and cast after the cache, so a cached run sees the same pixels as an
uncached one.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.data.decode import MAX_PIXELS, RESIZE_POLICIES, decode_bytes
from pipeline.errors import ConfigError, DataError
from pipeline.types import DataBundle

TASKS = ("multiclass", "binary")


@dataclass(frozen=True)
class ImageSettings:
    """How every image of an option is decoded and kept (see the option's Args)."""

    image_size: tuple[int, int]
    channels: int
    resize: str
    cache: str | None
    deterministic: bool
    max_pixels: int = MAX_PIXELS

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (*self.image_size, self.channels)

    def pixels_fingerprint(self, fingerprint: str) -> str:
        """The files' fingerprint plus what changes the decoded pixels (size, channels, resize)."""
        decoding = {"image_size": list(self.image_size), "channels": self.channels, "resize": self.resize,
                    "max_pixels": self.max_pixels}  # which files are read at all
        return hashlib.sha256((fingerprint + json.dumps(decoding, sort_keys=True)).encode()).hexdigest()

    def cache_key(self, fingerprint: str) -> str:
        """Names file caches: other files or other decode settings never reuse a cache."""
        text = fingerprint + json.dumps(asdict(self) | {"cache": None}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_settings(
    image_size: Sequence[int], channels: int, resize: str, cache: str | None, deterministic: bool,
    max_pixels: int = MAX_PIXELS,
) -> ImageSettings:
    """Checked settings; raises ConfigError naming the `data.` key and the fix."""
    size = list(image_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ConfigError(
            f"data.image_size={size!r}: expected [height, width] in pixels, for example "
            "data.image_size=[224,224]"
        )
    if channels not in (1, 3):
        raise ConfigError(f"data.channels={channels!r}: expected 1 (grayscale) or 3 (RGB)")
    if resize not in RESIZE_POLICIES:
        raise ConfigError(
            f"data.resize={resize!r}: expected one of {', '.join(RESIZE_POLICIES)}"
        )
    if cache is not None and not str(cache).strip():
        raise ConfigError(
            "data.cache='': expected null (no cache), memory, or a file path prefix such as "
            "/tmp/cache/flowers-"
        )
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(
            f"data.max_pixels={max_pixels!r}: expected a positive number of pixels (width x height), "
            "for example data.max_pixels=100000000 (100 MP)"
        )
    return ImageSettings((size[0], size[1]), channels, resize, cache, bool(deterministic), max_pixels)


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"data.task={task!r}: expected one of {', '.join(TASKS)}")


def check_classes(class_names: Sequence[str], task: str, where: str, examples: str = "images") -> None:
    """Fewer than two classes, or binary without exactly two, is a DataError."""
    if len(class_names) < 2:
        raise DataError(
            f"{where} has {len(class_names)} class(es) {list(class_names)}: a classifier needs "
            f"at least 2. Add {examples} of another class."
        )
    if task == "binary" and len(class_names) != 2:
        raise DataError(
            f"data.task=binary needs exactly 2 classes, but {where} has {len(class_names)}: "
            f"{list(class_names)}. Set data.task=multiclass or keep two classes."
        )


def folder_fixes(classes: Mapping[str, Sized], fractions: Mapping[str, float], dirs: Mapping[str, str | None],
                 noun: str = "image") -> dict[str, str]:
    """What fixes an empty split of a class-folder option (`require_examples`' `fixes`).

    Args:
        classes: class name -> its examples in `data.train_dir`.
        fractions: `val` and `test` -> `data.val_split`, `data.test_split`.
        dirs: `val` and `test` -> `data.val_dir`, `data.test_dir` (None when held out).
        noun: what an example is, `image` or `text`.
    """
    name, members = min(classes.items(), key=lambda item: len(item[1]))
    smallest = f"the smallest class, {name!r}, has {len(members)} {noun}(s)"
    fixes = {
        "train": f"data.val_split and data.test_split leave no training {noun} ({smallest}). "
                 f"Lower them or add {noun}s.",
    }
    for split in ("val", "test"):
        fixes[split] = (
            f"data.{split}_split={fractions[split]} takes no {noun} from any class of data.train_dir "
            f"({smallest}; each class gives round(count * {split}_split)). Raise "
            f"data.{split}_split, add {noun}s, or give data.{split}_dir."
            if not dirs[split] else
            f"data.{split}_dir={dirs[split]!r} holds no usable {noun} of the classes {list(classes)}. "
            f"Add {noun}s there."
        )
    return fixes


def require_examples(counts: dict[str, int], fixes: dict[str, str]) -> None:
    """Fail before training when a split ended up empty, with the option's own fix."""
    for split, count in counts.items():
        if count == 0:
            raise DataError(f"the {split} split is empty: {fixes[split]}")


def file_dataset(paths: Sequence[str], labels: Any, settings: ImageSettings, split: str, key: str):
    """`(image, label)` pairs decoded from files in parallel, then cached."""
    import tensorflow as tf

    decode = decoder(settings)

    def load(path, label):
        return decode(tf.io.read_file(path)), label

    dataset = tf.data.Dataset.from_tensor_slices((list(paths), labels))
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return finish(dataset, settings, split, key)


@functools.lru_cache(maxsize=8)
def decoder(settings: ImageSettings) -> Any:
    """`decode_bytes` with `settings`, as one traced function that every split's `map` calls.

    Traced inline, the decoder (a branch per file format, then the resize) was traced again
    for each split's dataset: about 0.3 s of every run on 2 cores, spent before the first image.
    """
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((), tf.string)], autograph=False)
    def decode(contents):
        return decode_bytes(contents, settings.channels, settings.image_size, settings.resize)

    return decode


def finish(dataset: Any, settings: ImageSettings, split: str, key: str):
    """Cache uint8 images (memory or files), cast them to float32, set determinism."""
    import tensorflow as tf

    if settings.cache == "memory":
        dataset = dataset.cache()
    elif settings.cache:
        prefix = Path(settings.cache).expanduser()
        prefix.parent.mkdir(parents=True, exist_ok=True)
        dataset = dataset.cache(f"{prefix}{split}-{key}")
    dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = settings.deterministic
    return dataset.with_options(options)


def make_bundle(
    splits: dict[str, Any],
    counts: dict[str, int],
    class_names: Sequence[str],
    settings: ImageSettings,
    task: str,
    augmentation: Any,
    skipped: Sequence[str],
    fingerprint: str,
    example_ids: dict[str, Sequence[str]] | None = None,
) -> DataBundle:
    return DataBundle(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        class_names=tuple(class_names),
        input_shape=settings.input_shape,
        task=task,
        num_examples=dict(counts),
        augmentation=augmentation.build() if augmentation is not None else None,
        skipped_files=tuple(skipped),
        fingerprint=settings.pixels_fingerprint(fingerprint),
        resize=settings.resize,
        max_pixels=settings.max_pixels,
        example_ids=dict(example_ids or {}),
    )
