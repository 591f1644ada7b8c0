"""Oracle tests for text (issue 18): the metrics a text run reports are those of the model it
exports, served on the raw test texts.

The texts are written by this file, as files (`data=text_folder`) and as a CSV column
(`data=csv`); the oracle reads them back itself, sends the raw strings to the exported
SavedModel's `serving_default`, to the MLflow model and to `pipeline.predict`, and recomputes
every test metric with scikit-learn (`test_oracle.sklearn_metrics`).

| run    | data                    | source                           | freeze / head                 | task       | deterministic |
|--------|-------------------------|----------------------------------|-------------------------------|------------|---------------|
| folder | text_folder (+ a broken and an empty file), max_chars 28 | BERT-style pair, seq_length 12 | none (fine-tuned) / linear | binary     | false |
| csv    | csv text_column, split_column | nnlm-like sentence encoder | all (feature cache) / sklearn LogisticRegression | multiclass | true |
| keras_hub | text_folder          | KerasHub BERT preset (WordPiece in TF.Text ops), mean pooling | all / linear | multiclass | true |
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import compose
from test_oracle import assert_learned, assert_reported, load_pyfunc, sklearn_metrics
from text_modules import make_bert_pair, make_keras_hub_bert, make_sentence_encoder

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one")]

# Words of each class, and words every class uses; a text is a few of both, in random order.
TOPICS = {
    "baking": ["oven", "bake", "flour", "sugar", "recipe", "dough", "minutes", "salt"],
    "sport": ["match", "goal", "team", "won", "score", "player", "league", "coach"],
    "weather": ["rain", "wind", "cloud", "storm", "sunny", "forecast", "cold", "snow"],
}
SHARED = ["the", "a", "and", "was", "with", "today", "very", "after", "we", "it"]
PER_CLASS = {"train": 16, "val": 5, "test": 8}


def write_texts(root: Path, names: tuple[str, ...], seed: int) -> dict[str, list[tuple[Path, int]]]:
    """One folder per split, one subfolder of .txt files per class; `{split: [(file, label)]}`."""
    files = {}
    for split, rows in texts(list(names), seed=seed).items():
        files[split] = []
        for index, (text, label) in enumerate(rows):
            path = root / split / names[label] / f"{index:03d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
            files[split].append((path, label))
    return files


def texts(topics: list[str], seed: int) -> dict[str, list[tuple[str, int]]]:
    """`{split: [(text, class index), ...]}`."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in PER_CLASS.items():
        rows = []
        for label, topic in enumerate(topics):
            for _ in range(count):
                words = list(rng.choice(TOPICS[topic], 3)) + list(rng.choice(SHARED, int(rng.integers(2, 6))))
                rng.shuffle(words)
                rows.append((" ".join(words).capitalize() + ".", label))
        splits[split] = rows
    return splits


def served(saved_model: Path, strings: list[str]) -> tuple[np.ndarray, list[str]]:
    import tensorflow as tf

    outputs = tf.saved_model.load(str(saved_model)).signatures["serving_default"](text=tf.constant(strings))
    return outputs["probabilities"].numpy(), [name.decode() for name in outputs["class_name"].numpy()]


