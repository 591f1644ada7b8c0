"""Oracle tests: the metrics a run reports are the metrics of the model it exports.

Each run trains on image files (or arrays) that this file makes, with sizes and aspect
ratios other than the training size. The oracle then shares none of the pipeline's code:
it reads the raw test files (or raw arrays) itself, sends them to the exported SavedModel
(`serving_bytes` for files, `serving_default` for pixels decoded by Pillow), to
`pipeline.predict` on the folders, and to the MLflow model, and recomputes every test
metric with scikit-learn. They must equal `metrics.json`.

The runs cover each value of every factor, and the pairs marked below (pairwise where the
options allow it: multilabel exists for `csv` only, `digits` has no files, resize policy
or determinism setting):

| run          | data         | resize            | task       | deterministic | channels | head |
|--------------|--------------|-------------------|------------|---------------|----------|------|
| folder_ap    | image_folder | aspect_preserving | multiclass | false         | 3        | linear (Keras) |
| folder_cp    | image_folder | crop_or_pad       | binary     | true          | 1        | sklearn LinearSVC |
| csv_ml       | csv          | resize            | multilabel | false         | 3        | linear (Keras) |
| csv_ap       | csv          | aspect_preserving | binary     | true          | 1        | linear (Keras) |
| tfrecord_cp  | tfrecord     | crop_or_pad       | multiclass | false         | 1        | linear (Keras) |
| tfrecord_r   | tfrecord     | resize            | binary     | true          | 3        | linear (Keras) |
| tfds_ap      | tfds         | aspect_preserving | multiclass | false         | 1        | linear (Keras) |
| tfds_cp      | tfds         | crop_or_pad       | binary     | true          | 3        | linear (Keras) |
| digits       | digits       | (8x8 arrays)      | multiclass | (fixed)       | 1        | sklearn StandardScaler + LogisticRegression |
| folder_svc   | image_folder | resize            | multiclass | true          | 3        | sklearn SVC (RBF: backbone/ + estimator.skops) |

Before the one-pass evaluation, `deterministic: false` runs reported metrics of
predictions paired with other images' labels; before the served pixel path, the
`aspect_preserving` and `crop_or_pad` runs served stretched images. Both fail here.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import compose

pytestmark = [
    pytest.mark.slow,
    # float32 softmax rows sum to 1 within 1e-7; scikit-learn warns and renormalizes.
    pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one"),
]
HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None

SIZE = 16  # the training size; the files are 14-24 pixels a side, of several aspect ratios
SHAPES = [(16, 16), (18, 24), (24, 18), (14, 16), (20, 20), (21, 16), (16, 21), (23, 23)]
# Class names in sorted order, as folder-based options name classes.
BRIGHTNESS = {"dark": 35, "dim": 95, "light": 160, "white": 225}  # multiclass: 4 classes
BINARY = {"day": 190, "night": 60}
PER_CLASS = {"train": 18, "val": 6, "test": 8}


# ----------------------------------------------------------------------------------------
# Data the tests make: pictures whose class is their brightness (and, multilabel, colour).


def picture(rng, brightness: float, shape, red: bool | None = None) -> np.ndarray:
    """uint8 RGB pixels of `shape`: a level plus noise and a tint that is not the class."""
    height, width = shape
    pixels = brightness + rng.normal(0, 12, (height, width, 3))
    tint = np.array([40.0, 0.0, -40.0]) if red else np.array([-40.0, 0.0, 40.0])
    if red is None:
        tint = rng.uniform(-15, 15, 3)
    return np.clip(pixels + tint, 0, 255).astype("uint8")


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def examples(levels: dict[str, float], seed: int):
    """`{split: [(pixels, class index), ...]}` with every shape in every split and class."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in PER_CLASS.items():
        splits[split] = [
            (picture(rng, level, SHAPES[(i + c) % len(SHAPES)]), c)
            for c, level in enumerate(levels.values())
            for i in range(count)
        ]
    return splits


