"""Stratified, seeded train/val/test index splits shared by the data options.

Why not scikit-learn's `train_test_split(stratify=...)`: it refuses a class with a single
member and a held-out split smaller than the number of classes, both of which a user's
small folder meets (a class of one photo trains; it just gets no test image). This rounds
each class's share on its own instead, and one seed always gives the same three splits.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import ConfigError


def stratified_split(
    labels: np.ndarray, val_split: float, test_split: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train, val and test; each class is split in the same proportions.

    The same labels and seed always give the same split.
    """
    for key, value in (("data.val_split", val_split), ("data.test_split", test_split)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}={value!r}: expected a fraction in [0, 1), for example 0.2")
    if val_split + test_split >= 1.0:
        raise ConfigError(
            f"data.val_split + data.test_split = {val_split + test_split:.2f}: nothing is left "
            "to train on; keep their sum below 1, for example 0.15 and 0.15"
        )
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_split))
        n_val = int(round(len(members) * val_split))
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_val])
        parts[0].append(members[n_test + n_val :])
    return tuple(rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts)
