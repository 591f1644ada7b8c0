"""The adapt stage: freeze the source backbone and put the new head on it."""

from __future__ import annotations

from typing import Any, Protocol

from pipeline.errors import DataError
from pipeline.types import AdaptedModel, InputKind, SourceModel, Task


class Head(Protocol):
    def build(self, feature_shape: tuple[int, ...], num_classes: int, task: Task) -> Any: ...


class Freeze(Protocol):
    def apply(self, backbone: Any) -> Any: ...  # -> pipeline.freeze.FrozenState


def adapt(
    source: SourceModel,
    head: Head,
    freeze: Freeze,
    class_names: tuple[str, ...],
    input_shape: tuple[int, ...],
    task: Task,
    resizable: bool = True,
    input_kind: InputKind = "image",
) -> AdaptedModel:
    """Build `head(backbone(inputs))` for the target task.

    Args:
        input_shape: the shape of the data's images (`()` for text); must be what the
            source takes.
        resizable: whether the data option sets its image size (`data.image_size`,
            `data.channels`); the mismatch error only suggests keys that exist.
        input_kind: what the data gives, `image` or `text`; must be what the source takes.
    """
    import keras

    from pipeline.sources.backbone import model_input

    check_input_kind(source, input_kind)
    check_input_shape(source, input_shape, resizable)
    frozen = freeze.apply(source.backbone)
    head_model = head.build(source.feature_shape, len(class_names), task)
    inputs = model_input(source.input_kind, source.input_shape)
    model = keras.Model(inputs, head_model(source.backbone(inputs)), name="transfer")
    return AdaptedModel(
        model=model,
        backbone=source.backbone,
        head=head_model,
        task=task,
        class_names=tuple(class_names),
        freeze=frozen,
        fit_head=getattr(head, "fit", None),
    )


def check_input_kind(source: SourceModel, input_kind: InputKind) -> None:
    """Raises DataError, naming the keys that fix it, unless the source takes what the data gives."""
    if input_kind == source.input_kind:
        return
    if input_kind == "text":
        fix = ("choose a source that takes strings, for example source=hub_text source.handle=<a TF Hub "
               "text module>, or image data")
    else:
        fix = "choose an image source (source=hub, keras_app, ...), or text data (data=text_folder)"
    raise DataError(
        f"the data gives {input_kind} but the source ({source.description}) takes {source.input_kind}: {fix}."
    )


def check_input_shape(source: SourceModel, input_shape: tuple[int, ...], resizable: bool = True) -> None:
    """Raises DataError, naming the keys that fix it, unless the data's images fit the source."""
    if tuple(input_shape) == tuple(source.input_shape):
        return
    data_fix = (
        f"set data.image_size=[{','.join(map(str, source.input_shape[:2]))}] and "
        f"data.channels={source.input_shape[-1]} to match the source, or "
        if resizable else ""
    )
    raise DataError(
        f"the data's images have shape {tuple(input_shape)} but the source "
        f"({source.description}) takes {tuple(source.input_shape)}: {data_fix}set "
        f"source.input_shape=[{','.join(map(str, input_shape))}] to match the data."
    )