def multilabel_examples(seed: int):
    """`{split: [(pixels, (bright, red)), ...]}`: two labels, each on or off."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in PER_CLASS.items():
        rows = []
        for i in range(count * 2):
            bright, red = bool(i % 2), bool((i // 2) % 2)
            rows.append((picture(rng, 190 if bright else 70, SHAPES[i % len(SHAPES)], red=red), (bright, red)))
        splits[split] = rows
    return splits


def write_folders(root: Path, splits, class_names) -> dict[str, list[tuple[Path, int]]]:
    """One folder per split, one subfolder per class; PNG and BMP (lossless) files."""
    files = {}
    for split, rows in splits.items():
        files[split] = []
        for index, (pixels, label) in enumerate(rows):
            fmt = ("png", "PNG") if index % 2 else ("bmp", "BMP")
            path = root / split / class_names[label] / f"{index:03d}.{fmt[0]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(pixels, fmt[1]))
            files[split].append((path, label))
    return files


def write_tfrecords(root: Path, splits, class_names) -> None:
    import tensorflow as tf

    root.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with tf.io.TFRecordWriter(str(root / f"{split}-00000.tfrecord")) as writer:
            for pixels, label in rows:
                feature = {
                    "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encode(pixels, "PNG")])),
                    "image/class/label": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[class_names[label].encode()])
                    ),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def prepare_tfds(data_dir: Path, name: str, splits, class_names) -> None:
    """A TFDS data set `name` (snake_case) with splits train/val/test, read back offline by name."""
    import tensorflow_datasets as tfds

    def info(self):
        features = {"image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=list(class_names))}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in splits}

    def generate_examples(self, split):
        for index, (pixels, label) in enumerate(splits[split]):
            yield index, {"image": pixels, "label": label}

    with tfds.core.registered.skip_registration():  # found by name in data_dir, as a user's copy
        builder = type(
            "".join(part.title() for part in name.split("_")),  # TFDS names it back in snake_case
            (tfds.core.GeneratorBasedBuilder,),
            {"VERSION": tfds.core.Version("1.0.0"), "_info": info,
             "_split_generators": split_generators, "_generate_examples": generate_examples},
        )
    builder(data_dir=str(data_dir)).download_and_prepare()


def hub_source(directory: Path, channels: int) -> Path:
    """A tiny tf_keras CNN on SIZE x SIZE x channels, saved in the TF Hub format."""
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    layers = tf_keras.layers
    inputs = tf_keras.Input(shape=(SIZE, SIZE, channels))
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(8, name="project")(x)
    tf.saved_model.save(tf_keras.Model(inputs, x), str(directory))
    return directory


# ----------------------------------------------------------------------------------------
# The oracle: raw inputs to the exported model, metrics by scikit-learn.


def served(saved_model: Path, files=None, arrays=None):
    """`(probabilities, class_name)` of the SavedModel for raw file bytes or raw pixel arrays."""
    import tensorflow as tf

    signatures = tf.saved_model.load(str(saved_model)).signatures
    if files is not None:
        outputs = signatures["serving_bytes"](images=tf.constant([Path(f).read_bytes() for f in files]))
        return outputs["probabilities"].numpy(), [n.decode() for n in outputs["class_name"].numpy()]
    probabilities, names = [], []
    for pixels in arrays:  # one call each: the images differ in size
        outputs = signatures["serving_default"](images=tf.constant(pixels[None].astype("float32")))
        probabilities.append(outputs["probabilities"].numpy()[0])
        names.append(outputs["class_name"].numpy()[0].decode())
    return np.stack(probabilities), names


def load_pyfunc(tmp_path: Path, run_dir: Path):
    """The run's MLflow model, loaded as MLflow serves it (`mlflow.pyfunc`) from the run's store."""
    import mlflow

    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        return mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    finally:
        mlflow.set_tracking_uri(previous)


def pyfunc_on_files(tmp_path: Path, run_dir: Path, paths):
    """The run's MLflow model on the files' Pillow-decoded pixels: a DataFrame of
    `class_name`, `probability`, `probabilities`."""
    model = load_pyfunc(tmp_path, run_dir)
    images = np.empty(len(paths), dtype=object)  # differently sized images: an object array
    images[:] = [np.asarray(Image.open(path).convert("RGB"), dtype="float32") for path in paths]
    return model.predict(images)


def sklearn_metrics(probabilities, labels, task: str, class_names, split: str = "test") -> dict[str, float]:
    """The pipeline's metric names, computed by scikit-learn from served probabilities."""
    from sklearn import metrics

    p = np.asarray(probabilities, dtype="float64")
    y = np.asarray(labels)
    if task == "multilabel":
        predicted = (p > 0.5).astype(int)
        loss = np.mean([metrics.log_loss(y[:, j], p[:, j], labels=[0, 1]) for j in range(y.shape[1])])
        found = {"loss": loss, "accuracy": 1.0 - metrics.hamming_loss(y, predicted)}
        precision, recall, f1, _ = metrics.precision_recall_fscore_support(y, predicted, zero_division=0)
    else:
        predicted = np.argmax(p, axis=1)
        k = len(class_names)
        found = {
            "loss": metrics.log_loss(y, p, labels=list(range(k))),
            "accuracy": metrics.accuracy_score(y, predicted),
        }
        if k > 3:
            found["top_3_accuracy"] = metrics.top_k_accuracy_score(y, p, k=3, labels=list(range(k)))
        if task == "binary":
            found["roc_auc"] = metrics.roc_auc_score(y, p[:, 1])
        precision, recall, f1, _ = metrics.precision_recall_fscore_support(
            y, predicted, labels=list(range(k)), zero_division=0
        )
    for kind, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        found[f"macro_{kind}"] = float(np.mean(values))
        found.update({f"{kind}_{name}": float(v) for name, v in zip(class_names, values)})
    return {f"{split}_{key}": float(value) for key, value in found.items()}


