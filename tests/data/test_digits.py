"""`data=digits`: class remapping, raw 0-255 images, stratified seeded splits, config errors."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.digits import DigitsData
from pipeline.errors import ConfigError

CLASSES = [5, 6, 7, 8, 9]


def _arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    pairs = list(dataset.as_numpy_iterator())
    return np.stack([x for x, _ in pairs]), np.array([y for _, y in pairs])


def _raw_digits(classes):
    """sklearn's digits of `classes`, scaled to 0-255 as the pipeline promises."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, classes)
    return (digits.images[keep] * (255.0 / 16.0)).astype("float32")[..., None], digits.target[keep]


def _rows(images: np.ndarray) -> list[bytes]:
    return sorted(image.tobytes() for image in images)


@pytest.fixture(scope="module")
def bundle():
    return DigitsData(classes=CLASSES, val_split=0.2, test_split=0.2, seed=0).load()


@pytest.fixture(scope="module")
def splits(bundle):
    return {name: _arrays(getattr(bundle, name)) for name in ("train", "val", "test")}


def test_class_names_and_shape(bundle):
    assert bundle.class_names == ("5", "6", "7", "8", "9")
    assert bundle.num_classes == 5
    assert tuple(bundle.input_shape) == (8, 8, 1)
    assert bundle.task == "multiclass"


def test_images_are_raw_float32_pixels(splits):
    images = np.concatenate([x for x, _ in splits.values()])
    assert images.dtype == np.float32
    assert images.shape[1:] == (8, 8, 1)
    assert images.min() == 0.0 and images.max() == 255.0  # not 0-16, not 0-1
    labels = np.concatenate([y for _, y in splits.values()])
    assert np.issubdtype(labels.dtype, np.integer)


def test_labels_are_class_indices_of_the_digits(splits):
    raw_images, raw_targets = _raw_digits(CLASSES)
    images = np.concatenate([x for x, _ in splits.values()])
    labels = np.concatenate([y for _, y in splits.values()])
    assert set(labels.tolist()) == {0, 1, 2, 3, 4}
    for index, digit in enumerate(CLASSES):
        # Digit 7 is class 2: its examples are exactly sklearn's sevens.
        assert _rows(images[labels == index]) == _rows(raw_images[raw_targets == digit]), digit


def test_class_order_follows_the_config_not_the_digit_value():
    data = DigitsData(classes=[9, 3], seed=0).load()
    assert data.class_names == ("9", "3")
    raw_images, raw_targets = _raw_digits([3, 9])
    images, labels = _arrays(data.train.concatenate(data.val).concatenate(data.test))
    assert _rows(images[labels == 0]) == _rows(raw_images[raw_targets == 9])
    assert _rows(images[labels == 1]) == _rows(raw_images[raw_targets == 3])


def test_every_example_is_in_exactly_one_split(bundle, splits):
    raw_images, _ = _raw_digits(CLASSES)
    images = np.concatenate([x for x, _ in splits.values()])
    assert _rows(images) == _rows(raw_images)  # a partition: nothing lost, nothing repeated
    sizes = {name: len(y) for name, (_, y) in splits.items()}
    assert bundle.num_examples == sizes
    assert sum(sizes.values()) == len(raw_images)


def test_splits_are_stratified_to_the_requested_fractions(splits):
    _, raw_targets = _raw_digits(CLASSES)
    for index, digit in enumerate(CLASSES):
        total = int(np.sum(raw_targets == digit))
        for name, fraction in (("val", 0.2), ("test", 0.2), ("train", 0.6)):
            count = int(np.sum(splits[name][1] == index))
            assert abs(count - total * fraction) <= 1, (digit, name, count, total)


def test_other_fractions_are_honoured():
    data = DigitsData(classes=[0, 1], val_split=0.1, test_split=0.3, seed=0).load()
    _, raw_targets = _raw_digits([0, 1])
    for name, fraction in (("val", 0.1), ("test", 0.3)):
        _, labels = _arrays(getattr(data, name))
        for index, digit in enumerate([0, 1]):
            total = int(np.sum(raw_targets == digit))
            assert abs(int(np.sum(labels == index)) - total * fraction) <= 1


def test_same_seed_same_split_other_seed_other_split(splits):
    again = DigitsData(classes=CLASSES, seed=0).load()
    other = DigitsData(classes=CLASSES, seed=1).load()
    for name in ("train", "val", "test"):
        images, labels = _arrays(getattr(again, name))
        np.testing.assert_array_equal(images, splits[name][0])
        np.testing.assert_array_equal(labels, splits[name][1])
    other_test, _ = _arrays(other.test)
    assert _rows(other_test) != _rows(splits["test"][0])


def _edited_digits(monkeypatch, edit):
    """sklearn's digits as `load_digits` gives them, after `edit(images, targets)` on the first five."""
    import sklearn.datasets

    original = sklearn.datasets.load_digits

    def load_digits():
        digits = original()  # fresh arrays on each call
        edit(digits.images, digits.target, int(np.flatnonzero(digits.target == 5)[0]))
        return digits

    monkeypatch.setattr(sklearn.datasets, "load_digits", load_digits)


def test_fingerprint_follows_the_split(bundle):
    assert DigitsData(classes=CLASSES, seed=0).load().fingerprint == bundle.fingerprint
    assert DigitsData(classes=CLASSES, seed=1).load().fingerprint != bundle.fingerprint


def test_new_pixels_in_one_example_change_the_fingerprint(bundle, monkeypatch):
    def repaint(images, targets, first):
        images[first, 0, 0] = 16 if images[first, 0, 0] != 16 else 0

    _edited_digits(monkeypatch, repaint)
    assert DigitsData(classes=CLASSES, seed=0).load().fingerprint != bundle.fingerprint


def test_relabelling_one_example_changes_the_fingerprint(bundle, monkeypatch):
    def relabel(images, targets, first):
        targets[first] = 6

    _edited_digits(monkeypatch, relabel)
    relabelled = DigitsData(classes=CLASSES, seed=0).load()
    assert sum(relabelled.num_examples.values()) == sum(bundle.num_examples.values())  # none dropped
    assert relabelled.fingerprint != bundle.fingerprint


@pytest.mark.parametrize(
    "classes",
    [[5], [], [5, 10], [-1, 3], [5, 5, 6]],
    ids=["one", "none", "not-a-digit", "negative", "duplicate"],
)
def test_bad_classes_name_the_key(classes):
    with pytest.raises(ConfigError, match=r"data\.classes"):
        DigitsData(classes=classes).load()


@pytest.mark.parametrize(
    "val_split, test_split, key",
    [
        (1.5, 0.2, "data.val_split"),
        (-0.1, 0.2, "data.val_split"),
        (0.2, 1.0, "data.test_split"),
        (0.5, 0.5, "data.val_split + data.test_split"),
    ],
)
def test_bad_split_fractions_name_the_key(val_split, test_split, key):
    with pytest.raises(ConfigError) as caught:
        DigitsData(classes=CLASSES, val_split=val_split, test_split=test_split).load()
    assert key in str(caught.value)


def test_example_ids_are_the_index_in_scikit_learns_digits(bundle, splits):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name, (images, labels) in splits.items():
        index = np.array([int(i) for i in bundle.example_ids[name]])
        np.testing.assert_array_equal(images[..., 0], digits.images[index] * (255.0 / 16.0))
        assert [CLASSES[label] for label in labels] == digits.target[index].tolist()
