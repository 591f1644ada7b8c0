"""A TF2 SavedModel's entry points: load a directory with a clear error, describe and check them.

Shared by the sources that read SavedModels (`hub`, `saved_model`) and by
`python -m pipeline.inspect`, so that every error and every listing shows the same thing:
each signature with its inputs and outputs (names, shapes, dtypes).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import SourceError

_SAVED_MODEL_HELP = (
    "A SavedModel directory holds saved_model.pb and variables/, as written by "
    "tf.saved_model.save or Keras `model.export(dir)`"
)


@dataclass(frozen=True)
class TensorDescription:
    """One input or output of a function: `images: shape=(None, 224, 224, 3) dtype=float32`."""

    name: str
    shape: tuple[int | None, ...] | None  # None: unknown rank
    dtype: str

    def __str__(self) -> str:
        shape = "unknown" if self.shape is None else str(self.shape)
        return f"{self.name}: shape={shape} dtype={self.dtype}"


@dataclass(frozen=True)
class SignatureDescription:
    """The named inputs and outputs of one signature function."""

    inputs: tuple[TensorDescription, ...]
    outputs: tuple[TensorDescription, ...]


def load_saved_model(path: str, key: str, value: str | None = None) -> Any:
    """`tf.saved_model.load(path)`, failing with the config key and the fix.

    Args:
        path: the local SavedModel directory.
        key: the config key it came from, quoted in errors (`source.path`).
        value: the value of `key` as the user wrote it, when it differs from `path` (a URL).

    Raises:
        SourceError: the directory is missing, holds no saved_model.pb, or cannot be loaded.
    """
    from pipeline.sources.graph_check import check_named

    value = path if value is None else value
    check_saved_model_dir(path, key, value)
    check_named(path, f"{key}={value!r}")  # a replayed config's SavedModel: data from the store
    try:
        return load_with_text_ops(path)
    except MissingTextOps as error:
        raise SourceError(f"{key}={value!r}: {error}") from error
    except Exception as error:
        raise SourceError(
            f"{key}={value!r}: {path} is not a loadable TF2 SavedModel "
            f"({type(error).__name__}: {error}). {_SAVED_MODEL_HELP}; TF1 SavedModels and "
            "TF1 hub.Module formats are not supported."
        ) from error


class MissingTextOps(Exception):
    """A SavedModel uses ops that only TF.Text registers, and `tensorflow-text` is not installed."""


def load_with_text_ops(path: str) -> Any:
    """`tf.saved_model.load(path)`; a graph with TF.Text ops (BERT preprocessors) loads once
    `tensorflow_text` registers them, imported here only when the graph needs it.

    Raises:
        MissingTextOps: naming the op and the extra to install, when it is not installed.
    """
    import tensorflow as tf

    try:
        return tf.saved_model.load(path)
    except Exception as error:
        if "Op type not registered" not in str(error):
            raise
        try:
            import tensorflow_text  # noqa: F401  (registers its ops with TensorFlow)
        except ImportError:
            op = str(error).split("Op type not registered", 1)[1].split("'")[1:2]
            raise MissingTextOps(
                f"{path} uses the op {''.join(op) or '(unknown)'}, which TensorFlow only knows once "
                "TF.Text is installed: pip install 'tf-transfer-pipeline[text]' (tensorflow-text, "
                "the version matching tensorflow)"
            ) from error
        return tf.saved_model.load(path)


def text_ops(directory: str | Path) -> bool:
    """Whether the SavedModel's graph runs ops that TensorFlow itself does not define (TF.Text's
    tokenizers: serving it needs `tensorflow-text`). Reads saved_model.pb; loads nothing."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((Path(directory) / "saved_model.pb").read_bytes())
    ops = {node.op for meta in saved_model.meta_graphs for function in meta.graph_def.library.function
           for node in function.node_def}
    library = {function.signature.name for meta in saved_model.meta_graphs
               for function in meta.graph_def.library.function}
    return any(not hasattr(tf.raw_ops, op) for op in ops - library)


def check_saved_model_dir(path: str, key: str, value: str | None = None) -> None:
    """Raise `SourceError` unless `path` is a directory holding saved_model.pb."""
    value = path if value is None else value
    directory = Path(path)
    if not directory.is_dir():
        hint = ""
        if directory.suffix in (".keras", ".h5"):
            hint = f" A {directory.suffix} file is a Keras model: use source=keras_file for it."
        raise SourceError(
            f"{key}={value!r} is not a directory.{hint} Point {key} at a SavedModel "
            f"directory. {_SAVED_MODEL_HELP}."
        )
    if not (directory / "saved_model.pb").exists():
        raise SourceError(
            f"{key}={value!r} is a directory without saved_model.pb. "
            "Point it at the directory that holds saved_model.pb and variables/."
        )