def run(tmp_path: Path, *overrides: str, source: str = "hub_text") -> Path:
    from pipeline.runner import run as run_pipeline

    run_pipeline(compose([f"source={source}", "train.epochs=10", "train.batch_size=8", "train.learning_rate=0.05",
                          "train.verbose=0", f"train.feature_cache_dir={tmp_path / 'feature_cache'}", *overrides],
                         tmp_path))
    return tmp_path / "run"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A BERT-style pair fine-tuned on text files, binary, with a file of each kind that is skipped."""
    tmp_path = tmp_path_factory.mktemp("text_folder")
    names = ("baking", "sport")
    files = write_texts(tmp_path / "texts", names, seed=1)
    (tmp_path / "texts/train/sport/broken.txt").write_bytes(b"the team \xff\xfe won")  # not UTF-8
    (tmp_path / "texts/train/baking/empty.txt").write_text("  \n")
    preprocess, encoder = make_bert_pair(tmp_path / "bert")
    run_dir = run(
        tmp_path, f"source.handle={encoder}", f"source.preprocessor={preprocess}", "source.output_key=pooled_output",
        "source.seq_length=12", "freeze=none", "data=text_folder", f"data.train_dir={tmp_path / 'texts/train'}",
        f"data.val_dir={tmp_path / 'texts/val'}", f"data.test_dir={tmp_path / 'texts/test'}", "data.task=binary",
        "data.deterministic=false", "data.max_chars=28",  # cuts about half of the texts: the served model must too
    )
    return tmp_path, run_dir, files, names


def test_text_folder_fine_tuned_bert_pair_binary(folder):
    _, run_dir, files, names = folder
    paths, labels = zip(*files["test"])
    strings = [path.read_text(encoding="utf-8") for path in paths]  # as a client sends them, newline and all
    probabilities, top = served(run_dir / "export/saved_model", strings)
    assert_learned(probabilities, labels, "binary")
    assert top == [names[i] for i in np.argmax(probabilities, axis=1)]
    assert_reported(run_dir, sklearn_metrics(probabilities, labels, "binary", names))
    assert json.loads((run_dir / "export/input_example.json").read_text())  # two raw texts, for MLflow


def test_the_broken_and_the_empty_text_were_skipped_and_listed(folder):
    import mlflow

    tmp_path, run_dir, _, _ = folder
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    listed = {Path(a.path).name for a in client.list_artifacts(run_id)}
    reported = json.loads((run_dir / "metrics.json").read_text())
    assert "epochs_completed" in reported
    skipped = [a for a in listed if "skipped" in a]
    assert skipped, f"no list of skipped files among the run's artifacts {sorted(listed)}"
    local = Path(client.download_artifacts(run_id, skipped[0], str(tmp_path / "skipped")))
    content = local.read_text() if local.is_file() else "".join(p.read_text() for p in local.rglob("*") if p.is_file())
    assert "broken.txt" in content and "empty.txt" in content


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """An nnlm-like encoder, frozen (the feature cache), under a LogisticRegression, on a CSV column."""
    tmp_path = tmp_path_factory.mktemp("text_csv")
    names = ("baking", "sport", "weather")
    manifest = tmp_path / "reviews.csv"
    rows = [(text, names[label], split) for split, pairs in texts(list(names), seed=2).items()
            for text, label in pairs]
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "topic", "split"])
        writer.writerows(rows)
    encoder = make_sentence_encoder(tmp_path / "nnlm")
    run_dir = run(
        tmp_path, f"source.handle={encoder}", "head=sklearn", "data=csv", f"data.manifest={manifest}",
        "data.text_column=review", "data.label_column=topic", "data.split_column=split", "data.deterministic=true",
    )
    test = [(text, names.index(topic)) for text, topic, split in rows if split == "test"]
    return tmp_path, run_dir, test, names


def test_csv_text_column_frozen_sentence_encoder_with_a_sklearn_head(csv_run):
    import mlflow

    tmp_path, run_dir, test, names = csv_run
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    tags = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.tags
    assert tags["feature_cache"] == "computed"  # the texts went through the encoder once, for every split
    strings, labels = zip(*test)
    probabilities, top = served(run_dir / "export/saved_model", list(strings))
    assert_learned(probabilities, labels, "multiclass")
    assert top == [names[i] for i in np.argmax(probabilities, axis=1)]
    assert_reported(run_dir, sklearn_metrics(probabilities, labels, "multiclass", names))


def test_the_mlflow_model_on_a_list_of_strings_gives_the_reported_metrics(folder):
    tmp_path, run_dir, files, names = folder
    paths, labels = zip(*files["test"])
    frame = load_pyfunc(tmp_path, run_dir).predict([path.read_text(encoding="utf-8") for path in paths])
    probabilities = np.stack(frame["probabilities"])
    assert list(frame["class_name"]) == [names[i] for i in np.argmax(probabilities, axis=1)]
    assert_reported(run_dir, sklearn_metrics(probabilities, labels, "binary", names))


def test_predict_on_the_test_folders_of_txt_files_gives_the_reported_accuracy(folder):
    from pipeline.predict import main

    tmp_path, run_dir, files, names = folder
    output = tmp_path / "predictions.csv"
    folders = [str(tmp_path / "texts/test" / name) for name in names]
    assert main([str(run_dir / "export"), *folders, "--top-k", "1", "--output", str(output)],
                output=lambda line: None) == 0
    predicted = {row["path"]: row["class"] for row in csv.DictReader(output.open())}
    truth = {str(path): names[label] for path, label in files["test"]}
    assert sorted(predicted) == sorted(truth)
    accuracy = np.mean([predicted[path] == truth[path] for path in truth])
    reported = json.loads((run_dir / "metrics.json").read_text())
    assert reported["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_a_keras_hub_preset_is_served_on_raw_strings_as_evaluated(tmp_path):
    pytest.importorskip("keras_hub", reason="the keras_hub extra is not installed")
    names = ("baking", "sport", "weather")
    files = write_texts(tmp_path / "texts", names, seed=4)
    words = sorted({word for topic in TOPICS.values() for word in topic} | set(SHARED))
    preset = make_keras_hub_bert(tmp_path / "bert_preset", words)
    run_dir = run(
        tmp_path, f"source.preset={preset}", "source.pooling=mean", "freeze=all",
        "data=text_folder", f"data.train_dir={tmp_path / 'texts/train'}", f"data.val_dir={tmp_path / 'texts/val'}",
        f"data.test_dir={tmp_path / 'texts/test'}", source="keras_hub",
    )
    paths, labels = zip(*files["test"])
    probabilities, top = served(run_dir / "export/saved_model", [path.read_text(encoding="utf-8") for path in paths])
    assert_learned(probabilities, labels, "multiclass")
    assert top == [names[i] for i in np.argmax(probabilities, axis=1)]
    assert_reported(run_dir, sklearn_metrics(probabilities, labels, "multiclass", names))


def test_a_text_run_reruns_from_its_stored_config_to_the_same_metrics(csv_run):
    from pipeline.rerun import rerun

    tmp_path, run_dir, _, _ = csv_run
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    again = rerun(run_id, f"sqlite:///{tmp_path / 'mlflow.db'}", output_dir=tmp_path / "rerun")
    reported = json.loads((run_dir / "metrics.json").read_text())
    assert again["test_accuracy"] == reported["test_accuracy"] and again["test_loss"] == pytest.approx(
        reported["test_loss"], abs=1e-6)
    assert (tmp_path / "rerun/export/saved_model/saved_model.pb").is_file()


def test_a_text_sweep_shares_the_feature_cache_and_reports_the_best_job(csv_run, tmp_path):
    from cli import run_pipeline, runs

    data_root, _, _, _ = csv_run
    done = run_pipeline(
        tmp_path, "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "source=hub_text",
        f"source.handle={data_root / 'nnlm'}", "data=csv", f"data.manifest={data_root / 'reviews.csv'}",
        "data.text_column=review", "data.label_column=topic", "data.split_column=split", "freeze=all",
        "train.learning_rate=0.05,0.001", "train.epochs=4", "export=none", "optimized_metric=val_accuracy",
        f"train.feature_cache_dir={tmp_path / 'feature_cache'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    everything = runs(tmp_path)
    (parent,) = [r for r in everything if r.data.tags.get("sweep") == "true"]
    children = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.tags["feature_cache"] for c in children) == ["computed", "hit"]
    best = max(c.data.metrics["val_accuracy"] for c in children)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best)
