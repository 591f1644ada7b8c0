"""The hub source trains for real in Keras 3: the forward pass reads the weights Keras updates."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.errors import SourceError
from pipeline.sources.hub import HubSource


def _fit_a_head(source_model, images, trainable_backbone: bool, epochs: int = 2):
    import keras

    backbone = source_model.backbone
    backbone.trainable = trainable_backbone
    inputs = keras.Input(source_model.input_shape)
    outputs = keras.layers.Dense(3, activation="softmax")(backbone(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    labels = np.arange(len(images)) % 3
    model.fit(images, labels, epochs=epochs, batch_size=8, verbose=0)
    return model


def _hub_layer(source_model):
    return source_model.backbone.get_layer("hub")


def test_trainable_fit_changes_the_variables_the_forward_pass_reads(hub_model_dir, tiny_images):
    source = HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1]).load()
    layer = _hub_layer(source)
    restored = {v.name: v.numpy().copy() for v in layer.loaded.variables}
    features_before = source.backbone(tiny_images, training=False).numpy()

    _fit_a_head(source, tiny_images, trainable_backbone=True)

    changed = {v.name for v in layer.loaded.variables if not np.array_equal(restored[v.name], v.numpy())}
    # Every restored variable moved: kernels and BN scale/offset by the optimizer, the BN
    # moving statistics by training-mode calls.
    assert changed == set(restored)
    features_after = source.backbone(tiny_images, training=False).numpy()
    assert np.abs(features_after - features_before).max() > 1e-3
    # The Keras variables *are* the restored ones (no copies, unlike TFSMLayer).
    assert {id(v.value) for v in layer.variables} == {id(v) for v in layer.loaded.variables}


def test_frozen_hub_model_stays_bit_identical_including_batchnorm(hub_model_dir, tiny_images):
    source = HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1], trainable=False).load()
    layer = _hub_layer(source)
    restored = {v.name: v.numpy().copy() for v in layer.loaded.variables}
    assert any("moving_mean" in name for name in restored)

    source.backbone.trainable = False  # a freeze schedule toggling the backbone
    model = _fit_a_head(source, tiny_images, trainable_backbone=True)

    for variable in layer.loaded.variables:
        np.testing.assert_array_equal(variable.numpy(), restored[variable.name], err_msg=variable.name)
    assert all("hub" not in v.path for v in model.trainable_weights)


def test_backbone_trainable_false_also_freezes_batchnorm_statistics(hub_model_dir, tiny_images):
    source = HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1]).load()
    layer = _hub_layer(source)
    restored = {v.name: v.numpy().copy() for v in layer.loaded.variables}
    _fit_a_head(source, tiny_images, trainable_backbone=False)
    for variable in layer.loaded.variables:
        np.testing.assert_array_equal(variable.numpy(), restored[variable.name], err_msg=variable.name)


def test_training_flag_reaches_the_wrapped_model(tmp_path, tiny_images):
    import tensorflow as tf

    from conftest import make_tf_keras_extractor

    tf.saved_model.save(make_tf_keras_extractor(dropout=0.5), str(tmp_path / "dropout"))
    source = HubSource(handle=str(tmp_path / "dropout"), input_shape=[8, 8, 1]).load()
    inference = [source.backbone(tiny_images, training=False).numpy() for _ in range(2)]
    training = source.backbone(tiny_images, training=True).numpy()
    np.testing.assert_array_equal(inference[0], inference[1])
    assert np.abs(training - inference[0]).max() > 1e-4


def test_preprocess_unit_is_inside_the_backbone(hub_model_dir, tiny_images):
    import tensorflow as tf

    source = HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1], preprocess="unit").load()
    direct = tf.saved_model.load(str(hub_model_dir))(tiny_images / 255.0, training=False).numpy()
    np.testing.assert_allclose(source.backbone(tiny_images, training=False).numpy(), direct, atol=1e-5)
    assert source.feature_shape == (6,)


def test_signature_and_output_key(tmp_path, tiny_images):
    import tensorflow as tf

    module = tf.Module()
    module.scale = tf.Variable(2.0)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32)])
    def features(images):
        pooled = tf.reduce_mean(images, axis=[1, 2]) * module.scale
        return {"pooled": pooled, "doubled": pooled * 2}

    module.features = features
    tf.saved_model.save(module, str(tmp_path / "sig"), signatures={"feature_vector": features})

    with pytest.raises(SourceError, match="feature_vector"):
        HubSource(handle=str(tmp_path / "sig"), input_shape=[8, 8, 1], signature="nope").load()
    source = HubSource(
        handle=str(tmp_path / "sig"),
        input_shape=[8, 8, 1],
        preprocess="none",
        signature="feature_vector",
        output_key="doubled",
    ).load()
    expected = tiny_images.mean(axis=(1, 2)) * 4
    np.testing.assert_allclose(source.backbone(tiny_images).numpy(), expected, rtol=1e-5)
    assert len(source.backbone.trainable_weights) == 1


def test_missing_directory_fails_with_the_fix(tmp_path):
    with pytest.raises(SourceError, match=r"source\.handle=.*not a directory"):
        HubSource(handle=str(tmp_path / "absent"), input_shape=[8, 8, 1]).load()


def test_directory_without_saved_model(tmp_path):
    with pytest.raises(SourceError, match="saved_model.pb"):
        HubSource(handle=str(tmp_path), input_shape=[8, 8, 1]).load()


def test_an_unresolvable_hub_fails_with_offline_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    handle = "https://hub.invalid/google/imagenet/mobilenet_v2_100_224/feature_vector/5"
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        HubSource(handle=handle, input_shape=[224, 224, 3], fetch_timeout=3).load()
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert handle in message and "TFHUB_CACHE_DIR" in message and "local" in message


def test_a_hub_that_accepts_but_never_answers_fails_after_fetch_timeout(monkeypatch, tmp_path, silent_server):
    port, accepted = silent_server
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    handle = f"https://127.0.0.1:{port}/google/some/model/1"
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        HubSource(handle=handle, input_shape=[8, 8, 1], fetch_timeout=2).load()
    waited = time.monotonic() - started
    assert len(accepted) == 1  # it reached the server (its port, not 443) and waited there
    assert 1.8 <= waited < 5, waited  # the timeout itself, not a refusal nor a hang
    message = str(caught.value)
    assert handle in message and f"127.0.0.1:{port} is unreachable after 2" in message
    assert "TFHUB_CACHE_DIR" in message


def test_tfhub_cache_dir_is_used_without_network(monkeypatch, tmp_path, hub_model_dir):
    import hashlib
    import shutil

    handle = "https://hub.invalid/some/model/1"
    cached = tmp_path / hashlib.sha1(handle.encode("utf8")).hexdigest()
    shutil.copytree(hub_model_dir, cached)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    source = HubSource(handle=handle, input_shape=[8, 8, 1], fetch_timeout=1).load()
    assert source.feature_shape == (6,)
