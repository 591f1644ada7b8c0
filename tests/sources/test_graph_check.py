"""What a SavedModel graph stored in a `.keras` file may do: read from saved_model.pb, not run."""

from __future__ import annotations

import shutil

import pytest

from pipeline.errors import SourceError
from pipeline.sources.graph_check import check_saved_model, checked_graphs, trusted_graphs, unsafe_ops

_SAVER_OPS = {"SaveV2", "RestoreV2", "MergeV2Checkpoints"}


def save_module(directory, secret: str, mode: str = "read"):
    """A TF Hub-style SavedModel on 8x8x1 images whose `__call__` also does `mode` with `secret`."""
    import tensorflow as tf

    root = tf.train.Checkpoint()  # a plain trackable, as TF Hub's own examples save
    root.scale = tf.Variable(1.0)
    root.variables = [root.scale]  # the TF Hub format's lists, which SavedModelLayer tracks
    root.trainable_variables = [root.scale]

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32)])
    def call(images):
        features = tf.reduce_mean(images, axis=[1, 2]) * root.scale
        zero = tf.constant(0.0)
        if mode == "read":
            zero = tf.cast(tf.strings.length(tf.io.read_file(secret)), tf.float32) * 0.0
        elif mode == "write":
            tf.io.write_file(secret, "written by a model")
        elif mode == "read_in_a_branch":  # only reachable through If's then_branch
            zero = tf.cond(
                tf.reduce_sum(images) >= 0,
                lambda: tf.cast(tf.strings.length(tf.io.read_file(secret)), tf.float32) * 0.0,
                lambda: tf.constant(0.0),
            )
        elif mode == "python":
            zero = tf.py_function(lambda: 0.0, [], tf.float32)
        elif mode == "dataset":
            lines = tf.data.TextLineDataset([secret]).reduce(0, lambda count, _: count + 1)
            zero = tf.cast(lines, tf.float32) * 0.0
        elif mode == "print_to_file":
            tf.print("features", output_stream=f"file://{secret}")
        elif mode == "print":
            tf.print("features")
        return features + zero

    root.__call__ = call
    tf.saved_model.save(root, str(directory))
    return directory


def _library_ops(directory) -> set[str]:
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((directory / "saved_model.pb").read_bytes())
    library = saved_model.meta_graphs[0].graph_def.library
    return {node.op for function in library.function for node in function.node_def}


@pytest.mark.parametrize("kind", ["demo", "tf_keras", "keras3_saved_model", "keras3_export"])
def test_usual_saved_models_pass_though_their_saver_functions_write_files(kind, hub_model_dir, tmp_path):
    import tensorflow as tf

    from pipeline.config import ASSETS
    from test_saved_model import make_keras_model

    directory = {"demo": ASSETS / "digits_0to4", "tf_keras": hub_model_dir}.get(kind, tmp_path / kind)
    if kind == "keras3_saved_model":
        tf.saved_model.save(make_keras_model(), str(directory))
    elif kind == "keras3_export":
        make_keras_model().export(str(directory), verbose=False)
    # The file holds the standard saver functions, which a scan of every function would flag;
    # only the graph_def's saver nodes call them, never the restored objects.
    assert _SAVER_OPS <= _library_ops(directory)
    assert unsafe_ops(directory) == []
    check_saved_model(directory, "the demo")  # no error


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("read", ["ReadFile"]),
        ("write", ["WriteFile"]),
        ("read_in_a_branch", ["ReadFile"]),
        ("python", ["EagerPyFunc"]),
        ("dataset", ["TextLineDataset"]),
        ("print_to_file", ["PrintV2"]),
        ("print", []),  # printing to stderr touches no file
    ],
)
def test_ops_that_touch_files_or_run_python_are_named(mode, expected, tmp_path):
    directory = save_module(tmp_path / "model", str(tmp_path / "secret.txt"), mode)
    assert unsafe_ops(directory) == expected


def test_a_table_read_from_its_own_asset_passes_and_one_from_elsewhere_does_not(tmp_path):
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("cat\ndog\n")

    class Lookup(tf.Module):
        def __init__(self):
            super().__init__()
            initializer = tf.lookup.TextFileInitializer(
                str(vocabulary), tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
            )
            self.table = tf.lookup.StaticHashTable(initializer, -1)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, words):
            return self.table.lookup(words)

    original = tmp_path / "lookup"
    tf.saved_model.save(Lookup(), str(original))
    assert "InitializeTableFromTextFileV2" in _library_ops(original)
    assert unsafe_ops(original) == []  # the file is assets/vocabulary.txt, inside the SavedModel

    def edited(name, edit):
        directory = tmp_path / name
        shutil.copytree(original, directory)
        saved_model = saved_model_pb2.SavedModel()
        saved_model.ParseFromString((directory / "saved_model.pb").read_bytes())
        edit(saved_model.meta_graphs[0])
        (directory / "saved_model.pb").write_bytes(saved_model.SerializeToString())
        return directory

    def escape(meta):
        meta.asset_file_def[0].filename = "../../../etc/passwd"

    assert unsafe_ops(edited("escaped", escape)) == ["<asset '../../../etc/passwd' outside assets/>"]

    def constant_path(meta):  # the initializer's file name bound to a constant, not the asset
        objects = meta.object_graph_def
        constant = next(i for i, node in enumerate(objects.nodes) if node.WhichOneof("kind") == "constant")
        for function in objects.concrete_functions.values():
            for index, node_id in enumerate(function.bound_inputs):
                if objects.nodes[node_id].WhichOneof("kind") == "asset":
                    function.bound_inputs[index] = constant

    assert unsafe_ops(edited("constant", constant_path)) == ["InitializeTableFromTextFileV2"]

    # Saved again after loading (an export, a .keras file whose source folder is gone): the
    # asset reaches the initializer through a call op, and is still recognised as the asset.
    resaved = tmp_path / "resaved"
    tf.saved_model.save(tf.saved_model.load(str(original)), str(resaved))
    original = resaved
    assert unsafe_ops(resaved) == []
    assert unsafe_ops(edited("resaved-constant", constant_path)) == ["InitializeTableFromTextFileV2"]


def test_a_tf1_saved_model_is_not_passed(tmp_path):
    from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

    saved_model = saved_model_pb2.SavedModel(meta_graphs=[meta_graph_pb2.MetaGraphDef()])
    (tmp_path / "saved_model.pb").write_bytes(saved_model.SerializeToString())
    assert unsafe_ops(tmp_path) == ["<a TF1 graph, which runs whole at load>"]


def test_a_refusal_names_the_ops_and_the_fix_and_trust_lifts_it(tmp_path):
    directory = save_module(tmp_path / "model", str(tmp_path / "secret.txt"), "read")
    with pytest.raises(SourceError) as caught:
        check_saved_model(directory, "the SavedModel in model.keras")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("the SavedModel in model.keras runs TensorFlow ops")
    assert "(ReadFile)" in message and "source.allow_unsafe=true" in message
    with checked_graphs() as refused:
        with pytest.raises(SourceError):
            check_saved_model(directory, "the SavedModel in model.keras")
    assert [str(error) for error in refused] == [message]
    with trusted_graphs():
        check_saved_model(directory, "the SavedModel in model.keras")  # no error
    with pytest.raises(SourceError):  # trust ends with the block
        check_saved_model(directory, "the SavedModel in model.keras")
