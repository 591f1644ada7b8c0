"""`source.layer` / `source.pooling`: cutting a Keras model, what a cut can name, and why a SavedModel cannot be cut."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.sources.cut import block_ends, cut, cut_points, refuse_saved_model_cut


def _residual_net():
    """A tiny functional model with a branch: stem -> (conv, identity) -> add -> tokens -> dense."""
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((6, 6, 3), name="pixels")
    stem = layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    branch = layers.Conv2D(4, 1, name="branch")(stem)
    added = layers.Add(name="add")([stem, branch])
    tokens = layers.Reshape((36, 4), name="tokens")(added)
    outputs = layers.Dense(2, name="head")(layers.Flatten(name="flat")(tokens))
    return keras.Model(inputs, outputs, name="residual")


def _images(n: int = 4):
    return np.random.default_rng(0).uniform(-1, 1, size=(n, 6, 6, 3)).astype("float32")


def test_a_cut_drops_the_layers_after_it_and_pools_what_it_gives():
    import keras

    model = _residual_net()
    cut_model = cut(model, "add", "avg", "extractor", "residual", "python -m pipeline.inspect ...")
    assert [layer.name for layer in cut_model.layers] == ["pixels", "stem", "branch", "add", "pooling"]
    assert len(cut_model.weights) == 4  # stem and branch: the head's kernel and bias are gone
    expected = keras.Model(model.input, model.get_layer("add").output)(_images()).numpy().mean(axis=(1, 2))
    np.testing.assert_allclose(cut_model(_images()).numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "pooling,pooled",
    [("avg", lambda t: t.mean(axis=1)), ("max", lambda t: t.max(axis=1)), ("flatten", lambda t: t.reshape(len(t), -1))],
)
def test_a_sequence_of_tokens_is_pooled_over_its_positions(pooling, pooled):
    import keras

    model = _residual_net()
    tokens = keras.Model(model.input, model.get_layer("tokens").output)(_images()).numpy()  # (4, 36, 4)
    cut_model = cut(model, "tokens", pooling, "extractor", "residual", "")
    np.testing.assert_allclose(cut_model(_images()).numpy(), pooled(tokens), rtol=1e-6, atol=1e-6)


def test_cut_points_leave_out_the_input_and_the_added_pooling():
    model = _residual_net()
    points = cut_points(cut(model, "add", "max", "extractor", "residual", ""))
    assert points == [("stem", (6, 6, 4)), ("branch", (6, 6, 4)), ("add", (6, 6, 4))]
    whole = cut_points(cut(model, None, None, "extractor", "residual", ""))
    assert [name for name, _ in whole] == ["stem", "branch", "add", "tokens", "flat", "head"]
    assert dict(whole)["tokens"] == (36, 4)


def test_block_ends_are_the_layers_whose_output_feeds_several():
    assert block_ends(_residual_net()) == {"stem"}  # it feeds the branch and the add


def test_a_saved_model_source_refuses_a_layer_and_says_why():
    refuse_saved_model_cut(None)
    with pytest.raises(ConfigError) as caught:
        refuse_saved_model_cut("conv")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("source.layer='conv': a SavedModel cannot be cut")
    assert "source.output_key" in message and "source=keras_file" in message


def test_saved_models_keep_no_layer_graph_to_cut(hub_model_dir, tmp_path):
    """Why `refuse_saved_model_cut` refuses: what a SavedModel keeps of the layers of a Keras model."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    # A Keras 3 export keeps the variables and the traced endpoints, no layers.
    model = _residual_net()
    model.export(str(tmp_path / "exported"), verbose=False)
    restored = tf.saved_model.load(str(tmp_path / "exported"))
    assert not [name for name in dir(restored) if "layer" in name]

    # A tf_keras one (the TF Hub format) keeps each layer with its own traced function, but
    # not the model's config: which layer feeds which is not recorded.
    restored = tf.saved_model.load(str(hub_model_dir))
    assert "layer_with_weights-0" in dir(restored)
    assert not (hub_model_dir / "keras_metadata.pb").exists()
    saved = saved_model_pb2.SavedModel.FromString((hub_model_dir / "saved_model.pb").read_bytes())
    nodes = saved.meta_graphs[0].object_graph_def.nodes
    keras_objects = [node.user_object for node in nodes if node.user_object.identifier.startswith("_tf_keras")]
    assert keras_objects and not any(each.metadata for each in keras_objects)