def describe_signatures(loaded: Any) -> dict[str, SignatureDescription]:
    """Signature name -> its inputs and outputs, sorted by name."""
    signatures = getattr(loaded, "signatures", None) or {}
    return {name: describe_function(signatures[name]) for name in sorted(signatures)}


def describe_function(function: Any) -> SignatureDescription:
    """The inputs and outputs of a concrete (signature) function."""
    args, kwargs = function.structured_input_signature
    inputs = [_tensor(f"input_{i}", spec) for i, spec in enumerate(args)]
    inputs += [_tensor(name, spec) for name, spec in sorted(kwargs.items())]
    structured = function.structured_outputs
    if isinstance(structured, Mapping):
        outputs = [_tensor(name, spec) for name, spec in sorted(structured.items())]
    elif isinstance(structured, (list, tuple)):
        outputs = [_tensor(f"output_{i}", spec) for i, spec in enumerate(structured)]
    else:
        outputs = [_tensor("output_0", structured)]
    return SignatureDescription(tuple(inputs), tuple(outputs))


def describe_call(loaded: Any) -> str:
    """One line about `loaded.__call__`: absent, or its arguments and whether it takes `training`."""
    call = getattr(loaded, "__call__", None) if callable(loaded) else None
    if call is None:
        return "__call__: absent (only its signatures can be called, and they run in inference mode)"
    try:
        parameters = inspect.signature(call).parameters
    except (TypeError, ValueError):
        return "__call__: present (arguments unknown)"
    arguments = ", ".join(str(p) for p in parameters.values())
    training = "takes training" if "training" in parameters else "takes no training argument"
    traced = sorted({str(t) for t in _traced_inputs(call)})
    inputs = f"; traced for {'; '.join(traced)}" if traced else ""
    return f"__call__({arguments}): {training}{inputs}"


def format_signatures(signatures: Mapping[str, SignatureDescription], indent: str = "  ") -> str:
    """Plain text, one block per signature; `none` when there are none."""
    if not signatures:
        return f"{indent}none"
    lines = []
    for name, described in signatures.items():
        lines.append(f"{indent}{name}")
        lines.append(f"{indent}  inputs:  {format_tensors(described.inputs)}")
        lines.append(f"{indent}  outputs: {format_tensors(described.outputs)}")
    return "\n".join(lines)


def format_tensors(tensors: tuple[TensorDescription, ...]) -> str:
    return "; ".join(str(t) for t in tensors) or "none"


def check_signature(loaded: Any, signature: str | None, where: str, key: str = "source.signature") -> None:
    """Raise `SourceError` listing every signature with its specs unless `signature` can be called.

    `signature=None` asks for `loaded.__call__`.
    """
    signatures = describe_signatures(loaded)
    listing = format_signatures(signatures, indent="  ")
    if signature is None:
        if not callable(loaded):
            raise SourceError(
                f"{key}=null: {where} has no __call__ function. Set {key} to one of its "
                f"signatures (these run in inference mode):\n{listing}"
            )
        return
    if signature not in signatures:
        raise SourceError(
            f"{key}={signature!r} is not a signature of {where}. Set {key} to one of its "
            f"signatures:\n{listing}"
        )


def select_output(
    described: SignatureDescription, output_key: str | None, what: str, key: str = "source.output_key"
) -> TensorDescription:
    """The output that `output_key` names (or the only one), else `SourceError` listing them all."""
    outputs = {t.name: t for t in described.outputs}
    listing = "\n".join(f"  {t}" for t in described.outputs) or "  none"
    if output_key is None:
        if len(outputs) == 1:
            return next(iter(outputs.values()))
        raise SourceError(
            f"{key}=null but {what} returns {len(outputs)} outputs. Set {key} to the one "
            f"that holds the features:\n{listing}"
        )
    if output_key not in outputs:
        raise SourceError(
            f"{key}={output_key!r} is not an output of {what}. Set {key} to one of:\n{listing}"
        )
    return outputs[output_key]


def _tensor(name: str, spec: Any) -> TensorDescription:
    shape = getattr(spec, "shape", None)
    dims = None if shape is None or shape.rank is None else tuple(shape.as_list())
    dtype = getattr(getattr(spec, "dtype", None), "name", None) or type(spec).__name__
    return TensorDescription(name=name, shape=dims, dtype=dtype)


def _traced_inputs(call: Any) -> list[TensorDescription]:
    """The first tensor argument of each traced `__call__` (the others are flags like `training`)."""
    traced = []
    for function in getattr(call, "concrete_functions", ()):
        args, _ = function.structured_input_signature
        specs = [s for s in args if hasattr(s, "shape") and hasattr(s, "dtype")]
        traced += [_tensor("inputs", s) for s in specs[:1]]
    return traced
