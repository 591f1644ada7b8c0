"""`source=keras_file`: a model (or the weights of one) that Keras saved to a file."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import SourceError
from pipeline.sources.cut import Pooling, cut
from pipeline.types import Preprocess, SourceModel

_SUFFIXES = "a .keras file, a full-model .h5 (model.save('x.h5')), or weights (.weights.h5 / .h5)"


class KerasFileSource:
    """A Keras model from a `.keras` or `.h5` file, optionally cut at an intermediate layer.

    Args:
        path: a `.keras` file (`model.save('x.keras')`), a full-model legacy `.h5`, or a
            weights-only `.weights.h5` / `.h5` (`model.save_weights(...)`), which also
            needs `architecture`.
        input_shape: `[height, width, channels]`; `None` reads it from the model.
        preprocess: how raw 0-255 pixels are mapped to what the model was trained on
            (`caffe`, `tf`, `torch`, `unit`, `none`); `none` suits models that rescale
            inside themselves.
        layer: the name of a layer whose output becomes the features (the model is cut
            there, e.g. before a classifier, and the layers after it are dropped); `None`
            takes the model's output. `python -m pipeline.inspect` lists the names.
        pooling: applied to the output of the cut: `avg` or `max` pool a feature map into a
            vector, `flatten` makes one vector of it, `None` keeps it. A vector output is
            left as it is.
        architecture: for weights-only files, the `keras.applications` model they were
            saved from, built with `include_top=False`, `pooling='avg'`, `weights=None`.
        allow_unsafe: load with Keras safe mode off, which runs Python code stored in the
            file (Lambda layers), and restore embedded SavedModels whose graphs touch files
            or run Python (`pipeline.sources.graph_check`). Only for files you trust.
        trainable: whether fine-tuning may change the model's weights. When false the
            model is pinned: it runs in inference mode (BatchNorm statistics fixed) and no
            freeze setting unfreezes it.

    Example:
        >>> KerasFileSource(path="/models/classifier.keras", layer="global_pool").load()
        >>> KerasFileSource(path="/models/classifier.keras", layer="conv4", pooling="max").load()
    """

    def __init__(
        self,
        path: str,
        input_shape: list[int] | None = None,
        preprocess: Preprocess = "none",
        layer: str | None = None,
        pooling: Pooling | None = None,
        architecture: str | None = None,
        allow_unsafe: bool = False,
        trainable: bool = True,
    ):
        self.path = path
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.preprocess = preprocess
        self.layer = layer
        self.pooling = pooling
        self.architecture = architecture
        self.allow_unsafe = allow_unsafe
        self.trainable = trainable

    def load(self) -> SourceModel:
        path = Path(self.path).expanduser()
        kind = self._file_kind(path)
        if kind == "weights":
            model = self._build_architecture(path)
        else:
            if self.architecture is not None:
                raise SourceError(
                    f"source.architecture={self.architecture!r} is only for weights-only files, "
                    f"but source.path={self.path!r} holds a full model. Set "
                    "source.architecture=null."
                )
            model = self._load_model(path)
        extractor = self._cut(model)
        input_shape = self._input_shape(extractor)
        from pipeline.sources.backbone import build_backbone
        from pipeline.sources.backbone import pin

        return build_backbone(
            pin(extractor, "keras_file") if not self.trainable else extractor,
            input_shape,
            self.preprocess,
            f"keras_file:{self.path}"
            + (f"@{self.layer}" if self.layer else "")
            + (f" pooling={self.pooling}" if self.pooling else ""),
        )

    def _file_kind(self, path: Path) -> Literal["model", "weights"]:
        if path.is_dir():
            raise SourceError(
                f"source.path={self.path!r} is a directory; source=keras_file takes {_SUFFIXES}. "
                "For a SavedModel directory use source=saved_model (source=hub for TF Hub models)."
            )
        if not path.is_file():
            raise SourceError(
                f"source.path={self.path!r}: no such file. Expected {_SUFFIXES}; fix the path."
            )
        name = path.name.lower()
        if name.endswith(".keras"):
            if not zipfile.is_zipfile(path):
                raise SourceError(
                    f"source.path={self.path!r} is not a readable .keras file (not a zip "
                    "archive). Re-save it with model.save('model.keras')."
                )
            return "model"
        if name.endswith(".weights.h5"):
            return "weights"
        if name.endswith((".h5", ".hdf5")):
            import h5py

            try:
                with h5py.File(path, "r") as file:
                    return "model" if "model_config" in file.attrs else "weights"
            except OSError as error:
                raise SourceError(
                    f"source.path={self.path!r} is not a readable HDF5 file ({error}). "
                    f"Expected {_SUFFIXES}."
                ) from error
        raise SourceError(
            f"source.path={self.path!r} has an unknown suffix; expected {_SUFFIXES}."
        )

    def _load_model(self, path: Path) -> Any:
        import keras

        from pipeline.sources.graph_check import checked_graphs

        with checked_graphs(self.allow_unsafe) as refused:
            try:
                return keras.saving.load_model(path, compile=False, safe_mode=not self.allow_unsafe)
            except Exception as error:
                failure = error
        if refused:  # Keras wraps it in a message of its own: the refusal, as one line
            raise SourceError(f"source.path={self.path!r}: {refused[0]}") from failure
        if "safe_mode" in str(failure) and not self.allow_unsafe:
            raise SourceError(
                f"source.path={self.path!r} contains Python code (a Lambda layer), which "
                "Keras' safe mode refuses to load because loading would run it. Set "
                "source.allow_unsafe=true only for files you trust."
            ) from failure
        raise SourceError(
            f"source.path={self.path!r} could not be loaded as a Keras model "
            f"({type(failure).__name__}: {failure}). Expected {_SUFFIXES}; a model with "
            "custom layers needs them registered with keras.saving.register_keras_serializable."
        ) from failure

    def _build_architecture(self, path: Path) -> Any:
        if self.architecture is None:
            raise SourceError(
                f"source.path={self.path!r} holds weights only, without the architecture. Set "
                "source.architecture to the keras.applications model they were saved from "
                "(e.g. source.architecture=MobileNetV2), or save the full model with "
                "model.save('model.keras')."
            )
        if self.input_shape is None:
            raise SourceError(
                f"source.input_shape is null, but source.path={self.path!r} holds weights only "
                "and so no input shape. Set it, like source.input_shape=[224,224,3]."
            )
        from pipeline.sources.keras_app import application

        app = application(self.architecture, "source.architecture")
        try:
            model = app(include_top=False, weights=None, input_shape=self.input_shape, pooling="avg")
            model.load_weights(path)
        except Exception as error:
            raise SourceError(
                f"source.path={self.path!r} could not be loaded onto source.architecture="
                f"{self.architecture!r} with source.input_shape={list(self.input_shape)} "
                f"({type(error).__name__}: {error}). The weights must be saved from "
                f"keras.applications.{self.architecture}(include_top=False)."
            ) from error
        return model

    def _cut(self, model: Any) -> Any:
        try:
            inputs = model.inputs
        except (AttributeError, ValueError) as error:
            raise SourceError(
                f"source.path={self.path!r} holds a model with no defined input (a Sequential "
                "model saved before it was built). Rebuild it with a keras.Input and save it again."
            ) from error
        if len(inputs) != 1:
            raise SourceError(
                f"source.path={self.path!r} has {len(inputs)} inputs; an image source takes one "
                "image tensor. Save a model with a single image input."
            )
        if self.layer is None and len(model.outputs) != 1:
            raise SourceError(
                f"source.path={self.path!r} has {len(model.outputs)} outputs; set "
                "source.layer to the layer whose output is the features."
            )
        # A new graph over the same layers: one tensor in and out, as the backbone calls it.
        return cut(model, self.layer, self.pooling, "keras_file", self.path, self._inspect_command())

    def _inspect_command(self) -> str:
        command = f"python -m pipeline.inspect source=keras_file source.path={self.path}"
        if self.architecture is not None:
            shape = ",".join(str(d) for d in self.input_shape or ())
            command += f" source.architecture={self.architecture} source.input_shape=[{shape}]"
        return command + " source.layer=null"

    def _input_shape(self, extractor: Any) -> tuple[int, ...]:
        model_shape = tuple(extractor.inputs[0].shape[1:])
        if self.input_shape is None:
            if None in model_shape:
                raise SourceError(
                    f"source.input_shape is null and the model's input shape {model_shape} has "
                    "free dimensions: set it, like source.input_shape=[224,224,3]."
                )
            return model_shape
        fits = len(model_shape) == len(self.input_shape) and all(
            expected is None or expected == given
            for expected, given in zip(model_shape, self.input_shape)
        )
        if not fits:
            raise SourceError(
                f"source.input_shape={list(self.input_shape)} does not fit the input shape "
                f"{model_shape} of source.path={self.path!r}: set source.input_shape=null to "
                "use the model's, or a shape that matches its fixed dimensions."
            )
        return self.input_shape
