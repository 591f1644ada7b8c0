"""The export stage: what is served is what was trained, and nothing half-written is left."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.adapt import adapt
from pipeline.errors import ExportError
from pipeline.export import Exporter
from pipeline.freeze import FreezeNone
from pipeline.heads import LinearHead
from pipeline.sources.hub import HubSource
from pipeline.types import DataBundle

CLASSES = ("cat", "dog", "eel")


def _adapted(hub_model_dir, task="multiclass", class_names=CLASSES):
    source = HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1]).load()
    return adapt(source, LinearHead(), FreezeNone(), class_names, (8, 8, 1), task)


def _data(images, num_test=None, class_names=CLASSES):
    import tensorflow as tf

    labels = np.arange(len(images)) % len(class_names)
    test = len(images) if num_test is None else num_test
    return DataBundle(
        train=tf.data.Dataset.from_tensor_slices((images, labels)),
        val=tf.data.Dataset.from_tensor_slices((images[:4], labels[:4])),
        test=tf.data.Dataset.from_tensor_slices((images[:test], labels[:test])),
        class_names=class_names,
        input_shape=(8, 8, 1),
    )


def _images(n=24, seed=0):
    # Brightness varies from image to image, so the pooled features (and predictions) do.
    rng = np.random.default_rng(seed)
    brightness = rng.uniform(0, 255, size=(n, 1, 1, 1))
    return (brightness * rng.uniform(0, 1, size=(n, 8, 8, 1))).astype("float32")


def _spread(adapted, seed):
    """Random head weights, centred so that the predicted class varies across `_images()`."""
    rng = np.random.default_rng(seed)
    dense = adapted.head.get_layer("probabilities")
    kernel = (3 * rng.normal(size=dense.kernel.shape)).astype("float32")
    logits = adapted.backbone.predict(_images(), verbose=0) @ kernel
    dense.kernel.assign(kernel)
    dense.bias.assign(-np.median(logits, axis=0).astype("float32"))


def _partials(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if "partial" in p.name]


@pytest.fixture(scope="module")
def exported(hub_model_dir, tmp_path_factory):
    adapted = _adapted(hub_model_dir)
    _spread(adapted, seed=1)  # a reload of initial weights would show
    destination = tmp_path_factory.mktemp("export") / "run" / "export"
    result = Exporter(formats=["saved_model", "keras"]).export(adapted, _data(_images()), destination)
    return adapted, result, destination


def test_saved_model_serves_the_in_memory_predictions(exported):
    import tensorflow as tf

    adapted, result, destination = exported
    images = _images(10, seed=5)  # not the images the export was verified on
    expected = adapted.model.predict(images, verbose=0)
    serving = tf.saved_model.load(str(destination / "saved_model")).signatures["serving_default"]
    assert set(serving.structured_input_signature[1]) == {"images"}
    outputs = serving(images=tf.constant(images))
    assert set(outputs) == {"probabilities", "class_name"}
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-5)
    names = [name.decode() for name in outputs["class_name"].numpy()]
    assert names == [CLASSES[i] for i in np.argmax(expected, axis=1)]
    assert len(set(names)) > 1  # the check above is not vacuous


def test_saved_model_cli_shows_the_serving_signature(exported):
    _, _, destination = exported
    cli = Path(sys.executable).parent / "saved_model_cli"
    done = subprocess.run(
        [str(cli), "show", "--dir", str(destination / "saved_model"), "--all"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    section = done.stdout.split("signature_def['serving_default']", 1)[1]
    assert "inputs['images']" in section
    assert "shape: (-1, 8, 8, 1)" in section
    assert "outputs['probabilities']" in section and "outputs['class_name']" in section


def test_keras_format_reloads_and_predicts_the_same(exported):
    import keras

    adapted, result, destination = exported
    images = _images(10, seed=6)
    model = keras.saving.load_model(destination / "model.keras")
    np.testing.assert_allclose(
        model.predict(images, verbose=0), adapted.model.predict(images, verbose=0), atol=1e-5
    )


def test_result_labels_and_layout(exported):
    _, result, destination = exported
    assert result.root == destination
    assert result.paths == {
        "saved_model": destination / "saved_model",
        "keras": destination / "model.keras",
    }
    assert set(result.max_abs_diff) == {"saved_model", "keras"}
    assert all(0.0 <= diff <= 1e-5 for diff in result.max_abs_diff.values())
    assert (destination / "labels.txt").read_text() == "cat\ndog\neel\n"
    assert (destination / "saved_model" / "saved_model.pb").is_file()
    assert not _partials(destination.parent)  # the staging directory became the export


def test_export_has_the_permissions_of_any_new_directory(exported):
    _, _, destination = exported
    reference = destination.parent / "reference"
    reference.mkdir()
    try:
        assert stat.S_IMODE(destination.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    finally:
        reference.rmdir()


def test_an_existing_destination_is_refused(exported, tmp_path):
    adapted, _, _ = exported
    destination = tmp_path / "export"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        Exporter().export(adapted, _data(_images()), destination)
    assert [p.name for p in destination.iterdir()] == ["keep.txt"]


def test_a_failed_verification_leaves_nothing(exported, tmp_path):
    adapted, _, _ = exported
    destination = tmp_path / "export"
    with pytest.raises(ExportError, match=r"saved_model.*export\.tolerance"):
        Exporter(tolerance=-1.0).export(adapted, _data(_images()), destination)
    assert not destination.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory either


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_class_name_for_sigmoid_outputs(hub_model_dir, tmp_path, task):
    import tensorflow as tf

    class_names = ("no", "yes") if task == "binary" else ("red", "round", "ripe", "sweet")
    adapted = _adapted(hub_model_dir, task=task, class_names=class_names)
    _spread(adapted, seed=2)
    images = _images()
    result = Exporter().export(adapted, _data(images, class_names=class_names), tmp_path / "export")
    serving = tf.saved_model.load(str(result.paths["saved_model"])).signatures["serving_default"]
    outputs = serving(images=tf.constant(images))
    p = adapted.model.predict(images, verbose=0)
    names = [name.decode() for name in outputs["class_name"].numpy()]
    if task == "binary":
        assert p.shape == (len(images), 1)
        expected = ["yes" if value > 0.5 else "no" for value in p[:, 0]]
    else:
        expected = [class_names[i] for i in np.argmax(p, axis=1)]
    assert names == expected and len(set(names)) > 1


def test_verification_works_without_a_test_split(exported, tmp_path):
    adapted, _, _ = exported
    result = Exporter().export(adapted, _data(_images(), num_test=0), tmp_path / "export")
    assert result.max_abs_diff["saved_model"] <= 1e-5
    assert (tmp_path / "export" / "saved_model" / "saved_model.pb").is_file()


_KILLED_MIDWAY = r"""
import os, signal, sys
from pathlib import Path

sys.path.insert(0, sys.argv[3])
import test_export as t

def killed(source, destination):
    # The SavedModel is fully written and verified; die before it is moved into place.
    assert (Path(source) / "saved_model" / "saved_model.pb").is_file()
    os.kill(os.getpid(), signal.SIGKILL)

os.replace = killed
adapted = t._adapted(Path(sys.argv[1]))
t.Exporter().export(adapted, t._data(t._images()), Path(sys.argv[2]))
print("export returned")
"""


def test_a_process_killed_midway_leaves_nothing_at_the_destination(hub_model_dir, tmp_path):
    destination = tmp_path / "run" / "export"
    here = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_MIDWAY, str(hub_model_dir), str(destination), str(here)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=here.parent,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(here.parent)},
    )
    assert done.returncode == -9, done.stderr[-3000:]
    assert "export returned" not in done.stdout
    assert not destination.exists()
    # What was left is a hidden staging directory beside it, never the export's own name.
    (partial,) = _partials(destination.parent)
    assert partial.name.startswith(".export-partial-")
    assert (partial / "saved_model" / "saved_model.pb").is_file()
