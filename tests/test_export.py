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
from pipeline.errors import ConfigError, ExportError
from pipeline.export import Exporter
from pipeline.freeze import FreezeNone
from pipeline.heads import LinearHead
from pipeline.sources.hub import HubSource
from pipeline.types import DataBundle

CLASSES = ("cat", "dog", "eel")
# The TFLite client the issue names; its successor (ai-edge-litert) is not a dependency.
pytestmark = pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")


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
    result = Exporter(formats=["saved_model", "keras", "tflite"]).export(
        adapted, _data(_images()), destination
    )
    return adapted, result, destination


def test_saved_model_serves_the_in_memory_predictions(exported):
    import tensorflow as tf

    adapted, result, destination = exported
    images = _images(10, seed=5)  # not the images the export was verified on
    expected = adapted.model.predict(images, verbose=0)
    serving = tf.saved_model.load(str(destination / "saved_model")).signatures["serving_default"]
    assert set(serving.structured_input_signature[1]) == {"images"}
    outputs = serving(images=tf.constant(images))
    assert set(outputs) == {"probabilities", "class_name", "class_names"}
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-5)
    names = [name.decode() for name in outputs["class_name"].numpy()]
    assert names == [CLASSES[i] for i in np.argmax(expected, axis=1)]
    assert len(set(names)) > 1  # the check above is not vacuous
    columns = outputs["class_names"].numpy()  # the class of each probability column, per row
    assert columns.shape == (10, 3) and all(list(map(bytes.decode, row)) == list(CLASSES) for row in columns)


def _as_training_saw(pixels, resize="resize"):
    """What the data stage makes of these pixels: whole values, then its resize policy."""
    from pipeline.data.decode import fit

    whole = np.clip(np.round(pixels), 0, 255).astype("uint8")
    return np.stack([fit(image, (8, 8), resize).numpy() for image in whole]).astype("float32")


def test_serving_default_resizes_images_of_any_size(exported):
    import tensorflow as tf

    adapted, _, destination = exported
    large = np.repeat(np.repeat(_images(6, seed=7), 3, axis=1), 2, axis=2)  # 24 x 16
    serving = tf.saved_model.load(str(destination / "saved_model")).signatures["serving_default"]
    expected = adapted.model.predict(_as_training_saw(large), verbose=0)
    np.testing.assert_allclose(serving(images=tf.constant(large))["probabilities"].numpy(), expected, atol=1e-5)
    # RGB pixels for a grayscale model: converted as the data stage converts RGB files.
    rgb = np.repeat(large, 3, axis=-1)
    np.testing.assert_allclose(serving(images=tf.constant(rgb))["probabilities"].numpy(), expected, atol=1e-5)


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0], mode="L").save(buffer, format=image_format)
    return buffer.getvalue()


def test_uint8_and_encoded_file_signatures_serve_the_same_predictions(exported):
    import io

    import tensorflow as tf
    from PIL import Image

    adapted, _, destination = exported
    signatures = tf.saved_model.load(str(destination / "saved_model")).signatures
    pixels = np.round(_images(6, seed=8)).astype("uint8")
    expected = adapted.model.predict(pixels.astype("float32"), verbose=0)
    uint8 = signatures["serving_uint8"](images=tf.constant(pixels))
    np.testing.assert_allclose(uint8["probabilities"].numpy(), expected, atol=1e-5)
    for image_format in ("PNG", "BMP", "GIF"):  # lossless for 8-bit gray
        files = tf.constant([_encode(image, image_format) for image in pixels])
        served = signatures["serving_bytes"](images=files)
        np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5, err_msg=image_format)
        assert [n.decode() for n in served["class_name"].numpy()] == [
            CLASSES[i] for i in np.argmax(expected, axis=1)
        ]
    # JPEG is lossy: compare with what another decoder (Pillow) reads from the same files.
    jpegs = [_encode(image, "JPEG") for image in pixels]
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("L")) for f in jpegs])[..., None]
    served = signatures["serving_bytes"](images=tf.constant(jpegs))["probabilities"].numpy()
    np.testing.assert_allclose(served, adapted.model.predict(decoded.astype("float32"), verbose=0), atol=2e-2)
    # A file of another size is resized inside, like serving_default does.
    big = np.kron(pixels[:1], np.ones((1, 2, 2, 1), dtype="uint8"))  # 16 x 16
    served = signatures["serving_bytes"](images=tf.constant([_encode(big[0], "PNG")]))
    want = adapted.model.predict(_as_training_saw(big), verbose=0)
    np.testing.assert_allclose(served["probabilities"].numpy(), want, atol=1e-5)


