"""A text model served on raw strings: the MLflow model and `pipeline.predict`.

The export is built here by hand, the way the export stage lays one out (`saved_model/`
whose `serving_default` takes `text`, `labels.txt`, `input_example.json`; or `backbone/` and
`estimator.skops` for a non-linear scikit-learn head), from a tiny hashed-token model kept
in memory: what every consumer returns is compared with that model's own outputs.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DataError, ExportError
from pipeline.predict import main, predict

CLASSES = ("sport", "cooking", "weather")
BUCKETS, DIM = 64, 6
TEXTS = [
    "the team won the match",
    "bake the dough for ten minutes",
    "rain and wind tomorrow",
    "a goal in the last minute",
    "salt, sugar and flour",
    "Crème brûlée à la française",  # UTF-8 beyond ASCII
]


def make_text_model(seed: int = 0):
    """A tf.Module: lower-cased words hashed to embeddings, averaged, then a dense softmax."""
    import tensorflow as tf

    class TextClassifier(tf.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = tf.Variable(tf.random.stateless_normal([BUCKETS, DIM], seed=[seed, 1]))
            self.kernel = tf.Variable(3.0 * tf.random.stateless_normal([DIM, len(CLASSES)], seed=[seed, 2]))
            self.bias = tf.Variable(tf.constant([0.1, -0.2, 0.05]))
            self.names = tf.constant(list(CLASSES))

        def features(self, text):
            ids = tf.strings.to_hash_bucket_fast(tf.strings.split(tf.strings.lower(text)), BUCKETS)
            vectors = tf.ragged.map_flat_values(tf.gather, self.embeddings, ids)
            count = tf.cast(ids.row_lengths(), tf.float32)[:, None]
            return tf.reduce_sum(vectors, axis=1) / tf.maximum(count, 1.0)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text):
            probabilities = tf.nn.softmax(self.features(text) @ self.kernel + self.bias)
            return {
                "probabilities": probabilities,
                "class_name": tf.gather(self.names, tf.argmax(probabilities, axis=-1)),
                "class_names": tf.tile(self.names[None, :], [tf.shape(probabilities)[0], 1]),
            }

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve_features(self, text):
            return {"features": self.features(text)}

    return TextClassifier()


def write_text_export(root: Path, model, estimator=None) -> Path:
    """The export directory of a text model: `saved_model/`, or `backbone/` + `estimator.skops`."""
    import tensorflow as tf

    root.mkdir(parents=True)
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "input_example.json").write_text(json.dumps(TEXTS[:2]) + "\n")
    if estimator is None:
        tf.saved_model.save(model, str(root / "saved_model"), signatures={"serving_default": model.serve})
    else:
        import skops.io

        tf.saved_model.save(model, str(root / "backbone"), signatures={"serving_default": model.serve_features})
        (root / "estimator.skops").write_bytes(skops.io.dumps(estimator))
    return root


def write_image_saved_model(path: Path) -> Path:
    """A SavedModel whose `serving_default` takes float32 `images`, as an image export's does."""
    import tensorflow as tf

    class Images(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, None], tf.float32, name="images")])
        def serve(self, images):
            mean = tf.reduce_mean(images, axis=[1, 2, 3])[:, None]
            return {"probabilities": tf.nn.softmax(tf.concat([mean, -mean, 0 * mean], axis=1))}

    module = Images()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


@pytest.fixture(scope="module")
def text_export(tmp_path_factory):
    """`(export_root, expected)`: the export, and the in-memory model's probabilities on TEXTS."""
    model = make_text_model(seed=7)
    expected = model.serve(np.array(TEXTS, dtype=object))["probabilities"].numpy()
    assert len(set(expected.argmax(axis=1))) == len(CLASSES)  # every class is someone's top: not vacuous
    return write_text_export(tmp_path_factory.mktemp("text") / "export", model), expected


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


def _log(store: Path, export_root: Path, experiment: str) -> str:
    from pipeline.tracking import MlflowTracker

    tracker = MlflowTracker(uri=_uri(store), experiment=experiment, artifact_location=str(store / "art" / experiment))
    with tracker.run(params={}, tags={}) as run:
        return run.log_model(export_root)


def _uri(store: Path) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"


@pytest.fixture(scope="module")
def logged(store, text_export) -> str:
    """The runs:/ URI of the text export logged as an MLflow model."""
    return _log(store, text_export[0], "text")


@pytest.fixture
def pyfunc(store):
    """`mlflow.pyfunc.load_model` on this module's store."""
    import mlflow

    mlflow.set_tracking_uri(_uri(store))
    try:
        yield mlflow.pyfunc.load_model
    finally:
        mlflow.set_tracking_uri(None)


