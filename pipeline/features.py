"""A disk cache of a frozen backbone's outputs, so head-only epochs skip the backbone.

While the backbone is frozen and the data is not augmented, each epoch would push every
image through the same function again. Instead the backbone's outputs for the training and
validation and test splits are computed once and stored with `tf.data.Dataset.save` (which
streams to disk, so a split larger than memory is fine) under a key made of the backbone's
fingerprint (its layers, weights, preprocessing and precision) and the data's. Later epochs,
later runs and the jobs of a sweep with the same key read them back; a different key
recomputes. Entries are written beside their final name and renamed into place, so a
concurrent job never reads half an entry. When the backbone never trained, the evaluate
stage scores the head on the cached validation and test outputs too (the same numbers as the
full model: the backbone is the one that made them); the export is always the full model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from pipeline.files import remove_stale

log = logging.getLogger("pipeline")
SPLITS = ("train", "val", "test")
FORMAT = "2"  # entries of another layout are never read (1 had no test split)


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

    def key(self, backbone: Any, data_fingerprint: str) -> str:
        text = f"{FORMAT}:{backbone_fingerprint(backbone)}:{data_fingerprint}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def load_or_compute(self, backbone: Any, data: Any, batch_size: int = 64) -> tuple[dict[str, Any], bool]:
        """The cached `(features, label)` datasets of each split, and whether they were cached."""
        import tensorflow as tf

        entry = self.root / self.key(backbone, data.fingerprint)
        hit = (entry / "meta.json").exists()
        if not hit:
            self._compute(backbone, data, entry, batch_size)
        log.info("feature cache %s: %s", "hit" if hit else "computed", entry)
        return {split: tf.data.Dataset.load(str(entry / split)) for split in SPLITS}, hit

    def _compute(self, backbone: Any, data: Any, entry: Path, batch_size: int) -> None:
        import tensorflow as tf

        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale(self.root, ".partial-*")  # of killed jobs; a live job's is fresh
        partial = self.root / f".partial-{entry.name}-{uuid.uuid4().hex[:8]}"
        extract = tf.function(lambda images: backbone(images, training=False))
        try:
            counts = {}
            for split in SPLITS:
                dataset = getattr(data, split).batch(batch_size)
                features = dataset.map(lambda x, y: (extract(x), y)).unbatch()
                features.save(str(partial / split))
                counts[split] = int(data.num_examples.get(split, 0))
                self.computed_examples += counts[split]
            (partial / "meta.json").write_text(json.dumps({"examples": counts}))
            try:
                os.replace(partial, entry)
            except OSError:  # another job finished the same entry first: keep theirs
                log.info("feature cache: %s was written by another job meanwhile", entry.name)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
