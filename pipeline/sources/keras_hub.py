"""`source=keras_hub`: a KerasHub backbone preset (a local directory, a Kaggle or Hugging Face
handle), for text or images, with the preset's own preprocessing inside the backbone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import ConfigError, SourceError
from pipeline.sources.network import check_reachable
from pipeline.types import InputKind, SourceModel

KerasHubPooling = Literal["avg", "max", "pooled", "mean"]
# Per input kind, the poolings that apply to it; the first is the default.
_POOLINGS = {"image": ("avg", "max"), "text": ("pooled", "mean")}
_INSTALL = "pip install 'tf-transfer-pipeline[keras_hub]'"
_EXAMPLE = "kaggle://keras/bert/keras/bert_tiny_en_uncased/2"
_OFFLINE_HELP = (
    "Offline options: point source.preset at a local preset directory: on a machine with the "
    "network save one with keras_hub.models.Backbone.from_preset(handle).save_to_preset(dir) and "
    "the same for its preprocessor (keras_hub.models.TextClassifierPreprocessor, or "
    "keras_hub.layers.ImageConverter for images), or copy the directory kagglehub downloaded "
    "(under ~/.cache/kagglehub/models/, or $KAGGLEHUB_CACHE)."
)


class KerasHubSource:
    """A KerasHub backbone from a preset, fine-tunable, fed raw text or raw 0-255 images.

    Text presets (those with a tokenizer) take a batch of strings: the preset's
    `TextClassifierPreprocessor` (tokenize, pack) runs inside the model, then the backbone,
    then `pooling`. Image presets (those with an image converter) take raw pixels of
    `input_shape`: the converter's scale and offset run inside the model (not its resize:
    the data stage resizes), then the backbone, then `pooling`. Freeze units are the
    backbone's layers (`transformer_layer_0`, ...; `python -m pipeline.inspect` lists them).

    Args:
        preset: a local preset directory (what `save_to_preset` writes), or a handle such as
            `kaggle://keras/bert/keras/bert_base_en_uncased/2` or `hf://<owner>/<model>`.
        input: `text` or `image`; `None` decides from the preset.
        input_shape: images: `[height, width, channels]`; `None` takes the preset's image
            size. Ignored for text.
        sequence_length: text: the token positions the preprocessor packs (longer texts are
            truncated); `None` keeps the preset's.
        pooling: images: `avg` or `max` over the feature map; text: `pooled` (the backbone's
            `pooled_output`, else the first token's vector) or `mean` (over the positions
            that are not padding). `None`: `avg` for images, `pooled` for text.
        trainable: whether fine-tuning may change the backbone's weights. When false it is
            pinned: inference mode (dropout off, BatchNorm statistics fixed), and no freeze
            setting unfreezes it.
        fetch_timeout: seconds to wait for Kaggle or Hugging Face before failing with
            offline advice.

    Example:
        >>> KerasHubSource(preset="kaggle://keras/bert/keras/bert_base_en_uncased/2").load()
        >>> KerasHubSource(preset="/models/resnet_preset", input_shape=[224, 224, 3]).load()
    """

    def __init__(
        self,
        preset: str,
        input: InputKind | None = None,
        input_shape: list[int] | None = None,
        sequence_length: int | None = None,
        pooling: KerasHubPooling | None = None,
        trainable: bool = True,
        fetch_timeout: float = 10.0,
    ):
        if input not in (None, "image", "text"):
            raise ConfigError(f"source.input={input!r}: expected image, text, or null to decide from the preset")
        if sequence_length is not None and (not isinstance(sequence_length, int) or sequence_length < 2):
            raise ConfigError(f"source.sequence_length={sequence_length!r}: expected a number of token "
                              "positions >= 2, for example 128, or null for the preset's")
        if input_shape is not None and len(input_shape) != 3:
            raise ConfigError(f"source.input_shape={list(input_shape)}: expected [height, width, channels], "
                              "or null for the preset's image size")
        self.preset = str(preset)
        self.input = input
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.sequence_length = sequence_length
        self.pooling = pooling
        self.trainable = trainable
        self.fetch_timeout = fetch_timeout

    def load(self) -> SourceModel:
        preset = self._resolve()
        try:
            import keras_hub  # noqa: F401
        except ImportError as error:
            raise SourceError(f"source=keras_hub needs the keras-hub package, which is not installed: "
                              f"{_INSTALL}") from error
        config = _backbone_config(preset, self.preset)
        kind = self.input or _kind(preset, self.preset)
        pooling = self._pooling(kind)
        if kind == "text":
            return self._load_text(preset, config, pooling)
        return self._load_image(preset, config, pooling)

    def _resolve(self) -> str:
        """A local directory, or the handle itself once its server answers."""
        scheme = self.preset.split("://", 1)[0].lower() if "://" in self.preset else None
        if scheme is None:
            path = Path(self.preset).expanduser()
            if not path.is_dir():
                raise SourceError(
                    f"source.preset={self.preset!r}: no such directory. Expected a KerasHub preset "
                    "directory (what save_to_preset writes: config.json, model.weights.h5 and the "
                    f"preprocessor's files) or a handle like {_EXAMPLE} or hf://<owner>/<model>; fix it."
                )
            return str(path)
        if scheme == "kaggle":
            cached = _kaggle_cache(self.preset)
            if cached is not None:
                return cached
            url = "https://www.kaggle.com/"
        elif scheme == "hf":
            url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        else:  # gs://, modelscope://: their own clients fetch them
            return self.preset
        check_reachable(f"source.preset={self.preset!r}", url, self.fetch_timeout, _OFFLINE_HELP)
        return self.preset

    def _pooling(self, kind: str) -> str:
        allowed = _POOLINGS[kind]
        if self.pooling is not None and self.pooling not in allowed:
            raise ConfigError(
                f"source.pooling={self.pooling!r} does not apply to a {kind} preset "
                f"(source.preset={self.preset!r}); expected {' or '.join(allowed)}, or null for {allowed[0]}"
            )
        if kind == "image" and self.sequence_length is not None:
            raise ConfigError(f"source.sequence_length={self.sequence_length} is for text presets, and "
                              f"source.preset={self.preset!r} is an image preset: set source.sequence_length=null")
        return self.pooling or allowed[0]

    def _load_text(self, preset: str, config: dict, pooling: str) -> SourceModel:
        try:
            import tensorflow_text  # noqa: F401  (the tokenizer's ops inside the model)
        except ImportError as error:
            raise SourceError(f"source.preset={self.preset!r} is a text preset, whose tokenizer runs "
                              f"inside the model on TF.Text ops: {_INSTALL}") from error
        self._check_positions(config)
        import keras_hub

        from pipeline.sources.keras_hub_layer import KerasHubTextLayer, sequence_output

        arguments = {} if self.sequence_length is None else {"sequence_length": self.sequence_length}
        try:
            preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(preset, **arguments)
        except Exception as error:
            raise SourceError(
                f"source.preset={self.preset!r}: no text preprocessor could be loaded from it "
                f"({_first_line(error)}). Expected a text preset of a classifier family (BERT, "
                "DistilBERT, RoBERTa, DeBERTa, ...) with its tokenizer; for an image preset set "
                "source.input=image or null"
            ) from error
        backbone = self._backbone(preset)
        if sequence_output(backbone) is None:
            raise SourceError(
                f"source.preset={self.preset!r}: its {type(backbone).__name__} gives no "
                "(batch, positions, hidden) sequence output to pool; source=keras_hub takes text "
                "encoders (BERT, RoBERTa, ...)"
            )
        if pooling == "mean" and isinstance(backbone.output, dict):
            # As a cut does: layers that do not reach the features (BERT's pooled_dense) are
            # left out, so that they are not freeze units, trained or exported.
            import keras

            backbone = keras.Model(backbone.input, sequence_output(backbone), name=backbone.name)
        layer = KerasHubTextLayer(preprocessor, backbone, pooling, name="keras_hub")
        description = f"keras_hub:{self.preset} sequence_length={preprocessor.sequence_length} pooling={pooling}"
        return self._build(layer, (), "none", description, "text")

    def _load_image(self, preset: str, config: dict, pooling: str) -> SourceModel:
        import keras
        import keras_hub

        from pipeline.sources.cut import cut

        try:
            converter = keras_hub.layers.ImageConverter.from_preset(preset)
        except Exception as error:
            raise SourceError(
                f"source.preset={self.preset!r}: no image converter could be loaded from it "
                f"({_first_line(error)}). Expected an image preset (ResNet, EfficientNet, ViT, ...) "
                "with its image_converter.json; for a text preset set source.input=text or null"
            ) from error
        input_shape = self.input_shape or self._preset_image_shape(converter, config)
        backbone = self._backbone(preset)
        preprocess, scaling = pixel_scaling(converter)
        inputs = keras.Input(input_shape)
        try:
            features = backbone(inputs if scaling is None else scaling(inputs))
        except ValueError as error:
            raise SourceError(
                f"source.input_shape={list(input_shape)} does not fit the backbone of "
                f"source.preset={self.preset!r} ({_first_line(error)}); set it to the image size "
                "the preset was made for, or null to take it from the preset"
            ) from error
        if isinstance(features, (dict, list, tuple)):
            raise SourceError(f"source.preset={self.preset!r}: its {type(backbone).__name__} gives several "
                              "outputs; source=keras_hub takes image backbones with one feature map")
        extractor = cut(keras.Model(inputs, features), None, pooling, "keras_hub", self.preset,
                        f"python -m pipeline.inspect source=keras_hub source.preset={self.preset}")
        scale = "" if scaling is None else f" scale={converter.scale} offset={converter.offset}"
        description = f"keras_hub:{self.preset}{scale} pooling={pooling}"
        return self._build(extractor, input_shape, preprocess, description, "image")

    def _build(self, extractor: Any, input_shape: tuple, preprocess: str, description: str, kind: str) -> SourceModel:
        """The backbone around `extractor`, which is pinned when `trainable` is false."""
        from pipeline.sources.backbone import build_backbone, pin

        return build_backbone(
            pin(extractor, "keras_hub") if not self.trainable else extractor,
            input_shape, preprocess, description, kind,
        )

    def _backbone(self, preset: str) -> Any:
        import keras_hub

        try:  # Keras safe mode: a preset's config cannot run code
            return keras_hub.models.Backbone.from_preset(preset)
        except Exception as error:
            remote = "://" in self.preset
            raise SourceError(
                f"source.preset={self.preset!r}: its backbone could not be loaded ({_first_line(error)}). "
                + (_OFFLINE_HELP if remote else "Expected the files backbone.save_to_preset(dir) writes "
                   "(config.json, model.weights.h5); save the preset again.")
            ) from error

    def _check_positions(self, config: dict) -> None:
        most = config.get("config", {}).get("max_sequence_length")
        if self.sequence_length is not None and isinstance(most, int) and self.sequence_length > most:
            raise ConfigError(
                f"source.sequence_length={self.sequence_length} is more than the {most} positions the "
                f"backbone of source.preset={self.preset!r} has embeddings for: set it to {most} or less"
            )

    def _preset_image_shape(self, converter: Any, config: dict) -> tuple[int, ...]:
        shape = list(config.get("config", {}).get("image_shape") or (None, None, 3))
        if converter.image_size is not None:
            shape[:2] = converter.image_size
        if len(shape) != 3 or None in shape:
            raise ConfigError(
                f"source.input_shape is null, and source.preset={self.preset!r} names no image size: "
                "set it, like source.input_shape=[224,224,3]"
            )
        return tuple(int(each) for each in shape)


def pixel_scaling(converter: Any) -> tuple[str, Any]:
    """`(preprocess mode, None)` when the converter's scale and offset equal a mode of
    `PreprocessLayer` (found on a probe image, as keras_app does), else `("none", a Rescaling
    layer)` that applies them."""
    import keras
    import numpy as np

    from pipeline.sources.preprocess import PREPROCESS_MODES, PreprocessLayer

    scale = 1.0 if converter.scale is None else np.asarray(converter.scale, dtype="float32")
    offset = 0.0 if converter.offset is None else np.asarray(converter.offset, dtype="float32")
    probe = np.random.default_rng(0).uniform(0, 255, size=(1, 3, 3, 3)).astype("float32")
    expected = probe * scale + offset
    for mode in PREPROCESS_MODES:
        actual = keras.ops.convert_to_numpy(PreprocessLayer(mode)(probe))
        if np.allclose(actual, expected, rtol=1e-5, atol=1e-4):
            return mode, None
    return "none", keras.layers.Rescaling(scale, offset, name="image_converter_scaling")


def _backbone_config(preset: str, value: str) -> dict:
    """The preset's `config.json`, checked to describe a KerasHub Backbone before any is built."""
    if not _has_file(preset, "config.json"):
        raise SourceError(
            f"source.preset={value!r} is not a KerasHub preset: it has no config.json. Expected a "
            "directory written by backbone.save_to_preset(dir) (config.json, model.weights.h5, and "
            "the tokenizer's or image converter's files); point source.preset at one"
        )
    try:
        config = _read_json(preset, "config.json")
    except (ValueError, OSError) as error:
        raise SourceError(f"source.preset={value!r}: its config.json is not readable JSON ({error}); "
                          "save the preset again with save_to_preset") from error
    if "registered_name" not in config:
        return config  # a Hugging Face (transformers, timm) config, which keras_hub converts
    import keras
    import keras_hub

    found = keras.saving.get_registered_object(config["registered_name"])
    if not (isinstance(found, type) and issubclass(found, keras_hub.models.Backbone)):
        raise SourceError(
            f"source.preset={value!r}: its config.json describes {config['registered_name']!r}, not a "
            "KerasHub Backbone. Expected a preset saved from a backbone "
            "(keras_hub.models.BertBackbone(...).save_to_preset(dir)); point source.preset at one"
        )
    return config


