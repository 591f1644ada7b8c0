"""A config read back from a store is data: what it may make this machine do.

`pipeline.rerun` rebuilds a run from its stored `config.yaml`, which anyone who can write the
store's artifacts can edit. Before anything is built from it, `check_replay` refuses:

- a `_target_` outside this package, `keras.optimizers.*`, `keras.losses.*` and the
  scikit-learn estimators `head=sklearn` serves (Hydra would import and call it:
  `builtins.open`, `os.system`, ...);
- a resolver (`${oc.env:SECRET}`, `${oc.decode:...}`): a stored config is already resolved,
  so one there can only read the machine;
- a setting that runs code from a file (`allow_unsafe: true`, `safe_mode: false`), unless
  the user passed `--allow-unsafe` on the command line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pipeline.errors import ConfigError

# The estimator families head=sklearn serves (pipeline.heads.SklearnHead) and the transformers a
# Pipeline may put before them: classes whose constructors only store their arguments. Not the
# rest of scikit-learn (sklearn.datasets fetches over the network, sklearn.utils runs anything).
SKLEARN_TARGETS = tuple(f"sklearn.{name}" for name in (
    "linear_model.", "svm.", "neighbors.", "ensemble.", "tree.", "naive_bayes.", "discriminant_analysis.",
    "neural_network.", "gaussian_process.GaussianProcessClassifier", "calibration.CalibratedClassifierCV",
    "multiclass.", "pipeline.Pipeline", "preprocessing.StandardScaler", "preprocessing.MinMaxScaler",
    "preprocessing.MaxAbsScaler", "preprocessing.RobustScaler", "preprocessing.Normalizer",
    "decomposition.PCA", "random_projection.",
))
ALLOWED_TARGETS = ("pipeline.", "keras.optimizers.", "keras.losses.", *SKLEARN_TARGETS)
_RESOLVER = re.compile(r"\$\{\s*[\w.-]+\s*:")
_RUNS_CODE = {"allow_unsafe": True, "safe_mode": False}


def check_replay(config: Any, allow_unsafe: bool = False, where: str = "the stored config") -> None:
    """Raises ConfigError naming the key of the first thing a replay may not do."""
    for key, value in _walk(config, ""):
        name = key.rsplit(".", 1)[-1]
        if name == "_target_" and not (isinstance(value, str) and value.startswith(ALLOWED_TARGETS)):
            raise ConfigError(
                f"{where}: {key}={value!r} is not a class of this pipeline, keras.optimizers, "
                "keras.losses or a scikit-learn estimator that head=sklearn serves; a replayed config "
                "may not build it. Run it yourself from a config file you trust instead of replaying "
                "the store's."
            )
        if isinstance(value, str) and _RESOLVER.search(value):
            raise ConfigError(
                f"{where}: {key}={value!r} calls a resolver; a replayed config is resolved already, "
                "so it may not read this machine (environment, files). Remove it from the stored config."
            )
        if name in _RUNS_CODE and value == _RUNS_CODE[name] and not allow_unsafe:
            raise ConfigError(
                f"{where}: {key}={value!r} would run Python code stored in a model file. Pass "
                "--allow-unsafe on the command line if you trust that file and the store."
            )


def _walk(node: Any, prefix: str):
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{prefix}{key}"
            yield path, value
            yield from _walk(value, path + ".")
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield f"{prefix[:-1]}[{index}]", value
            yield from _walk(value, f"{prefix[:-1]}[{index}].")
