"""`python -m pipeline.inspect`: any source, described before training from the run's own overrides."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import PROJECT_ROOT
from pipeline.inspect import describe_source, inspect_source, main


def _parameters(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


@pytest.fixture(scope="module")
def keras_export(tmp_path_factory):
    """`(directory, model)`: a tiny Keras 3 CNN with BatchNorm and what `model.export` wrote."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(5)(x))
    directory = tmp_path_factory.mktemp("inspect") / "exported"
    model.export(str(directory), verbose=False)
    return directory, model


def test_cli_shows_signatures_specs_and_parameter_counts(keras_export):
    directory, model = keras_export
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.inspect",
            "source=saved_model",
            f"source.path={directory}",
            "source.input_shape=[8,8,1]",
            "source.preprocess=unit",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    trainable, non_trainable = _parameters(model.trainable_weights), _parameters(model.non_trainable_weights)
    assert (trainable, non_trainable) == (69, 8)
    assert f"({trainable} trainable, {non_trainable} non-trainable)" in out
    assert "variables:         7 (5 trainable, 2 non-trainable)" in out
    assert "input shape:       (8, 8, 1)" in out and "preprocessing:     unit" in out
    assert "feature shape:     (5,)" in out
    assert f"saved_model:{directory} signature=serving_default output=output_0" in out
    # Keras 3 exports two signatures; both are listed with their specs, and there is no __call__.
    blocks = re.findall(
        r"\n    (\w+)\n      inputs:  keras_tensor\w*: shape=\(None, 8, 8, 1\) dtype=float32\n"
        r"      outputs: output_0: shape=\(None, 5\) dtype=float32",
        out,
    )
    assert blocks == ["serve", "serving_default"], out
    assert "__call__: absent" in out


def test_default_digits_source(tmp_path):
    import tensorflow as tf

    from pipeline.config import ASSETS

    out = inspect_source([])
    restored = tf.saved_model.load(str(ASSETS / "digits_0to4"))
    trainable = _parameters(restored.trainable_variables)
    non_trainable = _parameters(restored.variables) - trainable
    assert f"({trainable:,} trainable, {non_trainable:,} non-trainable)" in out
    assert "source:            hub:" in out and "digits_0to4" in out
    assert "input shape:       (8, 8, 1)" in out and "preprocessing:     unit" in out
    assert "serving_default\n      inputs:  images: shape=(None, 8, 8, 1) dtype=float32" in out
    assert "__call__(inputs, training=False, mask=None): takes training" in out
    # The freeze units, top first, as freeze=top_n counts them and freeze=regex matches them.
    units = out[out.index("freeze units:"):].splitlines()
    assert units[0].startswith("freeze units:      ")
    assert units[0].split()[2] == "6"
    assert units[1].split() == ["6", "batch_normalization_2", "(BatchNorm)"]
    assert units[2].split() == ["5", "conv2d_2"]


def test_a_pinned_source_shows_no_trainable_parameters(keras_export):
    overrides = [f"source.path={keras_export[0]}", "source.input_shape=[8,8,1]", "source.trainable=false"]
    out = inspect_source(["source=saved_model", *overrides])
    assert "(0 trainable, 77 non-trainable)" in out
    assert "called through signature 'serving_default'" in out


def test_a_keras_backbone_without_a_saved_model_is_described_too():
    import keras

    from pipeline.sources.backbone import build_backbone

    layers = [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]
    inner = keras.Sequential(layers, name="net")
    source = build_backbone(inner, (8, 8, 1), "tf", "keras:test")
    out = describe_source(source)
    assert "source:            keras:test" in out and "feature shape:     (3,)" in out
    assert "layers:            5 (3 at the top level: images, preprocess, net)" in out
    assert "(195 trainable, 0 non-trainable)" in out
    assert "signatures" not in out


def test_errors_exit_2_with_the_listing_and_no_traceback(keras_export, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["source=saved_model", f"source.path={keras_export[0]}", "source.signature=nope"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: source.signature='nope'")
    assert "\n  serve\n" in err and "\n  serving_default\n" in err and "output_0: shape=(None, 5)" in err


def test_config_errors_are_reported_before_loading(capsys):
    with pytest.raises(SystemExit):
        main(["source=saved_model"])
    assert "source.path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["source=nope"])
    assert "Available options in 'source'" in capsys.readouterr().err


def test_help_lists_usage(capsys):
    main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m pipeline.inspect")


VGG = ["source=keras_app", "source.name=VGG16", "source.weights=null", "source.input_shape=[32,32,3]"]


def _cut_points(out: str) -> list[str]:
    return out[out.index("cut points:"):out.index("freeze units:")].splitlines()


def test_keras_sources_list_the_layers_to_cut_at_with_their_output_shapes():
    import keras

    app = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    expected = [(layer.name, tuple(layer.output.shape[1:])) for layer in app.layers[1:]]  # not the input
    lines = _cut_points(inspect_source(VGG))
    assert lines[0] == f"cut points:        {len(expected)} (for source.layer; top first, with output shapes)"
    listed = [(line.split()[0], line.split(maxsplit=1)[1].strip()) for line in lines[1:]]
    assert listed == [(name, str(shape)) for name, shape in reversed(expected)]  # no `pooling` layer

    out = inspect_source([*VGG, "source.layer=block3_pool", "source.pooling=flatten"])
    assert "feature shape:     (4096,)" in out  # 4 x 4 x 256
    assert [line.split()[0] for line in _cut_points(out)[1:3]] == ["block3_pool", "block3_conv3"]
    assert "block4_conv1" not in out


def test_an_unknown_layer_names_the_command_that_lists_them_all(capsys):
    with pytest.raises(SystemExit) as caught:
        main([*VGG, "source.layer=block4pool"])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: source.layer='block4pool' is not a layer of") and "\n" not in err
    assert "closest: block4_pool" in err
    command = err.rsplit(": ", 1)[1].split()
    assert command[:3] == ["python", "-m", "pipeline.inspect"]
    assert "\n    block4_pool  " in inspect_source(command[3:])


def test_a_long_list_of_cut_points_keeps_its_ends_and_where_blocks_end():
    import keras

    from pipeline.sources.backbone import build_backbone
    from pipeline.sources.cut import cut

    inputs = keras.Input((4,))
    x = inputs
    for i in range(48):
        y = keras.layers.Dense(4, name=f"dense_{i}")(x)
        x = keras.layers.Add(name=f"add_{i}")([x, y]) if i == 15 else y  # dense_14 feeds two layers
    model = cut(keras.Model(inputs, x), None, None, "net", "net", "")
    out = describe_source(build_backbone(model, (4,), "none", "keras:test"), cut_points=True)
    lines = _cut_points(out)
    assert lines[0].startswith("cut points:        49 ")  # 48 Dense, 1 Add
    assert [line.split()[0] for line in lines[1:3]] == ["dense_47", "dense_46"]
    assert lines[31] == "    ...   (9 more; among them, feeding several layers: dense_14)"
    assert lines[-1].split()[0] == "dense_0" and len(lines) == 1 + 30 + 1 + 10


def test_a_saved_model_source_with_a_layer_fails_saying_why(keras_export, capsys):
    with pytest.raises(SystemExit):
        main(["source=saved_model", f"source.path={keras_export[0]}", "source.layer=conv"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: source.layer='conv': a SavedModel cannot be cut at a layer") and "\n" not in err
