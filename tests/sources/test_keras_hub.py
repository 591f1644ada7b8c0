"""KerasHub presets: text and images, the preset's preprocessing inside, real fine-tuning, offline errors.

The presets are tiny ones saved here with `save_to_preset` (no network): a BERT (WordPiece,
`pooled_output`), a RoBERTa (BPE, no pooled output) and a ResNet, each with its preprocessor.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import PROJECT_ROOT, compose
from pipeline.errors import ConfigError, SourceError
from pipeline.sources.keras_hub import KerasHubSource

pytest.importorskip("keras_hub", reason="the keras_hub extra is not installed")

VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a an movie film story was is good bad great awful boring i liked loved hated it "
    "very not really and but plot actors ##s ##ly ##ed"
).split()
SHORT = "the film was good"  # 4 word pieces: fits 8 positions with [CLS] and [SEP]
LONG = "the plot was boring and the actors were bad but i really liked the story"
TEXTS = np.array([SHORT, LONG, "awful movie", "i loved it very much", "not good", "a great story",
                  "boring boring plot", "the actors liked it"])
LABELS = np.arange(len(TEXTS)) % 2
IMAGE_SIZE = (16, 16)


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """`name -> preset directory`: bert, roberta, resnet (scale 1/255), resnet_odd (a scale
    that is no preprocess mode), each written by `save_to_preset` with its preprocessing."""
    import keras
    import keras_hub

    root = tmp_path_factory.mktemp("presets")
    keras.utils.set_random_seed(0)
    bert = keras_hub.models.BertTokenizer(vocabulary=VOCABULARY, lowercase=True)
    keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCABULARY), num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=16,
    ).save_to_preset(root / "bert")
    keras_hub.models.BertTextClassifierPreprocessor(bert, sequence_length=16).save_to_preset(root / "bert")

    merges = ["Ġ a", "a i", "p l", "n e", "Ġa t", "p o", "r t", "ai r", "pl a", "po rt", "Ġa i", "Ġai r", "pla ne"]
    tokens = ["<s>", "<pad>", "</s>", "<mask>", "<unk>"] + list("Ġairplneto")
    tokens += [m.replace(" ", "") for m in merges if m.replace(" ", "") not in tokens]
    roberta = keras_hub.models.RobertaTokenizer(vocabulary={t: i for i, t in enumerate(tokens)}, merges=merges)
    keras_hub.models.RobertaBackbone(
        vocabulary_size=len(tokens), num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=16,
    ).save_to_preset(root / "roberta")
    keras_hub.models.RobertaTextClassifierPreprocessor(roberta, sequence_length=8).save_to_preset(root / "roberta")

    resnet = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        image_shape=(None, None, 3),
    )
    scalings = {"resnet": (1 / 255.0, 0.0), "resnet_odd": ([1 / 64.0, 1 / 32.0, 1 / 16.0], [-2.0, 0.5, 1.0])}
    for name, (scale, offset) in scalings.items():
        resnet.save_to_preset(root / name)
        converter = keras_hub.layers.ResNetImageConverter(image_size=IMAGE_SIZE, scale=scale, offset=offset)
        keras_hub.models.ResNetImageClassifierPreprocessor(image_converter=converter).save_to_preset(root / name)
    return {name: root / name for name in ("bert", "roberta", "resnet", "resnet_odd")}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, size=(8, *IMAGE_SIZE, 3)).astype("float32")


def _inputs(source_model, images):
    return TEXTS if source_model.input_kind == "text" else images


def _with_a_head(source_model):
    import keras

    from pipeline.sources.backbone import model_input

    model_inputs = model_input(source_model.input_kind, source_model.input_shape)
    outputs = keras.layers.Dense(2, activation="softmax")(source_model.backbone(model_inputs))
    return keras.Model(model_inputs, outputs)


def _fit_a_head(source_model, inputs, epochs: int = 2, unfreeze: bool = True, eagerly: bool = False):
    """`eagerly` skips tracing the train step (seconds for a text model), where the test is
    about what does not train; the fits that prove training run as a run does, traced."""
    import keras
    import tensorflow as tf

    if unfreeze:
        source_model.backbone.trainable = True  # what freeze=none does
    model = _with_a_head(source_model)
    # No XLA: compiling it takes longer than these tiny fits.
    model.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy", jit_compile=False,
                  run_eagerly=eagerly)
    model.fit(tf.data.Dataset.from_tensor_slices((inputs, LABELS)).batch(4), epochs=epochs, verbose=0)
    return model


def _weights(source_model) -> dict[str, np.ndarray]:
    return {v.path: v.numpy().copy() for v in source_model.backbone.weights}


def _oracle_text(preset, sequence_length=None):
    """keras_hub's own preprocessor and backbone, outside any model of ours."""
    import keras_hub

    arguments = {} if sequence_length is None else {"sequence_length": sequence_length}
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(str(preset), **arguments)
    backbone = keras_hub.models.Backbone.from_preset(str(preset))
    inputs = preprocessor(TEXTS.tolist())
    outputs = backbone(inputs)
    return inputs, outputs


