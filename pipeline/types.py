"""The small frozen values that stages hand each other.

Stages never reach into each other's state: the runner passes these along. TensorFlow
objects are typed as `Any` so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Task = Literal["multiclass", "multilabel", "binary"]
Preprocess = Literal["caffe", "tf", "torch", "unit", "none"]
# What a model takes and a data option gives: images (`input_shape` is `(height, width,
# channels)`, float32 0-255 pixels) or text (`input_shape` is `()`: one tf.string per example).
InputKind = Literal["image", "text"]


@dataclass(frozen=True)
class DataBundle:
    """What the data stage produces.

    Args:
        train, val, test: unbatched `tf.data.Dataset`s of `(input, label)`; for images,
            raw float32 pixels in 0-255 of `input_shape`; for text, one scalar tf.string
            (UTF-8); labels integer class indices.
        class_names: the label of each class index, in a stable order.
        input_shape: `(height, width, channels)` of one image; `()` for text.
        task: the kind of labels; decides the head's activation and the loss. Labels are
            int class indices for `multiclass` and `binary` (0/1), and multi-hot float
            vectors of length `num_classes` for `multilabel`.
        num_examples: examples per split, for logging and steps.
        augmentation: a callable `(images, training) -> images` on a batch of raw images
            (for example a Keras `Sequential` of random layers); the train stage applies it
            to training batches only. `None` when the config asks for no augmentation.
        skipped_files: files that could not be decoded and were left out (logged to MLflow).
        fingerprint: a digest of the data's identity (files and sizes, or the package
            data set and split), for caches and reruns.
        resize: the policy that brought every image to `input_shape` (`data.resize`); the
            export serves images of other sizes through the same one.
        max_pixels: the largest image (width x height) read from a file; the export's
            `serving_bytes` refuses larger ones from their header, before decoding.
        resizable: whether the option has `data.image_size` and `data.channels` (the
            image options do; digits' 8x8 arrays do not), for advice that names real keys.
        example_ids: split -> the id of each example, in the split dataset's element order
            when the dataset keeps its order (`data.deterministic=true`): the file read
            (`image_folder`, `csv`), `<file>:<record index>` (`tfrecord`), the index in
            scikit-learn's data set (`digits`). A split without ids is numbered `0..n-1`.
        input_kind: `image` or `text` (`InputKind`); text options set `resizable=False`
            and give no augmentation.
        max_chars: text: each text was cut to its first `max_chars` characters
            (`data.max_chars`); the export cuts the texts it serves the same way. None: whole.
    """

    train: Any
    val: Any
    test: Any
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    task: Task = "multiclass"
    num_examples: dict[str, int] = field(default_factory=dict)
    augmentation: Any = None
    skipped_files: tuple[str, ...] = ()
    fingerprint: str = ""
    resize: str = "resize"
    max_pixels: int = 100_000_000
    resizable: bool = True
    example_ids: Mapping[str, Sequence[str]] = field(default_factory=dict)
    input_kind: InputKind = "image"
    max_chars: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class SourceModel:
    """What the load stage produces: the pre-trained backbone, ready to put under a head.

    Args:
        backbone: a Keras 3 model from raw 0-255 images of `input_shape` (or a batch of
            strings, for text) to features; the source's preprocessing is its first layer.
        input_shape: the image shape the backbone takes; `()` for text.
        feature_shape: the shape of one feature output (without the batch axis).
        preprocess: the preprocessing baked into the backbone (`unit`, `tf`, ...).
        description: where it came from, for logs (`hub:/path/to/model`).
        input_kind: what the backbone takes, `image` or `text` (`InputKind`).
    """

    backbone: Any
    input_shape: tuple[int, ...]
    feature_shape: tuple[int, ...]
    preprocess: str
    description: str
    input_kind: InputKind = "image"


@dataclass(frozen=True)
class AdaptedModel:
    """What the adapt stage produces.

    `model` is `head(backbone(images))`; `backbone` and `head` are its two sub-models, kept
    apart so that training can run the head alone on precomputed backbone features.
    `freeze` is the `pipeline.freeze.FrozenState`: the backbone's units, the variables that
    may ever train, and the schedule that unfreezes more of them during training.
    `fit_head(head, features, labels, task)` fits the head in one step on the backbone's
    training features instead of by gradient descent (`head=sklearn`); None for Keras heads.
    """

    model: Any
    backbone: Any
    head: Any
    task: Task
    class_names: tuple[str, ...]
    freeze: Any = None
    fit_head: Any = None


@dataclass(frozen=True)
class TrainResult:
    """What the train stage produces.

    Args:
        history: per-epoch values keyed like Keras (`loss`, `val_accuracy`).
        epochs_completed: epochs run (fewer than asked when early stopping fired).
        weights_sha256: a digest of every model weight after training, to compare runs
            and workers bit for bit.
        feature_cache: `hit`, `computed`, or why the cache was not used.
        features: when every epoch trained the head alone on cached backbone outputs, those
            outputs per split (`{"val": dataset of (features, label), ...}`), so that
            evaluation need not run the unchanged backbone again; otherwise None.
        backbone_seconds: the wall time spent computing the feature cache (the backbone's
            one pass over every split); 0 on a cache hit or without the cache.
        backbone_function: the `tf.function` that computed the cache, `backbone(images,
            training=False)` on batches of any size, traced once; the export calls it rather
            than trace the backbone again. None on a cache hit or without the cache.
    """

    history: dict[str, list[float]]
    epochs_completed: int
    weights_sha256: str = ""
    feature_cache: str = ""
    features: Mapping[str, Any] | None = None
    backbone_seconds: float = 0.0
    backbone_function: Any = None


@dataclass(frozen=True)
class ExportResult:
    """What the export stage produces.

    Args:
        paths: format name -> path of the artifact (`{"saved_model": Path(...)}`).
        max_abs_diff: format name -> largest difference between the reloaded artifact's
            predictions and the in-memory model's on the test images.
        accuracy_delta: format name -> the artifact's accuracy minus the in-memory model's
            on the same images (`tflite`, where quantization may cost accuracy).
        verify_seconds: of the export's wall time, what reloading and checking took.
    """

    root: Path
    paths: dict[str, Path]
    max_abs_diff: dict[str, float]
    accuracy_delta: dict[str, float] = field(default_factory=dict)
    verify_seconds: float = 0.0

    @property
    def metrics(self) -> dict[str, float]:
        """`export_<format>_max_abs_diff` and `export_<format>_accuracy_delta`, for MLflow."""
        return {
            **{f"export_{name}_max_abs_diff": value for name, value in self.max_abs_diff.items()},
            **{f"export_{name}_accuracy_delta": value for name, value in self.accuracy_delta.items()},
        }


@dataclass(frozen=True)
class EvaluationResult:
    """What the evaluate stage produces.

    Args:
        metrics: flat scalar metrics named by split (`test_accuracy`, `val_macro_f1`,
            `test_f1_<class>`), ready for `metrics.json` and MLflow.
        artifacts: the files it wrote (confusion matrices as JSON and PNG, training
            curves), to log beside the metrics.
    """

    metrics: dict[str, float]
    artifacts: tuple[Path, ...] = ()
