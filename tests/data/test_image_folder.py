"""`data=image_folder`: classes from folders, stratified seeded splits, skipped files, errors."""

from __future__ import annotations

import logging
import shutil
from collections import Counter

import numpy as np
import pytest

from image_files import class_of, dataset_arrays, truncated_jpeg, write_folder, write_image
from pipeline.data.augment import Augmentation
from pipeline.data.image_folder import ImageFolderData
from pipeline.errors import DataError

SIZE = [8, 8]


def _load(root, **kwargs):
    kwargs.setdefault("image_size", SIZE)
    return ImageFolderData(train_dir=str(root), **kwargs).load()


def _rows(images: np.ndarray) -> list[bytes]:
    return sorted(image.tobytes() for image in images)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("flowers") / "train", per_class=10)
    (root / "cat" / "notes.txt").write_text("not an image")
    truncated_jpeg(root / "dog" / "broken.jpg")
    (root / "emu" / ".DS_Store").write_bytes(b"\0\1")  # hidden: not data, not reported
    (root / "README.md").write_text("files next to the class folders are ignored")
    return root


@pytest.fixture(scope="module")
def bundle(folder):
    return _load(folder, val_split=0.2, test_split=0.2, seed=0)


@pytest.fixture(scope="module")
def splits(bundle):
    return {name: dataset_arrays(getattr(bundle, name)) for name in ("train", "val", "test")}


def test_classes_counts_and_shapes(bundle, splits):
    assert bundle.class_names == ("cat", "dog", "emu")
    assert bundle.input_shape == (8, 8, 3)
    assert bundle.task == "multiclass"
    assert bundle.num_examples == {"train": 18, "val": 6, "test": 6}
    for name, (images, labels) in splits.items():
        assert len(images) == bundle.num_examples[name]
        assert images.dtype == np.float32 and images.shape[1:] == (8, 8, 3)
        assert labels.dtype == np.int64
        assert 0 <= images.min() and images.max() <= 255 and images.max() > 150  # raw 0-255


def test_each_label_is_the_class_of_its_folder(bundle, splits):
    for images, labels in splits.values():
        assert class_of(images) == [bundle.class_names[i] for i in labels]


def test_splits_are_stratified(splits):
    for name, per_class in (("train", 6), ("val", 2), ("test", 2)):
        assert Counter(splits[name][1].tolist()) == {0: per_class, 1: per_class, 2: per_class}


def test_undecodable_files_are_skipped_and_listed(folder, caplog):
    with caplog.at_level(logging.WARNING):
        bundle = _load(folder)
    assert sorted(bundle.skipped_files) == [str(folder / "cat" / "notes.txt"), str(folder / "dog" / "broken.jpg")]
    assert "skipped 2 of 32 files" in caplog.text
    assert "broken.jpg" in caplog.text and "notes.txt" in caplog.text


def test_same_seed_same_split_other_seed_other_split(folder, splits):
    again = _load(folder, seed=0)
    for name in ("train", "val", "test"):
        images, labels = dataset_arrays(getattr(again, name))
        np.testing.assert_array_equal(images, splits[name][0])
        np.testing.assert_array_equal(labels, splits[name][1])
    other_images, _ = dataset_arrays(_load(folder, seed=1).test)
    assert _rows(other_images) != _rows(splits["test"][0])


def test_fingerprint_follows_the_files_and_the_split_not_the_location(folder, bundle, tmp_path):
    assert len(bundle.fingerprint) == 64
    assert _load(folder).fingerprint == bundle.fingerprint
    assert _load(folder, seed=1).fingerprint != bundle.fingerprint
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    assert _load(moved).fingerprint == bundle.fingerprint
    write_image(moved / "cat" / "00.jpg", colour=(210, 20, 20), seed=99)  # same name, new bytes
    assert _load(moved).fingerprint != bundle.fingerprint


# Identity is the bytes of each file and its path inside the data folder (the class folder
# is the label): a copy elsewhere shares the fingerprint, and with it the feature cache.
def test_moving_one_image_to_another_class_changes_the_fingerprint(folder, bundle, tmp_path):
    moved = shutil.copytree(folder, tmp_path / "relabelled")
    (moved / "cat" / "00.jpg").rename(moved / "dog" / "00-was-cat.jpg")
    assert _load(moved).fingerprint != bundle.fingerprint


def test_relabelling_a_linked_image_changes_the_fingerprint(tmp_path):
    """Class folders of links into one pool of images (a common layout): the link's folder is the label."""
    pool = write_folder(tmp_path / "pool", per_class=6, classes=("cat", "dog"))
    farm = tmp_path / "farm"
    for image in sorted(pool.glob("*/*")):
        (farm / image.parent.name).mkdir(parents=True, exist_ok=True)
        (farm / image.parent.name / image.name).symlink_to(image)
    before = _load(farm).fingerprint
    assert _load(shutil.copytree(farm, tmp_path / "copy", symlinks=True)).fingerprint == before
    (farm / "cat" / "00.jpg").rename(farm / "dog" / "00-was-cat.jpg")  # same target, other class
    relabelled = _load(farm).fingerprint
    assert relabelled != before
    write_image(pool / "dog" / "01.png", colour=(0, 0, 0), seed=7)  # new bytes behind a link
    assert _load(farm).fingerprint != relabelled


