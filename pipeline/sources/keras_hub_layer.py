"""The text model of `source=keras_hub`: a preset's preprocessor and backbone as one Keras layer."""

from __future__ import annotations

import keras

TEXT_POOLING = ("pooled", "mean")


@keras.saving.register_keras_serializable(package="pipeline")
class KerasHubTextLayer(keras.layers.Layer):
    """Raw strings -> a KerasHub preprocessor (tokenize, pack) -> its backbone -> one vector per text.

    One layer, not a functional graph of the two: Keras rebuilds a functional model from a
    `.keras` file by calling each layer on symbolic inputs *before* it restores assets, and a
    tokenizer without its vocabulary (an asset) cannot be called (keras-team/keras-hub#1522).
    This layer states its output shape instead, so checkpoints and `model.keras` reload.

    Args:
        preprocessor: a `keras_hub.models.TextClassifierPreprocessor` (or its Keras config),
            e.g. `BertTextClassifierPreprocessor`; it runs inside the model, never trained.
        backbone: the `keras_hub.models.Backbone` (or its config) that takes what the
            preprocessor gives (`token_ids`, `padding_mask`, ...).
        pooling: `pooled`: the backbone's `pooled_output` (BERT) when it has one, otherwise
            the first token's vector; `mean`: the mean of `sequence_output` over the positions
            that the padding mask keeps.

    Example:
        >>> KerasHubTextLayer(preprocessor, backbone, pooling="mean")(np.array(["a text"]))
    """

    def __init__(self, preprocessor, backbone, pooling: str = "pooled", **kwargs):
        super().__init__(**kwargs)
        if pooling not in TEXT_POOLING:
            raise ValueError(f"pooling={pooling!r}: expected one of {', '.join(TEXT_POOLING)}")
        self.preprocessor = _deserialize(preprocessor)
        self.backbone = _deserialize(backbone)
        self.pooling = pooling
        # The masked mean is Keras' own average pooling given the padding mask; as a sublayer
        # it also makes the pooling part of the feature cache's key (`walk_layers`).
        self.mean = keras.layers.GlobalAveragePooling1D(name="mean") if pooling == "mean" else None

    @property
    def layers(self) -> list:
        """The sublayers, so that `freeze` finds the backbone's layers as its units."""
        return [self.preprocessor, self.backbone] + ([self.mean] if self.mean is not None else [])

    @property
    def seq_length(self) -> int | None:
        """The token positions the preprocessor packs (read for the feature cache's key, under
        the name `SavedModelLayer` gives it)."""
        return getattr(self.preprocessor, "sequence_length", None)

    def build(self, input_shape):
        self.built = True  # the backbone comes built; the preprocessor holds no weights

    def call(self, texts, training=None):
        inputs = self.preprocessor(texts)
        expected = self.backbone.input
        if isinstance(expected, dict):
            outputs = self.backbone({name: inputs[name] for name in expected}, training=training)
        else:
            outputs = self.backbone(inputs["token_ids"], training=training)
        sequence = outputs["sequence_output"] if isinstance(outputs, dict) else outputs
        if self.pooling == "mean":
            return self.mean(sequence, mask=inputs["padding_mask"])
        if isinstance(outputs, dict) and "pooled_output" in outputs:
            return outputs["pooled_output"]
        return sequence[:, 0, :]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], hidden_size(self.backbone))

    def get_config(self):
        return {
            **super().get_config(),
            "preprocessor": keras.saving.serialize_keras_object(self.preprocessor),
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "pooling": self.pooling,
        }


def sequence_output(backbone):
    """The symbolic `(batch, positions, hidden)` output of a KerasHub text backbone, or None."""
    output = backbone.output
    if isinstance(output, dict):
        output = output.get("sequence_output")
    return output if output is not None and len(output.shape) == 3 else None


def hidden_size(backbone) -> int:
    return int(sequence_output(backbone).shape[-1])


def _deserialize(layer):
    # In `.keras` files the sublayers come as configs; Keras safe mode applies to them.
    return keras.saving.deserialize_keras_object(layer) if isinstance(layer, dict) else layer
