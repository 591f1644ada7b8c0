"""`data=tfds`: a TensorFlow Datasets data set, read offline from a prepared `data_dir`.

tensorflow-datasets is an optional extra (`pip install tensorflow-datasets`); it is
imported in `load()` only, so every other option works without it. With `text_key` a text
feature (`imdb_reviews`' `text`) gives text data instead of images.
"""

from __future__ import annotations

import os
from typing import Literal

from pipeline.data import dataset, scan, text
from pipeline.data.augment import Augmentation
from pipeline.data.decode import Resize, fit, match_channels
from pipeline.errors import ConfigError, DataError
from pipeline.types import DataBundle

SPLITS = ("train", "val", "test")


class TfdsData:
    """Images (or texts) and labels of a TFDS data set, by name and split.

    With `text_key`, that feature's strings are the examples (a text DataBundle,
    `input_kind="text"`) and the image keys are ignored. The texts are read once, before
    training, and held in memory (`imdb_reviews`' 25,000 training reviews: about 33 MB, a
    few seconds): those that are not valid UTF-8, empty or only whitespace are left out
    with a warning and listed in `skipped_files`, counted out of `num_examples`. Each
    text's id, there and in `example_ids`, is `<TFDS split>:<index in it>`.

    Args:
        name: the TFDS name, optionally with a version (`mnist`, `tf_flowers:3.*.*`).
        split: the TFDS split for each of train, val and test; slices work
            (`train[:80%]`), so a data set without a validation split can be cut.
        data_dir: where the prepared data set lives; null uses TFDS's default
            (`~/tensorflow_datasets` or `TFDS_DATA_DIR`).
        download: fetch and prepare the data set when it is not in `data_dir` (network).
        image_key: the image feature's name.
        text_key: a text feature's name (`text` of `imdb_reviews`, `description` of
            `ag_news_subset`) for text data; null reads images from `image_key`.
        max_chars: with `text_key`, keep each text's first `max_chars` characters; null
            keeps whole texts (cutting to tokens is the source's `seq_length`).
        label_key: the class label feature's name (a `ClassLabel`, which gives the names).
        image_size: `[height, width]` every image is brought to.
        channels: 1 (grayscale) or 3 (RGB).
        resize: resize, crop_or_pad or aspect_preserving.
        task: multiclass or binary (exactly two classes).
        cache: null, memory, or a file path prefix for decoded images.
        deterministic: keep tf.data's element order reproducible.
        augmentation: random changes applied to training batches, or null.
        seed: unused: TFDS splits are fixed by the prepared files, which the fingerprint reads.

    Example:
        >>> TfdsData(name="mnist", data_dir="/data/tfds", image_size=[28, 28], channels=1).load()
        >>> TfdsData(name="imdb_reviews", data_dir="/data/tfds", text_key="text", task="binary",
        ...          split={"train": "train[:80%]", "val": "train[80%:]", "test": "test"}).load()
    """

    def __init__(
        self,
        name: str,
        split: dict[str, str] | None = None,
        data_dir: str | None = None,
        download: bool = False,
        image_key: str = "image",
        text_key: str | None = None,
        max_chars: int | None = None,
        label_key: str = "label",
        image_size: list[int] = (224, 224),
        channels: Literal[1, 3] = 3,
        resize: Resize = "resize",
        task: Literal["multiclass", "binary"] = "multiclass",
        cache: str | None = None,
        deterministic: bool = True,
        augmentation: Augmentation | None = None,
        seed: int = 0,
    ):
        self.settings = dataset.image_settings(image_size, channels, resize, cache, deterministic)
        self.text_settings = text.text_settings("utf-8", max_chars, deterministic)
        dataset.check_task(task)
        if text_key is not None and not str(text_key).strip():
            raise ConfigError(
                "data.text_key='': set it to the text feature's name (for example text for "
                "imdb_reviews), or null to read images from data.image_key."
            )
        split = dict(split or {"train": "train[:80%]", "val": "train[80%:]", "test": "test"})
        if sorted(split) != sorted(SPLITS):
            raise ConfigError(
                f"data.split={split!r}: expected exactly the keys train, val and test, each a TFDS "
                "split such as data.split.val='train[80%:]'"
            )
        self.name = name
        self.split = split
        self.data_dir = data_dir
        self.download = download
        self.keys = (image_key, label_key)
        self.text_key = text_key
        self.task = task
        self.augmentation = augmentation
        self.seed = seed

    def load(self) -> DataBundle:
        tfds = _import_tfds()
        builder = self._builder(tfds)
        class_names = self._class_names(builder)
        dataset.check_classes(class_names, self.task, f"data.name={self.name!r}",
                              examples="texts" if self.text_key else "images")
        counts = {}
        for split, tfds_split in self.split.items():
            try:
                counts[split] = int(builder.info.splits[tfds_split].num_examples)
            except (KeyError, ValueError) as error:
                raise DataError(
                    f"data.split.{split}={tfds_split!r} is not a split of {self.name!r} "
                    f"({error}); its splits are {sorted(builder.info.splits)}."
                ) from error
        dataset.require_examples(counts, {s: f"data.split.{s}={self.split[s]!r} holds no example."
                                          for s in SPLITS})
        if self.text_key:
            return self._load_texts(builder, class_names, counts)
        fingerprint = scan.fingerprint(
            _prepared_files(builder, self.split.values()),
            {"option": "tfds", "name": self.name, "version": str(builder.info.version),
             "split": self.split, "num_examples": counts, "keys": self.keys},
        )
        key = self.settings.cache_key(fingerprint)
        splits = {split: self._split(builder, tfds_split, split, key)
                  for split, tfds_split in self.split.items()}
        return dataset.make_bundle(splits, counts, class_names, self.settings, self.task,
                                   self.augmentation, (), fingerprint)

    def _load_texts(self, builder, class_names: list[str], counts: dict[str, int]) -> DataBundle:
        fingerprint = scan.fingerprint(
            _prepared_files(builder, self.split.values()),
            {"option": "tfds", "name": self.name, "version": str(builder.info.version),
             "split": self.split, "num_examples": counts, "keys": ("text", self.text_key, self.keys[1]),
             **self.text_settings.identity()},
        )
        read = {split: self._texts(builder, tfds_split) for split, tfds_split in self.split.items()}
        skipped = [entry for _, _, _, found in read.values() for entry in found]
        text.report_skipped(skipped, sum(counts.values()), f"data.name={self.name!r}",
                            "the prepared data set is read as it is: re-prepare it to change them.")
        kept = {split: len(texts) for split, (texts, _, _, _) in read.items()}
        dataset.require_examples(kept, {s: f"data.split.{s}={self.split[s]!r} holds no usable text "
                                           f"(all {counts[s]} are empty or not UTF-8)." for s in SPLITS})
        return text.text_bundle(
            texts={split: texts for split, (texts, _, _, _) in read.items()},
            labels={split: labels for split, (_, labels, _, _) in read.items()},
            class_names=class_names, task=self.task, settings=self.text_settings,
            skipped=[name for name, _ in skipped], fingerprint=fingerprint,
            example_ids={split: ids for split, (_, _, ids, _) in read.items()},
        )

    def _texts(self, builder, tfds_split: str):
        """`(texts, labels, ids, skipped)` of one TFDS split, through `text.read_text`."""
        import numpy as np

        label_key = self.keys[1]
        examples = builder.as_dataset(split=tfds_split, shuffle_files=False)
        pairs = examples.map(lambda example: (example[self.text_key], example[label_key])).batch(4096)
        texts, labels, ids, skipped = [], [], [], []
        index = 0
        for raws, batch_labels in pairs.as_numpy_iterator():
            for raw, label in zip(raws, batch_labels):
                found, problem = text.read_text(raw, self.text_settings)
                name = f"{tfds_split}:{index}"
                index += 1
                if problem:
                    skipped.append((name, problem))
                    continue
                texts.append(found)
                labels.append(label)
                ids.append(name)
        return texts, np.array(labels, dtype="int64"), ids, skipped

    def _builder(self, tfds):
        where = f"data.data_dir={self.data_dir!r}"
        try:
            builder = tfds.builder(self.name, data_dir=self.data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            base, _, version = self.name.partition(":")
            versions = _prepared_versions(self.data_dir, base)
            if version and versions:
                raise DataError(
                    f"data.name={self.name!r}: version {version} of {base!r} is not prepared in "
                    f"{where}; the prepared versions are {versions}. Set data.name={base}:<version> "
                    f"to one of them, or data.name={base} for the newest."
                ) from None
            raise DataError(
                f"data.name={self.name!r} is not in the TFDS catalog and {where} holds no prepared "
                f"copy of it (expected {base}/<version>/dataset_info.json under it). Check the "
                "spelling against the TFDS catalog, or point data.data_dir at the directory that "
                f"holds {base}/."
            ) from None
        except Exception as error:  # a bad version, a broken dataset_info.json, ...
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(
                f"data.name={self.name!r} cannot be loaded from {where}: {first_line}. Fix the name "
                "or version, or re-prepare the data set."
            ) from error
        if not _is_prepared(builder):
            if not self.download:
                raise DataError(
                    f"data.name={self.name!r} is not prepared in {where} ({builder.data_dir} "
                    "holds no dataset_info.json). Point data.data_dir at a prepared copy, or set "
                    "data.download=true once (needs the network)."
                )
            builder.download_and_prepare()
        return builder

    def _class_names(self, builder) -> list[str]:
        features = builder.info.features
        image_key, label_key = self.keys
        example = ("data.text_key", self.text_key) if self.text_key else ("data.image_key", image_key)
        for key, name in (example, ("data.label_key", label_key)):
            if name not in features:
                raise DataError(
                    f"{key}={name!r} is not a feature of {self.name!r}; its features are "
                    f"{sorted(features.keys())}. Set {key} to one of them."
                )
        if self.text_key:
            _check_text_feature(features, self.text_key, self.name)
        names = getattr(features[label_key], "names", None)
        if not names:
            raise DataError(
                f"data.label_key={label_key!r} of {self.name!r} is not a class label with names; "
                "pick a ClassLabel feature."
            )
        return list(names)

    def _split(self, builder, tfds_split: str, split: str, key: str):
        import tensorflow as tf

        image_key, label_key = self.keys
        settings = self.settings

        def prepare(example):
            image = match_channels(example[image_key], settings.channels)
            return fit(image, settings.image_size, settings.resize), tf.cast(example[label_key], tf.int64)

        examples = builder.as_dataset(split=tfds_split, shuffle_files=False)
        return dataset.finish(examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE), settings, split, key)


