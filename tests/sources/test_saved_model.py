"""`source=saved_model`: Keras 3 exports and multi-signature tf.Modules, fine-tuned through a signature."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import PROJECT_ROOT
from pipeline.errors import SourceError
from pipeline.sources.saved_model import SavedModelSource


def make_keras_model(seed: int = 0):
    """A tiny Keras 3 CNN on 8x8x1 images with BatchNorm (77 parameters, 8 of them statistics)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, name="project")(x)
    return keras.Model(inputs, outputs, name="tiny_keras")


@pytest.fixture(scope="module")
def keras_export(tmp_path_factory):
    """`(directory, model)`: a Keras 3 model and what `model.export(directory)` wrote."""
    model = make_keras_model()
    directory = tmp_path_factory.mktemp("keras_export") / "exported"
    model.export(str(directory), verbose=False)
    return directory, model


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    """A tf.Module with several signatures, dict outputs and a non-trainable variable."""
    import tensorflow as tf

    module = tf.Module()
    module.scale = tf.Variable(2.0, name="scale")
    module.offset = tf.Variable(0.5, trainable=False, name="offset")
    module.weights = tf.Variable([[1.0, -1.0, 0.5]], name="weights")
    images = tf.TensorSpec([None, 8, 8, 1], tf.float32, name="images")

    @tf.function(input_signature=[images])
    def features(images):
        pooled = tf.reduce_mean(images, axis=[1, 2]) * module.scale + module.offset
        return {"pooled": pooled, "doubled": pooled * 2}

    @tf.function(input_signature=[images])
    def logits(images):
        pooled = tf.reduce_mean(images, axis=[1, 2]) * module.scale + module.offset
        return {"logits": tf.matmul(pooled, module.weights)}

    @tf.function(input_signature=[images, tf.TensorSpec([None], tf.int32, name="ids")])
    def pair(images, ids):
        return {"pooled": tf.reduce_mean(images, axis=[1, 2, 3]) + tf.cast(ids, tf.float32)}

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.uint8, name="pixels")])
    def encoded(pixels):
        return {"pooled": tf.reduce_mean(tf.cast(pixels, tf.float32), axis=[1, 2])}

    module.functions = [features, logits, pair, encoded]
    directory = tmp_path_factory.mktemp("module") / "multi"
    signatures = {"features": features, "logits": logits, "pair": pair, "encoded": encoded}
    tf.saved_model.save(module, str(directory), signatures=signatures)
    return directory


def _source(path, **overrides) -> SavedModelSource:
    return SavedModelSource(**{"path": str(path), "input_shape": [8, 8, 1], **overrides})