def _kind(preset: str, value: str) -> str:
    text, image = _has_file(preset, "tokenizer.json"), _has_file(preset, "image_converter.json")
    if text != image:
        return "text" if text else "image"
    has = "both a tokenizer and an image converter" if text else (
        "neither a tokenizer (tokenizer.json) nor an image converter (image_converter.json)")
    raise SourceError(f"source.preset={value!r} has {has}, so what it takes is not known: "
                      "set source.input=text or source.input=image")


def _has_file(preset: str, name: str) -> bool:
    if "://" not in preset:
        return (Path(preset) / name).is_file()
    # How keras_hub itself probes a handle's optional files (downloading only those).
    from keras_hub.src.utils import preset_utils

    return preset_utils.check_file_exists(preset, name)


def _read_json(preset: str, name: str) -> dict:
    if "://" not in preset:
        return json.loads((Path(preset) / name).read_text(encoding="utf-8"))
    from keras_hub.src.utils import preset_utils

    return preset_utils.load_json(preset, name)


def _kaggle_cache(handle: str) -> str | None:
    """The directory kagglehub keeps a versioned handle in, when it is there: no network needed."""
    parts = handle.split("://", 1)[1].strip("/").split("/")
    if len(parts) != 5:  # owner/model/framework/variation/version; without a version kagglehub asks
        return None
    root = os.environ.get("KAGGLEHUB_CACHE") or os.path.join("~", ".cache", "kagglehub")
    directory = Path(root).expanduser() / "models" / Path(*parts)
    return str(directory) if (directory / "config.json").is_file() else None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
