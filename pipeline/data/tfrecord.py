"""`data=tfrecord`: `tf.train.Example` shards holding encoded images and their labels."""

from __future__ import annotations

import os
from typing import Any, Literal

from pipeline.data import dataset, scan
from pipeline.data.augment import Augmentation
from pipeline.data.decode import MAX_PIXELS, Resize
from pipeline.data.splits import stratified_split
from pipeline.errors import DataError
from pipeline.types import DataBundle

CHUNK = 512  # records checked with Pillow at a time: bounds the bytes held in memory


class TFRecordData:
    """Images and labels from TFRecord files of `tf.train.Example`s.

    `load()` reads the shards once up front: to find the labels (for a stratified split),
    to pre-scan every image (undecodable ones are left out and listed in `skipped_files`
    as `file#record`) and to fingerprint the files. The splits then stream the shards and
    keep their own records; `cache: memory` avoids reading the shards three times an epoch.

    Args:
        file_pattern: a glob of the shards (`/data/train-*.tfrecord`), read in sorted order.
        val_file_pattern: a glob of validation shards; null holds out `val_split` of
            `file_pattern`'s records instead.
        test_file_pattern: likewise for the test shards and `test_split`.
        image_key: the bytes feature holding the encoded JPEG/PNG/BMP/GIF.
        label_key: the feature holding the label: an int64 class index or a string.
        class_names: the classes in index order. Null: the sorted distinct string labels,
            or `"0"..."n-1"` for integer labels. With string labels, one outside it is an error.
        val_split: fraction of each class held out for validation.
        test_split: fraction of each class held out for the test.
        image_size: `[height, width]` every image is brought to.
        channels: 1 (grayscale) or 3 (RGB).
        resize: resize, crop_or_pad or aspect_preserving.
        task: multiclass or binary (exactly two classes).
        cache: null, memory, or a file path prefix for decoded images.
        deterministic: keep tf.data's element order reproducible.
        max_pixels: a file whose header declares more pixels (width x height) is left out
            unread, like an undecodable one; the export's `serving_bytes` refuses it.
        augmentation: random changes applied to training batches, or null.
        seed: seeds the split.

    Example:
        >>> TFRecordData(file_pattern="/data/train-*.tfrecord", label_key="label").load().num_examples
        {'train': 600, 'val': 200, 'test': 200}
    """

    def __init__(
        self,
        file_pattern: str,
        val_file_pattern: str | None = None,
        test_file_pattern: str | None = None,
        image_key: str = "image/encoded",
        label_key: str = "image/class/label",
        class_names: list[str] | None = None,
        val_split: float = 0.2,
        test_split: float = 0.2,
        image_size: list[int] = (224, 224),
        channels: Literal[1, 3] = 3,
        resize: Resize = "resize",
        task: Literal["multiclass", "binary"] = "multiclass",
        cache: str | None = None,
        deterministic: bool = True,
        max_pixels: int = MAX_PIXELS,
        augmentation: Augmentation | None = None,
        seed: int = 0,
    ):
        self.settings = dataset.image_settings(image_size, channels, resize, cache, deterministic, max_pixels)
        dataset.check_task(task)
        self.file_pattern = file_pattern
        self.patterns = {"train": file_pattern, "val": val_file_pattern, "test": test_file_pattern}
        self.keys = (image_key, label_key)
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.fractions = (val_split, test_split)
        self.task = task
        self.augmentation = augmentation
        self.seed = seed

    def load(self) -> DataBundle:
        import numpy as np
        import tensorflow as tf

        # Record numbers run across the shards of train, then val, then test patterns.
        files, roles, raw_labels, skipped, origin, names = [], [], [], [], [], []
        for split, pattern in self.patterns.items():
            if pattern is None:
                continue
            shards = self._files(pattern, "data.file_pattern" if split == "train" else f"data.{split}_file_pattern")
            labels_here, skipped_here, names_here = self._read_labels(shards)
            files += shards
            names += names_here
            roles += [split] * len(shards)  # a shard moved to another pattern changes the data
            raw_labels += labels_here
            skipped += skipped_here
            origin += [split] * len(labels_here)
        origin = np.array(origin)
        keep = np.array([label is not None for label in raw_labels])
        if not keep.any():
            raise DataError(f"data.file_pattern={self.file_pattern!r}: no record holds a decodable image.")
        class_names, labels = self._index(raw_labels)
        where = f"data.file_pattern={self.file_pattern!r}"
        dataset.check_classes(class_names, self.task, where)

        # Split the kept records; indices are global record numbers across the sorted shards.
        # A split with shards of its own takes them; the others are held out of train's.
        kept = np.flatnonzero(keep)
        from_train = kept[origin[kept] == "train"]
        val, test = (0.0 if self.patterns[s] else f for s, f in zip(("val", "test"), self.fractions))
        carved = stratified_split(labels[from_train], val, test, self.seed)
        parts = {split: np.sort(from_train[chosen]) for split, chosen in zip(("train", "val", "test"), carved)}
        for split in ("val", "test"):
            if self.patterns[split]:
                parts[split] = kept[origin[kept] == split]
        counts = {split: len(indices) for split, indices in parts.items()}
        dataset.require_examples(counts, {
            "train": f"data.val_split={val} and data.test_split={test} leave no training record.",
            "val": f"data.val_split={val} takes no record from any class; raise it or add records."
                   if not self.patterns["val"] else
                   f"data.val_file_pattern={self.patterns['val']!r} holds no decodable record.",
            "test": f"data.test_split={test} takes no record from any class; raise it or add records."
                    if not self.patterns["test"] else
                    f"data.test_file_pattern={self.patterns['test']!r} holds no decodable record.",
        })

        fingerprint = scan.fingerprint(
            [(f"{role}:{name}", *scan.file_digest(file, tf.io.gfile.GFile))
             for role, name, file in zip(roles, _relative_names(files), files)],
            {"option": "tfrecord", "seed": self.seed, "val_split": val, "test_split": test,
             "keys": self.keys, "class_names": class_names},
        )
        key = self.settings.cache_key(fingerprint)
        splits = {split: self._split(files, labels, indices, split, key) for split, indices in parts.items()}
        ids = {split: [names[i] for i in indices] for split, indices in parts.items()}
        return dataset.make_bundle(splits, counts, class_names, self.settings, self.task,
                                   self.augmentation, [s for s, _ in skipped], fingerprint, ids)

    def _files(self, pattern: str, key: str) -> list[str]:
        import tensorflow as tf

        files = sorted(tf.io.gfile.glob(os.path.expanduser(pattern)))
        if not files:
            raise DataError(
                f"{key}={pattern!r} matches no file: check the folder and the glob (for example "
                "/data/train-*.tfrecord)."
            )
        return files

    def _read_labels(self, files: list[str]) -> tuple[list[Any], list[tuple[str, str]], list[str]]:
        """Each record's raw label (None when its image is skipped), the skipped records, and
        each record's id (`<file>:<record index in the file>`)."""
        import tensorflow as tf

        labels: list[Any] = []
        skipped: list[tuple[str, str]] = []
        names: list[str] = []
        for file in files:
            chunk: list[tuple[str, Any, bytes]] = []
            try:
                for number, record in enumerate(tf.data.TFRecordDataset(file).as_numpy_iterator()):
                    chunk.append((f"{file}#{number}", *self._features(file, number, record)))
                    names.append(f"{file}:{number}")
                    if len(chunk) == CHUNK:
                        self._check_chunk(chunk, labels, skipped, self.settings.max_pixels)
                        chunk = []
            except tf.errors.OpError as error:
                raise DataError(
                    f"data.file_pattern={self.file_pattern!r}: {file!r} is not a readable "
                    f"TFRecord file ({error.message.splitlines()[0]}). Rewrite or remove that shard."
                ) from error
            self._check_chunk(chunk, labels, skipped, self.settings.max_pixels)
        scan.report_skipped(skipped, len(labels), f"data.file_pattern={self.file_pattern!r}")
        return labels, skipped, names

    def _features(self, file: str, number: int, record: bytes) -> tuple[Any, bytes]:
        import tensorflow as tf

        features = tf.train.Example.FromString(record).features.feature
        image_key, label_key = self.keys
        for key, name in (("data.image_key", image_key), ("data.label_key", label_key)):
            if name not in features:
                raise DataError(
                    f"{file!r} record {number} has no feature {name!r} ({key}); its features "
                    f"are {sorted(features)}. Set {key} to one of them."
                )
        image = features[image_key].bytes_list.value
        label = features[label_key]
        values = label.int64_list.value or [v.decode() for v in label.bytes_list.value]
        if len(image) != 1 or len(values) != 1:
            raise DataError(
                f"{file!r} record {number}: expected one image in {image_key!r} and one label in "
                f"{label_key!r} (an int64 index or a string), found {len(image)} and {len(values)}."
            )
        return values[0], image[0]

    @staticmethod
    def _check_chunk(chunk, labels: list, skipped: list, max_pixels: int) -> None:
        problems = scan.check_blobs([image for _, _, image in chunk], max_pixels)
        for (name, label, _), problem in zip(chunk, problems):
            labels.append(None if problem else label)
            if problem:
                skipped.append((name, problem))

    def _index(self, raw_labels: list[Any]):
        """Class names and each record's class index (-1 for skipped records)."""
        import numpy as np

        present = [label for label in raw_labels if label is not None]
        if isinstance(present[0], str):
            names = self.class_names or sorted(set(present))
            lookup = {name: i for i, name in enumerate(names)}
            unknown = sorted(set(present) - set(lookup))
            if unknown:
                raise DataError(
                    f"data.file_pattern={self.file_pattern!r}: label(s) {unknown[:5]} are not in "
                    f"data.class_names={names}. Add them to data.class_names or fix the records."
                )
            indices = [lookup[label] if label is not None else -1 for label in raw_labels]
        else:
            indices = [int(label) if label is not None else -1 for label in raw_labels]
            names = self.class_names or [str(i) for i in range(max(present) + 1)]
            bad = sorted({i for i in indices if i != -1 and not 0 <= i < len(names)})
            if bad:
                raise DataError(
                    f"data.file_pattern={self.file_pattern!r}: label index(es) {bad[:5]} are outside "
                    f"0..{len(names) - 1} (data.class_names has {len(names)} names). Fix "
                    "data.class_names or the records."
                )
        return list(names), np.array(indices, dtype="int64")

    def _split(self, files: list[str], labels: Any, indices: Any, split: str, key: str):
        import tensorflow as tf

        image_key = self.keys[0]
        mask = tf.constant(_mask(len(labels), indices))
        all_labels = tf.constant(labels)
        image_of = dataset.decoder(self.settings)

        def decode(number, record):
            parsed = tf.io.parse_single_example(record, {image_key: tf.io.FixedLenFeature([], tf.string)})
            return image_of(parsed[image_key]), tf.gather(all_labels, number)

        # Shards are read in order (not interleaved) so that record numbers match load()'s.
        records = tf.data.TFRecordDataset(files).enumerate()
        records = records.filter(lambda number, _: tf.gather(mask, number))
        return dataset.finish(records.map(decode, num_parallel_calls=tf.data.AUTOTUNE), self.settings, split, key)


def _mask(size: int, indices: Any) -> Any:
    import numpy as np

    mask = np.zeros(size, dtype=bool)
    mask[indices] = True
    return mask


def _relative_names(files: list[str]) -> list[str]:
    """Shard names relative to their common folder: moving the data keeps the fingerprint."""
    if any("://" in f for f in files):
        return files  # a bucket: its URL is its identity
    root = os.path.dirname(files[0]) if len(files) == 1 else os.path.commonpath(files)
    return [os.path.relpath(f, root) for f in files]
