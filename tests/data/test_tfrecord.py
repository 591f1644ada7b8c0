"""`data=tfrecord`: shards of tf.train.Example with int or string labels, broken records, errors."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest

from image_files import COLOURS, class_of, dataset_arrays, image_bytes
from pipeline.data.tfrecord import TFRecordData
from pipeline.errors import DataError

SIZE = [8, 8]
CLASSES = ("cat", "dog", "emu")
FORMATS = ("JPEG", "PNG", "BMP", "GIF")


def _example(image: bytes, label, image_key="image/encoded", label_key="image/class/label"):
    import tensorflow as tf

    if isinstance(label, str):
        label_feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[label.encode()]))
    else:
        label_feature = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    features = {
        image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        label_key: label_feature,
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def write_shards(folder, strings=False, per_class=10, shards=2, broken_at=None, **keys):
    """Records alternate classes; record `broken_at` of shard 0 holds half a JPEG."""
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(per_class):
        for c, name in enumerate(CLASSES):
            image = image_bytes(colour=COLOURS[name], fmt=FORMATS[i % 4], gray=(i % 3 == 2), seed=10 * i + c)
            records.append(_example(image, name if strings else c, **keys))
    if broken_at is not None:
        jpeg = image_bytes(shape=(128, 128), fmt="JPEG")
        records.insert(broken_at, _example(jpeg[: len(jpeg) // 2], "cat" if strings else 0, **keys))
    paths = []
    for shard in range(shards):
        path = folder / f"train-{shard:05d}-of-{shards:05d}.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for record in records[shard::shards]:
                writer.write(record)
        paths.append(path)
    return paths


def _load(pattern, **kwargs):
    kwargs.setdefault("image_size", SIZE)
    return TFRecordData(file_pattern=str(pattern), **kwargs).load()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")
    write_shards(folder, broken_at=4)  # shard 0 gets records 0, 2, 4: the broken one is its third
    return folder


@pytest.fixture(scope="module")
def bundle(shards):
    return _load(shards / "train-*.tfrecord", class_names=list(CLASSES))


def test_counts_labels_and_the_skipped_record(bundle, shards):
    assert bundle.class_names == CLASSES
    assert bundle.num_examples == {"train": 18, "val": 6, "test": 6}
    assert bundle.skipped_files == (f"{shards / 'train-00000-of-00002.tfrecord'}#2",)
    seen = []
    for split in ("train", "val", "test"):
        images, labels = dataset_arrays(getattr(bundle, split))
        assert images.shape == (bundle.num_examples[split], 8, 8, 3) and images.dtype == np.float32
        assert labels.dtype == np.int64
        assert class_of(images) == [CLASSES[i] for i in labels]
        seen.extend(image.tobytes() for image in images)
    assert len(set(seen)) == 30  # a partition: no record in two splits


def test_splits_are_stratified_and_seeded(bundle, shards):
    _, labels = dataset_arrays(bundle.val)
    assert Counter(labels.tolist()) == {0: 2, 1: 2, 2: 2}
    pattern = shards / "train-*.tfrecord"
    first = dataset_arrays(_load(pattern, seed=0).test)[0]
    again = dataset_arrays(_load(pattern, seed=0).test)[0]
    other = dataset_arrays(_load(pattern, seed=3).test)[0]
    np.testing.assert_array_equal(first, again)
    assert sorted(x.tobytes() for x in first) != sorted(x.tobytes() for x in other)


def test_int_labels_without_class_names_are_named_by_index(shards):
    assert _load(shards / "*.tfrecord").class_names == ("0", "1", "2")


def test_string_labels_are_sorted_into_classes(tmp_path):
    write_shards(tmp_path, strings=True, per_class=4, shards=1, image_key="img", label_key="kind")
    bundle = _load(tmp_path / "*.tfrecord", image_key="img", label_key="kind", cache="memory")
    assert bundle.class_names == CLASSES
    images, labels = dataset_arrays(bundle.train)
    assert class_of(images) == [CLASSES[i] for i in labels]


def test_fingerprint_changes_with_the_bytes(tmp_path, bundle):
    write_shards(tmp_path, per_class=10, broken_at=4)
    assert _load(tmp_path / "*.tfrecord", class_names=list(CLASSES)).fingerprint == bundle.fingerprint
    write_shards(tmp_path, per_class=9)
    assert _load(tmp_path / "*.tfrecord", class_names=list(CLASSES)).fingerprint != bundle.fingerprint


def _edited_copy(shards, destination, index, change):
    """A copy of the shards whose record `index` of shard 0 went through `change(features)`."""
    import tensorflow as tf

    copy = shutil.copytree(shards, destination)
    shard = str(copy / "train-00000-of-00002.tfrecord")
    records = [tf.train.Example.FromString(r) for r in tf.data.TFRecordDataset(shard).as_numpy_iterator()]
    change(records[index].features.feature)
    with tf.io.TFRecordWriter(shard) as writer:
        for record in records:
            writer.write(record.SerializeToString())
    return copy


def test_relabelling_one_record_changes_the_fingerprint(shards, bundle, tmp_path):
    assert _load(shutil.copytree(shards, tmp_path / "copy") / "*.tfrecord",
                 class_names=list(CLASSES)).fingerprint == bundle.fingerprint  # location is not identity

    def relabel(features):
        features["image/class/label"].int64_list.value[0] = 1  # record 0 is a cat

    copy = _edited_copy(shards, tmp_path / "relabelled", 0, relabel)
    relabelled = _load(copy / "*.tfrecord", class_names=list(CLASSES))
    assert _label_counts(relabelled) == {0: 9, 1: 11, 2: 10} != _label_counts(bundle)  # the edit is read
    assert relabelled.fingerprint != bundle.fingerprint


def _label_counts(bundle) -> Counter:
    return Counter(label for split in ("train", "val", "test")
                   for label in dataset_arrays(getattr(bundle, split))[1].tolist())


def test_new_bytes_in_one_record_change_the_fingerprint(shards, bundle, tmp_path):
    def repaint(features):
        features["image/encoded"].bytes_list.value[0] = image_bytes(colour=COLOURS["cat"], seed=99)

    copy = _edited_copy(shards, tmp_path / "repainted", 0, repaint)
    repainted = _load(copy / "*.tfrecord", class_names=list(CLASSES))
    assert _label_counts(repainted) == _label_counts(bundle)  # the same labels, so the same split
    pixels = [np.concatenate([dataset_arrays(getattr(b, split))[0] for split in ("train", "val", "test")])
              for b in (repainted, bundle)]
    assert not np.array_equal(*pixels)  # the edit is read
    assert repainted.fingerprint != bundle.fingerprint


def _error(pattern, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        _load(pattern, **kwargs)
    return str(caught.value)


def test_no_matching_file(tmp_path):
    message = _error(tmp_path / "nothing-*.tfrecord")
    assert "data.file_pattern=" in message and "matches no file" in message


def test_a_missing_feature_lists_the_features(shards):
    message = _error(shards / "*.tfrecord", image_key="image/png")
    assert "no feature 'image/png' (data.image_key)" in message
    assert "['image/class/label', 'image/encoded']" in message


def test_a_label_outside_class_names(tmp_path, shards):
    message = _error(shards / "*.tfrecord", class_names=["cat", "dog"])
    assert "[2]" in message and "outside 0..1" in message
    write_shards(tmp_path, strings=True, per_class=2, shards=1)
    message = _error(tmp_path / "*.tfrecord", class_names=["cat", "dog"])
    assert "['emu']" in message and "data.class_names" in message


def test_not_a_tfrecord_file(tmp_path):
    (tmp_path / "junk.tfrecord").write_bytes(b"this is not a record file at all")
    message = _error(tmp_path / "*.tfrecord")
    assert "junk.tfrecord" in message and "not a readable TFRecord file" in message


def test_example_ids_name_each_elements_record(bundle, shards):
    """`<file>:<record index in the file>`, the skipped record counted: the record at that
    place decodes to the very image the split yields there."""
    import tensorflow as tf

    from pipeline.data.decode import decode_bytes

    records = {}
    for split in ("train", "val", "test"):
        images, _ = dataset_arrays(getattr(bundle, split))
        assert len(bundle.example_ids[split]) == len(images)
        for image, example_id in zip(images, bundle.example_ids[split], strict=True):
            file, number = example_id.rsplit(":", 1)
            if file not in records:
                records[file] = list(tf.data.TFRecordDataset(file).as_numpy_iterator())
            parsed = tf.io.parse_single_example(records[file][int(number)],
                                                {"image/encoded": tf.io.FixedLenFeature([], tf.string)})
            np.testing.assert_array_equal(image, decode_bytes(parsed["image/encoded"], 3, SIZE, "resize").numpy())
    assert f"{shards / 'train-00000-of-00002.tfrecord'}:2" not in {i for ids in bundle.example_ids.values() for i in ids}
