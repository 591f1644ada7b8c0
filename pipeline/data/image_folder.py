"""`data=image_folder`: one subfolder per class (`flowers/daisy/*.jpg`, `flowers/tulip/*.jpg`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.data import dataset, scan
from pipeline.data.augment import Augmentation
from pipeline.data.decode import MAX_PIXELS, Resize
from pipeline.data.splits import stratified_split
from pipeline.errors import DataError
from pipeline.types import DataBundle


class ImageFolderData:
    """Images in class subfolders; the sorted folder names are the class names.

    Files that are not decodable images (a truncated JPEG, a stray `.txt`) are left out
    with a warning and listed in `DataBundle.skipped_files`. Hidden files are ignored.
    The fingerprint is each file's bytes and its path inside the folder, links not followed
    (the class folder is the label); where the folder lives is not part of it, so a copy
    elsewhere shares the feature cache.

    Args:
        train_dir: folder with one subfolder per class (searched recursively).
        val_dir: optional folder laid out like `train_dir`; otherwise `val_split` of
            `train_dir` (per class) is held out.
        test_dir: optional, like `val_dir`, else `test_split` of `train_dir`.
        val_split: fraction of each class of `train_dir` for validation (without `val_dir`).
        test_split: fraction of each class of `train_dir` for the test (without `test_dir`).
        image_size: `[height, width]` every image is brought to.
        channels: 1 (grayscale) or 3 (RGB); images are converted either way.
        resize: resize (stretch), crop_or_pad (centre, no scaling) or aspect_preserving
            (scale to fit, pad).
        task: multiclass or binary (exactly two class folders; the second sorted is 1).
        cache: null, memory, or a file path prefix for decoded images.
        deterministic: keep tf.data's element order reproducible (a little slower).
        max_pixels: a file whose header declares more pixels (width x height) is left out
            unread, like an undecodable one; the export's `serving_bytes` refuses it.
        augmentation: random changes applied to training batches, or null.
        seed: seeds the split.

    Example:
        >>> bundle = ImageFolderData(train_dir="/data/flowers", image_size=[160, 160]).load()
        >>> bundle.class_names
        ('daisy', 'tulip')
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        test_dir: str | None = None,
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
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        self.fractions = {"val": 0.0 if val_dir else val_split, "test": 0.0 if test_dir else test_split}
        self.task = task
        self.augmentation = augmentation
        self.seed = seed

    def load(self) -> DataBundle:
        import numpy as np

        scans = {split: _scan_root(root, f"data.{split}_dir", self.settings.max_pixels)
                 for split, root in self.dirs.items() if root}
        class_names = sorted(scans["train"].classes)
        dataset.check_classes(class_names, self.task, f"data.train_dir={self.dirs['train']!r}")
        for split in scans.keys() - {"train"}:
            extra = sorted(set(scans[split].classes) - set(class_names))
            if extra:
                raise DataError(
                    f"data.{split}_dir={self.dirs[split]!r} has class folder(s) {extra} that "
                    f"data.train_dir lacks (its classes: {class_names}). Use the same folder "
                    "names in both, or remove those folders."
                )
        index = {name: i for i, name in enumerate(class_names)}

        def labelled(found: _FolderScan) -> list[tuple[str, int]]:
            return [(f.path, index[name]) for name, files in found.classes.items() for f in files]

        pool = labelled(scans["train"])
        labels = np.array([label for _, label in pool], dtype="int64")
        carved = stratified_split(labels, self.fractions["val"], self.fractions["test"], self.seed)
        pairs = {  # a split's own folder when given, else its share of train_dir
            split: labelled(scans[split]) if split != "train" and split in scans else [pool[i] for i in chosen]
            for split, chosen in zip(("train", "val", "test"), carved)
        }
        counts = {split: len(members) for split, members in pairs.items()}
        dataset.require_examples(counts, self._fixes(scans["train"]))

        fingerprint = scan.fingerprint(
            [entry for split, found in scans.items() for entry in found.entries(self.dirs[split], split)],
            {"option": "image_folder", "seed": self.seed, **self.fractions, "dirs": sorted(scans)},
        )
        key = self.settings.cache_key(fingerprint)
        splits = {
            split: dataset.file_dataset(
                [path for path, _ in members],
                np.array([label for _, label in members], dtype="int64"),
                self.settings, split, key,
            )
            for split, members in pairs.items()
        }
        skipped = [path for found in scans.values() for path, _ in found.skipped]
        ids = {split: [str(path) for path, _ in members] for split, members in pairs.items()}
        return dataset.make_bundle(splits, counts, class_names, self.settings, self.task,
                                   self.augmentation, skipped, fingerprint, ids)

    def _fixes(self, train: _FolderScan) -> dict[str, str]:
        return dataset.folder_fixes(train.classes, self.fractions, self.dirs, "image")


@dataclass(frozen=True)
class _FolderScan:
    """The decodable files of each class folder of one directory, and the skipped ones."""

    classes: dict[str, list[scan.ScannedFile]]
    skipped: list[tuple[str, str]]

    def entries(self, root: str, split: str) -> list[tuple[str, int, str]]:
        """`(split/relative path, size, sha256)` of the files used, for the fingerprint."""
        relative = scan.relative_to(Path(root).expanduser())
        return [(f"{split}/{relative(f.path)}", f.size, f.sha256)
                for files in self.classes.values() for f in files]


def _scan_root(root: str, key: str, max_pixels: int) -> _FolderScan:
    folders = scan.class_folders(root, key)
    listed = {name: scan.files_under(folder) for name, folder in folders}
    everything = [path for paths in listed.values() for path in paths]
    results = dict(zip(everything, scan.scan_files(everything, max_pixels=max_pixels)))
    skipped = [(r.path, r.problem) for r in results.values() if r.problem]
    scan.report_skipped(skipped, len(everything), key)
    classes = {}
    for name, folder in folders:
        classes[name] = [results[p] for p in listed[name] if results[p].problem is None]
        if not classes[name]:
            what = "is empty" if not listed[name] else "has no decodable images"
            raise DataError(
                f"{key}={root!r}: the class folder {str(folder)!r} {what}. Add images of "
                "that class or remove the folder."
            )
    return _FolderScan(classes, skipped)
