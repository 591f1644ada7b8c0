"""The only module that touches private APIs of Keras, Hydra and MLflow.

Each patch here names the upstream issue it works around, and checks, before it touches
anything, that the installed version still has what it patches: a release that renamed or
removed it fails with `IncompatibleVersion` naming the patch and the installed version,
instead of somewhere deep inside a training run. pyproject.toml pins Keras and hydra-core
to the minor versions these patches were tested with; tests/test_compat.py runs every check.
The MLflow patch only saves time: where MLflow no longer has what it replaces, MLflow's own
code runs, as it would without the patch.
(Optuna is used through its public API only: hydra_plugins/pipeline_optuna_sweeper.)

Keras, TensorFlow, Hydra and MLflow are imported inside the functions: config checks import this
module before TensorFlow.
"""

from __future__ import annotations

import contextlib
import inspect
from importlib import metadata
from typing import Any, Callable, Iterator

from pipeline.errors import IncompatibleVersion

# The patches, as their errors name them.
MULTI_WORKER_BUILD = "multi-worker build from a local batch (keras-team/keras#20585)"
MULTI_WORKER_REDUCE = (
    "multi-worker scalar metric reduction (keras-team/keras#20585, tensorflow/tensorflow#72388)"
)
VAR_KEY = "per-variable learning rates (keras-team/keras#11934)"
KERAS_DOWNLOADS = "fail-fast Keras downloads (keras.utils.get_file has no timeout)"
SAVED_MODEL_LAYER = "SavedModelLayer variable aliasing (tensorflow/tensorflow#65419)"
JOB_ERROR = "sweep job errors (hydra-ecosystem/hydra#1377)"
MLFLOW_PINS = "MLflow's check of a model's pins against the environment"


def require(owner: Any, attribute: str, *, patch: str, package: str) -> Any:
    """`owner.attribute`, or `IncompatibleVersion` naming `patch` when `package` dropped it.

    Example:
        >>> reduce = require(trainer, "reduce_per_replica", patch=MULTI_WORKER_REDUCE, package="keras")
    """
    if not hasattr(owner, attribute):
        raise _incompatible(f"{_describe(owner)}.{attribute}", patch=patch, package=package)
    return getattr(owner, attribute)


def _import(module: str, *, patch: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise _incompatible(f"the module {module}", patch=patch, package=package) from error


def _incompatible(what: str, *, patch: str, package: str) -> IncompatibleVersion:
    try:
        installed = f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        installed = f"this environment (no {package} installed)"
    return IncompatibleVersion(
        f"the patch '{patch}' in pipeline/compat.py needs {what}, which {installed} does not "
        f"have. Install the {package} version that pyproject.toml pins (pip install -e .), "
        "or update the patch for this version."
    )


def _describe(owner: Any) -> str:
    if inspect.ismodule(owner):
        return owner.__name__
    if inspect.isclass(owner):
        return f"{owner.__module__}.{owner.__qualname__}"
    return f"{type(owner).__qualname__} object"


# --- Keras: fit under MultiWorkerMirroredStrategy -------------------------------------------
# Keras builds metrics by reducing the first *distributed* batch eagerly, which
# MultiWorkerMirroredStrategy cannot do, and reduces scalar metrics along axis 0
# ("Invalid reduction dimension 0 for input with 0 dimensions"). We build from a local
# batch inside the strategy's scope and reduce scalars over replicas instead.
# tests/test_multi_worker.py fails if Keras changes the behaviour under these names.


def check_multi_worker_build() -> None:
    import keras

    for attribute in ("_symbolic_build", "_maybe_symbolic_build"):
        require(keras.Model, attribute, patch=MULTI_WORKER_BUILD, package="keras")


def build_for_multi_worker_fit(model: Any, strategy: Any, local_batch: Any) -> None:
    """Build `model`'s metrics from `local_batch` now, and stop `fit` from building them again."""
    symbolic_build = require(model, "_symbolic_build", patch=MULTI_WORKER_BUILD, package="keras")
    require(model, "_maybe_symbolic_build", patch=MULTI_WORKER_BUILD, package="keras")
    with strategy.scope():
        symbolic_build(data_batch=local_batch)
    model._maybe_symbolic_build = lambda *args, **kwargs: None


def check_multi_worker_reduce() -> Any:
    """The Keras TensorFlow trainer module, after checking that it has what the patch replaces."""
    trainer = _import("keras.src.backend.tensorflow.trainer", patch=MULTI_WORKER_REDUCE, package="keras")
    for attribute in ("reduce_per_replica", "_collective_all_reduce_multi_worker"):
        require(trainer, attribute, patch=MULTI_WORKER_REDUCE, package="keras")
    return trainer


def patch_multi_worker_reduce() -> None:
    """Make Keras reduce scalar metrics over replicas under MultiWorkerMirroredStrategy (once)."""
    import tensorflow as tf

    trainer = check_multi_worker_reduce()
    if getattr(trainer.reduce_per_replica, "_pipeline_patched", False):
        return
    original = trainer.reduce_per_replica
    is_multi_worker = trainer._collective_all_reduce_multi_worker

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and is_multi_worker(strategy):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None)
                if isinstance(v, tf.distribute.DistributedValues)
                else v,
                values,
            )
        return original(values, strategy, reduction)

    reduce_per_replica._pipeline_patched = True
    trainer.reduce_per_replica = reduce_per_replica