def test_the_saved_model_is_the_model(text_export):
    import tensorflow as tf

    root, expected = text_export
    serve = tf.saved_model.load(str(root / "saved_model")).signatures["serving_default"]
    np.testing.assert_allclose(serve(text=tf.constant(TEXTS))["probabilities"].numpy(), expected, atol=1e-6)


def test_the_mlflow_model_takes_strings_and_serves_the_model(logged, text_export, pyfunc):
    import pandas as pd

    root, expected = text_export
    assert logged.startswith("runs:/") and logged.endswith("/model")
    model = pyfunc(logged)
    (schema,) = model.metadata.get_input_schema().inputs
    assert schema.type.name == "string" and not model.metadata.get_input_schema().has_input_names()
    assert model.metadata.get_output_schema().input_names() == ["class_name", "probability", "probabilities"]
    assert model.input_example == json.loads((root / "input_example.json").read_text())

    inputs = {
        "DataFrame column text": pd.DataFrame({"text": TEXTS}),
        "DataFrame of another column": pd.DataFrame({"review": TEXTS}),
        "list": list(TEXTS),
        "Series": pd.Series(TEXTS),
        "array": np.array(TEXTS),
        "object array": np.array(TEXTS, dtype=object),
    }
    for name, value in inputs.items():
        frame = model.predict(value)
        assert list(frame.columns) == ["class_name", "probability", "probabilities"], name
        np.testing.assert_allclose(np.stack(frame["probabilities"]), expected, atol=1e-6, err_msg=name)
        assert list(frame["class_name"]) == [CLASSES[i] for i in expected.argmax(axis=1)], name
        np.testing.assert_allclose(frame["probability"], expected.max(axis=1), atol=1e-6, err_msg=name)
    one = model.predict(TEXTS[2])  # a single string is one example
    np.testing.assert_allclose(np.stack(one["probabilities"]), expected[2:3], atol=1e-6)

    # Outside MLflow's signature check (which passes a DataFrame's first column only), the
    # model itself picks a wider DataFrame's `text` column and names what it cannot use.
    python_model = model.unwrap_python_model()
    frame = python_model.predict(None, pd.DataFrame({"id": [str(i) for i in range(len(TEXTS))], "text": TEXTS}))
    np.testing.assert_allclose(np.stack(frame["probabilities"]), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"columns \['a', 'b'\].*`text` column"):
        python_model.predict(None, pd.DataFrame({"a": TEXTS, "b": TEXTS}))
    with pytest.raises(TypeError, match=r"row 1 is None"):
        python_model.predict(None, ["fine", None])
    assert python_model.predict(None, []).shape == (0, 3)


def test_mlflow_models_predict_takes_a_json_list_of_texts(logged, text_export, store, tmp_path):
    """`{"inputs": [...]}`, the request a named `text` column would refuse, through the command
    that scores `mlflow models serve` requests."""
    import os
    import subprocess
    import sys

    _, expected = text_export
    (tmp_path / "input.json").write_text(json.dumps({"inputs": TEXTS}))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "models", "predict", "-m", logged, "-i",
         str(tmp_path / "input.json"), "-t", "json", "-o", str(tmp_path / "output.json"), "--env-manager", "local"],
        check=False, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": _uri(store), "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = json.loads((tmp_path / "output.json").read_text())["predictions"]
    np.testing.assert_allclose([p["probabilities"] for p in predictions], expected, atol=1e-6)
    assert [p["class_name"] for p in predictions] == [CLASSES[i] for i in expected.argmax(axis=1)]


def _probabilities(predictions, names) -> np.ndarray:
    """The top-k rows of `pipeline.predict` back as one probability row per example, in `names`' order."""
    table = np.full((len(names), len(CLASSES)), np.nan)
    for p in predictions:
        table[names.index(p.path), CLASSES.index(p.class_name)] = p.probability
    return table


def test_predict_reads_texts_given_files_and_a_csv_column(text_export, tmp_path, caplog):
    root, expected = text_export
    names = [f"text[{i}]" for i in range(len(TEXTS))]
    given = predict(str(root), texts=TEXTS, top_k=3)
    assert [p.path for p in given if p.rank == 1] == names
    np.testing.assert_allclose(_probabilities(given, names), expected, atol=1e-6)

    folder = tmp_path / "reviews"
    folder.mkdir()
    for index, text in enumerate(TEXTS):
        (folder / f"r{index}.txt").write_text(text, encoding="utf-8")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "latin1.txt").write_bytes("déjà vu".encode("latin-1"))  # not UTF-8
    (folder / "photo.png").write_bytes(b"\x89PNG")  # not a .txt: not read from the folder
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        from_files = predict(str(root), [str(folder)], top_k=3)
    files = [str(folder / f"r{i}.txt") for i in range(len(TEXTS))]
    assert [p.path for p in from_files if p.rank == 1] == files
    np.testing.assert_allclose(_probabilities(from_files, files), expected, atol=1e-6)
    warnings = "\n".join(record.getMessage() for record in caplog.records)
    assert f"skipped {folder / 'empty.txt'}: empty" in warnings
    assert f"skipped {folder / 'latin1.txt'}: not valid utf-8 text" in warnings

    table = tmp_path / "reviews.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "review"])
        writer.writerow(["0", TEXTS[0]])
        writer.writerow(["1", TEXTS[1].replace("for ten", "for\nten")])  # a quoted cell over two lines
        writer.writerow(["2", ""])  # reported and skipped
        for index, text in enumerate(TEXTS[2:], start=3):
            writer.writerow([str(index), text])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        from_csv = predict(str(root / "saved_model"), csv_file=str(table), text_column="review", top_k=3)
    rows = [f"{table}:{line}" for line in (2, 3, 6, 7, 8, 9)]  # row 2 spans lines 3-4; line 5 is empty
    assert [p.path for p in from_csv if p.rank == 1] == rows
    np.testing.assert_allclose(_probabilities(from_csv, rows), expected, atol=1e-6)
    assert f"skipped {table}:5: empty" in caplog.text