def _fit_a_head(source_model, images, trainable_backbone: bool):
    import keras

    source_model.backbone.trainable = trainable_backbone
    inputs = keras.Input(source_model.input_shape)
    outputs = keras.layers.Dense(3, activation="softmax")(source_model.backbone(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    model.fit(images, np.arange(len(images)) % 3, epochs=2, batch_size=8, verbose=0)
    return model


def _restored(source_model):
    layer = source_model.backbone.get_layer("saved_model")
    return layer, {v.name: v.numpy().copy() for v in layer.loaded.variables}


def test_keras_export_gives_the_keras_models_features_with_preprocessing_inside(keras_export, tiny_images):
    directory, model = keras_export
    source = _source(directory, preprocess="unit").load()
    expected = model(tiny_images / 255.0, training=False).numpy()
    np.testing.assert_allclose(source.backbone(tiny_images, training=False).numpy(), expected, atol=1e-5)
    assert source.backbone.name == "backbone"
    assert source.feature_shape == (5,) and source.input_shape == (8, 8, 1)
    assert source.preprocess == "unit" and str(directory) in source.description


def test_fine_tuning_through_the_signature_changes_the_forward_pass(keras_export, tiny_images):
    source = _source(keras_export[0], preprocess="unit").load()
    layer, restored = _restored(source)
    features_before = source.backbone(tiny_images).numpy()

    _fit_a_head(source, tiny_images, trainable_backbone=True)

    changed = {v.name for v in layer.loaded.variables if not np.array_equal(restored[v.name], v.numpy())}
    # Kernels and BN scale/offset train; the signature runs in inference mode, so the BN
    # moving statistics stay as exported.
    assert changed == {name for name in restored if "moving" not in name}
    assert np.abs(source.backbone(tiny_images).numpy() - features_before).max() > 1e-3
    assert {id(v.value) for v in layer.variables} == {id(v) for v in layer.loaded.variables}


def test_trainable_false_keeps_every_variable_bit_identical(keras_export, tiny_images):
    source = _source(keras_export[0], preprocess="unit", trainable=False).load()
    layer, restored = _restored(source)
    features_before = source.backbone(tiny_images).numpy()

    model = _fit_a_head(source, tiny_images, trainable_backbone=True)  # a freeze setting cannot unpin it

    for variable in layer.loaded.variables:
        np.testing.assert_array_equal(variable.numpy(), restored[variable.name], err_msg=variable.name)
    np.testing.assert_array_equal(source.backbone(tiny_images).numpy(), features_before)
    assert source.backbone.trainable_weights == []
    assert all("saved_model" not in v.path for v in model.trainable_weights)


def test_module_signature_with_one_output_needs_no_output_key(module_dir, tiny_images):
    import tensorflow as tf

    source = _source(module_dir, signature="logits").load()
    pooled = tiny_images.mean(axis=(1, 2)) * 2.0 + 0.5
    np.testing.assert_allclose(source.backbone(tiny_images).numpy(), pooled @ [[1.0, -1.0, 0.5]], rtol=1e-5)
    # Only the variables this signature reads are tracked, with their trainable flags.
    assert sorted(v.name for v in source.backbone.trainable_weights) == ["scale", "weights"]
    assert [v.name for v in source.backbone.non_trainable_weights] == ["offset"]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(source.backbone(tiny_images, training=True))
    gradients = tape.gradient(loss, source.backbone.trainable_variables)
    assert all(g is not None and np.abs(g.numpy()).max() > 0 for g in gradients)


def test_output_key_picks_one_of_several_outputs(module_dir, tiny_images):
    source = _source(module_dir, signature="features", output_key="doubled").load()
    expected = (tiny_images.mean(axis=(1, 2)) * 2.0 + 0.5) * 2
    np.testing.assert_allclose(source.backbone(tiny_images).numpy(), expected, rtol=1e-5)
    assert "output=doubled" in source.description


def test_wrong_signature_lists_every_signature_with_its_specs(module_dir):
    with pytest.raises(SourceError) as caught:
        _source(module_dir, signature="serving_default").load()
    message = str(caught.value)
    assert "source.signature='serving_default'" in message and str(module_dir) in message
    for name in ("features", "logits", "pair", "encoded"):
        assert f"\n  {name}\n" in message
    for spec in (
        "images: shape=(None, 8, 8, 1) dtype=float32",
        "ids: shape=(None,) dtype=int32",
        "pixels: shape=(None, 8, 8, 1) dtype=uint8",
        "doubled: shape=(None, 1) dtype=float32",
        "logits: shape=(None, 3) dtype=float32",
    ):
        assert spec in message


def test_several_outputs_without_output_key_lists_the_outputs(module_dir):
    with pytest.raises(SourceError) as caught:
        _source(module_dir, signature="features").load()
    message = str(caught.value)
    assert "source.output_key=null" in message and "2 outputs" in message
    assert "doubled: shape=(None, 1) dtype=float32" in message
    assert "pooled: shape=(None, 1) dtype=float32" in message


def test_wrong_output_key_is_quoted_and_the_outputs_listed(module_dir):
    with pytest.raises(SourceError) as caught:
        _source(module_dir, signature="features", output_key="pool").load()
    message = str(caught.value)
    assert "source.output_key='pool'" in message
    assert "doubled: shape=(None, 1) dtype=float32" in message and "pooled: shape=" in message


@pytest.mark.parametrize(
    "signature,expected",
    [("pair", r"takes 2 inputs \(ids: .*; images: .*\)"), ("encoded", r"pixels: .*dtype=uint8.*float32")],
)
def test_signature_that_does_not_take_one_float_image_is_refused(module_dir, signature, expected):
    with pytest.raises(SourceError, match=rf"source\.signature='{signature}'.*{expected}"):
        _source(module_dir, signature=signature).load()


def test_input_shape_that_does_not_fit_the_signature_names_the_fix(keras_export):
    with pytest.raises(SourceError) as caught:
        _source(keras_export[0], input_shape=[224, 224, 3]).load()
    message = str(caught.value)
    assert "source.input_shape=[224, 224, 3]" in message
    assert re.search(r"keras_tensor\w*: shape=\(None, 8, 8, 1\) dtype=float32", message)  # the input's name
    assert "Set source.input_shape=[8, 8, 1]" in message


def test_missing_path_names_the_key(tmp_path):
    with pytest.raises(SourceError, match=r"source\.path='.*absent' is not a directory"):
        _source(tmp_path / "absent").load()
    with pytest.raises(SourceError, match=r"source\.path=.*source=keras_file"):
        _source(tmp_path / "model.keras").load()


def test_directory_without_saved_model_pb(tmp_path):
    with pytest.raises(SourceError, match=r"source\.path=.*without saved_model\.pb"):
        _source(tmp_path).load()


def test_unloadable_directory_names_the_key(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(SourceError, match=r"source\.path=.*not a loadable TF2 SavedModel"):
        _source(tmp_path).load()


def test_hub_source_lists_signatures_with_specs_too(module_dir):
    from pipeline.sources.hub import HubSource

    with pytest.raises(SourceError) as caught:
        HubSource(handle=str(module_dir), input_shape=[8, 8, 1]).load()  # no __call__
    message = str(caught.value)
    assert "source.signature=null" in message and "has no __call__" in message
    assert "logits: shape=(None, 3) dtype=float32" in message


def test_building_the_source_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "from pipeline.sources.saved_model import SavedModelSource\n"
        "SavedModelSource(path='/models/x', input_shape=[8, 8, 1])\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["False", "False"], done.stderr
