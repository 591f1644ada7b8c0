"""A fitted scikit-learn classifier served on the backbone's features, stored as data (skops).

`head=sklearn` folds a linear classifier into a Dense layer (`pipeline.heads`); any other
classifier (an RBF `SVC`, `KNeighborsClassifier`, a random forest) has no layer of its own,
so `pipeline.estimator_layer.EstimatorLayer` calls it on the pooled features. This module
holds what needs no Keras: the classifier's outputs, its skops file, its digest.

skops files are data: loading one builds only scikit-learn's own classes (and what skops
trusts by default: NumPy, SciPy, builtins containers). A file naming any other type is
refused unless the caller trusts it (`allow_unsafe`), so a file from a store never chooses
code to run.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import ExportError
from pipeline.types import Task

SKOPS_FILE = "estimator.skops"  # in an export directory, beside the backbone's SavedModel


def estimator_probabilities(estimator: Any, features: Any, num_classes: int, task: Task) -> Any:
    """The classifier's outputs in the head's shape: `[n, 1]` (binary) or `[n, num_classes]`, float32.

    `predict_proba` where the estimator has it; otherwise a softmax (binary: a sigmoid) of
    `decision_function`, the same decisions, uncalibrated, as for `LinearSVC`. A class the
    training split lacked gets probability 0. `pipeline/mlflow_model.py` applies the same
    rule where the package is not installed; tests/test_oracle.py checks the two agree.
    """
    import numpy as np

    x = np.asarray(features, dtype="float64")
    classes = np.asarray(estimator.classes_).astype("int64")
    if hasattr(estimator, "predict_proba"):
        known = np.asarray(estimator.predict_proba(x), dtype="float64")
    else:
        decision = np.asarray(estimator.decision_function(x), dtype="float64")
        if decision.ndim == 1:  # two classes, one decision: sigmoid(z) is the second's probability
            known = np.stack([1 / (1 + np.exp(decision)), 1 / (1 + np.exp(-decision))], axis=1)
        else:
            shifted = np.exp(decision - decision.max(axis=1, keepdims=True))
            known = shifted / shifted.sum(axis=1, keepdims=True)
    probabilities = np.zeros((len(x), 2 if task == "binary" else num_classes))
    probabilities[:, classes] = known
    if task == "binary":
        return probabilities[:, 1:].astype("float32")
    return probabilities.astype("float32")


def dump_estimator(estimator: Any) -> bytes:
    """The estimator in skops format."""
    import skops.io

    return skops.io.dumps(estimator)


def load_estimator(data: bytes, where: str, allow_unsafe: bool = False) -> Any:
    """The classifier in skops bytes `data`; only scikit-learn's own types unless `allow_unsafe`.

    Raises:
        ExportError: naming `where` when the bytes are not a skops file or name other types.
    """
    import skops.io

    try:
        untrusted = skops.io.get_untrusted_types(data=data)
    except Exception as error:  # skops raises zipfile, KeyError, JSON errors for a bad file
        raise ExportError(
            f"{where} is not a scikit-learn estimator in skops format ({type(error).__name__}: "
            f"{str(error)[:200]}); it was written by another program or damaged."
        ) from error
    foreign = [name for name in untrusted if not name.startswith("sklearn.")]
    if foreign and not allow_unsafe:
        raise ExportError(
            f"{where} names types outside scikit-learn ({', '.join(foreign[:5])}), which loading would "
            "run; this pipeline writes none. Pass --allow-unsafe (source.allow_unsafe=true) only "
            "if you trust the file and whoever wrote it."
        )
    try:
        return skops.io.loads(data, trusted=untrusted)
    except Exception as error:
        raise ExportError(
            f"{where}: the estimator cannot be loaded ({type(error).__name__}: {str(error)[:200]}); "
            "check that scikit-learn here is the version that wrote it."
        ) from error


def estimator_digest(estimator: Any) -> bytes:
    """A SHA-256 of the estimator's state, equal for equal state (a reloaded copy too).

    Neither skops files (they embed object ids) nor pickles (their memo follows shared
    references) are canonical, so the state is walked as pickling would see it: arrays by
    dtype, shape and contiguous bytes, mappings by sorted key, other objects by class and
    `__reduce_ex__` state.
    """
    import hashlib
    import types

    import numpy as np

    digest = hashlib.sha256()

    def walk(value: Any, depth: int) -> None:
        if depth > 64:
            raise ValueError("the estimator's state nests deeper than 64 levels")
        if isinstance(value, np.ndarray) and value.dtype.names:  # by field: padding bytes are garbage
            digest.update(f"F{value.shape}".encode())
            for name in value.dtype.names:
                walk(name, depth + 1)
                walk(value[name], depth + 1)
        elif isinstance(value, np.ndarray) and value.dtype != object:
            digest.update(f"A{value.dtype.str}{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, np.ndarray):
            digest.update(f"O{value.shape}".encode())
            for item in value.ravel():
                walk(item, depth + 1)
        elif value is None or isinstance(value, (str, bytes, bool, int, float, complex, np.generic)):
            digest.update(f"{type(value).__name__}:{value!r};".encode())
        elif isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
            digest.update(f"T{value.__module__}.{value.__qualname__};".encode())
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}".encode())
            for key in sorted(value, key=repr):
                walk(key, depth + 1)
                walk(value[key], depth + 1)
        elif isinstance(value, (set, frozenset)):
            walk(sorted(value, key=repr), depth + 1)
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                walk(item, depth + 1)
        else:
            reduced = value.__reduce_ex__(5)
            if isinstance(reduced, str):  # a module-level singleton, named
                digest.update(f"S{reduced};".encode())
                return
            digest.update(f"R{type(value).__module__}.{type(value).__qualname__}".encode())
            walk([list(part) if isinstance(part, types.GeneratorType) or hasattr(part, "__next__") else part
                  for part in reduced[1:]], depth + 1)

    walk(estimator, 0)
    return digest.digest()
