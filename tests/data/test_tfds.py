"""`data=tfds`: a TFDS data set that the test prepares itself, read offline from its `data_dir`.

The builder is defined without registering it, so `TfdsData` finds the data set the way a
user's run does: by name, from the files of a prepared `data_dir`, with no builder code and
no network.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest

from cli import run_pipeline, runs
from image_files import COLOURS, class_of, dataset_arrays
from pipeline.data.tfds import TfdsData
from pipeline.errors import ConfigError, DataError

HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None
needs_tfds = pytest.mark.skipif(not HAS_TFDS, reason="tensorflow-datasets is not installed")

NAME = "colour_patches"
CLASSES = tuple(COLOURS)  # cat, dog, emu
COUNTS = {"train": 30, "test": 12}


def prepare(data_dir):
    """Writes `NAME` 1.0.0 (train 30, test 12; features `picture` and `kind`) into `data_dir`."""
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)

    def examples(count):
        for index in range(count):
            label = index % len(CLASSES)
            shape = (9 + index % 4, 7 + index % 3, 1)  # sizes vary, as in real data sets
            noise = rng.integers(-8, 8, (*shape[:2], 3))
            pixels = np.clip(np.array(COLOURS[CLASSES[label]]) + noise, 0, 255).astype(np.uint8)
            yield index, {"picture": pixels, "kind": label, "caption": f"patch {index}"}

    with tfds.core.registered.skip_registration():

        class ColourPatches(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "picture": tfds.features.Image(shape=(None, None, 3)),
                    "kind": tfds.features.ClassLabel(names=list(CLASSES)),
                    "caption": tfds.features.Text(),
                }))

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(count) for split, count in COUNTS.items()}

            def _generate_examples(self, count):
                yield from examples(count)

    ColourPatches(data_dir=str(data_dir)).download_and_prepare()
    return data_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if not HAS_TFDS:
        pytest.skip("tensorflow-datasets is not installed")
    return prepare(tmp_path_factory.mktemp("tfds"))


def _data(data_dir, **kwargs):
    kwargs = {"name": NAME, "data_dir": str(data_dir), "image_key": "picture", "label_key": "kind",
              "image_size": [8, 8], **kwargs}
    return TfdsData(**kwargs)


@pytest.fixture(scope="module")
def bundle(data_dir):
    return _data(data_dir).load()


@needs_tfds
def test_names_counts_and_labels_come_from_the_prepared_data_set(bundle):
    assert bundle.class_names == CLASSES  # the ClassLabel's names, in its order
    assert bundle.num_examples == {"train": 24, "val": 6, "test": 12}  # train[:80%], train[80%:], test
    for split in ("train", "val", "test"):
        images, labels = dataset_arrays(getattr(bundle, split))
        assert images.shape == (bundle.num_examples[split], 8, 8, 3) and images.dtype == np.float32
        assert class_of(images) == [CLASSES[label] for label in labels]
    _, val_labels = dataset_arrays(bundle.val)
    _, test_labels = dataset_arrays(bundle.test)
    assert sorted(set(val_labels)) == [0, 1, 2] and sorted(set(test_labels)) == [0, 1, 2]


@needs_tfds
def test_slices_channels_and_resize_policy_apply(data_dir):
    gray = _data(data_dir, channels=1, resize="crop_or_pad", image_size=[6, 6],
                 split={"train": "train[:50%]", "val": "train[50%:]", "test": "test[:3]"}).load()
    assert gray.num_examples == {"train": 15, "val": 15, "test": 3}
    images, _ = dataset_arrays(gray.test)
    assert images.shape == (3, 6, 6, 1)


@needs_tfds
def test_fingerprint_names_the_data_set_version_and_splits(data_dir, bundle):
    again = _data(data_dir).load()
    other_split = _data(data_dir, split={"train": "train[:70%]", "val": "train[70%:]", "test": "test"}).load()
    assert again.fingerprint == bundle.fingerprint != other_split.fingerprint


def _edited_copy(data_dir, destination, split, index, change):
    """A copy of the prepared `data_dir` whose example `index` of `split` went through `change`.

    `change(features)` edits the stored `tf.train.Example`'s features in place; the shard is
    rewritten and dataset_info.json left as it was, as a hand-relabelled copy would be.
    """
    import tensorflow as tf

    copy = shutil.copytree(data_dir, destination)
    (shard,) = (copy / NAME / "1.0.0").glob(f"{NAME}-{split}.tfrecord-*")
    records = [tf.train.Example.FromString(r) for r in tf.data.TFRecordDataset(str(shard)).as_numpy_iterator()]
    change(records[index].features.feature)
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for record in records:
            writer.write(record.SerializeToString())
    return copy


def _train_labels(bundle) -> list[int]:
    return dataset_arrays(bundle.train)[1].tolist()


@needs_tfds
def test_relabelling_one_example_changes_the_fingerprint(data_dir, bundle, tmp_path):
    untouched = shutil.copytree(data_dir, tmp_path / "copy")
    assert _data(untouched).load().fingerprint == bundle.fingerprint  # where it lives is not identity

    def relabel(features):
        features["kind"].int64_list.value[0] = (features["kind"].int64_list.value[0] + 1) % len(CLASSES)

    relabelled = _data(_edited_copy(data_dir, tmp_path / "relabelled", "train", 0, relabel)).load()
    assert _train_labels(relabelled) != _train_labels(bundle)  # the edit is what a run reads
    assert relabelled.fingerprint != bundle.fingerprint


@needs_tfds
def test_new_bytes_in_one_example_change_the_fingerprint(data_dir, bundle, tmp_path):
    def repaint(features):
        import tensorflow as tf

        shape = tf.io.decode_png(features["picture"].bytes_list.value[0]).shape
        features["picture"].bytes_list.value[0] = tf.io.encode_png(np.full(shape, 128, np.uint8)).numpy()

    repainted = _data(_edited_copy(data_dir, tmp_path / "repainted", "train", 0, repaint)).load()
    images = [dataset_arrays(b.train)[0] for b in (bundle, repainted)]
    assert not np.array_equal(*images)  # the edit is what a run reads
    assert repainted.fingerprint != bundle.fingerprint


@needs_tfds
def test_renamed_classes_change_the_fingerprint(data_dir, bundle, tmp_path):
    copy = shutil.copytree(data_dir, tmp_path / "renamed")
    (copy / NAME / "1.0.0" / "kind.labels.txt").write_text("lion\ntiger\nbear\n")
    renamed = _data(copy).load()
    assert renamed.class_names == ("lion", "tiger", "bear")
    assert renamed.fingerprint != bundle.fingerprint


@needs_tfds
def test_a_key_that_is_not_a_feature_lists_the_features(data_dir):
    with pytest.raises(DataError, match=r"data\.image_key='image'.*\['caption', 'kind', 'picture'\]"):
        _data(data_dir, image_key="image").load()


@needs_tfds
def test_a_label_that_is_not_a_class_label_is_refused(data_dir):
    with pytest.raises(DataError, match=r"data\.label_key='caption'.*ClassLabel"):
        _data(data_dir, label_key="caption").load()


@needs_tfds
def test_an_unknown_split_names_the_key_and_the_splits(data_dir):
    with pytest.raises(DataError, match=r"data\.split\.test='validation'.*\['test', 'train'\]"):
        _data(data_dir, split={"train": "train", "val": "test", "test": "validation"}).load()


@needs_tfds
def test_a_catalog_data_set_that_is_not_prepared_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"data\.name='mnist' is not prepared in data\.data_dir=.*data\.download=true"):
        TfdsData(name="mnist", data_dir=str(tmp_path / "empty")).load()
    assert not (tmp_path / "empty").exists()  # nothing was downloaded or written


@needs_tfds
def test_an_unknown_name_points_at_the_catalog_and_the_data_dir(data_dir):
    with pytest.raises(DataError, match=r"data\.name='no_such_set' is not in the TFDS catalog and "
                                        r"data\.data_dir=.* holds no prepared copy"):
        _data(data_dir, name="no_such_set").load()


@needs_tfds
def test_a_version_that_was_not_prepared_is_named(data_dir):
    with pytest.raises(DataError, match=r"version 9\.9\.9 of .* the prepared versions are \['1\.0\.0'\]"):
        _data(data_dir, name=f"{NAME}:9.9.9").load()


@needs_tfds
@pytest.mark.slow
def test_a_run_on_the_prepared_data_set(data_dir, tmp_path):
    """`python -m pipeline data=tfds ...`: the config group option, end to end, offline."""
    done = run_pipeline(
        tmp_path, f"hydra.run.dir={tmp_path / 'run'}", "data=tfds", f"data.name={NAME}",
        f"data.data_dir={data_dir}", "data.image_key=picture", "data.label_key=kind",
        "data.image_size=[8,8]", "data.channels=1", "train.epochs=2", "export=none",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.name"] == NAME and run.data.params["data.data_dir"] == str(data_dir)
    assert {"test_f1_cat", "test_f1_dog", "test_f1_emu"} <= set(run.data.metrics)
    confusion = json.loads((tmp_path / "run" / "evaluation" / "confusion_matrix_test.json").read_text())
    assert confusion["class_names"] == list(CLASSES)
    assert sum(map(sum, confusion["matrix"])) == COUNTS["test"]  # every test example was scored


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if not installed
    data = TfdsData(name="mnist", data_dir="/data/tfds")
    with pytest.raises(DataError, match=r"pip install tensorflow-datasets"):
        data.load()


def test_split_needs_train_val_and_test():
    with pytest.raises(ConfigError, match=r"data\.split=.*train, val and test"):
        TfdsData(name="mnist", split={"train": "train", "validation": "test"})
    assert TfdsData(name="mnist").split == {"train": "train[:80%]", "val": "train[80%:]", "test": "test"}
