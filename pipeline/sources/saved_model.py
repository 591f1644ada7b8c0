"""`source=saved_model`: any TF2 SavedModel directory, called through one of its signatures."""

from __future__ import annotations

from pipeline.errors import SourceError
from pipeline.sources.cut import refuse_saved_model_cut
from pipeline.sources.signatures import (
    SignatureDescription,
    check_signature,
    describe_function,
    format_tensors,
    load_saved_model,
    select_output,
)
from pipeline.types import Preprocess, SourceModel


class SavedModelSource:
    """A SavedModel called through a signature, as a Keras 3 backbone that fine-tunes for real.

    Works with what Keras 3 `model.export(dir)` writes (signatures `serve` and
    `serving_default`), with `tf.saved_model.save` of a `tf.Module` holding several
    signatures, and with any other TF2 SavedModel whose signature takes one float32 image
    tensor. The Keras variables of the backbone are the very variables the signature reads,
    so the optimizer's updates change its forward pass.

    Signature functions take no `training` argument: they always run in inference mode.
    Dropout stays off and BatchNorm uses (and never updates) its moving statistics, even
    while the other weights fine-tune. For training-mode behaviour use a source that calls
    the model itself (`source=hub` on a SavedModel with `__call__`, or a Keras source).

    Args:
        path: the SavedModel directory (holding saved_model.pb and variables/).
        input_shape: `[height, width, channels]` of the raw images; must fit the
            signature's input shape.
        preprocess: how raw 0-255 pixels are mapped to the range the signature expects,
            inside the backbone (`none` passes them unchanged).
        signature: the entry of the SavedModel's `signatures` to call.
        output_key: which output of the signature holds the features; `None` takes the only
            one and is an error when there are several.
        trainable: whether fine-tuning may change the SavedModel's weights; `False` pins
            every variable bit for bit.
        layer: refused unless `None`: a SavedModel stores traced functions, not a layer
            graph one could cut (`pipeline.sources.cut.refuse_saved_model_cut`).

    Example:
        >>> source = SavedModelSource(path="/models/exported", input_shape=[224, 224, 3],
        ...                           preprocess="tf", output_key="output_0")
        >>> source.load().backbone(images)  # (batch, features)
    """

    def __init__(
        self,
        path: str,
        input_shape: list[int],
        preprocess: Preprocess = "none",
        signature: str = "serving_default",
        output_key: str | None = None,
        trainable: bool = True,
        layer: str | None = None,
    ):
        self.path = path
        self.input_shape = tuple(input_shape)
        self.preprocess = preprocess
        self.signature = signature
        self.output_key = output_key
        self.trainable = trainable
        refuse_saved_model_cut(layer)  # before anything is loaded

    def load(self) -> SourceModel:
        loaded = load_saved_model(self.path, key="source.path")
        check_signature(loaded, self.signature, where=self.path)
        described = describe_function(loaded.signatures[self.signature])
        what = f"signature {self.signature!r} of {self.path}"
        self._check_input(described, what)
        output = select_output(described, self.output_key, what)

        from pipeline.sources.backbone import build_backbone
        from pipeline.sources.saved_model_layer import SavedModelLayer

        layer = SavedModelLayer(
            handle=self.path,
            signature=self.signature,
            output_key=output.name,
            loaded=loaded,
            trainable=self.trainable,
            dtype="float32",  # signatures are traced for float32, also under mixed precision
            name="saved_model",
        )
        description = f"saved_model:{self.path} signature={self.signature} output={output.name}"
        return build_backbone(layer, self.input_shape, self.preprocess, description)

    def _check_input(self, described: SignatureDescription, what: str) -> None:
        """One float32 image input whose shape fits `[batch, *input_shape]`, before any call."""
        if len(described.inputs) != 1:
            raise SourceError(
                f"source.signature={self.signature!r}: {what} takes {len(described.inputs)} "
                f"inputs ({format_tensors(described.inputs)}); an image source needs exactly "
                "one image input. Set source.signature to a signature with one input "
                "(`python -m pipeline.inspect` lists them)."
            )
        image = described.inputs[0]
        if image.dtype != "float32":
            raise SourceError(
                f"source.signature={self.signature!r}: {what} takes {image}; the backbone "
                "feeds float32 images (after source.preprocess). Pick or export a signature "
                "that takes float32 images."
            )
        if image.shape is None:
            return
        expected = (None, *self.input_shape)
        fits = len(image.shape) == len(expected) and all(
            want is None or got is None or want == got for want, got in zip(expected, image.shape)
        )
        if not fits:
            if len(image.shape) > 1 and all(d is not None for d in image.shape[1:]):
                fix = f"Set source.input_shape={list(image.shape[1:])}."
            else:
                fix = "Set source.input_shape to the shape of one image it takes."
            raise SourceError(
                f"source.input_shape={list(self.input_shape)} does not fit the input of {what}: "
                f"{image} (the first axis is the batch). {fix}"
            )
