"""The files `pipeline.extract` writes: one split's features as Parquet or as npz.

Both read back with nothing of ours: `pandas.read_parquet(path)` (or `pyarrow.parquet`) and
`numpy.load(path)`. Both are written batch by batch from a stream of `(features, labels)`
numpy batches, so memory holds one batch (Parquet: one row group of at most
`ROW_GROUP_BYTES`), plus the split's labels for npz. Each file is written beside its final
name and renamed into place: a killed extract never leaves half a file under that name.

Parquet columns: `id` (string), `label` (int64; multilabel: the multi-hot list, int8),
`class_name` (string; multilabel: the list of names), `features` (a fixed-size list of
float32: the backbone's output, flattened). The schema's metadata holds `feature_shape`,
`class_names`, `task`, `split` and `source` as JSON strings.

npz arrays: `ids` (str, n), `labels` (int64, n; multilabel int8, n x classes), `features`
(float32, n x feature shape, unflattened) and `class_names` (str, in label order).

pyarrow is a dependency of MLflow, so it is installed wherever the pipeline is.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROW_GROUP_BYTES = 16 * 2**20  # a Parquet row group holds at most this much feature data (or one batch)

Batches = Iterable[tuple[Any, Any]]  # numpy (features, labels), one batch each


@dataclass(frozen=True)
class Split:
    """What one file describes besides its rows.

    Args:
        name: the split (`train`, `val`, `test`).
        ids: the id of each row, in row order (`ids(start, stop)` gives rows start..stop-1).
        num_examples: the rows the file must hold; a stream of another length is an error.
        class_names: the label of each class index.
        task: multiclass, binary or multilabel (multi-hot labels).
        feature_shape: one feature output's shape, without the batch axis.
        source: the source's description, for the file's metadata.
    """

    name: str
    ids: Callable[[int, int], Sequence[str]]
    num_examples: int
    class_names: tuple[str, ...]
    task: str
    feature_shape: tuple[int, ...]
    source: str = ""

    @property
    def feature_size(self) -> int:
        size = 1
        for dim in self.feature_shape:
            size *= int(dim)
        return size


def write_parquet(path: Path, split: Split, batches: Batches, on_rows: Callable[[int], None]) -> int:
    """Writes `batches` as `path` (Parquet, one row per example); returns the rows written."""
    import numpy as np
    import pyarrow.parquet as pq

    schema = _schema(split)
    per_group = max(1, ROW_GROUP_BYTES // (4 * split.feature_size))
    partial = _partial(path)
    rows, pending = 0, []
    try:
        with pq.ParquetWriter(partial, schema) as writer:
            for features, labels in batches:
                pending.append((np.asarray(features), np.asarray(labels)))
                if sum(len(f) for f, _ in pending) >= per_group:
                    rows += _write_group(writer, schema, split, pending, rows)
                    on_rows(rows)
                    pending = []
            if pending:
                rows += _write_group(writer, schema, split, pending, rows)
                on_rows(rows)
        _check_rows(split, rows, path)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return rows


def _schema(split: Split):
    import pyarrow as pa

    if split.task == "multilabel":
        label, name = pa.list_(pa.int8(), len(split.class_names)), pa.list_(pa.string())
    else:
        label, name = pa.int64(), pa.string()
    metadata = {"feature_shape": list(split.feature_shape), "class_names": list(split.class_names),
                "task": split.task, "split": split.name, "source": split.source}
    return pa.schema(
        [("id", pa.string()), ("label", label), ("class_name", name),
         ("features", pa.list_(pa.float32(), split.feature_size))],
        metadata={key: json.dumps(value) for key, value in metadata.items()},
    )


def _write_group(writer, schema, split: Split, pending: list, start: int) -> int:
    import numpy as np
    import pyarrow as pa

    features = np.concatenate([f for f, _ in pending]).reshape(-1, split.feature_size).astype("float32", copy=False)
    labels = np.concatenate([y for _, y in pending])
    names = np.asarray(split.class_names, dtype=object)
    if split.task == "multilabel":
        hot = (labels > 0.5).astype("int8")
        label_column = pa.FixedSizeListArray.from_arrays(pa.array(hot.ravel()), len(split.class_names))
        name_column = pa.array([names[row.astype(bool)].tolist() for row in hot], pa.list_(pa.string()))
    else:
        labels = labels.astype("int64")
        label_column, name_column = pa.array(labels), pa.array(names[labels].tolist(), pa.string())
    columns = [
        pa.array(list(split.ids(start, start + len(features))), pa.string()),
        label_column,
        name_column,
        pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), split.feature_size),
    ]
    writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    return len(features)


def write_npz(path: Path, split: Split, batches: Batches, on_rows: Callable[[int], None]) -> int:
    """Writes `batches` as `path` (numpy's npz); returns the rows written.

    `features` is streamed into the archive batch by batch (its shape is known up front);
    the labels (small) are gathered and written after it.
    """
    import numpy as np

    partial = _partial(path)
    rows, seen, labels = 0, 0, []
    try:
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("features.npy", "w", force_zip64=True) as handle:
                header = {"descr": "<f4", "fortran_order": False, "shape": (split.num_examples, *split.feature_shape)}
                np.lib.format.write_array_header_1_0(handle, header)
                for features, batch_labels in batches:
                    seen += len(features)
                    if seen > split.num_examples:
                        continue  # more rows than the header says: reported below
                    handle.write(np.ascontiguousarray(features, dtype="<f4").tobytes())
                    labels.append(np.asarray(batch_labels))
                    rows = seen
                    on_rows(rows)
            _check_rows(split, seen, path)
            label_array = np.concatenate(labels)
            label_array = (label_array > 0.5).astype("int8") if split.task == "multilabel" else label_array.astype("int64")
            arrays = {"labels": label_array, "ids": np.asarray(list(split.ids(0, rows)), dtype=str),
                      "class_names": np.asarray(split.class_names, dtype=str)}
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
                    np.lib.format.write_array(handle, array, allow_pickle=False)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return rows


WRITERS = {"parquet": write_parquet, "npz": write_npz}


def _partial(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.partial")


def _check_rows(split: Split, rows: int, path: Path) -> None:
    from pipeline.errors import DataError

    if rows != split.num_examples:
        raise DataError(
            f"the feature cache gave {rows} rows for the {split.name} split, but the data has "
            f"{split.num_examples} examples, so {path.name} would not pair rows with their ids. "
            "Delete that split's entry under train.feature_cache_dir and run again."
        )
