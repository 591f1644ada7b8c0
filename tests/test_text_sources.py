"""Text sources (issue 18): TF Hub text modules and BERT-style pairs, fine-tuned in Keras 3,
and a text model served on raw strings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.errors import ConfigError, DataError, SourceError
from pipeline.sources.hub import HubSource
from text_modules import make_bert_pair, make_sentence_encoder

SPORT = ["the team won the match", "a late goal for the team", "the player will score a goal",
         "they won the match with a late score", "the player and the team", "a goal in the match"]
BAKING = ["bake the dough for ten minutes", "add flour and sugar to the dough", "a recipe with salt and flour",
          "the oven needs ten minutes", "sugar salt and flour", "bake a recipe in the oven"]
TEXTS = SPORT + BAKING
LABELS = np.array([0] * len(SPORT) + [1] * len(BAKING))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return make_sentence_encoder(tmp_path_factory.mktemp("text") / "nnlm")


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    return make_bert_pair(tmp_path_factory.mktemp("bert"))


def _source(handle, **settings):
    return HubSource(handle=str(handle), input_shape=[], preprocess="none", input="text", **settings).load()


def _strings(texts=TEXTS):
    import tensorflow as tf

    return tf.constant(texts)


def _fit(source, epochs=5):
    """A dense head on the source, trained on the sentences; returns the Keras model."""
    import keras
    import tensorflow as tf

    from pipeline.sources.backbone import model_input

    keras.utils.set_random_seed(0)
    text = model_input("text", ())
    model = keras.Model(text, keras.layers.Dense(2, activation="softmax")(source.backbone(text)))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    batches = tf.data.Dataset.from_tensor_slices((TEXTS, LABELS)).shuffle(12, seed=0).batch(4)
    model.fit(batches, epochs=epochs, verbose=0)
    return model


def test_a_text_module_takes_strings_and_fine_tuning_changes_its_forward_pass(encoder_dir):
    source = _source(encoder_dir)
    assert source.input_kind == "text" and source.input_shape == () and source.feature_shape == (8,)
    before = source.backbone(_strings()).numpy()
    assert np.all(before[-1] != 0)  # real features (an empty text would give zeros)
    _fit(source)
    after = source.backbone(_strings()).numpy()
    assert np.max(np.abs(after - before)) > 1e-3  # the module's own embeddings were trained


def test_trainable_false_pins_a_text_module_bit_for_bit(encoder_dir):
    source = _source(encoder_dir, trainable=False)
    before = source.backbone(_strings()).numpy()
    model = _fit(source)
    np.testing.assert_array_equal(source.backbone(_strings()).numpy(), before)
    assert model.predict(_strings(), verbose=0).shape == (len(TEXTS), 2)


def test_a_bert_pair_fine_tunes_the_encoder_and_keeps_the_preprocessor_in_the_keras_file(bert_dirs, tmp_path):
    import keras

    preprocess, encoder = bert_dirs
    copy = tmp_path / "copy"  # moved away after the save: the .keras file must hold both
    shutil.copytree(preprocess.parent, copy)
    source = _source(copy / "encoder", preprocessor=str(copy / "preprocess"), output_key="pooled_output")
    before = source.backbone(_strings()).numpy()
    model = _fit(source)
    after = source.backbone(_strings()).numpy()
    assert np.max(np.abs(after - before)) > 1e-3
    model.save(tmp_path / "model.keras")
    expected = model.predict(_strings(), verbose=0)
    shutil.rmtree(copy)
    reloaded = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_allclose(reloaded.predict(_strings(), verbose=0), expected, atol=1e-6)


def test_seq_length_packs_the_preprocessors_tokens_to_that_many_positions(bert_dirs):
    preprocess, encoder = bert_dirs
    short = ["the team won"]  # 3 tokens: fits both lengths
    long = ["they won the match with a late score"]  # 8 tokens: cut at 4 - 2 = 2 tokens
    default = _source(encoder, preprocessor=str(preprocess), output_key="pooled_output")
    packed = _source(encoder, preprocessor=str(preprocess), output_key="pooled_output", seq_length=5)
    np.testing.assert_allclose(packed.backbone(_strings(short)).numpy(), default.backbone(_strings(short)).numpy(),
                               atol=1e-6)
    cut = packed.backbone(_strings(long)).numpy()
    assert np.max(np.abs(cut - default.backbone(_strings(long)).numpy())) > 1e-3
    first_three = packed.backbone(_strings(["they won the"])).numpy()
    np.testing.assert_allclose(cut, first_three, atol=1e-6)  # exactly the first 5 - 2 tokens


@pytest.mark.parametrize(("settings", "match"), [
    ({"preprocess": "unit"}, "source.preprocess='unit'.*set source.preprocess=none"),
    ({"seq_length": 64}, "source.seq_length=64 needs source.preprocessor"),
    ({"seq_length": 1, "preprocessor": "/p"}, "source.seq_length=1: expected"),
    ({"input": "audio"}, "source.input='audio'"),
])
def test_text_settings_that_do_not_fit_are_config_errors(settings, match):
    values = {"handle": "/nowhere", "input_shape": [], "preprocess": "none", "input": "text", **settings}
    with pytest.raises(ConfigError, match=match):
        HubSource(**values)


def test_preprocessor_and_seq_length_belong_to_text_sources():
    with pytest.raises(ConfigError, match="source.preprocessor='/p' is for text modules"):
        HubSource(handle="/nowhere", input_shape=[8, 8, 1], preprocessor="/p")


def test_seq_length_needs_a_preprocessor_that_packs(encoder_dir):
    with pytest.raises(SourceError, match="no tokenize or bert_pack_inputs"):
        _source(encoder_dir, preprocessor=str(encoder_dir), seq_length=8)


def test_text_data_under_an_image_source_and_back_is_one_line_naming_the_fix(encoder_dir, hub_model_dir):
    from pipeline.adapt import adapt
    from pipeline.freeze import FreezeNone
    from pipeline.heads import LinearHead

    image_source = HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1]).load()
    with pytest.raises(DataError, match="the data gives text but the source .* takes image: choose a source"):
        adapt(image_source, LinearHead(), FreezeNone(), ("a", "b"), (), "multiclass", input_kind="text")
    with pytest.raises(DataError, match="the data gives image but the source .* takes text"):
        adapt(_source(encoder_dir), LinearHead(), FreezeNone(), ("a", "b"), (8, 8, 1), "multiclass")


def _text_data(max_chars=None):
    import tensorflow as tf

    from pipeline.types import DataBundle

    texts = [text[:max_chars] for text in TEXTS]  # as the data stage reads them (data.max_chars)
    dataset = tf.data.Dataset.from_tensor_slices((texts, LABELS))
    return DataBundle(train=dataset, val=dataset.take(4), test=dataset, class_names=("sport", "baking"),
                      input_shape=(), input_kind="text", resizable=False, max_chars=max_chars)


def _centred_bert_model(bert_dirs):
    """A BERT-pair text model whose head predicts both classes on TEXTS."""
    from pipeline.adapt import adapt
    from pipeline.freeze import FreezeNone
    from pipeline.heads import LinearHead

    preprocess, encoder = bert_dirs
    source = _source(encoder, preprocessor=str(preprocess), output_key="pooled_output")
    adapted = adapt(source, LinearHead(), FreezeNone(), ("sport", "baking"), (), "multiclass", input_kind="text")
    dense = adapted.head.get_layer("probabilities")
    kernel = (3 * np.random.default_rng(0).normal(size=dense.kernel.shape)).astype("float32")
    dense.kernel.assign(kernel)  # centred below, so that both classes are predicted
    dense.bias.assign(-np.median(adapted.backbone(_strings()).numpy() @ kernel, axis=0).astype("float32"))
    return adapted


def test_a_model_trained_on_cut_texts_cuts_the_texts_it_serves(bert_dirs, tmp_path):
    import keras
    import tensorflow as tf

    from pipeline.export import Exporter

    adapted = _centred_bert_model(bert_dirs)
    cut = [text[:9] for text in TEXTS]
    expected = adapted.model.predict(_strings(cut), verbose=0)
    assert np.abs(expected - adapted.model.predict(_strings(), verbose=0)).max() > 1e-3  # the cut matters
    result = Exporter(formats=["saved_model", "keras"]).export(adapted, _text_data(max_chars=9), tmp_path / "export")
    served = tf.saved_model.load(str(result.paths["saved_model"])).signatures["serving_default"]
    np.testing.assert_allclose(served(text=_strings())["probabilities"].numpy(), expected, atol=1e-5)
    reloaded = keras.saving.load_model(result.paths["keras"], compile=False)
    np.testing.assert_allclose(reloaded.predict(_strings(), verbose=0), expected, atol=1e-5)


def test_a_text_model_is_served_on_raw_strings(bert_dirs, tmp_path):
    import keras
    import tensorflow as tf

    from pipeline.export import Exporter

    adapted = _centred_bert_model(bert_dirs)
    result = Exporter(formats=["saved_model", "keras"]).export(adapted, _text_data(), tmp_path / "export")
    assert set(result.paths) == {"saved_model", "keras"} and max(result.max_abs_diff.values()) < 1e-5

    expected = adapted.model.predict(_strings(), verbose=0)
    assert len(np.unique(expected.argmax(axis=1))) == 2  # the check below compares real predictions
    served = tf.saved_model.load(str(result.paths["saved_model"])).signatures["serving_default"]
    outputs = served(text=_strings())
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-5)
    names = np.array(["sport", "baking"])[expected.argmax(axis=1)]
    assert [name.decode() for name in outputs["class_name"].numpy()] == list(names)
    assert json.loads((tmp_path / "export" / "input_example.json").read_text()) == TEXTS[:2]
    assert not (tmp_path / "export" / "input_example.npy").exists()
    reloaded = keras.saving.load_model(result.paths["keras"], compile=False)
    np.testing.assert_allclose(reloaded.predict(_strings(), verbose=0), expected, atol=1e-5)


@pytest.mark.parametrize("formats", [["saved_model", "tflite"], ["onnx"]])
def test_formats_that_cannot_hold_a_text_model_fail_before_training(formats):
    from pipeline.export import Exporter

    with pytest.raises(ConfigError, match=r"cannot hold a text model.*export.formats=\[saved_model\]"):
        Exporter(formats=formats).check_input("text")
    Exporter(formats=formats).check_input("image")  # images: fine


def test_a_module_with_tf_text_ops_names_the_extra_that_registers_them(encoder_dir, tmp_path, monkeypatch):
    import sys

    from tensorflow.core.protobuf import saved_model_pb2

    from pipeline.sources.signatures import load_saved_model

    monkeypatch.setitem(sys.modules, "tensorflow_text", None)  # as if the extra were not installed
    needs_text = tmp_path / "needs_text"
    shutil.copytree(encoder_dir, needs_text)
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((needs_text / "saved_model.pb").read_bytes())
    lower = next(node for function in saved_model.meta_graphs[0].graph_def.library.function
                 for node in function.node_def if node.op == "StringLower")
    lower.op = "NotRegisteredWithoutTFText"  # like CaseFoldUTF8 of TF Hub's BERT preprocessors
    (needs_text / "saved_model.pb").write_bytes(saved_model.SerializeToString())
    with pytest.raises(SourceError, match=r"source.preprocessor=.*NotRegisteredWithoutTFText.*"
                                          r"tf-transfer-pipeline\[text\]"):
        load_saved_model(str(needs_text), key="source.preprocessor")


def test_the_feature_cache_key_covers_the_preprocessor_and_seq_length(bert_dirs, tmp_path):
    from pipeline.features import backbone_fingerprint

    preprocess, encoder = bert_dirs
    other = tmp_path / "other_preprocess"
    shutil.copytree(preprocess, other)
    keys = {
        backbone_fingerprint(_source(encoder, preprocessor=str(preprocess), output_key="pooled_output").backbone),
        backbone_fingerprint(_source(encoder, preprocessor=str(other), output_key="pooled_output").backbone),
        backbone_fingerprint(_source(encoder, preprocessor=str(preprocess), output_key="pooled_output",
                                     seq_length=5).backbone),
    }
    assert len(keys) == 3  # same weights, other tokens: never the same cached features


def test_inspect_describes_a_text_source_and_its_preprocessor(bert_dirs):
    from pipeline.inspect import describe_source

    preprocess, encoder = bert_dirs
    text = describe_source(_source(encoder, preprocessor=str(preprocess), output_key="pooled_output", seq_length=6))
    assert "input:             text (a batch of raw strings" in text
    assert "raw 0-255 pixels" not in text
    assert f"preprocessor of layer 'hub': {preprocess} (called first, never trained, packed to 6 positions)" in text


def test_text_ops_tells_a_graph_that_needs_tf_text_from_one_that_does_not(encoder_dir, tmp_path):
    from tensorflow.core.protobuf import saved_model_pb2

    from pipeline.sources.signatures import text_ops

    assert not text_ops(encoder_dir)  # core TensorFlow ops only: the MLflow model needs no tensorflow-text
    renamed = tmp_path / "renamed"
    shutil.copytree(encoder_dir, renamed)
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((renamed / "saved_model.pb").read_bytes())
    next(node for function in saved_model.meta_graphs[0].graph_def.library.function
         for node in function.node_def if node.op == "StringLower").op = "CaseFoldUTF8"
    (renamed / "saved_model.pb").write_bytes(saved_model.SerializeToString())
    assert text_ops(renamed)