def assert_reported(run_dir: Path, oracle: dict[str, float], split: str = "test") -> None:
    reported = json.loads((run_dir / "metrics.json").read_text())
    ours = {k: v for k, v in reported.items() if k.startswith(f"{split}_")}
    assert sorted(ours) == sorted(oracle), "the run reports other metrics than the oracle computes"
    for key, value in oracle.items():
        assert reported[key] == pytest.approx(value, abs=1e-5), key


def assert_learned(probabilities, labels, task, floor=0.8):
    """A model at chance would let scrambled labels pass unnoticed: this one learned."""
    p, y = np.asarray(probabilities), np.asarray(labels)
    accuracy = np.mean((p > 0.5) == y) if task == "multilabel" else np.mean(np.argmax(p, 1) == y)
    assert accuracy >= floor, f"the fixture did not learn (accuracy {accuracy:.2f})"


# ----------------------------------------------------------------------------------------
# Runs: in this process, each with its own store and run directory.


def run(tmp_path: Path, source: Path, channels: int, *overrides: str) -> Path:
    from pipeline.runner import run as run_pipeline

    cfg = compose(
        [
            "source=hub",
            f"source.handle={source}",
            f"source.input_shape=[{SIZE},{SIZE},{channels}]",
            f"data.image_size=[{SIZE},{SIZE}]",
            f"data.channels={channels}",
            "train.epochs=12",
            "train.batch_size=16",
            "train.learning_rate=0.02",
            "train.verbose=0",
            f"train.feature_cache_dir={tmp_path / 'feature_cache'}",
            *overrides,
        ],
        tmp_path,
    )
    run_pipeline(cfg)
    return tmp_path / "run"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {channels: hub_source(root / f"rgb{channels}", channels) for channels in (1, 3)}


@pytest.fixture(scope="module")
def folder_ap(tmp_path_factory, sources):
    tmp_path = tmp_path_factory.mktemp("folder_ap")
    names = tuple(BRIGHTNESS)
    files = write_folders(tmp_path / "images", examples(BRIGHTNESS, seed=1), names)
    run_dir = run(
        tmp_path, sources[3], 3, "data=image_folder", f"data.train_dir={tmp_path / 'images/train'}",
        f"data.val_dir={tmp_path / 'images/val'}", f"data.test_dir={tmp_path / 'images/test'}",
        "data.resize=aspect_preserving", "data.deterministic=false",
    )
    return tmp_path, run_dir, files, names


def test_image_folder_aspect_preserving_nondeterministic(folder_ap):
    _, run_dir, files, names = folder_ap
    paths, labels = zip(*files["test"])
    probabilities, top = served(run_dir / "export/saved_model", files=paths)
    assert_learned(probabilities, labels, "multiclass")
    assert top == [names[i] for i in np.argmax(probabilities, axis=1)]
    assert_reported(run_dir, sklearn_metrics(probabilities, labels, "multiclass", names))
    # Pixels decoded by another decoder (Pillow) through serving_default: the same answers.
    pixels = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    from_pixels, _ = served(run_dir / "export/saved_model", arrays=pixels)
    np.testing.assert_allclose(from_pixels, probabilities, atol=1e-5)


