"""A disk cache of a frozen backbone's outputs, so head-only epochs skip the backbone.

While the backbone is frozen and the data is not augmented, each epoch would push every
image through the same function again. Instead the backbone's outputs for the training and
validation and test splits are computed once and written batch by batch (so a split larger
than memory is fine) as TFRecord files of serialized tensors, under a key made of the
backbone's fingerprint (its layers, weights, preprocessing and precision) and the data's.
Later epochs, later runs and the jobs of a sweep with the same key read them back; a
different key recomputes. Entries are written beside their final name and renamed into
place, so a concurrent job never reads half an entry. When the backbone never trained, the
evaluate stage scores the head on the cached validation and test outputs too (the same
numbers as the full model: the backbone is the one that made them); the export is always
the full model.

Each entry records whether its rows follow the data's element order (`ordered`: every split
kept its order, as with `data.deterministic=true`); each split is one file of features and
one of labels, read back in the order written. Training takes any entry; `pipeline.extract`
only an ordered one, since it pairs row `i` with the split's `example_ids[i]`. When the
entry under a key is not ordered (or predates the flag), an ordered one is written beside
it as `<key>-ordered`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pipeline.files import remove_stale

log = logging.getLogger("pipeline")
SPLITS = ("train", "val", "test")
FORMAT = "3"  # entries of another layout are never read (1 had no test split, 2 was tf.data.Dataset.save)


def backbone_fingerprint(backbone: Any) -> str:
    """A digest of what determines the backbone's outputs: structure, weights, precision."""
    from pipeline.sources.backbone import walk_layers

    digest = hashlib.sha256()
    for layer in walk_layers(backbone):
        # Not layer.name: Keras numbers auto-named layers per process (input_layer_1, ...),
        # which gave every sweep job after the first a new key.
        config = {"class": type(layer).__name__, "dtype": layer.dtype_policy.name}
        for key in ("mode", "handle", "signature", "output_key"):  # preprocessing, SavedModels
            if hasattr(layer, key):
                config[key] = str(getattr(layer, key))
        for key in ("preprocessor", "seq_length"):  # a text model's tokenizing (absent: earlier keys hold)
            if getattr(layer, key, None) is not None:
                config[key] = str(getattr(layer, key))
        digest.update(json.dumps(config, sort_keys=True).encode())
    for variable in backbone.weights:
        digest.update(str(tuple(variable.shape)).encode())
        digest.update(variable.numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Backbone outputs per split, on disk under `root/<key>/`.

    Args:
        root: the cache directory, shared by runs and sweep jobs.

    Example:
        >>> splits, hit = FeatureCache(Path("outputs/feature_cache")).load_or_compute(backbone, data)
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.computed_examples = 0  # backbone outputs computed by this instance (tests count them)
        # The backbone's inference as the pass traced it, for the export to call (None: not computed here).
        self.backbone_function: Any = None

    def key(self, backbone: Any, data_fingerprint: str) -> str:
        text = f"{FORMAT}:{backbone_fingerprint(backbone)}:{data_fingerprint}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def load_or_compute(
        self,
        backbone: Any,
        data: Any,
        batch_size: int = 64,
        ordered: bool = False,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """The cached `(features, label)` datasets of each split, and whether they were cached.

        Args:
            ordered: only an entry whose rows follow the data's element order will do (the
                data must keep its order itself, else ValueError).
            on_batch: called as `on_batch(split, examples)` after each batch the backbone
                computes, for progress reports.
        """
        if ordered and not in_order(data):
            raise ValueError("FeatureCache(ordered=True) needs data that keeps its order (data.deterministic=true)")
        key = self.key(backbone, data.fingerprint)
        entries = [self.root / key, self.root / f"{key}-ordered"]
        found = next((entry for entry in entries if _usable(entry, ordered)), None)
        hit = found is not None
        if not hit:
            found = self._compute_first_free(backbone, data, entries, ordered, batch_size, on_batch)
        log.info("feature cache %s: %s", "hit" if hit else "computed", found)
        specs = json.loads((found / "meta.json").read_text())["specs"]
        return {split: _read(found / split, specs[split]) for split in SPLITS}, hit

    def _compute_first_free(self, backbone, data, entries: list[Path], ordered: bool, batch_size: int,
                            on_batch) -> Path:
        """Computes into the first entry name not taken; returns the usable entry written."""
        for entry in entries:
            if not (entry / "meta.json").exists():
                self._compute(backbone, data, entry, batch_size, on_batch)
                if _usable(entry, ordered):  # else another job wrote an unordered one there first
                    return entry
        raise RuntimeError(f"feature cache: no usable entry among {[e.name for e in entries]} in {self.root}")

    def _compute(
        self, backbone: Any, data: Any, entry: Path, batch_size: int,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        import tensorflow as tf

        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale(self.root, ".partial-*")  # of killed jobs; a live job's is fresh
        partial = self.root / f".partial-{entry.name}-{uuid.uuid4().hex[:8]}"
        images, labels = data.train.element_spec
        # One trace for every batch size (a split's last batch is smaller): tracing a large
        # backbone costs seconds each time.
        extract = tf.function(lambda x: backbone(x, training=False),
                              input_signature=[tf.TensorSpec((None, *images.shape), images.dtype)])
        traced = extract.get_concrete_function().structured_outputs
        # Outside a distribution strategy's scope the same trace serves the export, which
        # runs outside it too; inside one, the export traces its own.
        self.backbone_function = None if tf.distribute.has_strategy() else extract
        specs = {"features": _spec(traced.shape[1:], traced.dtype), "labels": _spec(labels.shape, labels.dtype)}
        try:
            counts = {}
            for split in SPLITS:
                counts[split] = _write(partial / split, getattr(data, split).batch(batch_size), extract,
                                       split, on_batch)
                self.computed_examples += counts[split]
            meta = {"examples": counts, "ordered": in_order(data), "specs": dict.fromkeys(SPLITS, specs)}
            (partial / "meta.json").write_text(json.dumps(meta))
            try:
                os.replace(partial, entry)
            except OSError:  # another job finished the same entry first: keep theirs
                log.info("feature cache: %s was written by another job meanwhile", entry.name)
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def in_order(data: Any) -> bool:
    """Whether every split of `data` yields its elements in a fixed order (tf.data's default;
    `data.deterministic=false` lets parallel decoding reorder them)."""
    return all(getattr(data, split).options().deterministic is not False for split in SPLITS)


def _usable(entry: Path, ordered: bool) -> bool:
    """A finished entry; when `ordered`, one whose rows are known to follow the data's order."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return not ordered or meta.get("ordered") is True


def _write(folder: Path, batches: Any, extract: Any, split: str,
           on_batch: Callable[[str, int], None] | None) -> int:
    """Computes `extract` on each batch and writes `features.tfrecord` and `labels.tfrecord` in
    `folder` (one serialized tensor per batch each); returns the examples written.

    The backbone runs here, in the caller's thread, as the plain `predict` loop a user writes
    does: inside a `Dataset.map` its ops ran on tf.data's threads, one thread each (about 3x
    slower on 2 cores), and called from a generator feeding `Dataset.save` they cost 7% more
    CPU time than this loop (300 images of 224x224, MobileNetV2, 2 cores: 20.2-21.3 s
    against 18.6-19.5). Batches are prefetched as deep as tf.data's autotuning chooses, as a
    user's loop does: one batch ahead left the backbone waiting for decoded images (the same
    SavedModel over 300 images of 224x224, one process: 8.1-9.3 s of wall time against
    7.4-8.1 s). Tells `on_batch(split, examples)` after each batch, for progress.
    """
    import tensorflow as tf

    folder.mkdir(parents=True)
    written = 0
    with _file_errors(folder):
        features = tf.io.TFRecordWriter(str(folder / "features.tfrecord"))
        labels = tf.io.TFRecordWriter(str(folder / "labels.tfrecord"))
    try:
        for images, batch_labels in batches.prefetch(tf.data.AUTOTUNE):
            computed = extract(images)
            with _file_errors(folder):
                features.write(tf.io.serialize_tensor(computed).numpy())
                labels.write(tf.io.serialize_tensor(batch_labels).numpy())
            written += int(computed.shape[0])
            if on_batch is not None:
                on_batch(split, int(computed.shape[0]))
    except BaseException:  # the backbone's error, a full disk, Ctrl-C: the files are let go now
        for writer in (features, labels):
            with suppress(tf.errors.OpError):
                writer.close()
        raise
    with _file_errors(folder):
        features.close()
        labels.close()
    return written


@contextmanager
def _file_errors(folder: Path) -> Iterator[None]:
    """TensorFlow's errors of a file write (a full disk, a refused permission) as OSError,
    which the trainer takes for an unusable cache folder; the backbone's own errors pass."""
    import errno

    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as error:
        code = {tf.errors.ResourceExhaustedError: errno.ENOSPC,
                tf.errors.PermissionDeniedError: errno.EACCES}.get(type(error), errno.EIO)
        raise OSError(code, error.message, str(folder)) from error


def _spec(shape: Any, dtype: Any) -> dict[str, Any]:
    """One example's shape and dtype, as meta.json records them."""
    return {"shape": [None if dim is None else int(dim) for dim in shape], "dtype": dtype.name}


def _read(folder: Path, specs: dict[str, Any]) -> Any:
    """A split written by `_write`, as a dataset of `(features, label)` examples in the order written."""
    import tensorflow as tf

    def tensors(name: str) -> Any:
        spec = specs[name]
        shape, dtype = [None, *spec["shape"]], tf.as_dtype(spec["dtype"])
        return tf.data.TFRecordDataset(str(folder / f"{name}.tfrecord")).map(
            lambda record: tf.ensure_shape(tf.io.parse_tensor(record, dtype), shape))

    return tf.data.Dataset.zip(tensors("features"), tensors("labels")).unbatch()