def test_predict_reads_files_and_a_csv_in_the_encoding_given(text_export, tmp_path):
    root, expected = text_export
    folder = tmp_path / "latin1"
    folder.mkdir()
    for index, text in enumerate(TEXTS):
        (folder / f"r{index}.txt").write_bytes(text.encode("latin-1"))  # "Crème brûlée" is not UTF-8 here
    files = [str(folder / f"r{i}.txt") for i in range(len(TEXTS))]
    from_files = predict(str(root), [str(folder)], top_k=3, encoding="latin-1")
    np.testing.assert_allclose(_probabilities(from_files, files), expected, atol=1e-6)
    table = tmp_path / "latin1.csv"
    with open(table, "w", newline="", encoding="cp1252") as handle:
        csv.writer(handle).writerows([["text"], *([text] for text in TEXTS)])
    from_csv = predict(str(root), csv_file=str(table), top_k=3, encoding="cp1252")
    rows = [f"{table}:{line}" for line in range(2, 2 + len(TEXTS))]
    np.testing.assert_allclose(_probabilities(from_csv, rows), expected, atol=1e-6)
    # read as UTF-8, the texts beyond ASCII are not valid: they are skipped, the rest predicted
    assert len({p.path for p in predict(str(root), [str(folder)], top_k=1)}) == len(TEXTS) - 1


def test_predict_from_the_mlflow_model_matches_the_export(logged, text_export, store):
    root, expected = text_export
    names = [f"text[{i}]" for i in range(len(TEXTS))]
    from_mlflow = predict(logged, texts=TEXTS, top_k=2, tracking_uri=_uri(store), batch_size=4)
    from_export = predict(str(root), texts=TEXTS, top_k=2, batch_size=4)
    assert [(p.path, p.rank, p.class_name) for p in from_mlflow] == [(p.path, p.rank, p.class_name) for p in from_export]
    np.testing.assert_allclose([p.probability for p in from_mlflow], [p.probability for p in from_export], atol=1e-6)
    top = [p for p in from_mlflow if p.rank == 1]
    np.testing.assert_allclose([p.probability for p in top], expected.max(axis=1), atol=1e-6)
    assert [p.path for p in top] == names


