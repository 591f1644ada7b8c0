"""`data=text_folder`: one subfolder of `.txt` files per class (`aclImdb/train/pos/*.txt`)."""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.data import dataset, scan, text
from pipeline.data.splits import stratified_split
from pipeline.errors import ConfigError, DataError
from pipeline.types import DataBundle

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class TextFolderData:
    """Texts in class subfolders, one example per file: the layout of aclImdb.

    Every visible file below a class folder is read (searched recursively). A file that is
    not valid text in `encoding` (a stray image, a Latin-1 file read as UTF-8) or that is
    empty or only whitespace is left out with a warning and listed in
    `DataBundle.skipped_files`, as broken images are. The fingerprint is each file's bytes and
    its path inside the folder, plus `encoding` and `max_chars`; where the folder lives is
    not part of it, so a copy elsewhere shares the feature cache. Texts are held in memory.

    Args:
        train_dir: folder with one subfolder per class.
        val_dir: optional folder laid out like `train_dir`; otherwise `val_split` of
            `train_dir` (per class) is held out.
        test_dir: optional, like `val_dir`, else `test_split` of `train_dir`.
        class_names: the subfolders that are the classes, in index order (aclImdb's
            `train/` also holds `unsup/`: `[neg, pos]` leaves it out); null takes every
            subfolder, sorted.
        val_split: fraction of each class of `train_dir` for validation (without `val_dir`).
        test_split: fraction of each class of `train_dir` for the test (without `test_dir`).
        encoding: the files' text encoding (`utf-8`, `latin-1`, `cp1252`, ...).
        max_chars: keep each text's first `max_chars` characters; null keeps whole texts.
            Cutting to a number of tokens is the source's `seq_length`.
        task: multiclass or binary (exactly two classes; the second is 1).
        deterministic: keep tf.data's element order reproducible.
        seed: seeds the split.

    Example:
        >>> bundle = TextFolderData(train_dir="/data/aclImdb/train", test_dir="/data/aclImdb/test",
        ...                         class_names=["neg", "pos"], task="binary").load()
        >>> bundle.class_names, bundle.input_kind
        (('neg', 'pos'), 'text')
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        test_dir: str | None = None,
        class_names: list[str] | None = None,
        val_split: float = 0.2,
        test_split: float = 0.2,
        encoding: str = "utf-8",
        max_chars: int | None = None,
        task: Literal["multiclass", "binary"] = "multiclass",
        deterministic: bool = True,
        seed: int = 0,
    ):
        self.settings = text.text_settings(encoding, max_chars, deterministic)
        dataset.check_task(task)
        if class_names is not None and len(set(map(str, class_names))) != len(class_names):
            raise ConfigError(f"data.class_names={list(class_names)!r} repeats a name; list each folder once")
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        self.fractions = {"val": 0.0 if val_dir else val_split, "test": 0.0 if test_dir else test_split}
        self.task = task
        self.seed = seed

    def load(self) -> DataBundle:
        import numpy as np

        train = self._read_root("train")
        class_names = self.class_names or sorted(train.classes)
        dataset.check_classes(class_names, self.task, f"data.train_dir={self.dirs['train']!r}", examples="texts")
        reads = {"train": train}
        for split in ("val", "test"):
            if self.dirs[split]:
                reads[split] = self._read_root(split, class_names)
        index = {name: i for i, name in enumerate(class_names)}

        def labelled(found: _FolderRead) -> list[tuple[_Text, int]]:
            return [(t, index[name]) for name, texts in found.classes.items() for t in texts]

        pool = labelled(train)
        labels = np.array([label for _, label in pool], dtype="int64")
        carved = stratified_split(labels, self.fractions["val"], self.fractions["test"], self.seed)
        members = {  # a split's own folder when given, else its share of train_dir
            split: labelled(reads[split]) if split in reads and split != "train" else [pool[i] for i in chosen]
            for split, chosen in zip(SPLITS, carved)
        }
        dataset.require_examples({split: len(m) for split, m in members.items()}, self._fixes(train))

        fingerprint = scan.fingerprint(
            [entry for split, found in reads.items() for entry in found.entries(self.dirs[split], split)],
            {"option": "text_folder", "seed": self.seed, **self.fractions, "dirs": sorted(reads),
             "class_names": class_names, **self.settings.identity()},
        )
        skipped = [path for found in reads.values() for path, _ in found.skipped]
        return text.text_bundle(
            texts={split: [t.text for t, _ in m] for split, m in members.items()},
            labels={split: np.array([label for _, label in m], dtype="int64") for split, m in members.items()},
            class_names=class_names, task=self.task, settings=self.settings, skipped=skipped,
            fingerprint=fingerprint,
            example_ids={split: [t.path for t, _ in m] for split, m in members.items()},
        )

    def _read_root(self, split: str, train_classes: list[str] | None = None) -> _FolderRead:
        """The usable texts of each class folder of `data.<split>_dir`, and the skipped files.

        `data.class_names` picks the folders (null: all). Each class of `train_dir` must
        hold a usable text; a `val_dir` or `test_dir` may lack a class, but without
        `data.class_names` it may not add one that `train_dir` lacks (`train_classes`).
        """
        root, key = self.dirs[split], f"data.{split}_dir"
        folders = dict(_class_folders(root, key))
        required = split == "train"
        if self.class_names is None:
            chosen = folders
            extra = sorted(set(folders) - set(train_classes or folders))
            if extra:
                raise DataError(
                    f"{key}={root!r} has class folder(s) {extra} that data.train_dir lacks (its "
                    f"classes: {train_classes}). Use the same folder names in both, remove those "
                    "folders, or list the classes to read in data.class_names."
                )
        else:
            absent = [name for name in self.class_names if name not in folders]
            if absent and (required or len(absent) == len(self.class_names)):
                raise DataError(
                    f"data.class_names={self.class_names} names folder(s) {absent} that "
                    f"{key}={root!r} lacks; its subfolders are {sorted(folders)}. List only "
                    "those in data.class_names, or fix the folder names."
                )
            chosen = {name: folders[name] for name in self.class_names if name in folders}
            if len(folders) > len(chosen):
                log.info("%s: left out subfolder(s) %s, not in data.class_names", key,
                         sorted(folders.keys() - chosen.keys()))
        listed = {name: scan.files_under(folder) for name, folder in chosen.items()}
        everything = [path for paths in listed.values() for path in paths]
        with ThreadPoolExecutor(scan.WORKERS) as pool:  # bound by the disk, not by decoding
            results = dict(zip(everything, pool.map(lambda p: _read_file(p, self.settings), everything)))
        skipped = [(str(path), problem) for path, (_, problem) in results.items() if problem]
        text.report_skipped(skipped, len(everything), key, "fix them (re-save them as "
                            f"{self.settings.encoding}, or set data.encoding to theirs) or delete them.")
        classes: dict[str, list[_Text]] = {}
        for name, folder in chosen.items():
            classes[name] = [results[p][0] for p in listed[name] if results[p][1] is None]
            if not classes[name] and required:
                what = "is empty" if not listed[name] else "has no usable text"
                raise DataError(
                    f"{key}={root!r}: the class folder {str(folder)!r} {what}. Add texts of that "
                    "class, or remove the folder (or leave it out of data.class_names)."
                )
        return _FolderRead(classes, skipped)

    def _fixes(self, train: _FolderRead) -> dict[str, str]:
        return dataset.folder_fixes(train.classes, self.fractions, self.dirs, "text")


@dataclass(frozen=True)
class _Text:
    """One usable file: its path, its text (decoded, cut to max_chars), size and digest."""

    path: str
    text: str
    size: int
    sha256: str


@dataclass(frozen=True)
class _FolderRead:
    """The usable texts of each class folder of one directory, and the skipped files."""

    classes: dict[str, list[_Text]]
    skipped: list[tuple[str, str]]

    def entries(self, root: str, split: str) -> list[tuple[str, int, str]]:
        """`(split/relative path, size, sha256)` of the files used, for the fingerprint."""
        relative = scan.relative_to(Path(root).expanduser())
        return [(f"{split}/{relative(t.path)}", t.size, t.sha256)
                for texts in self.classes.values() for t in texts]


def _read_file(path: Path, settings: text.TextSettings) -> tuple[_Text | None, str | None]:
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, f"cannot be read ({error.strerror})"
    found, problem = text.read_text(data, settings)
    if problem:
        return None, problem
    return _Text(str(path), found, len(data), hashlib.sha256(data).hexdigest()), None


def _class_folders(root: str, key: str) -> list[tuple[str, Path]]:
    return scan.class_folders(root, key, items="texts", layout=(
        "one subfolder of .txt files per class (for example aclImdb/train/neg/*.txt, aclImdb/train/pos/*.txt)"))