def test_predict_on_the_test_folders_gives_the_reported_metrics(folder_ap):
    import csv

    from pipeline.predict import main

    tmp_path, run_dir, files, names = folder_ap
    output = tmp_path / "predictions.csv"
    folders = [str(tmp_path / "images/test" / name) for name in names]
    assert main([str(run_dir / "export"), *folders, "--top-k", str(len(names)), "--output", str(output)],
                output=lambda line: None) == 0
    rows = list(csv.DictReader(output.open()))
    truth = {str(path): label for path, label in files["test"]}
    assert sorted({row["path"] for row in rows}) == sorted(truth)
    probabilities = np.zeros((len(truth), len(names)))
    order = sorted(truth)
    for row in rows:
        probabilities[order.index(row["path"]), names.index(row["class"])] = float(row["probability"])
    labels = [truth[path] for path in order]
    oracle = sklearn_metrics(probabilities, labels, "multiclass", names)
    reported = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test_accuracy", "test_macro_f1", "test_top_3_accuracy"):
        assert reported[key] == pytest.approx(oracle[key], abs=1e-9), key
    assert reported["test_loss"] == pytest.approx(oracle["test_loss"], abs=1e-4)  # the CSV keeps 6 decimals


def test_the_mlflow_model_gives_the_reported_metrics(folder_ap):
    tmp_path, run_dir, files, names = folder_ap
    paths, labels = zip(*files["test"])
    frame = pyfunc_on_files(tmp_path, run_dir, paths)
    probabilities = np.stack(frame["probabilities"])
    assert list(frame["class_name"]) == [names[i] for i in np.argmax(probabilities, axis=1)]
    assert_reported(run_dir, sklearn_metrics(probabilities, labels, "multiclass", names))


def test_image_folder_crop_or_pad_binary_grayscale(tmp_path, sources):
    names = tuple(BINARY)
    files = write_folders(tmp_path / "images", examples(BINARY, seed=2), names)
    run_dir = run(
        tmp_path, sources[1], 1, "data=image_folder", f"data.train_dir={tmp_path / 'images/train'}",
        f"data.val_dir={tmp_path / 'images/val'}", f"data.test_dir={tmp_path / 'images/test'}",
        "data.resize=crop_or_pad", "data.task=binary", "data.deterministic=true",
        "head=sklearn", "head.estimator._target_=sklearn.svm.LinearSVC", "~head.estimator.max_iter",
    )
    paths, labels = zip(*files["test"])
    probabilities, top = served(run_dir / "export/saved_model", files=paths)
    assert_learned(probabilities, labels, "binary")
    assert_reported(run_dir, sklearn_metrics(probabilities, labels, "binary", names))