def test_a_text_preset_takes_raw_strings_and_runs_its_own_preprocessor_inside(presets):
    source = KerasHubSource(preset=str(presets["bert"])).load()
    assert source.input_kind == "text" and source.input_shape == () and source.preprocess == "none"
    assert source.backbone.inputs[0].dtype == "string"
    assert source.feature_shape == (8,)
    _, outputs = _oracle_text(presets["bert"])
    np.testing.assert_allclose(source.backbone(TEXTS).numpy(), outputs["pooled_output"].numpy(), atol=1e-6)


def test_text_pooling_mean_averages_the_positions_that_are_not_padding(presets):
    source = KerasHubSource(preset=str(presets["bert"]), pooling="mean").load()
    inputs, outputs = _oracle_text(presets["bert"])
    mask = np.asarray(inputs["padding_mask"], dtype="float32")[..., None]
    expected = (outputs["sequence_output"].numpy() * mask).sum(axis=1) / mask.sum(axis=1)
    np.testing.assert_allclose(source.backbone(TEXTS).numpy(), expected, atol=1e-6)
    assert not np.allclose(expected, outputs["pooled_output"].numpy(), atol=1e-3)


def test_without_a_pooled_output_pooled_takes_the_first_token(presets):
    source = KerasHubSource(preset=str(presets["roberta"])).load()
    _, sequence = _oracle_text(presets["roberta"])  # RoBERTa returns the sequence alone
    assert source.input_kind == "text" and source.feature_shape == (8,)
    np.testing.assert_allclose(source.backbone(TEXTS).numpy(), sequence.numpy()[:, 0, :], atol=1e-6)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_an_image_preset_applies_its_converters_scale_but_not_its_resize(presets, images, pooling):
    import keras_hub

    backbone = keras_hub.models.Backbone.from_preset(str(presets["resnet"]))
    reduce = {"avg": np.mean, "max": np.max}[pooling]

    source = KerasHubSource(preset=str(presets["resnet"]), pooling=pooling).load()
    assert source.input_kind == "image" and source.input_shape == (*IMAGE_SIZE, 3)  # the converter's size
    assert source.preprocess == "unit"  # scale 1/255, found as the mode it equals
    expected = reduce(backbone(images / 255.0).numpy(), axis=(1, 2))
    np.testing.assert_allclose(source.backbone(images).numpy(), expected, rtol=1e-5, atol=1e-5)

    larger = np.random.default_rng(1).uniform(0, 255, size=(2, 24, 24, 3)).astype("float32")
    source = KerasHubSource(preset=str(presets["resnet"]), input_shape=[24, 24, 3], pooling=pooling).load()
    expected = reduce(backbone(larger / 255.0).numpy(), axis=(1, 2))  # not resized to 16x16
    np.testing.assert_allclose(source.backbone(larger).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_converter_scale_that_is_no_preprocess_mode_runs_inside_the_backbone(presets, images):
    import keras_hub

    source = KerasHubSource(preset=str(presets["resnet_odd"])).load()
    assert source.preprocess == "none" and "offset=" in source.description
    backbone = keras_hub.models.Backbone.from_preset(str(presets["resnet_odd"]))
    scaled = images * np.array([1 / 64.0, 1 / 32.0, 1 / 16.0], "float32") + np.array([-2.0, 0.5, 1.0], "float32")
    expected = backbone(scaled).numpy().mean(axis=(1, 2))
    np.testing.assert_allclose(source.backbone(images).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "resnet"])
