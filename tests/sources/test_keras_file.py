"""Keras model files: .keras, legacy .h5, weights onto an architecture, cutting, safe mode."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError, SourceError
from pipeline.sources.keras_file import KerasFileSource


@pytest.fixture
def images():
    return np.random.default_rng(0).uniform(0, 255, size=(8, 16, 16, 3)).astype("float32")


def _classifier(lambda_layer: bool = False):
    """A tiny trained-looking classifier: conv, BatchNorm, pooling, softmax."""
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((16, 16, 3), name="pixels")
    x = layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    if lambda_layer:
        x = layers.Lambda(lambda t: t * 2.0 - 1.0, name="to_signed")(x)
    x = layers.Conv2D(8, 3, name="conv")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(5, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="classifier_model")


def _cut(model, layer: str):
    import keras

    return keras.Model(model.inputs[0], model.get_layer(layer).output)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_full_model_files_load_whole_or_cut_at_a_layer(tmp_path, images, suffix):
    model = _classifier()
    path = tmp_path / f"model{suffix}"
    model.save(path)

    whole = KerasFileSource(path=str(path)).load()
    assert whole.input_shape == (16, 16, 3)  # read from the model
    assert whole.feature_shape == (5,)
    np.testing.assert_allclose(whole.backbone(images).numpy(), model(images).numpy(), atol=1e-6)

    cut = KerasFileSource(path=str(path), layer="pool").load()
    assert cut.feature_shape == (8,)
    expected = _cut(model, "pool")(images).numpy()
    np.testing.assert_allclose(cut.backbone(images).numpy(), expected, rtol=1e-5, atol=1e-6)


def _legacy_weights_h5(model, path):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as file:  # what Keras 2's model.save_weights('x.h5') wrote
        legacy_h5_format.save_weights_to_hdf5_group(file, model)


@pytest.mark.parametrize("file_name", ["mobilenet.weights.h5", "mobilenet_keras2.h5"])
def test_weights_only_file_loads_onto_the_architecture(tmp_path, file_name):
    import keras

    keras.utils.set_random_seed(1)
    saved = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / file_name
    if file_name.endswith(".weights.h5"):
        saved.save_weights(path)
    else:
        _legacy_weights_h5(saved, path)
    images = np.random.default_rng(0).uniform(0, 255, size=(4, 32, 32, 3)).astype("float32")

    keras.utils.set_random_seed(2)  # a different random init, overwritten by the file
    source = KerasFileSource(
        path=str(path), architecture="MobileNetV2", input_shape=[32, 32, 3], preprocess="tf", layer="out_relu"
    ).load()
    expected = saved(images / 127.5 - 1.0).numpy()
    np.testing.assert_allclose(source.backbone(images).numpy(), expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(SourceError, match=r"weights only.*source\.architecture"):
        KerasFileSource(path=str(path), input_shape=[32, 32, 3]).load()


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_layers_need_allow_unsafe(tmp_path, images, suffix):
    model = _classifier(lambda_layer=True)
    path = tmp_path / f"lambda{suffix}"
    model.save(path)
    with pytest.raises(SourceError, match=r"Lambda.*source\.allow_unsafe=true only for files you trust"):
        KerasFileSource(path=str(path)).load()
    source = KerasFileSource(path=str(path), allow_unsafe=True).load()
    np.testing.assert_allclose(source.backbone(images).numpy(), model(images).numpy(), atol=1e-6)


def _fit_a_head(source_model, images):
    import keras

    source_model.backbone.trainable = True  # what freeze=none does
    inputs = keras.Input(source_model.input_shape)
    outputs = keras.layers.Dense(3, activation="softmax")(source_model.backbone(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    model.fit(images, np.arange(len(images)) % 3, epochs=2, batch_size=4, verbose=0)
    return model


def _weights(source_model) -> dict[str, np.ndarray]:
    return {v.path: v.numpy().copy() for v in source_model.backbone.get_layer("keras_file").weights}


def test_trainable_fit_changes_weights_and_frozen_stays_bit_identical(tmp_path, images):
    _classifier().save(tmp_path / "model.keras")

    trainable = KerasFileSource(path=str(tmp_path / "model.keras"), layer="pool").load()
    before = _weights(trainable)
    _fit_a_head(trainable, images)
    changed = {p for p, value in _weights(trainable).items() if not np.array_equal(value, before[p])}
    assert {p for p in before if "conv" in p or "bn" in p} <= changed  # BN statistics included

    frozen = KerasFileSource(path=str(tmp_path / "model.keras"), layer="pool", trainable=False).load()
    before = _weights(frozen)
    model = _fit_a_head(frozen, images)
    for path, value in _weights(frozen).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    assert len(model.trainable_weights) == 2  # the head's kernel and bias only


def test_a_frozen_backbone_survives_a_keras_round_trip(tmp_path, images):
    import keras

    _classifier().save(tmp_path / "model.keras")
    source = KerasFileSource(path=str(tmp_path / "model.keras"), layer="pool", trainable=False).load()
    source.backbone.save(tmp_path / "backbone.keras")
    reloaded = keras.saving.load_model(tmp_path / "backbone.keras")
    np.testing.assert_allclose(reloaded(images).numpy(), source.backbone(images).numpy(), atol=1e-6)
    reloaded.trainable = True
    assert reloaded.trainable_weights == []  # still pinned


def test_missing_file_names_source_path(tmp_path):
    path = str(tmp_path / "absent.keras")
    with pytest.raises(SourceError, match=rf"source\.path='{path}': no such file"):
        KerasFileSource(path=path).load()


def test_unreadable_file_names_source_path(tmp_path):
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    with pytest.raises(SourceError, match=r"source\.path=.*broken\.h5.*not a readable HDF5"):
        KerasFileSource(path=str(tmp_path / "broken.h5")).load()


def test_unknown_layer_is_a_one_line_config_error_naming_the_closest(tmp_path):
    path = tmp_path / "model.keras"
    _classifier().save(path)
    with pytest.raises(ConfigError) as caught:
        KerasFileSource(path=str(path), layer="poool").load()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"source.layer='poool' is not a layer of {path} (closest: pool")
    assert message.endswith(f"python -m pipeline.inspect source=keras_file source.path={path} source.layer=null")


@pytest.mark.parametrize(
    "pooling,pooled",
    [
        ("avg", lambda maps: maps.mean(axis=(1, 2))),
        ("max", lambda maps: maps.max(axis=(1, 2))),
        ("flatten", lambda maps: maps.reshape(len(maps), -1)),
        (None, lambda maps: maps),
    ],
)
def test_pooling_applies_to_the_feature_map_a_cut_gives(tmp_path, images, pooling, pooled):
    model = _classifier()
    model.save(tmp_path / "model.keras")
    source = KerasFileSource(path=str(tmp_path / "model.keras"), layer="relu", pooling=pooling).load()
    expected = pooled(_cut(model, "relu")(images).numpy())
    assert source.feature_shape == expected.shape[1:]
    np.testing.assert_allclose(source.backbone(images).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pooling_leaves_a_vector_output_as_it_is(tmp_path, images):
    model = _classifier()
    model.save(tmp_path / "model.keras")
    for pooling in ["avg", "max", "flatten"]:
        source = KerasFileSource(path=str(tmp_path / "model.keras"), pooling=pooling).load()
        assert source.feature_shape == (5,)
        np.testing.assert_allclose(source.backbone(images).numpy(), model(images).numpy(), atol=1e-6)


def test_input_shape_must_fit_the_models(tmp_path):
    _classifier().save(tmp_path / "model.keras")
    with pytest.raises(SourceError, match=r"source\.input_shape=\[32, 32, 3\] does not fit"):
        KerasFileSource(path=str(tmp_path / "model.keras"), input_shape=[32, 32, 3]).load()
