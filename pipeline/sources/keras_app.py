"""`source=keras_app`: a `keras.applications` model, its own preprocessing inside the backbone."""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import SourceError
from pipeline.sources.cut import Pooling, cut
from pipeline.sources.network import check_reachable
from pipeline.types import Preprocess, SourceModel

_OFFLINE_HELP = (
    "Offline options: set source.weights to a local weights file saved from the same "
    "application without its top (model.save_weights('x.weights.h5')), or pre-populate the "
    "Keras cache ($KERAS_HOME/models, by default ~/.keras/models) with the application's "
    "weights file on a machine that has the network."
)


class KerasAppSource:
    """A `keras.applications` model without its classifier, fed raw 0-255 images.

    The application's own `preprocess_input` becomes the backbone's preprocessing layer:
    its mode is found by calling it on a probe image, not looked up in a table.

    Args:
        name: the application's name in `keras.applications` (`MobileNetV2`, `ResNet50`,
            `EfficientNetB0`, `VGG16`, ...).
        weights: `imagenet` (downloaded into the Keras cache on first use), `None` for
            random initialization, or the path of a weights file saved from the same
            application built with `include_top=False`.
        input_shape: `[height, width, channels]` the model takes.
        layer: the name of a layer to cut the model at (`block4_pool` of VGG16, `mixed7` of
            InceptionV3): its output becomes the features and the layers after it are
            dropped. `None` takes the last feature map. `python -m pipeline.inspect` lists
            the names with their output shapes.
        pooling: applied to the output of the cut: `avg` or `max` pool a feature map into a
            vector, `flatten` makes one vector of it, `None` keeps it. A vector output is
            left as it is.
        preprocess: `None` to use the application's own preprocessing; a mode (`caffe`,
            `tf`, `torch`, `unit`, `none`) overrides it.
        trainable: whether fine-tuning may change the model's weights. When false the
            model is pinned: it runs in inference mode (BatchNorm statistics fixed) and no
            freeze setting unfreezes it.
        fetch_timeout: seconds to wait for the weights server before failing with offline
            advice.

    Example:
        >>> KerasAppSource(name="ResNet50", input_shape=[224, 224, 3]).load()
        >>> KerasAppSource(name="VGG16", layer="block4_pool", pooling="avg").load()
    """

    def __init__(
        self,
        name: str,
        weights: str | None = "imagenet",
        input_shape: list[int] = (224, 224, 3),
        layer: str | None = None,
        pooling: Pooling | None = "avg",
        preprocess: Preprocess | None = None,
        trainable: bool = True,
        fetch_timeout: float = 10.0,
    ):
        self.name = name
        self.weights = weights
        self.input_shape = tuple(input_shape)
        self.layer = layer
        self.pooling = pooling
        self.preprocess = preprocess
        self.trainable = trainable
        self.fetch_timeout = fetch_timeout

    def load(self) -> SourceModel:
        self._check_weights_path()
        app = application(self.name, "source.name")
        preprocess = self.preprocess or preprocess_mode(app, f"source.name={self.name!r}")
        model = cut(
            self._build(app), self.layer, self.pooling, "keras_app",
            f"keras.applications.{self.name}(include_top=False)", self._inspect_command(),
        )
        from pipeline.sources.backbone import build_backbone, pin

        return build_backbone(
            pin(model, "keras_app") if not self.trainable else model,
            self.input_shape,
            preprocess,
            f"keras_app:{self.name}(weights={self.weights})"
            + (f"@{self.layer}" if self.layer else "")
            + (f" pooling={self.pooling}" if self.pooling else ""),
        )

    def _inspect_command(self) -> str:
        # Random weights: the names and shapes are the same, and nothing is downloaded.
        shape = ",".join(str(d) for d in self.input_shape)
        return (
            f"python -m pipeline.inspect source=keras_app source.name={self.name} "
            f"source.weights=null source.input_shape=[{shape}] source.layer=null"
        )

    def _check_weights_path(self) -> None:
        if self.weights in (None, "imagenet") or Path(self.weights).expanduser().is_file():
            return
        raise SourceError(
            f"source.weights={self.weights!r}: no such file. Expected 'imagenet', null (random "
            f"initialization) or the path of a weights file saved from "
            f"keras.applications.{self.name}(include_top=False); fix the path."
        )

    def _build(self, app: Any) -> Any:
        weights = self.weights
        if weights not in (None, "imagenet"):
            weights = str(Path(weights).expanduser())
        arguments = dict(
            include_top=False,
            weights=weights,
            input_shape=self.input_shape,
            pooling=None,  # source.pooling applies to the output of the cut
        )
        what = f"source.weights={self.weights!r} (for source.name={self.name!r})"
        try:
            with _downloads_fail_fast(what, self.fetch_timeout):
                return app(**arguments)
        except SourceError:
            raise
        except Exception as error:
            raise SourceError(
                f"source.name={self.name!r} could not be built with source.weights="
                f"{self.weights!r} and source.input_shape={list(self.input_shape)} "
                f"({type(error).__name__}: {error}). Use an input shape the application "
                "accepts, and a weights file saved from this application without its top."
            ) from error