# --- Keras: per-variable learning rates -----------------------------------------------------
# Keras optimizers have one learning rate and no per-variable factor
# (keras-team/keras#11934). learning_rates.py matches variables by the optimizer's own key,
# which is stable across the Keras variable, its tf.Variable and distributed copies.


def check_var_key() -> None:
    import keras

    require(keras.optimizers.Optimizer, "_var_key", patch=VAR_KEY, package="keras")


def var_key(optimizer: Any, variable: Any) -> Any:
    """The key `optimizer` files `variable` under."""
    return require(optimizer, "_var_key", patch=VAR_KEY, package="keras")(variable)


# --- Keras: downloads that fail fast --------------------------------------------------------
# keras.applications fetch weights with file_utils.get_file, which takes no timeout and
# hangs offline (no upstream issue found). sources/keras_app.py wraps it for one build to
# check that the server answers first; the wrapper relies on these parameter names.
_GET_FILE_PARAMETERS = ("fname", "origin", "cache_subdir", "cache_dir")


def _keras_file_utils() -> Any:
    import keras

    file_utils = _import("keras.src.utils.file_utils", patch=KERAS_DOWNLOADS, package="keras")
    require(file_utils, "get_file", patch=KERAS_DOWNLOADS, package="keras")
    # The public function is the same one, and stays unwrapped (tests replace the module's).
    parameters = inspect.signature(keras.utils.get_file).parameters
    for name in _GET_FILE_PARAMETERS:
        if name not in parameters:
            raise _incompatible(f"the parameter {name!r} of keras.utils.get_file",
                                patch=KERAS_DOWNLOADS, package="keras")
    return file_utils


def check_keras_downloads() -> None:
    _keras_file_utils()


def keras_get_file() -> Callable[..., Any]:
    """The `get_file` that `keras.applications` call now."""
    return _keras_file_utils().get_file


@contextlib.contextmanager
def replace_keras_get_file(replacement: Callable[..., Any]) -> Iterator[None]:
    """Within the block, `keras.applications` download through `replacement`."""
    file_utils = _keras_file_utils()
    original = file_utils.get_file
    file_utils.get_file = replacement
    try:
        yield
    finally:
        file_utils.get_file = original


# --- Keras: SavedModelLayer -----------------------------------------------------------------
# hub.KerasLayer is a tf_keras layer that Keras 3 refuses (tensorflow/tensorflow#65419) and
# keras.layers.TFSMLayer copies the SavedModel's variables, so the restored functions never
# see the trained values. sources/saved_model_layer.py wraps each restored tf.Variable in a
# Keras variable whose storage *is* that variable: `_AliasVariable` overrides
# `keras.Variable._initialize` (which stores into `_value`) and stays in that module, which
# calls `check_saved_model_layer()` at import. The layer then tracks the wrappers after it is
# built, through `unlocked` and `track_variable` below.


