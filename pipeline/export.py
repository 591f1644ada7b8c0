"""The export stage: write the fine-tuned model for serving, verify it, then move it into place.

Everything is written into a temporary directory beside the destination, reloaded by the
client that will read it and compared with the in-memory model there, and only then renamed
into place: a crash or a failed check never leaves half an export where a user would look.

The export directory holds `labels.txt` (one class name per line, in probability order),
`input_example.npy` (two raw images, for `saved_model_cli run` and MLflow; for a text model
`input_example.json`, two texts) and one entry per format: `saved_model/`, `model.keras`, `model.tflite`, `model.onnx`. A non-linear
scikit-learn head is exported as `backbone/` (a SavedModel giving features) and
`estimator.skops` instead (`EstimatorFormat`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pipeline.errors import ConfigError, ExportError
from pipeline.files import remove_stale
from pipeline.tflite import QUANTIZATIONS, Quantization
from pipeline.types import AdaptedModel, DataBundle, ExportResult

log = logging.getLogger(__name__)

Format = Literal["saved_model", "keras", "tflite", "onnx"]
FORMATS: tuple[str, ...] = get_args(Format)
# The gap TFLite's own kernels leave, by quantization, when export.tflite_tolerance is null.
TFLITE_TOLERANCE = {"none": 1e-4, "float16": 1e-2, "int8": 0.25}
TEXT_EXAMPLE = "input_example.json"  # a text model's two example texts, a JSON list
_BYTES_CHECKED = 16  # images sent through serving_uint8 and serving_bytes in the check


class Exporter:
    """Writes the model (preprocessing included) in each requested format and checks each.

    Args:
        formats: any of `saved_model` (signatures `serving_default` on float 0-255 images
            of any size, `serving_uint8`, `serving_bytes` on encoded files; see
            `pipeline.serving`), `keras` (a self-contained `.keras` file for
            `keras.saving.load_model`), `tflite` (`model.tflite`, fixed image size) and `onnx`
            (`model.onnx`, fixed image size; needs the `onnx` extra).
        quantization: for `tflite`: `none`, `float16` or `int8` (calibrated on training
            images); the accuracy change is reported as `export_tflite_accuracy_delta`.
        calibration_examples: training images that set the int8 activation ranges.
        tolerance: the largest difference allowed between the probabilities of a reloaded
            `saved_model` or `keras` export and the in-memory model's.
        tflite_tolerance: the same for `tflite`; null takes the default for the quantization
            (`none` 1e-4, `float16` 1e-2, `int8` 0.25).
        verify_examples: how many images the checks use (test images first, then val, train);
            the TFLite accuracy change is measured on them too, so raise it for a finer figure.

    Example:
        >>> Exporter(formats=["saved_model", "tflite"], quantization="int8").export(
        ...     adapted, data, Path("run/export"))
    """

    def __init__(
        self,
        formats: list[Format] = ("saved_model",),
        quantization: Quantization = "none",
        calibration_examples: int = 200,
        tolerance: float = 1e-5,
        tflite_tolerance: float | None = None,
        verify_examples: int = 64,
    ):
        unknown = [name for name in formats if name not in FORMATS]
        if unknown or not formats:
            raise ConfigError(
                f"export.formats={list(formats)!r}: expected one or more of {', '.join(FORMATS)}, "
                "for example export.formats=[saved_model,tflite]"
            )
        if quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"export.quantization={quantization!r}: expected one of {', '.join(QUANTIZATIONS)}, "
                "for example export.quantization=float16"
            )
        self.formats = list(dict.fromkeys(formats))
        self.quantization = quantization
        self.calibration_examples = calibration_examples
        self.tolerance = tolerance
        self.tflite_tolerance = tflite_tolerance
        self.verify_examples = verify_examples

    def export(
        self, adapted: AdaptedModel, data: DataBundle, destination: Path, replace: bool = False,
        features: Mapping[str, Any] | None = None, backbone_function: Any = None,
    ) -> ExportResult:
        """Writes, verifies and moves the export into `destination`.

        Args:
            replace: a resumed run's own earlier export (written before a kill during the
                MLflow logging) is replaced, once the new one is verified; otherwise an
                existing destination is refused.
            features: the frozen backbone's cached outputs per split (`TrainResult.features`),
                which evaluation scored. The export is then checked against the head on
                them (what the metrics measured) instead of a pass of the whole model.
            backbone_function: the feature pass's traced `backbone(images, training=False)`
                (`TrainResult.backbone_function`); the SavedModel calls it, so the export
                traces the head alone rather than every layer of the backbone again.
        """
        import numpy as np

        from pipeline.estimator_layer import served_estimator

        destination = Path(destination)
        if destination.exists() and not replace:
            raise ExportError(
                f"{destination} already exists; exports never overwrite. Choose a new run "
                "directory (each Hydra run gets its own) or move the old export away."
            )
        destination.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(destination.parent, f".{destination.name}-partial-*")  # of killed runs
        start = time.perf_counter()
        self.check_input(data.input_kind)
        images, labels, expected = _expected(adapted, data, self.verify_examples, features)
        verify_seconds = time.perf_counter() - start
        # mkdir, not tempfile.mkdtemp: mkdtemp's 0700 mode would follow the export into place
        # and hide it from a server running as another user.
        staging = destination.parent / f".{destination.name}-partial-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            (staging / "labels.txt").write_text("\n".join(map(str, adapted.class_names)) + "\n")
            if data.input_kind == "text":
                (staging / TEXT_EXAMPLE).write_text(json.dumps([_text(x) for x in images[:2]]) + "\n")
            else:
                np.save(staging / "input_example.npy", images[:2])
            paths: dict[str, Path] = {}
            differences: dict[str, float] = {}
            accuracy_delta: dict[str, float] = {}
            writers = self._writers(served_estimator(adapted.model) is not None, backbone_function)
            for name, writer in writers.items():
                written = writer.write(adapted, data, staging, images, expected)
                verify_seconds += written.verify_seconds
                differences[name] = written.max_abs_diff
                if not written.max_abs_diff <= writer.tolerance:  # also catches NaN
                    raise ExportError(
                        f"the {name} export's predictions differ from the in-memory model's by "
                        f"{written.max_abs_diff:.3g} (> {writer.tolerance_key}={writer.tolerance}); the "
                        f"export was not kept. Raise {writer.tolerance_key} only if this is expected."
                    )
                if writer.reports_accuracy:
                    accuracy_delta[name] = _accuracy(written.probabilities, labels, adapted.task) - _accuracy(
                        expected, labels, adapted.task
                    )
                paths[name] = destination / written.path.relative_to(staging)
            _move_into_place(staging, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return ExportResult(
            root=destination, paths=paths, max_abs_diff=differences, accuracy_delta=accuracy_delta,
            verify_seconds=verify_seconds,
        )

    def check_input(self, input_kind: str) -> None:
        """Fails, before any training, when a requested format cannot hold a model of this input.

        Text models export as SavedModel and `.keras`; TFLite and ONNX convert fixed-size
        image graphs, and a tokenizer's string ops do not convert.
        """
        if input_kind != "text":
            return
        refused = [name for name in self.formats if name in ("tflite", "onnx")]
        if refused:
            raise ConfigError(
                f"export.formats={self.formats!r}: {', '.join(refused)} cannot hold a text model (its "
                "tokenizer's string ops do not convert); use export.formats=[saved_model] or [saved_model,keras]"
            )

    def _writers(self, estimator: bool = False, backbone_function: Any = None) -> dict[str, Any]:
        """One writer per requested format (`export.formats`, a checked list of names).

        `estimator`: the model ends in a scikit-learn estimator (`EstimatorLayer`), which
        only `saved_model` (as `EstimatorFormat`) serves. `backbone_function`: see `export`.
        """
        if estimator:
            others = [name for name in self.formats if name != "saved_model"]
            if others:
                raise ConfigError(
                    f"export.formats={self.formats!r}: a scikit-learn head other than a linear one is "
                    f"served as a SavedModel of the backbone plus estimator.skops, which {', '.join(others)} "
                    "cannot hold. Use export.formats=[saved_model], or a linear head.estimator "
                    "(LogisticRegression, LinearSVC, RidgeClassifier) for every format."
                )
            return {"saved_model": EstimatorFormat(self.tolerance)}
        tflite_tolerance = self.tflite_tolerance
        if tflite_tolerance is None:
            tflite_tolerance = TFLITE_TOLERANCE[self.quantization]
        writers = {
            "saved_model": SavedModelFormat(self.tolerance, backbone_function),
            "keras": KerasFormat(self.tolerance),
            "tflite": TfliteFormat(self.quantization, self.calibration_examples, tflite_tolerance),
            "onnx": OnnxFormat(self.tolerance),
        }
        return {name: writers[name] for name in self.formats}


@dataclass(frozen=True)
class Written:
    """One format, written into the staging directory and checked against the in-memory model.

    Args:
        path: the file or directory written.
        max_abs_diff: the largest difference of its probabilities from the in-memory model's.
        probabilities: its per-class probabilities on the verification images.
    """

    path: Path
    max_abs_diff: float
    probabilities: Any
    verify_seconds: float = 0.0


class SavedModelFormat:
    """`saved_model/` with the signatures of `pipeline.serving`, checked as a TF Serving client would.

    `backbone_function`: the feature pass's traced backbone, which the signatures call
    (`Exporter.export`); None traces the model.
    """

    tolerance_key = "export.tolerance"
    reports_accuracy = False

    def __init__(self, tolerance: float, backbone_function: Any = None):
        self.tolerance = tolerance
        self.backbone_function = backbone_function

    def write(self, adapted, data, staging, images, expected) -> Written:
        import tensorflow as tf

        from pipeline.serving import write_saved_model

        path = write_saved_model(
            adapted.model, adapted.class_names, adapted.task, data.input_shape, data.resize,
            staging / "saved_model", max_pixels=data.max_pixels, input_kind=data.input_kind,
            call=_composed(adapted, self.backbone_function), max_chars=data.max_chars,
        )
        start = time.perf_counter()
        signatures = tf.saved_model.load(str(path)).signatures
        if data.input_kind == "text":
            actual = signatures["serving_default"](text=tf.constant(images))["probabilities"].numpy()
            return Written(path, _max_abs_diff(actual, expected), actual, time.perf_counter() - start)

        def probabilities(signature, batch):
            return signatures[signature](images=batch)["probabilities"].numpy()

        actual, difference = _image_signatures(probabilities, "serving_bytes" in signatures, images, expected)
        return Written(path, difference, actual, time.perf_counter() - start)


class EstimatorFormat:
    """`backbone/` (a SavedModel: images in, the features the classifier takes out) and
    `estimator.skops` (the fitted scikit-learn classifier): a non-linear `head=sklearn`.

    The SavedModel has the signatures of `pipeline.serving`, returning `features`; the MLflow
    model and `pipeline.predict` put the two together. Checked as they serve it: the
    reloaded SavedModel's features through the estimator reloaded from its file.
    """

    tolerance_key = "export.tolerance"
    reports_accuracy = False

    def __init__(self, tolerance: float):
        self.tolerance = tolerance

    def write(self, adapted, data, staging, images, expected) -> Written:
        import tensorflow as tf

        from pipeline.estimator_layer import feature_model, served_estimator
        from pipeline.estimators import SKOPS_FILE, estimator_probabilities, load_estimator
        from pipeline.serving import write_saved_model

        layer = served_estimator(adapted.model)
        path = write_saved_model(
            feature_model(adapted), adapted.class_names, adapted.task, data.input_shape, data.resize,
            staging / "backbone", max_pixels=data.max_pixels, features=True, input_kind=data.input_kind,
            max_chars=data.max_chars,
        )
        (staging / SKOPS_FILE).write_bytes(layer.saved)
        start = time.perf_counter()
        estimator = load_estimator((staging / SKOPS_FILE).read_bytes(), SKOPS_FILE)
        signatures = tf.saved_model.load(str(path)).signatures
        count = len(adapted.class_names)

        def served(signature, batch):
            name = "text" if data.input_kind == "text" else "images"
            features = signatures[signature](**{name: batch})["features"].numpy()
            return estimator_probabilities(estimator, features, count, "multiclass")

        if data.input_kind == "text":
            actual = served("serving_default", tf.constant(images))
            return Written(path, _max_abs_diff(actual, expected), actual, time.perf_counter() - start)
        actual, difference = _image_signatures(served, "serving_bytes" in signatures, images, expected)
        return Written(path, difference, actual, time.perf_counter() - start)


class KerasFormat:
    """`model.keras`: the model behind the data stage's pixel path (any image size in)."""

    tolerance_key = "export.tolerance"
    reports_accuracy = False

    def __init__(self, tolerance: float):
        self.tolerance = tolerance

    def write(self, adapted, data, staging, images, expected) -> Written:
        import keras

        from pipeline.serving import serving_model
        from pipeline.sources.graph_check import trusted_graphs

        path = staging / "model.keras"
        serving_model(adapted.model, data.input_shape, data.resize, data.input_kind, data.max_chars).save(path)
        start = time.perf_counter()
        with trusted_graphs():  # this process wrote it, from the source the user named
            actual = keras.saving.load_model(path, compile=False).predict(_batch(images), verbose=0)
        actual = _class_probabilities(actual, adapted.task)
        return Written(path, _max_abs_diff(actual, expected), actual, time.perf_counter() - start)