def test_trainable_fit_changes_the_forward_pass_and_frozen_stays_bit_identical(presets, images, name):
    import keras

    keras.utils.set_random_seed(0)
    trainable = KerasHubSource(preset=str(presets[name])).load()
    inputs = _inputs(trainable, images)
    before, features = _weights(trainable), trainable.backbone(inputs).numpy()
    _fit_a_head(trainable, inputs)
    changed = {path for path, value in _weights(trainable).items() if not np.array_equal(value, before[path])}
    assert any("kernel" in path for path in changed), changed
    assert not np.allclose(trainable.backbone(inputs).numpy(), features, atol=1e-4)

    frozen = KerasHubSource(preset=str(presets[name]), trainable=False).load()
    before, features = _weights(frozen), frozen.backbone(inputs).numpy()
    model = _fit_a_head(frozen, inputs, eagerly=True)  # sets backbone.trainable = True first
    for path, value in _weights(frozen).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    np.testing.assert_array_equal(frozen.backbone(inputs).numpy(), features)
    assert len(model.trainable_weights) == 2  # the head's kernel and bias only


def test_freeze_units_are_the_keras_hub_backbones_layers(presets):
    import keras_hub

    from pipeline.freeze import Regex, TopN, backbone_units

    source = KerasHubSource(preset=str(presets["bert"])).load()
    hub_backbone = keras_hub.models.Backbone.from_preset(str(presets["bert"]))
    units = [unit.name for unit in backbone_units(source.backbone)]
    assert units == [layer.name for layer in hub_backbone.layers if layer.weights]
    assert units[-2:] == ["transformer_layer_0", "pooled_dense"]

    mean = KerasHubSource(preset=str(presets["bert"]), pooling="mean").load()
    assert [unit.name for unit in backbone_units(mean.backbone)] == units[:-1]  # pooled_dense feeds nothing

    TopN(n=2).apply(source.backbone)
    assert {v.path.split("/")[0] for v in source.backbone.trainable_weights} == {"transformer_layer_0", "pooled_dense"}

    state = Regex(patterns=["^transformer_layer_0$"]).apply(source.backbone)
    opened = {v.path for v in source.backbone.trainable_weights}
    assert opened and all(path.startswith("transformer_layer_0/") for path in opened)
    assert len(state.candidates) == len(opened)
    before = _weights(source)
    _fit_a_head(source, TEXTS, unfreeze=False, eagerly=True)
    for path, value in _weights(source).items():  # the opened unit trained, nothing else did
        assert np.array_equal(value, before[path]) != path.startswith("transformer_layer_0/"), path

    resnet = KerasHubSource(preset=str(presets["resnet"])).load()
    assert [unit.name for unit in backbone_units(resnet.backbone)][:2] == ["conv1_conv", "conv1_bn"]
    assert [unit.batchnorm for unit in backbone_units(resnet.backbone)][:2] == [False, True]


def test_sequence_length_sets_the_packed_length(presets):
    default = KerasHubSource(preset=str(presets["bert"]), pooling="mean").load()
    short = KerasHubSource(preset=str(presets["bert"]), pooling="mean", sequence_length=8).load()
    assert "sequence_length=16" in default.description and "sequence_length=8" in short.description
    texts = np.array([SHORT, LONG])
    with_16, with_8 = default.backbone(texts).numpy(), short.backbone(texts).numpy()
    np.testing.assert_allclose(with_8[0], with_16[0], atol=1e-6)  # fits in 8: padding is masked out
    assert not np.allclose(with_8[1], with_16[1], atol=1e-3)  # cut at 8 positions
    inputs, outputs = _oracle_text(presets["bert"], sequence_length=8)
    mask = np.asarray(inputs["padding_mask"], dtype="float32")[..., None]
    assert mask.shape[1] == 8
    expected = (outputs["sequence_output"].numpy() * mask).sum(axis=1) / mask.sum(axis=1)
    np.testing.assert_allclose(short.backbone(TEXTS).numpy(), expected, atol=1e-6)


