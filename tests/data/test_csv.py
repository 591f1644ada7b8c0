"""`data=csv`: manifests with relative paths, single and multiple labels, and their errors."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest

from image_files import class_of, dataset_arrays, truncated_jpeg, write_folder, write_image
from pipeline.data.manifest import CsvData
from pipeline.errors import ConfigError, DataError

SIZE = [8, 8]


def _manifest(root, rows, header="path,label", name="labels.csv"):
    path = root / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _load(manifest, **kwargs):
    kwargs.setdefault("image_size", SIZE)
    return CsvData(manifest=str(manifest), **kwargs).load()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv")
    write_folder(root / "images", per_class=10)
    truncated_jpeg(root / "images" / "broken.jpg")
    return root


def _rows(root, classes=("cat", "dog", "emu")):
    """`images/<class>/<file>,<class>` for every image of the fixture folder."""
    return [f"images/{c}/{p.name},{c}" for c in classes for p in sorted((root / "images" / c).iterdir())]


@pytest.fixture(scope="module")
def manifest(root):
    return _manifest(root, [*_rows(root), "images/broken.jpg,dog"])


def test_classes_counts_labels_and_skipped_file(root, manifest):
    bundle = _load(manifest)
    assert bundle.class_names == ("cat", "dog", "emu")
    assert bundle.num_examples == {"train": 18, "val": 6, "test": 6}
    assert bundle.skipped_files == (str(root / "images" / "broken.jpg"),)
    for split in ("train", "val", "test"):
        images, labels = dataset_arrays(getattr(bundle, split))
        assert images.shape[1:] == (8, 8, 3) and images.dtype == np.float32
        assert class_of(images) == [bundle.class_names[i] for i in labels]
    _, labels = dataset_arrays(bundle.val)
    assert Counter(labels.tolist()) == {0: 2, 1: 2, 2: 2}  # stratified


def test_class_names_fix_the_order(manifest):
    bundle = _load(manifest, class_names=["emu", "cat", "dog"])
    assert bundle.class_names == ("emu", "cat", "dog")
    images, labels = dataset_arrays(bundle.train)
    assert class_of(images) == [bundle.class_names[i] for i in labels]


def test_seed_decides_the_split(manifest):
    first = dataset_arrays(_load(manifest, seed=0).test)[0]
    again = dataset_arrays(_load(manifest, seed=0).test)[0]
    other = dataset_arrays(_load(manifest, seed=5).test)[0]
    np.testing.assert_array_equal(first, again)
    assert sorted(x.tobytes() for x in first) != sorted(x.tobytes() for x in other)


def test_other_column_names_and_a_byte_order_mark(root):
    rows = _rows(root, ("cat", "dog"))
    path = root / "bom.csv"
    path.write_text("\ufefffile,kind,notes\n" + "\n".join(f"{r},x" for r in rows) + "\n", encoding="utf-8")
    bundle = _load(path, path_column="file", label_column="kind")
    assert bundle.class_names == ("cat", "dog")
    assert sum(bundle.num_examples.values()) == 20


def test_multilabel_gives_multi_hot_vectors(root):
    rows = [f"{r.split(',')[0]},{c} furry" if c != "emu" else f"{r.split(',')[0]},{c}"
            for r, c in ((r, r.split(",")[1]) for r in _rows(root))]
    bundle = _load(_manifest(root, rows, name="multi.csv"), multilabel=True)
    assert bundle.task == "multilabel"
    assert bundle.class_names == ("cat", "dog", "emu", "furry")
    images, labels = dataset_arrays(bundle.train)
    assert labels.dtype == np.float32 and labels.shape[1:] == (4,)
    for name, row in zip(class_of(images), labels):
        expected = {name, "furry"} if name != "emu" else {name}
        assert {bundle.class_names[i] for i in np.flatnonzero(row)} == expected


def test_manifest_edits_change_the_fingerprint(root, manifest):
    before = _load(manifest).fingerprint
    rows = _rows(root)
    relabelled = _manifest(root, [rows[0].replace(",cat", ",dog"), *rows[1:]], name="relabelled.csv")
    assert _load(relabelled).fingerprint != before
    assert _load(manifest).fingerprint == before


def test_new_bytes_in_one_image_change_the_fingerprint(root, manifest, tmp_path):
    before = _load(manifest).fingerprint
    copy = shutil.copytree(root, tmp_path / "copy")
    assert _load(copy / manifest.name).fingerprint == before  # where it lives is not identity
    write_image(copy / "images" / "cat" / "00.jpg", colour=(210, 20, 20), seed=99)  # same name, new bytes
    assert _load(copy / manifest.name).fingerprint != before


def test_the_label_separator_is_part_of_the_fingerprint(root):
    """The same cells read as other labels with another separator: `cat dog` is two labels or one."""
    rows = [f"{r.split(',')[0]},cat dog" if i % 3 == 0 else r for i, r in enumerate(_rows(root, ("cat", "dog")))]
    path = _manifest(root, rows, name="separated.csv")
    names = ["cat", "dog", "cat dog"]
    spaces, bars = (_load(path, multilabel=True, class_names=names, label_separator=s) for s in (" ", "|"))
    assert not np.array_equal(dataset_arrays(spaces.train)[1], dataset_arrays(bars.train)[1])
    assert spaces.fingerprint != bars.fingerprint


def _error(manifest, kind=DataError, **kwargs) -> str:
    with pytest.raises(kind) as caught:
        _load(manifest, **kwargs)
    return str(caught.value)


def test_a_row_naming_a_missing_file_gives_its_line_and_path(root):
    rows = _rows(root)
    path = _manifest(root, [*rows[:3], "images/cat/nope.jpg,cat", *rows[3:]], name="missing.csv")
    message = _error(path)
    assert "line 5" in message and "'images/cat/nope.jpg'" in message
    assert str(root / "images" / "cat" / "nope.jpg") in message
    assert "relative to the manifest's folder" in message


def test_an_unknown_label_gives_its_line(manifest):
    message = _error(manifest, class_names=["cat", "dog"])
    assert "not in data.class_names" in message and "'emu'" in message and "line 22" in message
    assert "add the labels to data.class_names" in message


def test_a_missing_column_names_the_key_and_the_columns(root):
    path = _manifest(root, ["images/cat/00.jpg,cat"], header="file,label", name="columns.csv")
    message = _error(path)
    assert "no column 'path' (data.path_column)" in message and "['file', 'label']" in message


def test_an_empty_label_cell_gives_its_line(root):
    path = _manifest(root, [*_rows(root)[:4], "images/cat/00.jpg,"], name="empty_label.csv")
    assert "line 6" in _error(path)


def test_missing_manifest_and_empty_manifest(root):
    assert "does not exist" in _error(root / "nope.csv")
    assert "lists no images" in _error(_manifest(root, [], name="empty.csv"))


def test_one_class_and_binary_with_three(root, manifest):
    single = _manifest(root, _rows(root, ("cat",)), name="single.csv")
    assert "at least 2" in _error(single)
    assert "data.task=binary needs exactly 2 classes" in _error(manifest, task="binary")


def test_empty_split_names_the_fraction(root):
    path = _manifest(root, [r for r in _rows(root, ("cat", "dog")) if "/00." in r or "/01." in r], name="tiny.csv")
    message = _error(path, val_split=0.2, test_split=0.5)
    assert "val split is empty" in message and "data.val_split=0.2" in message


def test_binary_and_multilabel_together_is_a_config_error():
    with pytest.raises(ConfigError, match="data.task=binary with data.multilabel=true"):
        CsvData(manifest="/data/labels.csv", multilabel=True, task="binary")