class TfliteFormat:
    """`model.tflite` (fixed image size), quantized as asked; reports the accuracy change."""

    tolerance_key = "export.tflite_tolerance"
    reports_accuracy = True

    def __init__(self, quantization: Quantization, calibration_examples: int, tolerance: float):
        self.quantization = quantization
        self.calibration_examples = calibration_examples
        self.tolerance = tolerance

    def write(self, adapted, data, staging, images, expected) -> Written:
        from pipeline import tflite
        from pipeline.serving import write_fixed_size

        source = write_fixed_size(adapted.model, adapted.task, data.input_shape, staging / ".tflite-source")
        calibration = []
        if self.quantization == "int8":
            calibration = [x.numpy() for x, _ in data.train.take(self.calibration_examples)]
            if not calibration:
                raise ExportError(
                    "export.quantization='int8' needs training images to calibrate on, but "
                    "the training split is empty. Use export.quantization=float16 or none."
                )
        path = staging / "model.tflite"
        path.write_bytes(tflite.convert(source, self.quantization, calibration))
        shutil.rmtree(source)
        actual = tflite.predict(path, images)
        return Written(path, _max_abs_diff(actual, expected), actual)


class OnnxFormat:
    """`model.onnx` (fixed image size, opset 17) through tf2onnx, checked with ONNX Runtime.

    Needs the `onnx` extra (`pip install -e ".[onnx]"`: tf2onnx, onnx, onnxruntime). Input
    `images` float32 raw 0-255 `[batch, height, width, channels]` of the training size; output
    `probabilities`, one per class name in `labels.txt` order.
    """

    tolerance_key = "export.tolerance"
    reports_accuracy = False

    def __init__(self, tolerance: float):
        self.tolerance = tolerance

    def write(self, adapted, data, staging, images, expected) -> Written:
        import numpy as np
        import tensorflow as tf

        from pipeline.heads import class_probabilities

        try:
            import onnxruntime
            import tf2onnx
        except ImportError as error:
            raise ExportError(
                f"export.formats includes onnx, but {error.name} is not installed: run "
                "`pip install -e \".[onnx]\"` (tf2onnx, onnx, onnxruntime), or drop onnx from export.formats."
            ) from None
        model, task = adapted.model, adapted.task

        @tf.function(input_signature=[tf.TensorSpec((None, *data.input_shape), tf.float32, name="images")])
        def probabilities(images):
            return {"probabilities": class_probabilities(model(images, training=False), task)}

        path = staging / "model.onnx"
        tf2onnx.convert.from_function(probabilities, input_signature=probabilities.input_signature,
                                      opset=17, output_path=str(path))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (actual,) = session.run(["probabilities"], {"images": np.asarray(images, dtype="float32")})
        return Written(path, _max_abs_diff(actual, expected), actual)


