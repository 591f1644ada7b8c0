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


def reading_keras_file(tmp_path, images):
    """`(path, predictions)`: a `.keras` file whose stored SavedModel reads a file in its call.

    Made as a user would: a SavedModel source (trusted, named on the command line), a head,
    `model.save`; then the source directory is gone, so only the copy in the file is left.
    """
    from test_graph_check import save_module

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the model")
    source_dir = save_module(tmp_path / "reads", str(secret), "read")
    model = _classifier(HubSource(handle=str(source_dir), input_shape=[8, 8, 1]).load())
    predictions = model.predict(images, verbose=0)
    path = tmp_path / "reads.keras"
    model.save(path)
    shutil.rmtree(source_dir)
    return path, predictions


# Keras goes on restoring the other layers after the refusal, and says so; the load still fails.
@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_a_stored_saved_model_that_reads_files_is_refused_at_load_unless_trusted(tmp_path, tiny_images):
    import keras

    from pipeline.errors import SourceError
    from pipeline.sources.graph_check import trusted_graphs
    from pipeline.sources.keras_file import KerasFileSource

    path, predictions = reading_keras_file(tmp_path, tiny_images)
    with pytest.raises(ValueError, match=r"layer 'hub'.*runs TensorFlow ops .*\(ReadFile\)"):
        keras.saving.load_model(path)  # plain Keras: the layer itself refuses
    with pytest.raises(SourceError) as caught:
        KerasFileSource(path=str(path)).load()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"source.path={str(path)!r}: the SavedModel stored for layer 'hub'")
    assert "(ReadFile)" in message and "source.allow_unsafe=true" in message

    source = KerasFileSource(path=str(path), allow_unsafe=True).load()
    reloaded = source.backbone.get_layer("keras_file")
    np.testing.assert_allclose(reloaded(tiny_images).numpy(), predictions, atol=1e-6)
    with trusted_graphs():
        trusted = keras.saving.load_model(path)
    np.testing.assert_allclose(trusted.predict(tiny_images, verbose=0), predictions, atol=1e-6)


def test_an_old_file_naming_a_saved_model_directory_is_checked_too(tmp_path):
    # Files from before the SavedModel was embedded rebuild the layer from `handle`, a
    # directory the file names: as much the file's code as an embedded SavedModel.
    from pipeline.errors import SourceError
    from pipeline.sources.graph_check import trusted_graphs
    from pipeline.sources.saved_model_layer import SavedModelLayer
    from test_graph_check import save_module

    directory = save_module(tmp_path / "reads", str(tmp_path / "secret.txt"), "read")
    config = {"name": "hub", "handle": str(directory), "signature": None, "output_key": None, "output_shape": None}
    with pytest.raises(SourceError, match=rf"the SavedModel {directory} that layer 'hub' names runs .*\(ReadFile\)"):
        SavedModelLayer.from_config(config)
    with trusted_graphs():
        assert SavedModelLayer.from_config(config).loaded is not None
