"""`source=run`: the fine-tuned backbone of an earlier run of this pipeline, under a new head.

An earlier run leaves `<run_dir>/checkpoints/last.keras` (the whole model, written after
every epoch) and `state.json`. Its sub-model `backbone` is the source's preprocessing and
feature extractor as that run fine-tuned them, and maps raw 0-255 images to features like
any other source, so a new head for another task goes on it: transfer in stages.

A run id is looked up in the MLflow store, whose `run_dir` tag anyone who can write the store
can change; the directory it names is used only if its `mlflow_run.json` records that id.
The checkpoint loads in Keras safe mode, and a SavedModel stored in it is checked
(`pipeline.sources.graph_check`) before it is restored, unless `allow_unsafe`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, SourceError
from pipeline.types import SourceModel

log = logging.getLogger("pipeline")

_RUN_ID = re.compile(r"[0-9a-f]{32}")  # what MLflow gives a run: a uuid4 in hex
_CHECKPOINT = Path("checkpoints") / "last.keras"
_STATE = Path("checkpoints") / "state.json"


class RunSource:
    """The backbone an earlier run fine-tuned, read from its last checkpoint.

    Input shape and preprocessing come from the checkpoint; the earlier run's head is
    dropped, so the new head may have another number of classes or another task.

    Args:
        run: the earlier run's directory (`outputs/runs/<date_time>`, the one holding
            `checkpoints/last.keras`), or its MLflow run id.
        tracking_uri: the MLflow store to look a run id up in (its `run_dir` tag); not used
            when `run` is a directory.
        allow_unsafe: load the checkpoint with Keras safe mode off (Lambda layers run
            Python code from it) and restore a stored SavedModel whose graph touches files
            or runs Python. Only for runs you trust.
        trainable: whether fine-tuning may change the backbone's weights again, whatever
            froze them in the earlier run (this run's `freeze` decides). When false the
            backbone is pinned: it runs in inference mode (BatchNorm statistics fixed) and
            no freeze setting unfreezes it.

    Example:
        >>> RunSource(run="outputs/runs/2026-11-21_21-37-16_304034", trainable=False).load()
    """

    def __init__(
        self,
        run: str,
        tracking_uri: str = "sqlite:///mlflow.db",
        allow_unsafe: bool = False,
        trainable: bool = True,
    ):
        self.run = run
        self.tracking_uri = tracking_uri
        self.allow_unsafe = allow_unsafe
        self.trainable = trainable

    def load(self) -> SourceModel:
        run_dir = resolve_run(self.run, self.tracking_uri, key="source.run")
        model_path, state = read_checkpoint(run_dir, key="source.run")
        log.info("source.run: %s after %d epoch(s)", model_path, state["epochs_completed"])
        backbone = self._backbone(_load(model_path, self.run, self.allow_unsafe))
        if self.trainable:
            _unpin(backbone)
        input_shape = tuple(backbone.inputs[0].shape[1:])
        if None in input_shape:
            raise SourceError(
                f"source.run={self.run!r}: the backbone in {model_path} takes images of shape "
                f"{input_shape} with free dimensions; this pipeline needs a fixed image size. "
                "Use a run whose source had a fixed source.input_shape."
            )
        preprocess = _preprocess_layer(backbone)
        mode = preprocess.mode if preprocess is not None else "none"
        description = f"run:{run_dir}"
        if self.trainable:
            return SourceModel(
                backbone=backbone,
                input_shape=input_shape,
                feature_shape=tuple(backbone.outputs[0].shape[1:]),
                preprocess=mode,
                description=description,
            )
        import keras

        from pipeline.sources.backbone import build_backbone
        from pipeline.sources.backbone import pin

        # Preprocessing stays the first layer, in front of the pinned rest, as for any source;
        # the rest shares the checkpoint's layers and so its weights.
        extractor = backbone
        if preprocess is not None:
            extractor = keras.Model(preprocess.output, backbone.outputs[0], name="run")
        return build_backbone(pin(extractor, "run"), input_shape, mode, description)

    def _backbone(self, model: Any) -> Any:
        names = [layer.name for layer in model.layers]
        if "backbone" not in names:
            raise SourceError(
                f"source.run={self.run!r}: its checkpoint holds a model without a layer named "
                f"'backbone' (its layers: {', '.join(names)}), so it was not written by this "
                "pipeline. For any other Keras model use source=keras_file with source.layer "
                "set to the layer whose output is the features."
            )
        backbone = model.get_layer("backbone")
        if len(getattr(backbone, "inputs", None) or ()) != 1 or len(backbone.outputs) != 1:
            raise SourceError(
                f"source.run={self.run!r}: the layer 'backbone' of its checkpoint is not a "
                "model from one image input to one feature output. Point source.run at a run "
                "of this pipeline."
            )
        return backbone


def resolve_run(run: str, tracking_uri: str, key: str = "source.run") -> Path:
    """The run directory that `run` names: a directory as given, or an MLflow run id looked up.

    A run id's directory comes from the store (the `run_dir` tag), which is not trusted: it
    must hold the `mlflow_run.json` that the run wrote there, recording that run id.

    Raises:
        ConfigError: naming `key` and `run` when it is neither, or when the directory the
            store names is not that run's.
    """
    path = Path(run).expanduser()
    if path.is_dir():
        return path
    if not _RUN_ID.fullmatch(run):
        raise ConfigError(
            f"{key}={run!r} is neither a directory nor an MLflow run id (32 hex characters). "
            f"Set it to an earlier run's directory, like {key}=outputs/runs/<date_time>, or to "
            "the run id that run printed (`MLflow run: ...`)."
        )
    from pipeline.tracking import run_directory

    try:
        run_dir = run_directory(tracking_uri, run)
    except ConfigError as error:
        raise ConfigError(
            f"{key}={run!r} is not a directory, and as an MLflow run id in the store "
            f"{tracking_uri!r}: {error}"
        ) from error
    check_run_file(run_dir, run, key)
    return run_dir


def check_run_file(run_dir: Path, run_id: str, key: str) -> None:
    """Raise ConfigError unless `run_dir/mlflow_run.json` records `run_id`.

    The runner writes that file into each run directory; a store's `run_dir` tag that names
    another directory (another run's, or any on this machine) is refused.
    """
    from pipeline.resume import RUN_FILE

    try:
        recorded = json.loads((run_dir / RUN_FILE).read_text())
        found = f"its {RUN_FILE} records run_id {recorded.get('run_id')!r}"
        if recorded.get("run_id") == run_id:
            return
    except FileNotFoundError:
        found = f"it has no {RUN_FILE}"
    except (OSError, ValueError, AttributeError) as error:
        found = f"its {RUN_FILE} cannot be read ({error})"
    raise ConfigError(
        f"{key}={run_id!r}: the store's run_dir tag names {str(run_dir)!r}, but {found}; expected "
        f"the {RUN_FILE} that run {run_id} wrote into its own directory (the tag may have been "
        f"edited in the store). Set {key} to the run's directory (outputs/runs/<date_time>) if you "
        "know it."
    )


def read_checkpoint(run_dir: Path, key: str = "source.run") -> tuple[Path, dict[str, int]]:
    """The path of a run's `checkpoints/last.keras` and its `state.json`, checked.

    The state is `{"epochs_completed": int, "iterations": int}`, as `AtomicCheckpoint` writes
    it after each epoch. `key` is the config key that named the run, for the errors.

    Raises:
        ConfigError: when either file is missing or the state is not what it should be.
    """
    run_dir = Path(run_dir)
    model_path = run_dir / _CHECKPOINT
    if not model_path.is_file():
        hint = ""
        if (run_dir / "last.keras").is_file():
            hint = f" It holds last.keras itself: set {key}={str(run_dir.parent)!r}, the run directory."
        raise ConfigError(
            f"{key}={str(run_dir)!r} has no {_CHECKPOINT}: was the run trained with "
            f"train.checkpoint=true? Expected the directory of a run that completed at least "
            f"one epoch (outputs/runs/<date_time>).{hint}"
        )
    state_path = run_dir / _STATE
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{key}={str(run_dir)!r} has {_CHECKPOINT} but no {_STATE}; every epoch writes "
            "both, so the checkpoint was copied without it or damaged. Copy the whole "
            "checkpoints/ directory of the run."
        ) from None
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{key}={str(run_dir)!r}: {_STATE} cannot be read ({error}); expected JSON like "
            '{"epochs_completed": 3, "iterations": 51}. Restore it from the run, or rerun it.'
        ) from error
    fields = ("epochs_completed", "iterations")
    if not isinstance(state, dict) or not all(
        isinstance(state.get(name), int) and not isinstance(state.get(name), bool) and state[name] >= 0
        for name in fields
    ):
        raise ConfigError(
            f"{key}={str(run_dir)!r}: {_STATE} holds {state!r}; expected non-negative "
            'integers like {"epochs_completed": 3, "iterations": 51}. Restore it from the run, '
            "or rerun it."
        )
    return model_path, {name: state[name] for name in fields}


def _load(model_path: Path, run: str, allow_unsafe: bool) -> Any:
    import keras

    # The custom layers a pipeline model holds must be registered before Keras reads it.
    import pipeline.sources.backbone  # noqa: F401
    import pipeline.sources.preprocess  # noqa: F401
    import pipeline.sources.saved_model_layer  # noqa: F401
    from pipeline.sources.graph_check import checked_graphs

    with checked_graphs(allow_unsafe) as refused:
        try:
            return keras.saving.load_model(model_path, compile=False, safe_mode=not allow_unsafe)
        except Exception as error:
            failure = error
    if refused:  # Keras wraps it in a message of its own: the refusal, as one line
        raise SourceError(f"source.run={run!r}: its checkpoint {model_path}: {refused[0]}") from failure
    if "safe_mode" in str(failure) and not allow_unsafe:
        raise SourceError(
            f"source.run={run!r}: its checkpoint {model_path} contains Python code (a Lambda "
            "layer), which Keras' safe mode refuses to load because loading would run it. Set "
            "source.allow_unsafe=true only if you trust the run and its directory."
        ) from failure
    raise SourceError(
        f"source.run={run!r}: its checkpoint {model_path} could not be loaded "
        f"({type(failure).__name__}: {failure}). A checkpoint written while a SavedModel source "
        "was not yet stored inside .keras files needs that source directory in place; "
        "otherwise rerun the earlier run."
    ) from failure


def _preprocess_layer(backbone: Any) -> Any:
    """The backbone's first layer when it is the source's preprocessing, else None."""
    from pipeline.sources.preprocess import PreprocessLayer

    first = backbone.layers[1] if len(backbone.layers) > 1 else None
    return first if isinstance(first, PreprocessLayer) else None


def _unpin(backbone: Any) -> None:
    """Let this run's freeze setting train every layer again.

    Freezing is written into a checkpoint as `trainable: false`, and a pinned layer (a
    pinned source, or a SavedModel source that the earlier run froze) is rebuilt pinned.
    With `source.trainable=true` this run's freeze setting decides instead.
    """
    from pipeline.sources.backbone import walk_layers
    from pipeline.sources.pin import Pinnable

    for layer in walk_layers(backbone):
        if isinstance(layer, Pinnable):
            layer.unpin()
    backbone.trainable = True  # reaches every sublayer, now that none refuses