def _composed(adapted: AdaptedModel, backbone_function: Any) -> Any:
    """`adapted.model`'s inference as `head(backbone_function(images))`; None: trace the model.

    The feature pass traced the backbone already. Called from the export's trace, that
    `tf.function` becomes one call in the graph instead of a second trace of every layer
    (Keras traces layer by layer: seconds for a large network). It computes what the model
    does: `adapt` builds the model as `head(backbone(inputs))`, checked here, and the
    export's check compares the result with the trained model's on the test images.
    """
    import keras
    import tensorflow as tf

    if backbone_function is None:
        return None
    # The export's trace calls it on float32 images of the data's shape: a pass traced on
    # other inputs (uint8 images, say) is not called, the model is traced instead.
    spec = (getattr(backbone_function, "input_signature", None) or (None,))[0]
    if spec is None or spec.dtype != tf.float32 or tuple(spec.shape[1:]) != tuple(adapted.model.inputs[0].shape[1:]):
        return None
    layers = [layer for layer in adapted.model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if layers != [adapted.backbone, adapted.head]:
        return None

    def call(images):
        return adapted.head(backbone_function(images), training=False)

    return call


def _image_signatures(probabilities: Any, has_bytes: bool, images: Any, expected: Any) -> tuple[Any, float]:
    """Checks an image SavedModel's signatures; `(serving_default's probabilities, the largest difference)`.

    `probabilities(signature, batch)` calls one signature. `serving_default` is compared with
    `expected` (the trained model's); whole pixel values, as decoders give them, go through
    `serving_uint8` and (with `has_bytes`) `serving_bytes` as PNG files, compared with
    `serving_default` on the same pixels: one more pass of the trained model (a trace of its
    own) would prove nothing more. The first calls run side by side (`_first_calls`).
    """
    import numpy as np
    import tensorflow as tf

    pixels = np.clip(np.round(images[:_BYTES_CHECKED]), 0, 255).astype("uint8")
    calls = {
        "actual": lambda: probabilities("serving_default", tf.constant(images)),
        "wanted": lambda: probabilities("serving_default", tf.constant(pixels.astype("float32"))),
        "serving_uint8": lambda: probabilities("serving_uint8", tf.constant(pixels)),
    }
    if has_bytes:
        files = tf.stack([tf.io.encode_png(image) for image in pixels])
        calls["serving_bytes"] = lambda: probabilities("serving_bytes", files)
    got = _first_calls(calls)
    actual, wanted = got.pop("actual"), got.pop("wanted")
    return actual, max([_max_abs_diff(actual, expected)] + [_max_abs_diff(other, wanted) for other in got.values()])


def _first_calls(calls: Mapping[str, Any]) -> dict[str, Any]:
    """`{name: call()}`, each call on a thread of its own.

    A reloaded SavedModel's signatures are separate functions, each optimized by TensorFlow
    on its first call, on one core; together their optimizations overlap (three first calls
    of a MobileNetV2 export at 96x96 took 2.3 s one after another, 1.0 s together on 2 cores).
    A call's error is raised here, as if it had been made in this thread.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="export-check") as pool:
        started = {name: pool.submit(call) for name, call in calls.items()}
        return {name: future.result() for name, future in started.items()}


def _move_into_place(staging: Path, destination: Path) -> None:
    """Renames `staging` to `destination`; an earlier export there is set aside first and
    removed after, so a crash leaves one complete export under one of the two names."""
    if not destination.exists():
        os.replace(staging, destination)
        return
    previous = destination.parent / f".{destination.name}-partial-replaced-{uuid.uuid4().hex[:12]}"
    os.replace(destination, previous)
    os.replace(staging, destination)
    shutil.rmtree(previous, ignore_errors=True)


def _expected(adapted: AdaptedModel, data: DataBundle, count: int, features: Mapping[str, Any] | None):
    """The verification images and labels, and the probabilities the export must reproduce.

    With the feature cache that evaluation scored (every split, in a fixed order), the head
    on the cached outputs of the same examples (paired element by element; their labels
    must agree); this skips a pass of the whole model, whose trace costs seconds, and checks
    the export against what the metrics measured. Otherwise the trained model's `predict`.
    """
    import numpy as np

    from pipeline.features import SPLITS, in_order

    if features is not None and all(split in features for split in SPLITS) and in_order(data):
        import tensorflow as tf

        images = data.test.concatenate(data.val).concatenate(data.train)
        cached = features["test"].concatenate(features["val"]).concatenate(features["train"])
        pairs = [(x.numpy(), y.numpy(), f.numpy(), z.numpy())
                 for (x, y), (f, z) in tf.data.Dataset.zip(images, cached).take(count).batch(256)]
        if pairs and all(np.array_equal(y, z) for _, y, _, z in pairs):
            outputs = adapted.head.predict(np.concatenate([f for _, _, f, _ in pairs]), verbose=0)
            return (np.concatenate([x for x, _, _, _ in pairs]), np.concatenate([y for _, y, _, _ in pairs]),
                    _class_probabilities(outputs, adapted.task))
        log.warning("export: the cached features are not in the images' order; checking against the "
                    "whole model instead")
    images, labels = _verification_set(data, count)
    return images, labels, _class_probabilities(adapted.model.predict(_batch(images), verbose=0), adapted.task)


def _verification_set(data: DataBundle, count: int):
    """Up to `count` images and labels: test first; the other splits make up for a small test split."""
    import numpy as np

    examples = data.test.concatenate(data.val).concatenate(data.train).take(count)
    batches = [(x.numpy(), y.numpy()) for x, y in examples.batch(256)]
    if not batches:
        raise ExportError("the data has no images at all, so no export can be verified")
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


def _batch(inputs):
    """What Keras' `predict` takes: numpy images as they are, texts as a string tensor (it
    refuses numpy's object arrays of bytes in some versions)."""
    import tensorflow as tf

    return tf.constant(inputs) if inputs.dtype == object else inputs


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _max_abs_diff(actual, expected) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(actual, dtype="float64") - expected)))


def _class_probabilities(outputs, task):
    import numpy as np

    from pipeline.heads import class_probabilities

    return np.asarray(class_probabilities(outputs, task))


def _accuracy(probabilities, labels, task) -> float:
    """Accuracy of per-class probabilities (`class_probabilities`): argmax, or 0.5 per label."""
    import numpy as np

    if task == "multilabel":
        return float(np.mean((probabilities > 0.5) == (labels.reshape(probabilities.shape) > 0.5)))
    return float(np.mean(np.argmax(probabilities, axis=1) == labels.reshape(-1)))


class NoExport:
    """Writes nothing: for sweep jobs, which are scored only; run the winner's overrides to export.

    Example:
        >>> NoExport().export(adapted, data, Path("run/export")).paths
        {}
    """

    def check_input(self, input_kind: str) -> None:
        """Nothing is written, so every input kind is fine."""

    def export(
        self, adapted: AdaptedModel, data: DataBundle, destination: Path, replace: bool = False,
        features: Mapping[str, Any] | None = None, backbone_function: Any = None,
    ) -> ExportResult:
        return ExportResult(root=Path(destination), paths={}, max_abs_diff={})
