"""`data=csv`: a CSV manifest of image paths and labels (one label, or several per image)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.data import dataset, scan
from pipeline.data.augment import Augmentation
from pipeline.data.decode import MAX_PIXELS, Resize
from pipeline.data.splits import stratified_split
from pipeline.errors import ConfigError, DataError
from pipeline.types import DataBundle

SHOWN = 5  # problems quoted in one error; the count says how many more there are

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class _Row:
    line: int  # the line in the file, as an editor shows it (the header is line 1)
    path: str  # as written in the manifest
    file: Path  # resolved against the manifest's folder
    labels: tuple[str, ...]
    split: str | None = None  # train, val or test, from data.split_column


class CsvData:
    """Images listed in a CSV file with their labels.

    Paths are relative to the manifest's folder (absolute paths work too). Files that are
    not decodable images are left out with a warning and listed in `skipped_files`; a row
    naming a missing file is an error that quotes its line.

    Args:
        manifest: the CSV file; its first line names the columns.
        path_column: the column with each image's path.
        label_column: the column with each image's label (or labels, see `multilabel`).
        multilabel: each row holds several labels separated by `label_separator`; labels
            become multi-hot vectors and the task is multilabel.
        label_separator: what separates labels in one cell when `multilabel`.
        class_names: the classes in index order; null takes the sorted distinct labels.
            When set, a label outside it is an error.
        split_column: a column naming each row's split (`train`, `val` or `test`), for a
            manifest that is already split; null holds out `val_split` and `test_split`.
        val_split: fraction held out for validation (per class unless `multilabel`).
        test_split: fraction held out for the test.
        image_size: `[height, width]` every image is brought to.
        channels: 1 (grayscale) or 3 (RGB).
        resize: resize, crop_or_pad or aspect_preserving.
        task: multiclass or binary (exactly two classes); ignored when `multilabel`.
        cache: null, memory, or a file path prefix for decoded images.
        deterministic: keep tf.data's element order reproducible.
        max_pixels: a file whose header declares more pixels (width x height) is left out
            unread, like an undecodable one; the export's `serving_bytes` refuses it.
        augmentation: random changes applied to training batches, or null.
        seed: seeds the split.

    Example:
        >>> # labels.csv:  path,label \\n images/1.jpg,cat \\n images/2.jpg,dog
        >>> CsvData(manifest="/data/labels.csv", image_size=[160, 160]).load().class_names
        ('cat', 'dog')
    """

    def __init__(
        self,
        manifest: str,
        path_column: str = "path",
        label_column: str = "label",
        multilabel: bool = False,
        label_separator: str = " ",
        class_names: list[str] | None = None,
        split_column: str | None = None,
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
        if multilabel and task == "binary":
            raise ConfigError(
                "data.task=binary with data.multilabel=true: a multilabel manifest already "
                "gives one yes/no output per class. Drop data.task or set data.multilabel=false."
            )
        if multilabel and not label_separator:
            raise ConfigError("data.label_separator='': set the character between labels, e.g. ' '")
        if class_names is not None and len(set(class_names)) != len(class_names):
            raise ConfigError(f"data.class_names={list(class_names)!r} repeats a name; list each once")
        self.manifest = manifest
        self.columns = (path_column, label_column)
        self.multilabel = multilabel
        self.label_separator = label_separator
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.split_column = split_column
        self.fractions = (val_split, test_split)
        self.task = "multilabel" if multilabel else task
        self.augmentation = augmentation
        self.seed = seed

    def load(self) -> DataBundle:
        import numpy as np

        rows, manifest_file = self._read()
        self._check_files(rows)
        class_names = self._classes(rows)
        unique = sorted({row.file for row in rows})
        scanned = dict(zip(unique, scan.scan_files(unique, max_pixels=self.settings.max_pixels)))
        skipped = sorted((str(f), s.problem) for f, s in scanned.items() if s.problem)
        scan.report_skipped(skipped, len(scanned), f"data.manifest={self.manifest!r}")
        rows = [row for row in rows if scanned[row.file].problem is None]
        self._check_every_class_has_images(rows, class_names)

        labels = self._encode(rows, class_names)
        if self.split_column:
            parts = {split: np.array([i for i, row in enumerate(rows) if row.split == split], "int64")
                     for split in SPLITS}
        else:
            # Multi-hot labels have no single class to stratify by: those split at random.
            strata = np.zeros(len(rows), "int64") if self.multilabel else labels
            parts = dict(zip(SPLITS, stratified_split(strata, *self.fractions, self.seed)))
        counts = {split: len(indices) for split, indices in parts.items()}
        dataset.require_examples(counts, self._fixes())

        relative = scan.relative_to(manifest_file.parent)
        used = {row.file for row in rows}
        fingerprint = scan.fingerprint(
            [(relative(str(f)), scanned[f].size, scanned[f].sha256) for f in used]
            + [(f"manifest:{manifest_file.name}", *scan.file_digest(manifest_file))],
            {"option": "csv", "seed": self.seed, "val_split": self.fractions[0],
             "test_split": self.fractions[1], "columns": self.columns,
             "split_column": self.split_column,
             "multilabel": self.multilabel, "class_names": class_names,
             # The separator decides how a cell reads ("cat dog": two labels, or one).
             "label_separator": self.label_separator if self.multilabel else None},
        )
        key = self.settings.cache_key(fingerprint)
        paths = np.array([str(row.file) for row in rows])
        splits = {
            split: dataset.file_dataset(paths[indices], labels[indices], self.settings, split, key)
            for split, indices in parts.items()
        }
        ids = {split: paths[indices].tolist() for split, indices in parts.items()}
        return dataset.make_bundle(splits, counts, class_names, self.settings, self.task,
                                   self.augmentation, [p for p, _ in skipped], fingerprint, ids)

    def _read(self) -> tuple[list[_Row], Path]:
        manifest = Path(self.manifest).expanduser()
        if not manifest.is_file():
            what = "is a folder" if manifest.is_dir() else "does not exist"
            raise DataError(
                f"data.manifest={self.manifest!r} {what}: point it at a CSV file whose first "
                f"line names the columns, e.g. `{self.columns[0]},{self.columns[1]}`."
            )
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            keys = ("data.path_column", "data.label_column", "data.split_column")
            for key, column in zip(keys, (*self.columns, self.split_column)):
                if column is not None and column not in header:
                    raise DataError(
                        f"data.manifest={self.manifest!r} has no column {column!r} ({key}); its "
                        f"columns are {header}. Set {key} to one of them or fix the header line."
                    )
            rows = [self._row(reader.line_num, record, manifest.parent) for record in reader]
        if not rows:
            raise DataError(f"data.manifest={self.manifest!r} lists no images: add rows under the header.")
        return rows, manifest

    def _row(self, line: int, record: dict, folder: Path) -> _Row:
        path_column, label_column = self.columns
        path = (record.get(path_column) or "").strip()
        cell = (record.get(label_column) or "").strip()
        if not path:
            raise DataError(
                f"data.manifest={self.manifest!r} line {line}: the {path_column!r} cell is empty. "
                "Fill in the image's path or remove the row."
            )
        if self.multilabel:
            labels = tuple(dict.fromkeys(p.strip() for p in cell.split(self.label_separator) if p.strip()))
        elif cell:
            labels = (cell,)
        else:
            raise DataError(
                f"data.manifest={self.manifest!r} line {line} ({path!r}): the {label_column!r} "
                "cell is empty. Fill in the label or remove the row."
            )
        split = None
        if self.split_column:
            split = (record.get(self.split_column) or "").strip()
            if split not in SPLITS:
                raise DataError(
                    f"data.manifest={self.manifest!r} line {line} ({path!r}): the "
                    f"{self.split_column!r} cell is {split!r}; expected one of {', '.join(SPLITS)} "
                    "(data.split_column). Fix the cell, or set data.split_column=null to hold out "
                    "data.val_split and data.test_split instead."
                )
        return _Row(line, path, folder / Path(path).expanduser(), labels, split)

    def _check_files(self, rows: list[_Row]) -> None:
        missing = [row for row in rows if not row.file.is_file()]
        if missing:
            quoted = "; ".join(f"line {r.line}: {r.path!r} (looked for {str(r.file)!r})" for r in missing[:SHOWN])
            more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
            raise DataError(
                f"data.manifest={self.manifest!r}: {len(missing)} row(s) name files that do not "
                f"exist: {quoted}{more}. Paths are relative to the manifest's folder; fix "
                "those paths or remove the rows."
            )

    def _classes(self, rows: list[_Row]) -> list[str]:
        if self.class_names is None:
            class_names = sorted({label for row in rows for label in row.labels})
        else:
            class_names = self.class_names
            known = set(class_names)
            unknown = [(r, label) for r in rows for label in r.labels if label not in known]
            if unknown:
                quoted = "; ".join(f"line {r.line}: {label!r}" for r, label in unknown[:SHOWN])
                more = f" and {len(unknown) - SHOWN} more" if len(unknown) > SHOWN else ""
                raise DataError(
                    f"data.manifest={self.manifest!r}: {len(unknown)} label(s) are not in "
                    f"data.class_names={class_names}: {quoted}{more}. Fix those rows or add "
                    "the labels to data.class_names."
                )
        dataset.check_classes(class_names, self.task, f"data.manifest={self.manifest!r}")
        return class_names

    def _check_every_class_has_images(self, rows: list[_Row], class_names: list[str]) -> None:
        if self.class_names is not None:
            return  # listed on purpose: a class may have no examples yet
        present = {label for row in rows for label in row.labels}
        empty = [name for name in class_names if name not in present]
        if empty:
            raise DataError(
                f"data.manifest={self.manifest!r}: label(s) {empty} have no decodable image left "
                "(see the skipped files above). Fix those files or remove their rows."
            )

    def _encode(self, rows: list[_Row], class_names: list[str]):
        import numpy as np

        index = {name: i for i, name in enumerate(class_names)}
        if not self.multilabel:
            return np.array([index[row.labels[0]] for row in rows], dtype="int64")
        hot = np.zeros((len(rows), len(class_names)), dtype="float32")
        for i, row in enumerate(rows):
            hot[i, [index[label] for label in row.labels]] = 1.0
        return hot

    def _fixes(self) -> dict[str, str]:
        if self.split_column:
            return {split: f"no row has {self.split_column}={split} (data.split_column). Mark some "
                           f"rows {split}." for split in SPLITS}
        val, test = self.fractions
        return {
            "train": f"data.val_split={val} and data.test_split={test} leave no training image. "
                     "Lower them or add rows.",
            "val": f"data.val_split={val} takes no image (too few rows per class). Raise it or add rows.",
            "test": f"data.test_split={test} takes no image (too few rows per class). Raise it or add rows.",
        }