def test_a_nonlinear_sklearn_head_is_served_as_evaluated(tmp_path, sources):
    """An RBF SVC: the exported backbone and estimator.skops, put together by the oracle itself,
    by `pipeline.predict` (export directory and MLflow URI) and by the MLflow pyfunc."""
    import skops.io
    from scipy.special import softmax

    from pipeline.predict import predict

    names = tuple(BRIGHTNESS)
    files = write_folders(tmp_path / "images", examples(BRIGHTNESS, seed=3), names)
    run_dir = run(
        tmp_path, sources[3], 3, "data=image_folder", f"data.train_dir={tmp_path / 'images/train'}",
        f"data.val_dir={tmp_path / 'images/val'}", f"data.test_dir={tmp_path / 'images/test'}",
        "data.resize=resize", "data.deterministic=true", "head=sklearn", "head.estimator._target_=sklearn.svm.SVC",
        "~head.estimator.max_iter", "head.estimator.C=10",
    )
    paths, labels = zip(*files["test"])
    export = run_dir / "export"
    assert not (export / "saved_model").exists()
    import tensorflow as tf

    backbone = tf.saved_model.load(str(export / "backbone")).signatures["serving_bytes"]
    features = backbone(images=tf.constant([Path(p).read_bytes() for p in paths]))["features"].numpy()
    data = (export / "estimator.skops").read_bytes()
    svc = skops.io.loads(data, trusted=skops.io.get_untrusted_types(data=data))
    assert type(svc).__name__ == "SVC" and not hasattr(svc, "predict_proba")
    probabilities = softmax(svc.decision_function(features.astype("float64")), axis=1)
    assert_learned(probabilities, labels, "multiclass")
    assert_reported(run_dir, sklearn_metrics(probabilities, labels, "multiclass", names))

    for source in (str(export), f"runs:/{json.loads((run_dir / 'mlflow_run.json').read_text())['run_id']}/model"):
        rows = predict(source, [str(p) for p in paths], top_k=len(names),
                       tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        served = np.zeros_like(probabilities)
        for row in rows:
            served[paths.index(Path(row.path)), names.index(row.class_name)] = row.probability
        np.testing.assert_allclose(served, probabilities, atol=1e-5, err_msg=source)

    frame = pyfunc_on_files(tmp_path, run_dir, paths)
    np.testing.assert_allclose(np.stack(frame["probabilities"]), probabilities, atol=1e-5)
    assert list(frame["class_name"]) == [names[i] for i in np.argmax(probabilities, axis=1)]


def _manifest(tmp_path: Path, files, labels_of) -> Path:
    lines = ["path,label,split"]
    for split, rows in files.items():
        lines += [f"{path.relative_to(tmp_path)},{labels_of(label)},{split}" for path, label in rows]
    manifest = tmp_path / "labels.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_csv_multilabel_resize_nondeterministic(tmp_path, sources):
    names = ("bright", "red")
    splits = multilabel_examples(seed=3)
    files = {}
    for split, rows in splits.items():  # written flat: multilabel files have no class folder
        files[split] = []
        for index, (pixels, label) in enumerate(rows):
            path = tmp_path / "images" / f"{split}-{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(pixels, "PNG"))
            files[split].append((path, label))

    def labels_of(label):
        return " ".join(name for name, on in zip(names, label) if on)

    manifest = _manifest(tmp_path, files, labels_of)
    run_dir = run(
        tmp_path, sources[3], 3, "data=csv", f"data.manifest={manifest}", "data.multilabel=true",
        "data.split_column=split", "data.resize=resize", "data.deterministic=false",
        "data.class_names=[bright,red]",
    )
    paths, labels = zip(*files["test"])
    truth = np.array(labels, dtype=int)
    probabilities, _ = served(run_dir / "export/saved_model", files=paths)
    assert_learned(probabilities, truth, "multilabel")
    assert_reported(run_dir, sklearn_metrics(probabilities, truth, "multilabel", names))


def test_csv_aspect_preserving_binary_grayscale(tmp_path, sources):
    names = tuple(BINARY)
    files = write_folders(tmp_path / "images", examples(BINARY, seed=4), names)
    manifest = _manifest(tmp_path, files, lambda label: names[label])
    run_dir = run(
        tmp_path, sources[1], 1, "data=csv", f"data.manifest={manifest}", "data.split_column=split",
        "data.resize=aspect_preserving", "data.task=binary", "data.deterministic=true",
        f"data.class_names=[{','.join(names)}]",
    )
    paths, labels = zip(*files["test"])
    probabilities, _ = served(run_dir / "export/saved_model", files=paths)
    assert_learned(probabilities, labels, "binary")
    assert_reported(run_dir, sklearn_metrics(probabilities, labels, "binary", names))


@pytest.mark.parametrize(
    "resize, task, deterministic, channels",
    [("crop_or_pad", "multiclass", False, 1), ("resize", "binary", True, 3)],
)
def test_tfrecord(tmp_path, sources, resize, task, deterministic, channels):
    levels = BRIGHTNESS if task == "multiclass" else BINARY
    names = tuple(levels)
    splits = examples(levels, seed=5)
    write_tfrecords(tmp_path / "records", splits, names)
    run_dir = run(
        tmp_path, sources[channels], channels, "data=tfrecord",
        f"data.file_pattern={tmp_path / 'records/train-*.tfrecord'}",
        f"data.val_file_pattern={tmp_path / 'records/val-*.tfrecord'}",
        f"data.test_file_pattern={tmp_path / 'records/test-*.tfrecord'}",
        f"data.class_names=[{','.join(names)}]", f"data.resize={resize}", f"data.task={task}",
        f"data.deterministic={str(deterministic).lower()}", "data.label_key=image/class/label",
    )
    pixels, labels = zip(*splits["test"])
    # The raw test images as a client holds them: the records' encoded files, read here.
    import tensorflow as tf

    files = []
    for record in tf.data.TFRecordDataset(str(tmp_path / "records/test-00000.tfrecord")):
        example = tf.train.Example.FromString(record.numpy())
        files.append(example.features.feature["image/encoded"].bytes_list.value[0])
    signatures = tf.saved_model.load(str(run_dir / "export/saved_model")).signatures
    probabilities = signatures["serving_bytes"](images=tf.constant(files))["probabilities"].numpy()
    assert_learned(probabilities, labels, task)
    assert_reported(run_dir, sklearn_metrics(probabilities, labels, task, names))


@pytest.mark.skipif(not HAS_TFDS, reason="tensorflow-datasets is not installed")
@pytest.mark.parametrize(
    "resize, task, deterministic, channels",
    [("aspect_preserving", "multiclass", False, 1), ("crop_or_pad", "binary", True, 3)],
)
def test_tfds(tmp_path, sources, resize, task, deterministic, channels):
    levels = BRIGHTNESS if task == "multiclass" else BINARY
    names = tuple(levels)
    splits = examples(levels, seed=6)
    name = f"brightness_{task}"
    prepare_tfds(tmp_path / "tfds", name, splits, names)
    run_dir = run(
        tmp_path, sources[channels], channels, "data=tfds", f"data.name={name}",
        f"data.data_dir={tmp_path / 'tfds'}", "data.split.train=train", "data.split.val=val",
        "data.split.test=test", f"data.resize={resize}", f"data.task={task}",
        f"data.deterministic={str(deterministic).lower()}",
    )
    pixels, labels = zip(*splits["test"])  # the raw arrays, of their own sizes
    probabilities, _ = served(run_dir / "export/saved_model", arrays=pixels)
    assert_learned(probabilities, labels, task)
    assert_reported(run_dir, sklearn_metrics(probabilities, labels, task, names))


def test_digits_all_splits_against_the_raw_arrays(tmp_path):
    """The default data: every split reported equals the served model on sklearn's arrays.

    The oracle does not know which digit went to which split, so it scores all of them
    and compares with the reported splits' example-weighted accuracy and loss.
    """
    from sklearn.datasets import load_digits

    from pipeline.runner import run as run_pipeline

    # head=sklearn: a StandardScaler + LogisticRegression folded into the served Dense layer.
    run_pipeline(compose(["head=sklearn", "freeze=all", "head.estimator._target_=sklearn.pipeline.Pipeline",
                          "~head.estimator.C", "~head.estimator.max_iter",
                          "+head.estimator.steps=[[scale,{_target_:sklearn.preprocessing.StandardScaler}],"
                          "[fit,{_target_:sklearn.linear_model.LogisticRegression,C:0.5,max_iter:2000}]]",
                          "train.verbose=0", "evaluate.splits=[train,val,test]",
                          f"train.feature_cache_dir={tmp_path / 'cache'}"], tmp_path))
    run_dir = tmp_path / "run"
    digits = load_digits()
    keep = np.isin(digits.target, [5, 6, 7, 8, 9])
    arrays = (digits.images[keep] * (255.0 / 16.0))[..., None]
    labels = digits.target[keep] - 5
    probabilities, _ = served(run_dir / "export/saved_model", arrays=arrays)
    assert_learned(probabilities, labels, "multiclass", floor=0.9)
    oracle = sklearn_metrics(probabilities, labels, "multiclass", [str(d) for d in range(5, 10)], split="all")
    reported = json.loads((run_dir / "metrics.json").read_text())
    counts = {}
    for split in ("train", "val", "test"):
        matrix = json.loads((run_dir / f"evaluation/confusion_matrix_{split}.json").read_text())["matrix"]
        counts[split] = int(np.sum(matrix))
    assert sum(counts.values()) == len(labels)
    for metric in ("accuracy", "loss"):
        weighted = sum(counts[s] * reported[f"{s}_{metric}"] for s in counts) / len(labels)
        assert weighted == pytest.approx(oracle[f"all_{metric}"], abs=1e-5), metric