def application(name: str, key: str) -> Any:
    """The `keras.applications` constructor called `name`; `key` is the config key, for errors."""
    import keras

    apps = {
        n: getattr(keras.applications, n)
        for n in dir(keras.applications)
        if n[:1].isupper() and callable(getattr(keras.applications, n))
    }
    if name in apps:
        return apps[name]
    by_lowercase = {n.lower(): n for n in apps}
    close = difflib.get_close_matches(name, apps, n=5, cutoff=0.6)
    if name.lower() in by_lowercase:
        close.insert(0, by_lowercase[name.lower()])
    close = list(dict.fromkeys(close))
    hint = f"did you mean {', '.join(close)}?" if close else f"available: {', '.join(sorted(apps))}."
    raise SourceError(
        f"{key}={name!r} is not a keras.applications model; {hint} "
        "Names are case-sensitive, as in keras.applications."
    )


def preprocess_mode(app: Any, what: str) -> str:
    """Which mode of `PreprocessLayer` the application's `preprocess_input` computes.

    Found by calling it on a probe image and comparing with each mode, so a new
    application needs no table entry.

    Raises:
        SourceError: when it matches none of the modes.
    """
    import numpy as np
    from keras import ops

    from pipeline.sources.preprocess import PREPROCESS_MODES, PreprocessLayer

    preprocess_input = getattr(sys.modules.get(app.__module__), "preprocess_input", None)
    if preprocess_input is None:
        raise SourceError(
            f"{what}: its module {app.__module__} has no preprocess_input. Set "
            f"source.preprocess to one of {', '.join(PREPROCESS_MODES)}."
        )
    probe = np.random.default_rng(0).uniform(0, 255, size=(1, 3, 3, 3)).astype("float32")
    # preprocess_input scales float numpy arrays in place: give it a copy.
    actual = ops.convert_to_numpy(preprocess_input(probe.copy()))
    for mode in PREPROCESS_MODES:
        expected = ops.convert_to_numpy(PreprocessLayer(mode)(probe))
        if actual.shape == expected.shape and np.allclose(actual, expected, rtol=1e-5, atol=1e-3):
            return mode
    raise SourceError(
        f"{what}: its preprocess_input ({app.__module__}) matches none of the modes this "
        f"pipeline implements ({', '.join(PREPROCESS_MODES)}). Set source.preprocess to the "
        "mode that is equivalent, or use source=keras_file with a model that has its "
        "preprocessing built in."
    )


@contextlib.contextmanager
def _downloads_fail_fast(what: str, timeout: float):
    """Check that the server answers before Keras downloads a file that is not in its cache.

    `keras.applications` fetch weights with Keras' `get_file`, which has no timeout and
    hangs offline. Wrapping it (for the duration of one build) learns each file's name and
    URL from Keras itself, so no table of weights files is kept here.
    """
    from pipeline import compat

    original = compat.keras_get_file()

    def get_file(fname=None, origin=None, *args, cache_subdir="datasets", cache_dir=None, **kwargs):
        cache_dir = cache_dir or os.environ.get("KERAS_HOME") or os.path.join("~", ".keras")
        name = fname or os.path.basename(urlparse(origin).path)
        if not (_cache_root(cache_dir) / cache_subdir / name).exists():
            check_reachable(what, origin, timeout, _OFFLINE_HELP)
        try:
            return original(fname, origin, *args, cache_subdir=cache_subdir, cache_dir=cache_dir, **kwargs)
        except Exception as error:
            raise SourceError(
                f"{what} could not be fetched from {origin} ({type(error).__name__}: {error}). "
                + _OFFLINE_HELP
            ) from error

    with compat.replace_keras_get_file(get_file):
        yield


def _cache_root(cache_dir: str) -> Path:
    # Where Keras' get_file puts files: the cache directory, or /tmp/.keras if not writable.
    root = os.path.expanduser(cache_dir)
    if not os.access(root, os.W_OK):
        root = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    return Path(root)