def test_the_feature_cache_key_follows_pooling_and_sequence_length(presets):
    from pipeline.features import backbone_fingerprint

    def key(**settings):
        return backbone_fingerprint(KerasHubSource(preset=str(presets["bert"]), **settings).load().backbone)

    assert key() == key()
    assert len({key(), key(pooling="mean"), key(sequence_length=8)}) == 3


def test_a_sequence_length_beyond_the_position_embeddings_fails_before_loading(presets):
    with pytest.raises(ConfigError, match=r"source\.sequence_length=32 is more than the 16 positions"):
        KerasHubSource(preset=str(presets["bert"]), sequence_length=32).load()


@pytest.mark.parametrize("name,trainable", [("bert", True), ("bert", False), ("resnet", True)])
def test_a_model_on_the_source_survives_the_keras_round_trip(presets, images, tmp_path, name, trainable):
    import keras
    import tensorflow as tf

    source = KerasHubSource(preset=str(presets[name]), pooling="mean" if name == "bert" else None,
                            trainable=trainable).load()
    model = _with_a_head(source)
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    batch = tf.constant(_inputs(source, images))
    np.testing.assert_array_equal(reloaded(batch).numpy(), model(batch).numpy())
    assert reloaded.inputs[0].dtype == model.inputs[0].dtype


@pytest.mark.slow
def test_a_saved_text_model_loads_in_a_new_process_after_import_pipeline(presets, tmp_path):
    source = KerasHubSource(preset=str(presets["bert"])).load()
    source.backbone.save(tmp_path / "backbone.keras")
    expected = source.backbone(TEXTS).numpy()
    np.save(tmp_path / "expected.npy", expected)
    script = (
        "import sys, numpy as np, pipeline, keras\n"
        f"model = keras.saving.load_model({str(tmp_path / 'backbone.keras')!r})\n"
        f"texts = np.array({TEXTS.tolist()!r})\n"
        f"np.testing.assert_allclose(model(texts).numpy(), np.load({str(tmp_path / 'expected.npy')!r}), atol=1e-6)\n"
    )
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


# --- errors ---------------------------------------------------------------------------------


def test_a_missing_directory_names_the_key_and_the_forms_it_takes(tmp_path):
    path = str(tmp_path / "absent")
    with pytest.raises(SourceError) as caught:
        KerasHubSource(preset=path).load()
    message = str(caught.value)
    assert message.startswith(f"source.preset={path!r}: no such directory")
    assert "save_to_preset" in message and "kaggle://" in message


def test_a_directory_without_config_json_is_not_a_preset(tmp_path):
    (tmp_path / "model.weights.h5").write_bytes(b"")
    with pytest.raises(SourceError, match=r"source\.preset=.* is not a KerasHub preset: it has no config\.json"):
        KerasHubSource(preset=str(tmp_path)).load()


@pytest.mark.parametrize("registered_name", ["keras_hub>BertTokenizer", "os>system", "Functional"])
def test_a_preset_whose_class_is_not_a_backbone_is_refused_before_it_is_built(presets, tmp_path, registered_name):
    preset = tmp_path / "preset"
    shutil.copytree(presets["bert"], preset)
    config = json.loads((preset / "config.json").read_text())
    marker = tmp_path / "ran"
    config.update(registered_name=registered_name, class_name=registered_name.split(">")[-1],
                  module=registered_name.split(">")[0], config={"command": f"touch {marker}"})
    (preset / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError) as caught:
        KerasHubSource(preset=str(preset)).load()
    assert f"describes {registered_name!r}, not a KerasHub Backbone" in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("module,what", [("tensorflow_text", "is a text preset"), ("keras_hub", "needs the keras-hub")])
