"""The files of `pipeline.extract`, read back with pandas, pyarrow and numpy alone."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.feature_files import Split, write_npz, write_parquet

CLASSES = ("cat", "dog", "emu")


def _stream(features: np.ndarray, labels: np.ndarray, batch: int = 4):
    for start in range(0, len(features), batch):
        yield features[start : start + batch], labels[start : start + batch]


def _split(num_examples: int, task: str = "multiclass", feature_shape=(2, 3)) -> Split:
    return Split("val", lambda start, stop: [f"img/{i}.jpg" for i in range(start, stop)], num_examples,
                 CLASSES, task, feature_shape, "test-source")


def test_parquet_rows_schema_and_metadata(tmp_path, monkeypatch):
    import json

    import pandas as pd
    import pyarrow.parquet as pq

    from pipeline import feature_files

    monkeypatch.setattr(feature_files, "ROW_GROUP_BYTES", 4 * 6 * 4)  # four rows a group
    rng = np.random.default_rng(0)
    features = rng.normal(size=(10, 2, 3)).astype("float32")
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    progress = []
    path = tmp_path / "val.parquet"
    assert write_parquet(path, _split(10), _stream(features, labels, batch=3), progress.append) == 10

    table = pd.read_parquet(path)
    assert list(table["id"]) == [f"img/{i}.jpg" for i in range(10)]
    assert table["label"].tolist() == labels.tolist() and table["label"].dtype == np.int64
    assert list(table["class_name"]) == [CLASSES[i] for i in labels]
    np.testing.assert_array_equal(np.stack(table["features"]), features.reshape(10, 6))
    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_row_groups == 2 and progress == [6, 10]  # batches of 3 fill groups of >= 4
    metadata = {k.decode(): json.loads(v) for k, v in parquet.schema_arrow.metadata.items() if k != b"pandas"}
    assert metadata == {"feature_shape": [2, 3], "class_names": list(CLASSES), "task": "multiclass",
                        "split": "val", "source": "test-source"}
    assert [p.name for p in tmp_path.iterdir()] == ["val.parquet"]  # no partial file left


def test_multilabel_rows_hold_the_multi_hot_list_and_the_names(tmp_path):
    import pandas as pd

    hot = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 1]], dtype="float32")
    path = tmp_path / "val.parquet"
    write_parquet(path, _split(3, "multilabel", (4,)), _stream(np.ones((3, 4), "float32"), hot), lambda n: None)
    table = pd.read_parquet(path)
    assert [row.tolist() for row in table["label"]] == hot.astype(int).tolist()
    assert [list(names) for names in table["class_name"]] == [["cat", "emu"], ["emu"], ["cat", "dog", "emu"]]


def test_npz_holds_the_same_arrays_unflattened(tmp_path):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(9, 2, 3)).astype("float32")
    labels = np.arange(9) % 3
    path = tmp_path / "val.npz"
    assert write_npz(path, _split(9), _stream(features, labels), lambda n: None) == 9
    with np.load(path) as arrays:  # allow_pickle=False: plain arrays only
        np.testing.assert_array_equal(arrays["features"], features)
        assert arrays["labels"].tolist() == labels.tolist()
        assert arrays["ids"].tolist() == [f"img/{i}.jpg" for i in range(9)]
        assert arrays["class_names"].tolist() == list(CLASSES)


@pytest.mark.parametrize("writer", [write_parquet, write_npz])
@pytest.mark.parametrize("rows", [7, 11])
def test_a_stream_of_another_length_leaves_no_file(tmp_path, writer, rows):
    """Rows are paired with ids by position: a short or long stream must not become a file."""
    features = np.zeros((rows, 2, 3), "float32")
    path = tmp_path / "val.out"
    with pytest.raises(DataError, match=rf"gave {rows} rows for the val split, but the data has 9 examples"):
        writer(path, _split(9), _stream(features, np.zeros(rows, int)), lambda n: None)
    assert list(tmp_path.iterdir()) == []
