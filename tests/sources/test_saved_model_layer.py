"""A `.keras` file of a model over a SavedModel is self-contained and still fine-tunes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.sources.hub import HubSource
from pipeline.sources.saved_model import SavedModelSource


def _keras_export(directory):
    from test_saved_model import make_keras_model

    make_keras_model().export(str(directory), verbose=False)
    return directory


def _classifier(source_model):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input(source_model.input_shape)
    outputs = keras.layers.Dense(3, activation="softmax")(source_model.backbone(inputs))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("kind", ["hub", "signature"])
def test_keras_file_loads_after_the_source_is_gone_and_still_trains(kind, hub_model_dir, tmp_path, tiny_images):
    import keras

    source_dir = tmp_path / "source"
    if kind == "hub":  # called through __call__, with a training argument
        shutil.copytree(hub_model_dir, source_dir)
        source = HubSource(handle=str(source_dir), input_shape=[8, 8, 1]).load()
        layer_name = "hub"
    else:  # called through a signature of a Keras 3 export
        _keras_export(source_dir)
        source = SavedModelSource(path=str(source_dir), input_shape=[8, 8, 1], preprocess="unit").load()
        layer_name = "saved_model"
    model = _classifier(source)
    for variable in source.backbone.get_layer(layer_name).loaded.variables:  # "fine-tuned" values
        variable.assign(variable * 1.25 + 0.01)
    expected = model.predict(tiny_images, verbose=0)
    model.save(tmp_path / "first.keras")
    shutil.rmtree(source_dir)

    reloaded = keras.saving.load_model(tmp_path / "first.keras")
    np.testing.assert_allclose(reloaded.predict(tiny_images, verbose=0), expected, atol=1e-6)
    layer = reloaded.get_layer("backbone").get_layer(layer_name)
    assert {id(v.value) for v in layer.variables} == {id(v) for v in layer.loaded.variables}

    # Written again by the reloaded model, whose source folder never existed on this side.
    reloaded.save(tmp_path / "second.keras")
    again = keras.saving.load_model(tmp_path / "second.keras")
    np.testing.assert_allclose(again.predict(tiny_images, verbose=0), expected, atol=1e-6)

    # The reloaded layer still trains the variables its SavedModel functions read.
    again.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    features = again.get_layer("backbone")
    before = features(tiny_images).numpy()
    again.fit(tiny_images, np.arange(len(tiny_images)) % 3, epochs=1, batch_size=8, verbose=0)
    assert np.abs(features(tiny_images).numpy() - before).max() > 1e-4


def test_a_layer_rebuilt_from_config_alone_says_how_to_load_it(hub_model_dir):
    from pipeline.sources.saved_model_layer import SavedModelLayer

    source = HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1]).load()
    config = source.backbone.get_layer("hub").get_config()
    assert config["output_shape"] == [6]
    rebuilt = SavedModelLayer.from_config(config)
    with pytest.raises(ValueError, match="keras.saving.load_model"):
        rebuilt(np.zeros((1, 8, 8, 1), "float32"))