def test_a_missing_package_says_what_to_install_in_one_line(presets, monkeypatch, module, what):
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` fails
    with pytest.raises(SourceError) as caught:
        KerasHubSource(preset=str(presets["bert"])).load()
    message = str(caught.value)
    assert "\n" not in message
    assert what in message and "pip install 'tf-transfer-pipeline[keras_hub]'" in message


def test_pooling_and_input_that_do_not_fit_the_preset_fail_naming_the_key(presets, tmp_path):
    with pytest.raises(ConfigError, match=r"source\.pooling='avg' does not apply to a text preset.*pooled or mean"):
        KerasHubSource(preset=str(presets["bert"]), pooling="avg").load()
    with pytest.raises(ConfigError, match=r"source\.sequence_length=8 is for text presets"):
        KerasHubSource(preset=str(presets["resnet"]), sequence_length=8).load()
    with pytest.raises(SourceError, match=r"no image converter could be loaded.*source\.input=text or null"):
        KerasHubSource(preset=str(presets["bert"]), input="image").load()

    bare = tmp_path / "bare"  # a backbone without its tokenizer or image converter
    bare.mkdir()
    for name in ("config.json", "model.weights.h5"):
        shutil.copy(presets["bert"] / name, bare / name)
    with pytest.raises(SourceError, match=r"has neither a tokenizer .* set source\.input=text or source\.input=image"):
        KerasHubSource(preset=str(bare)).load()


def _no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")


def test_an_unreachable_kaggle_handle_fails_within_fetch_timeout_with_offline_advice(monkeypatch, tmp_path):
    from keras_hub.src.utils import preset_utils

    def black_hole(address, timeout=None, **kwargs):  # what an offline network looks like
        time.sleep(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    monkeypatch.setattr("pipeline.sources.network.socket.create_connection", black_hole)
    monkeypatch.setattr(preset_utils, "get_file", _no_download)
    handle = "kaggle://keras/bert/keras/bert_tiny_en_uncased/2"
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        KerasHubSource(preset=handle, fetch_timeout=2).load()
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert message.startswith(f"source.preset={handle!r} could not be fetched: www.kaggle.com:443 is unreachable")
    assert "local preset directory" in message and "save_to_preset" in message


def test_a_hugging_face_server_that_never_answers_fails_after_fetch_timeout(monkeypatch, silent_server):
    from keras_hub.src.utils import preset_utils

    port, accepted = silent_server
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{port}")
    monkeypatch.setattr(preset_utils, "get_file", _no_download)
    started = time.monotonic()
    unreachable = rf"source\.preset='hf://owner/model' .*127\.0\.0\.1:{port} is unreachable after 2"
    with pytest.raises(SourceError, match=unreachable):
        KerasHubSource(preset="hf://owner/model", fetch_timeout=2).load()
    assert 1.8 <= time.monotonic() - started < 8 and len(accepted) == 1


def test_a_versioned_kaggle_handle_in_the_kagglehub_cache_needs_no_network(presets, monkeypatch, tmp_path):
    shutil.copytree(presets["bert"], tmp_path / "models" / "keras" / "bert" / "keras" / "bert_tiny" / "3")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    monkeypatch.setattr("pipeline.sources.keras_hub.check_reachable", _no_download)
    source = KerasHubSource(preset="kaggle://keras/bert/keras/bert_tiny/3").load()
    assert source.input_kind == "text" and source.description.startswith("keras_hub:kaggle://keras/bert/")


def test_the_option_composes_validates_and_refuses_a_pooling_typo(tmp_path):
    from hydra.utils import instantiate

    from pipeline import config

    cfg = compose(["source=keras_hub", "source.preset=/models/preset"], tmp_path)
    config.validate(cfg)
    assert type(instantiate(cfg.source)) is KerasHubSource
    with pytest.raises(ConfigError, match=r"source\.pooling='avrg'"):
        config.validate(compose(["source=keras_hub", "source.preset=/p", "source.pooling=avrg"], tmp_path))