def _saved_model_cli(*args: str) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).parent / "saved_model_cli"
    return subprocess.run(
        [str(cli), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def test_saved_model_cli_shows_the_serving_signatures(exported):
    _, _, destination = exported
    done = _saved_model_cli("show", "--dir", str(destination / "saved_model"), "--all")
    assert done.returncode == 0, done.stderr[-2000:]
    sections = {
        name: done.stdout.split(f"signature_def['{name}']", 1)[1].split("signature_def[", 1)[0]
        for name in ("serving_default", "serving_uint8", "serving_bytes")
    }
    for name, dtype, shape in (
        ("serving_default", "DT_FLOAT", "(-1, -1, -1, -1)"),  # any size, 1-4 channels
        ("serving_uint8", "DT_UINT8", "(-1, -1, -1, -1)"),
        ("serving_bytes", "DT_STRING", "(-1)"),
    ):
        section = sections[name]
        inputs = section.split("outputs[", 1)[0]
        assert "inputs['images']" in inputs and dtype in inputs and f"shape: {shape}" in inputs, name
        for output in ("probabilities", "class_name", "class_names"):
            assert f"outputs['{output}']" in section, (name, output)


def test_saved_model_cli_run_on_the_shipped_input_example(exported, tmp_path):
    adapted, _, destination = exported
    example = destination / "input_example.npy"
    done = _saved_model_cli(
        "run", "--dir", str(destination / "saved_model"), "--tag_set", "serve",
        "--signature_def", "serving_default", "--inputs", f"images={example}",
        "--outdir", str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    images = np.load(example)
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.float32
    expected = adapted.model.predict(images, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "probabilities.npy"), expected, atol=1e-5)
    names = [n.decode() if isinstance(n, bytes) else n for n in np.load(tmp_path / "class_name.npy", allow_pickle=True)]
    assert names == [CLASSES[i] for i in np.argmax(expected, axis=1)]


def test_keras_format_reloads_and_predicts_the_same(exported):
    import keras

    adapted, result, destination = exported
    images = _images(10, seed=6)
    model = keras.saving.load_model(destination / "model.keras")
    np.testing.assert_allclose(
        model.predict(images, verbose=0), adapted.model.predict(images, verbose=0), atol=1e-5
    )


@pytest.mark.parametrize("imports", ["import pipeline, keras", "import keras, pipeline", "import pipeline, tensorflow, keras"])
def test_keras_file_loads_in_a_fresh_python_after_import_pipeline(exported, tmp_path, imports):
    """What a consumer does: a plain `import pipeline`, nothing else of ours, in either order."""
    adapted, _, destination = exported
    images = _images(5, seed=11)
    np.save(tmp_path / "images.npy", images)
    script = (
        f"{imports}; import numpy as np\n"
        f"model = keras.saving.load_model({str(destination / 'model.keras')!r})\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, model.predict(np.load({str(tmp_path / 'images.npy')!r}), verbose=0))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), adapted.model.predict(images, verbose=0), atol=1e-5)


def test_import_pipeline_alone_does_not_import_tensorflow():
    done = subprocess.run([sys.executable, "-c", "import sys, pipeline; print('tensorflow' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_keras_file_needs_no_source_folder(hub_model_dir, tmp_path):
    import shutil

    import keras

    source = tmp_path / "source"
    shutil.copytree(hub_model_dir, source)
    adapted = _adapted(source)
    _spread(adapted, seed=3)
    hub = adapted.backbone.get_layer("hub")
    for variable in hub.loaded.variables:  # as fine-tuning would: the file must keep these
        variable.assign(variable * 1.5)
    result = Exporter(formats=["keras"]).export(adapted, _data(_images()), tmp_path / "export")
    shutil.rmtree(source)  # the source folder moved away
    images = _images(10, seed=9)
    model = keras.saving.load_model(result.paths["keras"])
    np.testing.assert_allclose(
        model.predict(images, verbose=0), adapted.model.predict(images, verbose=0), atol=1e-5
    )
    # And again from a file written by the reloaded model, which has no source folder at all.
    model.save(tmp_path / "again.keras")
    again = keras.saving.load_model(tmp_path / "again.keras")
    np.testing.assert_allclose(
        again.predict(images, verbose=0), adapted.model.predict(images, verbose=0), atol=1e-5
    )


def _interpreter_outputs(path: Path, images: np.ndarray):
    """What a TFLite client does: the interpreter, the input tensor resized to the batch."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    (image_input,) = interpreter.get_input_details()
    assert list(image_input["shape_signature"]) == [-1, 8, 8, 1]
    assert image_input["dtype"] == np.float32
    interpreter.resize_tensor_input(image_input["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(image_input["index"], images)
    interpreter.invoke()
    (output,) = interpreter.get_output_details()
    tensor_types = {detail["dtype"] for detail in interpreter.get_tensor_details()}
    return interpreter.get_tensor(output["index"]), tensor_types


def test_tflite_runs_in_the_interpreter_like_the_in_memory_model(exported):
    adapted, result, destination = exported
    images = _images(10, seed=10)
    probabilities, _ = _interpreter_outputs(destination / "model.tflite", images)
    np.testing.assert_allclose(probabilities, adapted.model.predict(images, verbose=0), atol=1e-4)
    assert result.accuracy_delta == {"tflite": pytest.approx(0.0, abs=1e-9)}


@pytest.mark.parametrize("quantization,stored", [("float16", np.float16), ("int8", np.int8)])
def test_quantized_tflite_is_quantized_and_close(hub_model_dir, tmp_path, quantization, stored):
    adapted = _adapted(hub_model_dir)
    _spread(adapted, seed=1)
    result = Exporter(formats=["tflite"], quantization=quantization).export(
        adapted, _data(_images()), tmp_path / "export"
    )
    images = _images(24, seed=11)
    probabilities, tensor_types = _interpreter_outputs(result.paths["tflite"], images)
    assert stored in tensor_types  # the weights really are stored in the smaller type
    expected = adapted.model.predict(images, verbose=0)
    np.testing.assert_allclose(probabilities, expected, atol=0.1 if quantization == "int8" else 1e-2)
    assert 0.0 < result.max_abs_diff["tflite"] <= (0.25 if quantization == "int8" else 1e-2)
    # The reported accuracy change, recomputed: the interpreter's accuracy on the images the
    # export checks (test, val, then train split of _data) minus the in-memory model's.
    checked = np.concatenate([_images(), _images()[:4], _images()])
    labels = np.concatenate([np.arange(24), np.arange(4), np.arange(24)]) % len(CLASSES)
    served, _ = _interpreter_outputs(result.paths["tflite"], checked)
    in_memory = adapted.model.predict(checked, verbose=0)
    delta = np.mean(served.argmax(1) == labels) - np.mean(in_memory.argmax(1) == labels)
    assert result.accuracy_delta["tflite"] == pytest.approx(delta, abs=1e-9)
    # Not vacuous: int8 flips some of _spread's near-ties here, float16 none.
    assert delta != 0 if quantization == "int8" else delta == 0
    assert set(result.metrics) == {"export_tflite_max_abs_diff", "export_tflite_accuracy_delta"}


def test_result_labels_and_layout(exported):
    _, result, destination = exported
    assert result.root == destination
    assert result.paths == {
        "saved_model": destination / "saved_model",
        "keras": destination / "model.keras",
        "tflite": destination / "model.tflite",
    }
    assert set(result.max_abs_diff) == {"saved_model", "keras", "tflite"}
    assert all(0.0 <= diff <= 1e-4 for diff in result.max_abs_diff.values())
    assert result.metrics["export_saved_model_max_abs_diff"] == result.max_abs_diff["saved_model"]
    assert "export_tflite_accuracy_delta" in result.metrics
    assert (destination / "labels.txt").read_text() == "cat\ndog\neel\n"
    assert (destination / "saved_model" / "saved_model.pb").is_file()
    assert sorted(p.name for p in destination.iterdir()) == [
        "input_example.npy", "labels.txt", "model.keras", "model.tflite", "saved_model",
    ]  # the TFLite converter's scratch SavedModel is gone
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


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"tolerance": -1.0}, r"saved_model.*export\.tolerance"),
        ({"formats": ["tflite"], "tflite_tolerance": -1.0}, r"tflite.*export\.tflite_tolerance"),
    ],
)
def test_a_failed_verification_leaves_nothing(exported, tmp_path, settings, message):
    adapted, _, _ = exported
    destination = tmp_path / "export"
    with pytest.raises(ExportError, match=message):
        Exporter(**settings).export(adapted, _data(_images()), destination)
    assert not destination.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory either


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"export\.formats=\['coreml'\].*saved_model, keras, tflite, onnx"):
        Exporter(formats=["coreml"])
    with pytest.raises(ConfigError, match=r"export\.quantization='int4'.*none, float16, int8"):
        Exporter(quantization="int4")


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
    columns = outputs["class_names"].numpy()
    if task == "binary":
        assert p.shape == (len(images), 1)  # the head's one sigmoid column: P(yes) ...
        expected = ["yes" if value > 0.5 else "no" for value in p[:, 0]]
        # ... served as both classes' probabilities, named like every other task's columns.
        assert [n.decode() for n in columns[0]] == ["no", "yes"]
        np.testing.assert_allclose(outputs["probabilities"].numpy(), np.hstack([1 - p, p]), atol=1e-6)
    else:
        expected = [class_names[i] for i in np.argmax(p, axis=1)]
        assert [n.decode() for n in columns[0]] == list(class_names)
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


def test_onnx_runs_in_onnx_runtime_like_the_in_memory_model(hub_model_dir, tmp_path):
    """`export.formats=[onnx]`: a fine-tuned TF Hub model, read back by ONNX Runtime."""
    onnxruntime = pytest.importorskip("onnxruntime")
    adapted = _adapted(hub_model_dir, task="binary", class_names=("no", "yes"))
    _spread(adapted, seed=4)
    result = Exporter(formats=["onnx"]).export(adapted, _data(_images(), class_names=("no", "yes")),
                                                tmp_path / "export")
    session = onnxruntime.InferenceSession(str(result.paths["onnx"]), providers=["CPUExecutionProvider"])
    images = _images(10, seed=12)
    (probabilities,) = session.run(["probabilities"], {"images": images})
    p = adapted.model.predict(images, verbose=0)
    np.testing.assert_allclose(probabilities, np.hstack([1 - p, p]), atol=1e-5)  # both classes, in order
    assert len(set(np.argmax(probabilities, axis=1))) > 1
    assert result.max_abs_diff["onnx"] <= 1e-5


def test_onnx_without_its_packages_names_the_extra(exported, tmp_path, monkeypatch):
    import sys

    adapted, _, _ = exported
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as if not installed
    with pytest.raises(ExportError, match=r'pip install -e "\.\[onnx\]"'):
        Exporter(formats=["onnx"]).export(adapted, _data(_images()), tmp_path / "export")
    assert not (tmp_path / "export").exists() and not _partials(tmp_path)


def _cached_features(adapted, data):
    """What the feature cache holds for `data`: the backbone's outputs per split, with labels."""
    import tensorflow as tf

    def split(dataset):
        images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
        return tf.data.Dataset.from_tensor_slices((adapted.backbone.predict(np.stack(images), verbose=0),
                                                   np.stack(labels)))

    return {name: split(getattr(data, name)) for name in ("train", "val", "test")}


def test_with_the_feature_cache_the_export_is_checked_against_the_head_on_it(hub_model_dir, tmp_path):
    adapted = _adapted(hub_model_dir)
    _spread(adapted, seed=4)
    data = _data(_images())
    features = _cached_features(adapted, data)

    def whole_model_pass(*args, **kwargs):
        raise AssertionError("the whole model ran: the cached features were not used")

    adapted.model.predict = whole_model_pass
    result = Exporter().export(adapted, data, tmp_path / "export", features=features)
    assert result.max_abs_diff["saved_model"] < 1e-5

    # Features that are not the exported backbone's (what evaluation would then have
    # scored) fail the check instead of passing it.
    wrong = {name: dataset.map(lambda f, y: (f * 0.0 + 1.0, y)) for name, dataset in features.items()}
    with pytest.raises(ExportError, match="differ from the in-memory model"):
        Exporter().export(adapted, data, tmp_path / "wrong", features=wrong)
    assert not (tmp_path / "wrong").exists()


def test_a_file_signature_that_serves_other_pixels_is_refused(hub_model_dir, tmp_path, monkeypatch):
    # The signatures' first calls run side by side (pipeline.export._first_calls); each
    # result is still compared: serving_bytes decoding to darker pixels fails the check.
    import pipeline.data.decode as decode

    decode_bytes = decode.decode_bytes
    monkeypatch.setattr(decode, "decode_bytes", lambda *args, **kwargs: decode_bytes(*args, **kwargs) // 2)
    adapted = _adapted(hub_model_dir)
    _spread(adapted, seed=4)
    with pytest.raises(ExportError, match="saved_model export's predictions differ"):
        Exporter().export(adapted, _data(_images()), tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_the_export_calls_the_backbone_that_the_feature_pass_traced(hub_model_dir, tmp_path, monkeypatch):
    from pipeline.features import FeatureCache

    adapted = _adapted(hub_model_dir)
    _spread(adapted, seed=4)
    data = _data(_images())
    cache = FeatureCache(tmp_path / "cache")
    features, hit = cache.load_or_compute(adapted.backbone, data, batch_size=8)
    assert not hit and cache.backbone_function is not None
    calls = []
    call = adapted.backbone.call
    monkeypatch.setattr(adapted.backbone, "call", lambda *args, **kwargs: calls.append(1) or call(*args, **kwargs))

    result = Exporter().export(adapted, data, tmp_path / "export", features=features,
                               backbone_function=cache.backbone_function)
    assert calls == []  # neither traced nor run again: the SavedModel calls the pass's function
    assert result.max_abs_diff["saved_model"] < 1e-5  # and serves what the trained model computes
    served = _load_serving_default(result.paths["saved_model"])
    np.testing.assert_allclose(served(_images()), adapted.model.predict(_images(), verbose=0), atol=1e-5)

    Exporter().export(adapted, data, tmp_path / "traced", features=features)
    assert calls  # without it, the export traces the backbone itself


def _load_serving_default(path):
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    return lambda images: signature(images=tf.constant(images))["probabilities"].numpy()


def test_a_backbone_function_on_other_inputs_is_not_called(hub_model_dir):
    import tensorflow as tf

    from pipeline.export import _composed

    adapted = _adapted(hub_model_dir)
    for spec in (tf.TensorSpec((None, 8, 8, 1), tf.uint8), tf.TensorSpec((None, 16, 16, 1), tf.float32)):
        function = tf.function(lambda x: adapted.backbone(tf.cast(x, tf.float32)), input_signature=[spec])
        assert _composed(adapted, function) is None
    same = tf.function(lambda x: adapted.backbone(x), input_signature=[tf.TensorSpec((None, 8, 8, 1), tf.float32)])
    assert _composed(adapted, same) is not None