def test_the_command_names_each_text_in_the_table_and_the_csv(text_export, tmp_path):
    root, expected = text_export
    review = tmp_path / "review.txt"
    review.write_text(TEXTS[3])
    output = tmp_path / "out.csv"
    lines: list[str] = []
    code = main([str(root), str(review), "--text", TEXTS[0], "--text", "   ", "--text", TEXTS[1],
                 "--top-k", "1", "--output", str(output)], output=lines.append)
    assert code == 0
    with open(output, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [str(review), "text[0]", "text[2]"]  # text[1] is only whitespace
    for row, index in zip(rows, (3, 0, 1)):
        assert row["class"] == CLASSES[expected[index].argmax()]
        assert float(row["probability"]) == pytest.approx(expected[index].max(), abs=1e-6)
    assert "text[2]" in "\n".join(lines)


def _image_export(root: Path) -> Path:
    root.mkdir()
    write_image_saved_model(root / "saved_model")
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def _png(path: Path) -> Path:
    import tensorflow as tf

    path.write_bytes(tf.io.encode_png(tf.fill([4, 4, 3], tf.constant(90, tf.uint8))).numpy())
    return path


def test_inputs_of_the_other_kind_are_one_line_errors(text_export, logged, store, tmp_path, capsys):
    root, _ = text_export
    image_export = _image_export(tmp_path / "image_export")
    review = tmp_path / "review.txt"
    review.write_text(TEXTS[0])
    photo = _png(tmp_path / "photo.png")

    with pytest.raises(DataError, match=r"is an image model, but the inputs are texts \('a review'\).*pass image files"):
        predict(str(image_export), texts=["a review"])
    with pytest.raises(DataError, match=r"is an image model, but the inputs are texts \('.*review\.txt'\)"):
        predict(str(image_export / "saved_model"), [str(review)])
    assert main([str(image_export), "--text", "a review", "--output", str(tmp_path / "out.csv")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is an image model" in error and "--text" in error
    assert not (tmp_path / "out.csv").exists()

    text_model = r"is a text model, but the inputs are images \('.*photo\.png'\).*--text .*--csv FILE --text-column"
    with pytest.raises(DataError, match=text_model):
        predict(str(root), [str(photo)])
    with pytest.raises(DataError, match=text_model):  # known once the model is read from the store
        predict(logged, [str(photo)], tracking_uri=_uri(store))
    with pytest.raises(DataError, match=r"the inputs mix images \('.*photo\.png'\) and texts"):
        predict(str(root), [str(review), str(photo)])
    with pytest.raises(DataError, match=r"mix images .* and texts \('--text'\)"):
        predict(str(root), [str(photo)], texts=["a review"])


def test_unusable_texts_and_csv_mistakes_name_the_fix(text_export, tmp_path):
    root, _ = text_export
    with pytest.raises(DataError, match=r"none of the 2 text\(s\) is usable"):
        predict(str(root), texts=["", " \n "])
    table = tmp_path / "t.csv"
    table.write_text("id,review\n1,fine\n")
    with pytest.raises(DataError, match=r"has no column 'text' \(its header: \['id', 'review'\]\); pass --text-column"):
        predict(str(root), csv_file=str(table))
    with pytest.raises(DataError, match=r"--text-column 'review' without --csv"):
        predict(str(root), texts=["fine"], text_column="review")
    with pytest.raises(DataError, match=r"cannot be read"):
        predict(str(root), csv_file=str(tmp_path / "missing.csv"))
    (tmp_path / "latin1.csv").write_bytes("text\ndéjà vu\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"is not utf-8 text \(invalid .* at byte \d+\); pass its --encoding"):
        predict(str(root), csv_file=str(tmp_path / "latin1.csv"))
    with pytest.raises(DataError, match=r"--encoding 'utf8x' is not a text encoding Python knows"):
        predict(str(root), texts=["fine"], encoding="utf8x")
    with pytest.raises(DataError, match=r"folder '.*' holds no text files \(\.txt\)"):
        predict(str(root), [str(_empty_folder(tmp_path))], texts=["fine"])


def _empty_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    return folder


def test_log_model_refuses_an_export_whose_example_and_signature_disagree(store, tmp_path):
    image_export = _image_export(tmp_path / "export")
    (image_export / "input_example.json").write_text(json.dumps(["a review"]))
    with pytest.raises(ExportError, match=r"holds input_example\.json .* takes images: .*Export the run again"):
        _log(store, image_export, "mismatch")


def test_a_nonlinear_estimator_on_text_features_is_served_as_fitted(store, tmp_path, pyfunc):
    """`backbone/` (text in, features out) and `estimator.skops`: every consumer gives the
    estimator's own `predict_proba` on the features the in-memory model computes."""
    from sklearn.neighbors import KNeighborsClassifier

    model = make_text_model(seed=3)
    train = ["won the cup final", "the striker scored", "team of the season", "knead and bake bread",
             "a pinch of salt", "sugar in the oven", "sunny with clouds", "storm and heavy rain", "cold wind"]
    labels = np.repeat([0, 1, 2], 3)

    def features(texts):
        return model.serve_features(np.array(texts, dtype=object))["features"].numpy()

    estimator = KNeighborsClassifier(n_neighbors=4, weights="distance", algorithm="brute").fit(features(train), labels)
    expected = estimator.predict_proba(features(TEXTS))
    assert len(set(expected.argmax(axis=1))) > 1 and (expected.max(axis=1) < 1).any()  # not vacuous
    root = write_text_export(tmp_path / "export", model, estimator)
    names = [f"text[{i}]" for i in range(len(TEXTS))]

    from_export = predict(str(root), texts=TEXTS, top_k=3)
    np.testing.assert_allclose(np.nan_to_num(_probabilities(from_export, names)), expected, atol=1e-6)
    uri = _log(store, root, "text-estimator")
    from_mlflow = predict(uri, texts=TEXTS, top_k=3, tracking_uri=_uri(store))
    np.testing.assert_allclose(np.nan_to_num(_probabilities(from_mlflow, names)), expected, atol=1e-6)
    frame = pyfunc(uri).predict(TEXTS)
    np.testing.assert_allclose(np.stack(frame["probabilities"]), expected, atol=1e-6)
    assert list(frame["class_name"]) == [CLASSES[i] for i in expected.argmax(axis=1)]