def test_explicit_val_and_test_folders_are_used_as_they_are(tmp_path):
    train = write_folder(tmp_path / "train", per_class=4, classes=("cat", "dog"))
    val = write_folder(tmp_path / "val", per_class=2, classes=("cat", "dog"))
    test = write_folder(tmp_path / "test", per_class=3, classes=("cat", "dog"))
    bundle = _load(train, val_dir=str(val), test_dir=str(test), val_split=0.5, test_split=0.5)
    assert bundle.num_examples == {"train": 8, "val": 4, "test": 6}
    images, labels = dataset_arrays(bundle.test)
    assert class_of(images) == [bundle.class_names[i] for i in labels]


def test_only_a_val_folder_still_carves_the_test_split(tmp_path):
    train = write_folder(tmp_path / "train", per_class=10, classes=("cat", "dog"))
    val = write_folder(tmp_path / "val", per_class=2, classes=("cat", "dog"))
    bundle = _load(train, val_dir=str(val), test_split=0.3)
    assert bundle.num_examples == {"train": 14, "val": 4, "test": 6}


def test_grayscale_option_and_resize_policies(folder):
    gray = _load(folder, channels=1, image_size=[6, 10])
    images, labels = dataset_arrays(gray.val)
    assert gray.input_shape == (6, 10, 1) and images.shape[1:] == (6, 10, 1)
    assert class_of(images) == [gray.class_names[i] for i in labels]
    letterbox = _load(folder, image_size=[6, 30], resize="aspect_preserving")
    images, _ = dataset_arrays(letterbox.val)
    assert images.shape[1:] == (6, 30, 3) and images[:, :, 0].max() == 0  # padded at the sides
    padded = _load(folder, image_size=[40, 40], resize="crop_or_pad")
    images, _ = dataset_arrays(padded.val)
    assert images.shape[1:] == (40, 40, 3) and images[:, 0].max() == 0  # small images are padded


def test_binary_task_takes_two_classes(tmp_path):
    root = write_folder(tmp_path / "two", per_class=5, classes=("cat", "dog"))
    bundle = _load(root, task="binary")
    assert bundle.task == "binary" and bundle.class_names == ("cat", "dog")
    _, labels = dataset_arrays(bundle.train)
    assert set(labels.tolist()) == {0, 1}


def test_cache_memory_and_files_give_the_same_pixels(folder, splits, tmp_path):
    memory = _load(folder, cache="memory")
    prefix = tmp_path / "cache" / "flowers-"
    files = _load(folder, cache=str(prefix))
    for bundle in (memory, files, files):  # the second pass over `files` reads the cache
        images, labels = dataset_arrays(bundle.train)
        np.testing.assert_array_equal(images, splits["train"][0])
        np.testing.assert_array_equal(labels, splits["train"][1])
    written = sorted(p.name for p in prefix.parent.iterdir())
    assert written and all(name.startswith("flowers-train-") for name in written)


def test_deterministic_flag_reaches_tf_data(folder):
    assert _load(folder, deterministic=False).train.options().deterministic is False
    assert _load(folder, deterministic=True).train.options().deterministic is True


def test_augmentation_goes_into_the_bundle(folder, bundle):
    assert bundle.augmentation is None
    augmented = _load(folder, augmentation=Augmentation(flip="horizontal", seed=0))
    assert callable(augmented.augmentation)
    assert _load(folder, augmentation=Augmentation()).augmentation is None


def test_constructor_does_not_touch_the_filesystem():
    data = ImageFolderData(train_dir="/no/such/folder")
    with pytest.raises(DataError, match=r"data\.train_dir='/no/such/folder' does not exist"):
        data.load()


def _error(root, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        _load(root, **kwargs)
    return str(caught.value)


def test_empty_class_folder_is_named(tmp_path):
    root = write_folder(tmp_path / "train", per_class=5, classes=("cat", "dog"))
    (root / "emu").mkdir()
    message = _error(root)
    assert str(root / "emu") in message and "is empty" in message and "remove the folder" in message


def test_class_folder_without_a_decodable_image_is_named(tmp_path):
    root = write_folder(tmp_path / "train", per_class=5, classes=("cat", "dog"))
    truncated_jpeg(root / "emu" / "only.jpg")
    message = _error(root)
    assert str(root / "emu") in message and "no decodable images" in message


def test_a_file_instead_of_a_folder_is_named(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    message = _error(tmp_path / "file.txt")
    assert "data.train_dir=" in message and "is not a folder" in message


def test_fewer_than_two_classes(tmp_path):
    root = write_folder(tmp_path / "train", per_class=5, classes=("cat",))
    assert "at least 2" in _error(root)
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert "no class subfolders" in _error(empty)


def test_binary_needs_exactly_two_classes(folder):
    message = _error(folder, task="binary")
    assert "data.task=binary" in message and "3" in message and "data.task=multiclass" in message


def test_a_split_that_ends_up_empty_is_named_with_the_fix(tmp_path):
    root = write_folder(tmp_path / "train", per_class=2, classes=("cat", "dog"))
    message = _error(root, val_split=0.2, test_split=0.5)
    assert "val split is empty" in message
    assert "data.val_split=0.2" in message and "data.val_dir" in message and "'cat'" in message


def test_val_folder_with_an_unknown_class(tmp_path):
    train = write_folder(tmp_path / "train", per_class=4, classes=("cat", "dog"))
    val = write_folder(tmp_path / "val", per_class=2, classes=("cat", "emu"))
    message = _error(train, val_dir=str(val))
    assert "data.val_dir" in message and "'emu'" in message