def check_saved_model_layer() -> None:
    import keras

    for attribute in ("_initialize", "_initialize_with_initializer"):
        require(keras.Variable, attribute, patch=SAVED_MODEL_LAYER, package="keras")
    if "self._value" not in inspect.getsource(keras.Variable._initialize):
        raise _incompatible("keras.Variable._initialize to store the tensor in `_value`",
                            patch=SAVED_MODEL_LAYER, package="keras")
    require(keras.layers.Layer, "_track_variable", patch=SAVED_MODEL_LAYER, package="keras")
    tracking = _import("keras.src.utils.tracking", patch=SAVED_MODEL_LAYER, package="keras")
    tracker = require(tracking, "Tracker", patch=SAVED_MODEL_LAYER, package="keras")({})
    for attribute in ("locked", "lock", "unlock"):
        require(tracker, attribute, patch=SAVED_MODEL_LAYER, package="keras")


@contextlib.contextmanager
def unlocked(layer: Any) -> Iterator[None]:
    """Let a built `layer` track new variables (Keras locks a layer's state once built)."""
    tracker = require(layer, "_tracker", patch=SAVED_MODEL_LAYER, package="keras")
    locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if locked:
            tracker.lock()


def track_variable(layer: Any, variable: Any) -> None:
    """Make `variable` one of `layer`'s weights (trainable or not, as the variable says)."""
    require(layer, "_track_variable", patch=SAVED_MODEL_LAYER, package="keras")(variable)


# --- Hydra: the error of a failed sweep job -------------------------------------------------
# JobReturn hands a failed job's exception out only by raising it from `return_value`
# (hydra-ecosystem/hydra#1377 asked for a non-raising accessor); the sweep callback records
# it without raising.


def check_job_error() -> None:
    from hydra.core.utils import JobReturn

    require(JobReturn, "_return_value", patch=JOB_ERROR, package="hydra-core")


def job_error(job_return: Any) -> BaseException | None:
    """The exception a failed Hydra job raised; None when it did not fail."""
    if job_return.status.name != "FAILED":
        return None
    return require(job_return, "_return_value", patch=JOB_ERROR, package="hydra-core")


# --- MLflow: checking a logged model's pins -------------------------------------------------
# Saving a model, MLflow checks each of its pip requirements against the installed packages
# and warns of a mismatch (`warn_dependency_requirement_mismatches`). To do so it first maps
# every installed distribution to its modules (importlib's `packages_distributions`, which
# reads every distribution's file list): 0.5-0.8 s with this project's 160 packages, seconds
# in a large environment, paid by every run. `pins_checked_by_metadata` swaps in the same
# check made with `importlib.metadata.version` of each pinned package, which is where our
# pins come from (pipeline.tracking.model), and warns the same way.


def check_mlflow_pins() -> None:
    environment = _import("mlflow.utils.environment", patch=MLFLOW_PINS, package="mlflow")
    require(environment, "warn_dependency_requirement_mismatches", patch=MLFLOW_PINS, package="mlflow")


@contextlib.contextmanager
def pins_checked_by_metadata() -> Iterator[None]:
    """Meanwhile, MLflow's model saving checks its pins with `mismatched_pins` (see above)."""
    import importlib

    environment = importlib.import_module("mlflow.utils.environment")
    original = getattr(environment, "warn_dependency_requirement_mismatches", None)
    if original is None:  # a speed patch: MLflow's own check runs
        yield
        return
    environment.warn_dependency_requirement_mismatches = _warn_mismatched_pins
    try:
        yield
    finally:
        environment.warn_dependency_requirement_mismatches = original


def mismatched_pins(requirements: list[str]) -> list[str]:
    """The requirements that the installed packages do not satisfy, as MLflow words them:
    `name (current: 1.0, required: name==2.0)`. Lines that are not a requirement (a path,
    an option) and those whose marker excludes this environment are skipped, as MLflow does."""
    from packaging.requirements import InvalidRequirement, Requirement

    found = []
    for line in requirements:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.marker and not requirement.marker.evaluate():
            continue
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            found.append(f"{requirement.name} (current: {installed or 'uninstalled'}, required: {line})")
    return found


def _warn_mismatched_pins(requirements: list[str]) -> None:
    import logging

    mismatched = mismatched_pins(requirements)
    if mismatched:
        logging.getLogger("pipeline").warning(
            "the MLflow model's requirements do not match this environment: %s. Serving it "
            "elsewhere installs the required versions.", "; ".join(mismatched))


# Every check, for tests/test_compat.py.
CHECKS: tuple[Callable[[], Any], ...] = (
    check_multi_worker_build,
    check_multi_worker_reduce,
    check_var_key,
    check_keras_downloads,
    check_saved_model_layer,
    check_job_error,
    check_mlflow_pins,
)