def _check_text_feature(features, key: str, name: str) -> None:
    """A text feature is one string per example (`tfds.features.Text`)."""
    import tensorflow as tf

    feature = features[key]
    if getattr(feature, "tf_dtype", None) != tf.string or tuple(getattr(feature, "shape", ())) != ():
        strings = sorted(k for k, f in features.items()
                         if getattr(f, "tf_dtype", None) == tf.string and tuple(getattr(f, "shape", ())) == ())
        raise DataError(
            f"data.text_key={key!r} of {name!r} is not one string per example (it is "
            f"{type(feature).__name__} of {getattr(feature, 'tf_dtype', '?')!s}, shape "
            f"{getattr(feature, 'shape', '?')}); its text features are {strings}. Set data.text_key "
            "to one of them."
        )


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DataError(
            "data=tfds needs the tensorflow-datasets package, which is not installed: run "
            "`pip install tensorflow-datasets` (then prepare the data set once, or point "
            "data.data_dir at a prepared copy), or use data=image_folder, csv or tfrecord."
        ) from error
    return tfds


def _prepared_files(builder, tfds_splits) -> list[tuple[str, int, str]]:
    """`(name, size, sha256)` of the prepared files a run reads, relative to `builder.data_dir`.

    Those are the record shards of the splits in `data.split` and every other file there
    (dataset_info.json, features.json, the label names): a relabelled or re-encoded example
    or a renamed class changes the fingerprint, an untouched copy in another `data_dir`
    keeps it. Shards of splits the run does not read are left out.

    Cost: one streaming read of those files, nothing decoded (`scan.file_digest`: 1 MiB of
    memory, about 1.7 ms per MB through GFile on a 2-core EPYC, so 1.7 s per GB), paid
    once per process for unchanged local files.
    """
    import tensorflow as tf

    shards = {name for split in builder.info.splits.values() for name in split.filenames}
    read = {name for split in tfds_splits for name in builder.info.splits[split].filenames}
    root = str(builder.data_dir)
    files = []
    for folder, subfolders, names in tf.io.gfile.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for path in (os.path.join(folder, n) for n in names if not n.startswith(".")):
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            if relative in read or relative not in shards:
                files.append((relative, *scan.file_digest(path, tf.io.gfile.GFile)))
    return files


def _prepared_versions(data_dir: str | None, base: str) -> list[str]:
    """The version folders under `data_dir/base` that hold a dataset_info.json."""
    import tensorflow as tf

    if not data_dir or not tf.io.gfile.isdir(f"{data_dir}/{base}"):
        return []
    return sorted(v.rstrip("/") for v in tf.io.gfile.listdir(f"{data_dir}/{base}")
                  if tf.io.gfile.exists(f"{data_dir}/{base}/{v.rstrip('/')}/dataset_info.json"))


def _is_prepared(builder) -> bool:
    import tensorflow as tf

    return tf.io.gfile.exists(builder.data_dir) and bool(builder.info.splits)
