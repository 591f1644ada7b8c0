"""An export made from every kind of source serves raw 0-255 images, preprocessing included.

Each source format is built here (no network), adapted with a new head, trained for an
epoch, exported as a SavedModel and reloaded the way a server would; the served
probabilities for raw images must be the in-memory model's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.adapt import adapt
from pipeline.export import Exporter
from pipeline.freeze import FreezeNone
from pipeline.heads import LinearHead
from pipeline.types import DataBundle

CLASSES = ("ant", "bee", "cow")
SOURCES = ("hub", "keras_app", "keras_app_cut", "keras_file", "saved_model", "run")


def _images(shape, n: int, seed: int) -> np.ndarray:
    # Brightness varies from image to image, so that the predictions do too.
    rng = np.random.default_rng(seed)
    brightness = rng.uniform(0, 255, size=(n, 1, 1, 1))
    return (brightness * rng.uniform(0, 1, size=(n, *shape))).astype("float32")


def _tiny_cnn(shape, name: str):
    """A small Keras 3 CNN with BatchNorm that takes 0-1 pixels."""
    import keras

    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(6, name="project")(x), name=name)


def _data(shape) -> DataBundle:
    import tensorflow as tf

    images = _images(shape, 24, seed=0)
    labels = np.arange(len(images)) % len(CLASSES)
    split = lambda a, b: tf.data.Dataset.from_tensor_slices((images[a:b], labels[a:b]))  # noqa: E731
    return DataBundle(
        train=split(0, 16), val=split(16, 20), test=split(20, 24), class_names=CLASSES, input_shape=tuple(shape)
    )


def _trained(source, data: DataBundle):
    """The adapted model after one short epoch on raw images (everything trains)."""
    import keras

    adapted = adapt(source, LinearHead(), FreezeNone(), CLASSES, data.input_shape, "multiclass")
    adapted.model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    adapted.model.fit(data.train.batch(8), epochs=1, shuffle=False, verbose=0)
    return adapted


@pytest.fixture(scope="module")
def sources(hub_model_dir, tmp_path_factory):
    """Source name -> a function that loads it, each from a model made here."""
    import keras

    from pipeline.sources.hub import HubSource
    from pipeline.sources.keras_app import KerasAppSource
    from pipeline.sources.keras_file import KerasFileSource
    from pipeline.sources.run import RunSource
    from pipeline.sources.saved_model import SavedModelSource

    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("sources")
    _tiny_cnn((8, 8, 3), "keras_file_cnn").save(root / "model.keras")
    _tiny_cnn((8, 8, 3), "exported_cnn").export(str(root / "exported"), verbose=False)

    # An earlier run of a hub source: what AtomicCheckpoint leaves in <run_dir>/checkpoints.
    hub_shape = (8, 8, 1)
    earlier = _trained(HubSource(handle=str(hub_model_dir), input_shape=list(hub_shape)).load(), _data(hub_shape))
    (root / "run" / "checkpoints").mkdir(parents=True)
    earlier.model.save(root / "run" / "checkpoints" / "last.keras")
    (root / "run" / "checkpoints" / "state.json").write_text(json.dumps({"epochs_completed": 1, "iterations": 2}))

    return {
        "hub": lambda: HubSource(handle=str(hub_model_dir), input_shape=list(hub_shape)).load(),
        # VGG16: few layers, so fast to trace, and caffe preprocessing (BGR, mean) that shows
        # if lost; random BatchNorm nets such as MobileNetV2 predict the same for every image.
        "keras_app": lambda: KerasAppSource(name="VGG16", weights=None, input_shape=[32, 32, 3]).load(),
        # Cut early (the layers after block2_pool are gone from what trains and is exported);
        # 0-1 pixels keep its large early activations from saturating the new head.
        "keras_app_cut": lambda: KerasAppSource(
            name="VGG16", weights=None, input_shape=[32, 32, 3], layer="block2_pool", pooling="avg", preprocess="unit"
        ).load(),
        "keras_file": lambda: KerasFileSource(path=str(root / "model.keras"), preprocess="unit").load(),
        "saved_model": lambda: SavedModelSource(
            path=str(root / "exported"), input_shape=[8, 8, 3], preprocess="unit", output_key="output_0"
        ).load(),
        "run": lambda: RunSource(run=str(root / "run")).load(),
    }


@pytest.mark.parametrize("name", SOURCES)
def test_the_exported_saved_model_serves_raw_images_like_the_trained_model(name, sources, tmp_path):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(SOURCES.index(name))
    source = sources[name]()
    assert source.preprocess != "none"  # so that serving without it would show
    data = _data(source.input_shape)
    adapted = _trained(source, data)
    result = Exporter(formats=["saved_model"]).export(adapted, data, tmp_path / "export")

    serving = tf.saved_model.load(str(result.paths["saved_model"])).signatures["serving_default"]
    raw = _images(source.input_shape, 8, seed=1)  # raw 0-255 pixels, not seen in training
    expected = adapted.model.predict(raw, verbose=0)
    served = serving(images=tf.constant(raw))["probabilities"].numpy()
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)
    assert np.ptp(expected, axis=0).max() > 1e-3  # the predictions depend on the image
