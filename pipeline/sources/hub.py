"""`source=hub`: a TF Hub model (URL, hub/Kaggle handle or local directory), fine-tunable in Keras 3."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import ConfigError, SourceError
from pipeline.sources.cut import refuse_saved_model_cut
from pipeline.sources.network import check_reachable
from pipeline.sources.signatures import check_saved_model_dir, check_signature, load_saved_model
from pipeline.types import InputKind, Preprocess, SourceModel

_OFFLINE_HELP = (
    "Offline options: point source.handle at a local SavedModel directory, or set "
    "TFHUB_CACHE_DIR to a cache that already holds this handle."
)


class HubSource:
    """A TF2 SavedModel in the TF Hub format, loaded so that Keras 3 can fine-tune it.

    Image modules take raw pixels; text modules (`input: text`: nnlm, Universal Sentence
    Encoder, or a BERT encoder with its `preprocessor`) take a batch of raw strings.

    Args:
        handle: a `https://tfhub.dev/...` or `https://www.kaggle.com/models/...` URL, or a
            local directory holding `saved_model.pb`.
        input_shape: `[height, width, channels]` the model takes (ignored for text).
        preprocess: how raw 0-255 pixels are mapped to the model's input range; TF Hub
            image models take `unit` (0-1); text modules take `none`.
        input: `image`, or `text` for a module whose call takes a batch of strings.
        preprocessor: for text, a preprocessing module (handle or directory, e.g. TF Hub's
            `bert_en_uncased_preprocess`) called on the strings before `handle`; its ops
            come from TF.Text (`pip install 'tf-transfer-pipeline[text]'`).
        seq_length: with such a preprocessor, the number of token positions to pack
            (its `tokenize` and `bert_pack_inputs`); null keeps its default (128 for TF Hub's).
        trainable: whether fine-tuning may change the model's weights.
        signature: call this entry of `signatures` instead of `__call__` (such calls
            always run in inference mode).
        output_key: which output to take when the model returns a dict.
        fetch_timeout: seconds to wait for the hub before failing with offline advice.
        layer: refused unless `None`: a SavedModel stores traced functions, not a layer
            graph one could cut (`pipeline.sources.cut.refuse_saved_model_cut`).

    Example:
        >>> HubSource(handle="/models/mobilenet_v2", input_shape=[224, 224, 3]).load()
    """

    def __init__(
        self,
        handle: str,
        input_shape: list[int],
        preprocess: Preprocess = "unit",
        trainable: bool = True,
        signature: str | None = None,
        output_key: str | None = None,
        fetch_timeout: float = 10.0,
        layer: str | None = None,
        input: InputKind = "image",
        preprocessor: str | None = None,
        seq_length: int | None = None,
    ):
        check_text_settings(input, preprocess, preprocessor, seq_length)
        self.handle = handle
        self.input = input
        self.input_shape = tuple(input_shape) if input == "image" else ()
        self.preprocessor = preprocessor
        self.seq_length = seq_length
        self.preprocess = preprocess
        self.trainable = trainable
        self.signature = signature
        self.output_key = output_key
        self.fetch_timeout = fetch_timeout
        refuse_saved_model_cut(layer)  # before anything is loaded

    def load(self) -> SourceModel:
        path = resolve_handle(self.handle, self.fetch_timeout)
        loaded = load_saved_model(path, key="source.handle", value=self.handle)
        check_signature(loaded, self.signature, where=self.handle)
        preprocessor_path = preprocessor = None
        if self.preprocessor is not None:
            preprocessor_path = resolve_handle(self.preprocessor, self.fetch_timeout, key="source.preprocessor")
            preprocessor = load_saved_model(preprocessor_path, key="source.preprocessor", value=self.preprocessor)
            check_packing(preprocessor, self.seq_length)
        from pipeline.sources.backbone import build_backbone
        from pipeline.sources.saved_model_layer import SavedModelLayer

        layer = SavedModelLayer(
            handle=path,
            signature=self.signature,
            output_key=self.output_key,
            loaded=loaded,
            trainable=self.trainable,
            dtype="float32",  # the SavedModel's functions are float32, also under mixed precision
            preprocessor=preprocessor_path,
            preprocessor_loaded=preprocessor,
            seq_length=self.seq_length,
            name="hub",
        )
        return build_backbone(layer, self.input_shape, self.preprocess, f"hub:{self.handle}", self.input)


def check_text_settings(kind: str, preprocess: str, preprocessor: str | None, seq_length: int | None) -> None:
    """The text keys of a source fit together; raises ConfigError naming the key and the fix."""
    if kind not in ("image", "text"):
        raise ConfigError(f"source.input={kind!r}: expected image (pixels) or text (a batch of strings)")
    if kind == "image":
        for key, value in (("preprocessor", preprocessor), ("seq_length", seq_length)):
            if value is not None:
                raise ConfigError(f"source.{key}={value!r} is for text modules: set source.input=text "
                                  f"(source=hub_text), or source.{key}=null")
        return
    if preprocess != "none":
        raise ConfigError(f"source.preprocess={preprocess!r} scales pixels; a text module takes strings: "
                          "set source.preprocess=none (source=hub_text does)")
    if seq_length is not None and (not isinstance(seq_length, int) or seq_length < 2):
        raise ConfigError(f"source.seq_length={seq_length!r}: expected a number of token positions >= 2, "
                          "for example 128, or null for the preprocessor's default")
    if seq_length is not None and preprocessor is None:
        raise ConfigError(f"source.seq_length={seq_length} needs source.preprocessor (the module that "
                          "tokenizes); without one the text module tokenizes itself: set source.seq_length=null")


def check_packing(preprocessor, seq_length: int | None) -> None:
    """A `seq_length` needs a preprocessor that exposes `tokenize` and `bert_pack_inputs`."""
    if seq_length is None:
        return
    missing = [name for name in ("tokenize", "bert_pack_inputs") if not hasattr(preprocessor, name)]
    if missing:
        raise SourceError(f"source.seq_length={seq_length}: the preprocessor has no {' or '.join(missing)} "
                          "to pack tokens with (TF Hub's BERT preprocessors have both); set source.seq_length=null")


def resolve_handle(handle: str, timeout: float = 10.0, key: str = "source.handle") -> str:
    """A local directory for `handle`, downloading (into TFHUB_CACHE_DIR) if it is a URL.

    Raises:
        SourceError: within about `timeout` seconds when the hub cannot be reached.
    """
    if os.path.isdir(handle):
        check_saved_model_dir(handle, key=key)
        return handle
    parsed = urlparse(handle)
    if parsed.scheme in ("", "file") and not _looks_like_hub_handle(handle):
        raise SourceError(
            f"{key}={handle!r} is not a directory. Point it at a local SavedModel "
            "directory, or at a TF Hub / Kaggle Models URL."
        )
    if _looks_like_hub_handle(handle) and not parsed.scheme:
        handle = f"https://www.kaggle.com/models/{handle}"  # owner/model/framework/variation/version
        parsed = urlparse(handle)
    cached = _cached_path(handle)
    if cached is not None:
        return cached
    url = handle if parsed.hostname else "https://www.kaggle.com/"
    check_reachable(f"{key}={handle!r}", url, timeout, _OFFLINE_HELP)
    import tensorflow_hub as hub

    try:
        return hub.resolve(handle)
    except Exception as error:
        raise SourceError(
            f"{key}={handle!r} could not be fetched ({type(error).__name__}: {error}). "
            + _OFFLINE_HELP
        ) from error


def _looks_like_hub_handle(handle: str) -> bool:
    # Kaggle handles: owner/model/framework/variation[/version]
    return not handle.startswith((".", "/", "~")) and handle.count("/") >= 3


def _cached_path(handle: str) -> str | None:
    cache = os.environ.get("TFHUB_CACHE_DIR")
    if not cache:
        return None
    candidate = Path(cache) / hashlib.sha1(handle.encode("utf8")).hexdigest()
    return str(candidate) if (candidate / "saved_model.pb").exists() else None
