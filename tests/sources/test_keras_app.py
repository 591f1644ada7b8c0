"""keras.applications models: their own preprocessing inside the backbone, real fine-tuning, offline errors."""

from __future__ import annotations

import sys
import time
import types

import numpy as np
import pytest

from pipeline.errors import ConfigError, SourceError
from pipeline.sources.keras_app import KerasAppSource, preprocess_mode

SHAPE = [32, 32, 3]


@pytest.fixture
def images():
    return np.random.default_rng(0).uniform(0, 255, size=(8, *SHAPE)).astype("float32")


def _fit_a_head(source_model, images, epochs: int = 1):
    import keras

    source_model.backbone.trainable = True  # what freeze=none does
    inputs = keras.Input(source_model.input_shape)
    outputs = keras.layers.Dense(3, activation="softmax")(source_model.backbone(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    model.fit(images, np.arange(len(images)) % 3, epochs=epochs, batch_size=8, verbose=0)
    return model


def _weights(source_model) -> dict[str, np.ndarray]:
    return {v.path: v.numpy().copy() for v in source_model.backbone.get_layer("keras_app").weights}


@pytest.mark.parametrize(
    "name,mode",
    [("ResNet50", "caffe"), ("MobileNetV2", "tf"), ("DenseNet121", "torch"), ("EfficientNetB0", "none")],
)
def test_the_applications_own_preprocessing_is_found_and_applied_inside(name, mode, images):
    import keras

    source = KerasAppSource(name=name, weights=None, input_shape=SHAPE).load()
    assert source.preprocess == mode
    app = source.backbone.get_layer("keras_app")
    module = sys.modules[getattr(keras.applications, name).__module__]
    expected = app(module.preprocess_input(images.copy()), training=False)
    np.testing.assert_allclose(
        source.backbone(images, training=False).numpy(), expected.numpy(), rtol=1e-4, atol=1e-4
    )
    assert len(source.feature_shape) == 1  # pooling=avg


def test_preprocess_overrides_the_applications_own(images):
    source = KerasAppSource(name="MobileNetV2", weights=None, input_shape=SHAPE, preprocess="unit").load()
    assert source.preprocess == "unit"
    app = source.backbone.get_layer("keras_app")
    np.testing.assert_allclose(
        source.backbone(images).numpy(), app(images / 255.0).numpy(), rtol=1e-4, atol=1e-5
    )


def test_preprocessing_that_matches_no_mode_fails_clearly(monkeypatch):
    module = types.ModuleType("fake_application")
    module.preprocess_input = lambda x: x / 64.0 - 2.0
    monkeypatch.setitem(sys.modules, "fake_application", module)

    def FakeNet(**kwargs):
        raise AssertionError("never built")

    FakeNet.__module__ = "fake_application"
    with pytest.raises(SourceError, match=r"source\.name='FakeNet'.*matches none.*source\.preprocess"):
        preprocess_mode(FakeNet, "source.name='FakeNet'")


def test_pooling_null_keeps_the_feature_map():
    source = KerasAppSource(name="MobileNetV2", weights=None, input_shape=SHAPE, pooling=None).load()
    assert source.feature_shape == (1, 1, 1280)


# source.pooling, recomputed in numpy on the layer's output (batch, height, width, channels).
POOLED = {
    "avg": lambda maps: maps.mean(axis=(1, 2)),
    "max": lambda maps: maps.max(axis=(1, 2)),
    "flatten": lambda maps: maps.reshape(len(maps), -1),
    None: lambda maps: maps,
}


@pytest.fixture(scope="module")
def saved_apps(tmp_path_factory):
    """`name -> (weights file, application)`: random applications without their top, saved."""
    import keras

    saved = {}
    for seed, name in enumerate(["VGG16", "MobileNetV2"]):
        keras.utils.set_random_seed(seed)
        app = getattr(keras.applications, name)(include_top=False, weights=None, input_shape=SHAPE)
        path = tmp_path_factory.mktemp(name) / f"{name}.weights.h5"
        app.save_weights(path)
        saved[name] = (path, app)
    return saved


@pytest.mark.parametrize(
    "name,layer,pooling",
    [
        ("VGG16", "block4_pool", "avg"),
        ("VGG16", "block4_pool", "max"),
        ("VGG16", "block3_conv2", "flatten"),
        ("VGG16", "block4_pool", None),
        ("MobileNetV2", "block_5_add", "avg"),  # inside the residual blocks, BatchNorm included
    ],
)
def test_a_cut_gives_the_named_layers_output_pooled(saved_apps, images, name, layer, pooling):
    import keras

    from pipeline.sources.backbone import walk_layers

    path, app = saved_apps[name]
    source = KerasAppSource(name=name, weights=str(path), input_shape=SHAPE, layer=layer, pooling=pooling).load()
    oracle = keras.Model(app.input, app.get_layer(layer).output)
    module = sys.modules[getattr(keras.applications, name).__module__]
    expected = POOLED[pooling](oracle(module.preprocess_input(images.copy())).numpy())
    assert source.feature_shape == expected.shape[1:]
    features = source.backbone(images).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # The layers after the cut are gone from the backbone, not merely unused.
    assert len(source.backbone.weights) == len(oracle.weights)
    names = {each.name for each in walk_layers(source.backbone)}
    assert layer in names and not names & {each.name for each in app.layers[app.layers.index(app.get_layer(layer)) + 1:]}
    assert f"@{layer}" in source.description


def test_freeze_units_and_the_feature_cache_key_follow_the_cut(saved_apps):
    from pipeline.features import backbone_fingerprint
    from pipeline.freeze import TopN, backbone_units

    path, app = saved_apps["VGG16"]

    def load(layer="block4_pool", pooling="avg"):
        return KerasAppSource(name="VGG16", weights=str(path), input_shape=SHAPE, layer=layer, pooling=pooling).load()

    cut = load()
    units = [unit.name for unit in backbone_units(cut.backbone)]
    assert units == [f"block{b}_conv{c}" for b, convs in [(1, 2), (2, 2), (3, 3), (4, 3)] for c in range(1, convs + 1)]
    TopN(n=3).apply(cut.backbone)
    trainable = {v.path.split("/")[-2] for v in cut.backbone.trainable_weights}
    assert trainable == {"block4_conv1", "block4_conv2", "block4_conv3"}  # the top of the cut

    key = backbone_fingerprint(load().backbone)
    assert backbone_fingerprint(load().backbone) == key  # the same cut: the cache is hit
    for other in [load(pooling="max"), load(pooling=None), load(layer="block4_conv3"), load(layer=None)]:
        assert backbone_fingerprint(other.backbone) != key, other.description


def test_an_unknown_layer_is_a_one_line_config_error_with_suggestions():
    with pytest.raises(ConfigError) as caught:
        KerasAppSource(name="VGG16", weights=None, input_shape=SHAPE, layer="block4pool").load()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("source.layer='block4pool' is not a layer of keras.applications.VGG16")
    assert "closest: block4_pool, " in message
    assert message.endswith(
        "python -m pipeline.inspect source=keras_app source.name=VGG16 source.weights=null "
        "source.input_shape=[32,32,3] source.layer=null"
    )


def test_without_a_layer_pooling_applies_to_the_last_feature_map(saved_apps, images):
    import keras

    path, app = saved_apps["VGG16"]
    expected = app(keras.applications.vgg16.preprocess_input(images.copy())).numpy()
    for pooling in POOLED:
        source = KerasAppSource(name="VGG16", weights=str(path), input_shape=SHAPE, pooling=pooling).load()
        np.testing.assert_allclose(source.backbone(images).numpy(), POOLED[pooling](expected), rtol=1e-4, atol=1e-3)


def test_trainable_fit_changes_weights_and_frozen_stays_bit_identical(images):
    import keras

    keras.utils.set_random_seed(0)
    trainable = KerasAppSource(name="MobileNetV2", weights=None, input_shape=SHAPE).load()
    before = _weights(trainable)
    _fit_a_head(trainable, images)
    changed = {path for path, value in _weights(trainable).items() if not np.array_equal(value, before[path])}
    assert any("kernel" in path for path in changed)
    assert any("moving_mean" in path for path in changed)

    frozen = KerasAppSource(name="MobileNetV2", weights=None, input_shape=SHAPE, trainable=False).load()
    before = _weights(frozen)
    features = frozen.backbone(images).numpy()
    model = _fit_a_head(frozen, images)  # sets backbone.trainable = True first
    for path, value in _weights(frozen).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    np.testing.assert_array_equal(frozen.backbone(images).numpy(), features)
    assert len(model.trainable_weights) == 2  # the head's kernel and bias only


def test_a_local_weights_file_gives_the_saved_models_features(tmp_path, images):
    import keras

    keras.utils.set_random_seed(1)
    saved = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=SHAPE)
    saved.save_weights(tmp_path / "mobilenet.weights.h5")
    expected = saved(keras.applications.mobilenet_v2.preprocess_input(images.copy())).numpy()

    keras.utils.set_random_seed(2)  # a different random init, overwritten by the file
    source = KerasAppSource(
        name="MobileNetV2", weights=str(tmp_path / "mobilenet.weights.h5"), input_shape=SHAPE, pooling=None
    ).load()
    np.testing.assert_allclose(source.backbone(images).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_missing_weights_file_names_the_path(tmp_path):
    path = str(tmp_path / "absent.weights.h5")
    with pytest.raises(SourceError, match=rf"source\.weights='{path}': no such file"):
        KerasAppSource(name="MobileNetV2", weights=path, input_shape=SHAPE).load()


def test_unknown_name_lists_close_matches():
    with pytest.raises(SourceError, match=r"source\.name='MobilenetV2'.*did you mean MobileNetV2"):
        KerasAppSource(name="MobilenetV2", weights=None).load()
    with pytest.raises(SourceError, match=r"did you mean ResNet50\b"):
        KerasAppSource(name="resnet50", weights=None).load()


def _no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined")
def test_imagenet_offline_fails_within_seconds_with_the_offline_options(monkeypatch, tmp_path):
    import socket

    from keras.src.utils import file_utils

    def black_hole(address, timeout=None, **kwargs):  # what an offline network looks like
        time.sleep(timeout)
        raise socket.timeout("timed out")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr("pipeline.sources.network.socket.create_connection", black_hole)
    monkeypatch.setattr(file_utils, "get_file", _no_download)
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        KerasAppSource(name="MobileNetV2", weights="imagenet", input_shape=SHAPE, fetch_timeout=2).load()
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "source.weights='imagenet'" in message and "unreachable" in message
    assert "local weights file" in message and "KERAS_HOME" in message
    assert file_utils.get_file is _no_download  # the wrapper is removed again


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined")
def test_a_weights_server_that_never_answers_fails_after_fetch_timeout(monkeypatch, tmp_path, silent_server):
    from keras.src.applications import mobilenet_v2
    from keras.src.utils import file_utils

    port, accepted = silent_server
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(mobilenet_v2, "BASE_WEIGHT_PATH", f"https://127.0.0.1:{port}/weights/")
    monkeypatch.setattr(file_utils, "get_file", _no_download)
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        KerasAppSource(name="MobileNetV2", weights="imagenet", input_shape=SHAPE, fetch_timeout=2).load()
    waited = time.monotonic() - started
    assert len(accepted) == 1  # the server of the weights URL, not port 443
    assert 1.8 <= waited < 8, waited  # building the architecture takes a moment too
    message = str(caught.value)
    assert "source.weights='imagenet'" in message and f"127.0.0.1:{port} is unreachable after 2" in message
    assert "KERAS_HOME" in message


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined")
def test_imagenet_weights_in_the_keras_cache_need_no_network(monkeypatch, tmp_path, images):
    import keras
    from keras.src.utils import file_utils

    keras.utils.set_random_seed(3)
    saved = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=SHAPE)
    saved.save_weights(tmp_path / "stand_in.weights.h5")
    calls = []

    def keras_get_file(fname, origin, cache_subdir="datasets", cache_dir=None, **kwargs):
        calls.append((fname, cache_dir))
        return str(tmp_path / "stand_in.weights.h5")

    checks = []
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(file_utils, "get_file", keras_get_file)
    monkeypatch.setattr("pipeline.sources.keras_app.check_reachable", lambda *a, **k: checks.append(a))
    KerasAppSource(name="MobileNetV2", weights="imagenet", input_shape=SHAPE).load()
    assert len(checks) == 1 and checks[0][1].startswith("https://storage.googleapis.com/")

    (tmp_path / "home" / "models").mkdir(parents=True, exist_ok=True)
    (tmp_path / "home" / "models" / calls[0][0]).write_bytes(b"cached")
    monkeypatch.setattr("pipeline.sources.keras_app.check_reachable", _no_download)
    source = KerasAppSource(name="MobileNetV2", weights="imagenet", input_shape=SHAPE, pooling=None).load()
    assert calls[-1] == (calls[0][0], str(tmp_path / "home"))  # Keras looks where we looked
    expected = saved(keras.applications.mobilenet_v2.preprocess_input(images.copy())).numpy()
    np.testing.assert_allclose(source.backbone(images).numpy(), expected, rtol=1e-5, atol=1e-5)
