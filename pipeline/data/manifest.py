"""`data=csv`: a CSV manifest of image paths and labels (one label, or several per image).

With `text_column` the examples are the texts in that column instead, read from the CSV
itself: no file is opened and the image keys are ignored.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.data import dataset, scan, text
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
    path: str  # as written in the manifest ('' for a text row)
    file: Path | None  # resolved against the manifest's folder (None for a text row)
    labels: tuple[str, ...]
    split: str | None = None  # train, val or test, from data.split_column
    text: str | None = None  # the data.text_column cell, as written


class CsvData:
    """Images listed in a CSV file with their labels, or texts written in it.

    Paths are relative to the manifest's folder (absolute paths work too). Files that are
    not decodable images are left out with a warning and listed in `skipped_files`; a row
    naming a missing file is an error that quotes its line.

    With `text_column`, each row's cell in that column is the example's text (a text
    DataBundle: `input_kind="text"`); `path_column` and the image keys are not used. A row
    whose text is empty or only whitespace is left out with a warning and listed in
    `skipped_files` as `<manifest>:<line>`, which is also each text's example id. The
    fingerprint is the manifest's bytes plus the settings, so any edited cell changes it.

    Args:
        manifest: the CSV file; its first line names the columns.
        path_column: the column with each image's path.
        label_column: the column with each image's label (or labels, see `multilabel`).
        text_column: the column with each example's text, for text data; null reads
            images from `path_column`.
        max_chars: with `text_column`, keep each text's first `max_chars` characters; null
            keeps whole texts (cutting to tokens is the source's `seq_length`).
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
        >>> # reviews.csv:  review,sentiment \\n "A slow, lovely film.",pos \\n ...
        >>> CsvData(manifest="/data/reviews.csv", text_column="review", label_column="sentiment").load().input_kind
        'text'
    """

    def __init__(
        self,
        manifest: str,
        path_column: str = "path",
        label_column: str = "label",
        text_column: str | None = None,
        max_chars: int | None = None,
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
        self.text_settings = text.text_settings("utf-8", max_chars, deterministic)
        dataset.check_task(task)
        if text_column is not None and not str(text_column).strip():
            raise ConfigError(
                "data.text_column='': set it to the column that holds each text, or null to "
                "read images from data.path_column."
            )
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
        self.text_column = text_column
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
        if self.text_column:
            return self._load_texts(rows, manifest_file)
        self._check_files(rows)
        class_names = self._classes(rows)
        unique = sorted({row.file for row in rows})
        scanned = dict(zip(unique, scan.scan_files(unique, max_pixels=self.settings.max_pixels)))
        skipped = sorted((str(f), s.problem) for f, s in scanned.items() if s.problem)
        scan.report_skipped(skipped, len(scanned), f"data.manifest={self.manifest!r}")
        rows = [row for row in rows if scanned[row.file].problem is None]
        self._check_every_class_has_images(rows, class_names)

        labels = self._encode(rows, class_names)
        parts = self._parts(rows, labels)
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

    def _load_texts(self, rows: list[_Row], manifest_file: Path) -> DataBundle:
        """The text bundle of `data.text_column`: empty texts skipped, the rest split."""
        import numpy as np

        names = [f"{manifest_file}:{row.line}" for row in rows]  # the example ids
        read = [text.read_text(row.text, self.text_settings) for row in rows]
        skipped = [(name, problem) for name, (_, problem) in zip(names, read) if problem]
        text.report_skipped(skipped, len(rows), f"data.manifest={self.manifest!r}",
                            f"fill in their {self.text_column!r} cells (data.text_column) or remove the rows.")
        class_names = self._classes(rows)
        kept = [i for i, (_, problem) in enumerate(read) if problem is None]
        rows = [rows[i] for i in kept]
        self._check_every_class_has_images(rows, class_names)
        labels = self._encode(rows, class_names)
        parts = self._parts(rows, labels)
        dataset.require_examples({split: len(indices) for split, indices in parts.items()}, self._fixes())

        fingerprint = scan.fingerprint(  # the texts are in the manifest: its bytes are their identity
            [(f"manifest:{manifest_file.name}", *scan.file_digest(manifest_file))],
            {"option": "csv", "seed": self.seed, "val_split": self.fractions[0],
             "test_split": self.fractions[1], "columns": ("text", self.text_column, self.columns[1]),
             "split_column": self.split_column, "multilabel": self.multilabel, "class_names": class_names,
             "label_separator": self.label_separator if self.multilabel else None,
             **self.text_settings.identity()},
        )
        texts = np.array([read[i][0] for i in kept], dtype=object)
        ids = np.array([names[i] for i in kept], dtype=object)
        return text.text_bundle(
            texts={split: texts[indices].tolist() for split, indices in parts.items()},
            labels={split: labels[indices] for split, indices in parts.items()},
            class_names=class_names, task=self.task, settings=self.text_settings,
            skipped=[name for name, _ in skipped], fingerprint=fingerprint,
            example_ids={split: ids[indices].tolist() for split, indices in parts.items()},
        )

    def _parts(self, rows: list[_Row], labels) -> dict:
        """Split -> row indices: from `data.split_column`, else stratified by `seed`."""
        import numpy as np

        if self.split_column:
            return {split: np.array([i for i, row in enumerate(rows) if row.split == split], "int64")
                    for split in SPLITS}
        # Multi-hot labels have no single class to stratify by: those split at random.
        strata = np.zeros(len(rows), "int64") if self.multilabel else labels
        return dict(zip(SPLITS, stratified_split(strata, *self.fractions, self.seed)))

    def _read(self) -> tuple[list[_Row], Path]:
        manifest = Path(self.manifest).expanduser()
        if not manifest.is_file():
            what = "is a folder" if manifest.is_dir() else "does not exist"
            first = self.text_column or self.columns[0]
            raise DataError(
                f"data.manifest={self.manifest!r} {what}: point it at a CSV file whose first "
                f"line names the columns, e.g. `{first},{self.columns[1]}`."
            )
        try:
            with manifest.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                header = reader.fieldnames or []
                self._check_header(header)
                rows = [self._row(reader.line_num, record, manifest.parent) for record in reader]
        except UnicodeDecodeError as error:
            raise DataError(
                f"data.manifest={self.manifest!r} is not UTF-8 text ({error.reason} at byte "
                f"{error.start}): re-save the CSV as UTF-8."
            ) from None
        if not rows:
            what = "texts" if self.text_column else "images"
            raise DataError(f"data.manifest={self.manifest!r} lists no {what}: add rows under the header.")
        return rows, manifest

    def _check_header(self, header: list[str]) -> None:
        if self.text_column and self.text_column not in header:
            raise ConfigError(
                f"data.text_column={self.text_column!r} is not a column of data.manifest="
                f"{self.manifest!r}; its columns are {header}. Set data.text_column to the one "
                "that holds the texts, or null to read images from data.path_column."
            )
        keys = ("data.path_column", "data.label_column", "data.split_column")
        for key, column in zip(keys, (*self.columns, self.split_column)):
            if key == "data.path_column" and self.text_column:
                continue  # a text manifest needs no file paths
            if column is not None and column not in header:
                raise DataError(
                    f"data.manifest={self.manifest!r} has no column {column!r} ({key}); its "
                    f"columns are {header}. Set {key} to one of them or fix the header line."
                )

    def _row(self, line: int, record: dict, folder: Path) -> _Row:
        path_column = self.columns[0]
        if self.text_column:  # the row is its text: no path, and rows are named by line only
            return self._labelled_row(line, record, "", None, record.get(self.text_column) or "")
        path = (record.get(path_column) or "").strip()
        if not path:
            raise DataError(
                f"data.manifest={self.manifest!r} line {line}: the {path_column!r} cell is empty. "
                "Fill in the image's path or remove the row."
            )
        return self._labelled_row(line, record, path, folder / Path(path).expanduser(), None)

    def _labelled_row(self, line: int, record: dict, path: str, file: Path | None, body: str | None) -> _Row:
        """The row with its labels and split read; `path` is '' for a text row."""
        label_column = self.columns[1]
        where = f"line {line} ({path!r})" if path else f"line {line}"
        cell = (record.get(label_column) or "").strip()
        if self.multilabel:
            labels = tuple(dict.fromkeys(p.strip() for p in cell.split(self.label_separator) if p.strip()))
        elif cell:
            labels = (cell,)
        else:
            raise DataError(
                f"data.manifest={self.manifest!r} {where}: the {label_column!r} "
                "cell is empty. Fill in the label or remove the row."
            )
        split = None
        if self.split_column:
            split = (record.get(self.split_column) or "").strip()
            if split not in SPLITS:
                raise DataError(
                    f"data.manifest={self.manifest!r} {where}: the "
                    f"{self.split_column!r} cell is {split!r}; expected one of {', '.join(SPLITS)} "
                    "(data.split_column). Fix the cell, or set data.split_column=null to hold out "
                    "data.val_split and data.test_split instead."
                )
        return _Row(line, path, file, labels, split, body)

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
            what = (f"non-empty text (data.text_column={self.text_column!r}) left (see the skipped "
                    "rows above). Fill in their texts" if self.text_column else
                    "decodable image left (see the skipped files above). Fix those files")
            raise DataError(f"data.manifest={self.manifest!r}: label(s) {empty} have no {what} or remove their rows.")

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
        noun = "text" if self.text_column else "image"
        return {
            "train": f"data.val_split={val} and data.test_split={test} leave no training {noun}. "
                     "Lower them or add rows.",
            "val": f"data.val_split={val} takes no {noun} (too few rows per class). Raise it or add rows.",
            "test": f"data.test_split={test} takes no {noun} (too few rows per class). Raise it or add rows.",
        }
