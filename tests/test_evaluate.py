"""The evaluate stage: metrics checked against hand computations, and the files it draws."""

from __future__ import annotations

import json
import logging
import math
import re

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.evaluate import Evaluator, _class_scores, _scores, metric_names
from pipeline.types import AdaptedModel, DataBundle

# Four examples, four classes; no ties, so every ranking is unambiguous.
PROBABILITIES = np.array(
    [
        [0.70, 0.15, 0.10, 0.05],  # label 0: top-1
        [0.10, 0.20, 0.30, 0.40],  # label 1: 3rd most probable -> top-3 only
        [0.10, 0.60, 0.25, 0.05],  # label 3: 4th -> neither
        [0.20, 0.10, 0.45, 0.25],  # label 2: top-1
    ],
    dtype="float32",
)
LABELS = np.array([0, 1, 3, 2])
LOSS = -(math.log(0.70) + math.log(0.20) + math.log(0.05) + math.log(0.45)) / 4


def test_multiclass_scores_by_hand():
    scores = _scores("test", PROBABILITIES, LABELS, "multiclass", top_k=3)
    assert set(scores) == {"test_loss", "test_accuracy", "test_top_3_accuracy"}
    assert scores["test_loss"] == pytest.approx(LOSS, rel=1e-6)
    assert scores["test_accuracy"] == pytest.approx(0.5)
    assert scores["test_top_3_accuracy"] == pytest.approx(0.75)
    top_2 = _scores("val", PROBABILITIES, LABELS, "multiclass", top_k=2)
    assert top_2["val_top_2_accuracy"] == pytest.approx(0.5)  # examples 0 and 3 only


def test_top_k_is_left_out_when_it_covers_every_class():
    # With k >= the number of classes the true class is always among the top k: 1.0 says nothing.
    assert "test_top_4_accuracy" not in _scores("test", PROBABILITIES, LABELS, "multiclass", top_k=4)
    assert "test_top_9_accuracy" not in _scores("test", PROBABILITIES, LABELS, "multiclass", top_k=9)


def test_top_1_adds_no_duplicate_key_and_zero_probability_is_finite():
    scores = _scores("val", np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0, 1]), "multiclass", top_k=1)
    assert set(scores) == {"val_loss", "val_accuracy"}
    assert scores["val_accuracy"] == pytest.approx(0.5)
    # p=0 for the true class is clipped (as Keras' crossentropy does), not infinite.
    assert scores["val_loss"] == pytest.approx(-math.log(1e-7) / 2, rel=1e-6)


def test_binary_scores_by_hand():
    p = np.array([[0.9], [0.2], [0.6], [0.3]], dtype="float32")
    y = np.array([1, 0, 0, 1])
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.3)) / 4
    scores = _scores("test", p, y, "binary", top_k=3)
    assert set(scores) == {"test_loss", "test_accuracy"}  # top-k means nothing here
    assert scores["test_loss"] == pytest.approx(expected, rel=1e-6)
    assert scores["test_accuracy"] == pytest.approx(0.5)


def test_multilabel_scores_by_hand():
    p = np.array([[0.9, 0.2, 0.7], [0.4, 0.8, 0.1]], dtype="float32")
    y = np.array([[1, 0, 0], [0, 1, 1]], dtype="float32")
    right = [0.9, 0.8, 0.3, 0.6, 0.8, 0.1]  # probability given to each true bit
    scores = _scores("test", p, y, "multilabel", top_k=3)
    assert scores["test_loss"] == pytest.approx(-sum(map(math.log, right)) / 6, rel=1e-6)
    assert scores["test_accuracy"] == pytest.approx(4 / 6)  # bits right at 0.5


def _identity_model(width: int):
    import keras

    inputs = keras.Input((width,))
    return keras.Model(inputs, keras.layers.Identity()(inputs))


def _bundle(val, test, task="multiclass", class_names=tuple("abcd")):
    import tensorflow as tf

    def dataset(pair):
        return tf.data.Dataset.from_tensor_slices(pair)

    return DataBundle(
        train=dataset(test),
        val=dataset(val),
        test=dataset(test),
        class_names=class_names,
        input_shape=(4,),
        task=task,
    )


def _adapted(model, task="multiclass", class_names=tuple("abcd")):
    return AdaptedModel(model=model, backbone=None, head=None, task=task, class_names=class_names)


PER_CLASS = {  # predicted [a, d, b, c] for true [a, b, d, c]
    "precision": {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0},
    "recall": {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0},
    "f1": {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0},
}


def test_per_class_precision_recall_f1_by_hand():
    p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6], [0.1, 0.2, 0.7]])
    y = np.array([0, 1, 1, 2, 0])  # predicted [0, 0, 1, 2, 2]
    scores = _class_scores("val", p, y, "multiclass", ["x", "y", "z"])
    # x: tp 1, fp 1, fn 1; y: tp 1, fn 1; z: tp 1, fp 1
    assert scores["val_precision_x"] == pytest.approx(0.5)
    assert scores["val_recall_x"] == pytest.approx(0.5)
    assert scores["val_precision_y"] == pytest.approx(1.0)
    assert scores["val_recall_y"] == pytest.approx(0.5)
    assert scores["val_f1_y"] == pytest.approx(2 / 3)
    assert scores["val_precision_z"] == pytest.approx(0.5)
    assert scores["val_recall_z"] == pytest.approx(1.0)
    assert scores["val_macro_f1"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert scores["val_macro_recall"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert "val_roc_auc" not in scores


def test_binary_roc_auc_and_per_class_scores_by_hand():
    p = np.array([[0.9], [0.2], [0.6], [0.3]], dtype="float32")
    y = np.array([1, 0, 0, 1])
    scores = _class_scores("test", p, y, "binary", ["no", "yes"])
    # positives score 0.9 and 0.3, negatives 0.2 and 0.6: 3 of the 4 pairs are ordered right.
    assert scores["test_roc_auc"] == pytest.approx(0.75)
    assert scores["test_precision_yes"] == pytest.approx(0.5)  # predicted yes: 0.9 (right), 0.6
    assert scores["test_recall_no"] == pytest.approx(0.5)


def test_roc_auc_is_skipped_when_a_split_holds_one_class(caplog):
    with caplog.at_level(logging.WARNING):
        scores = _class_scores("val", np.array([[0.9], [0.4]]), np.array([1, 1]), "binary", ["no", "yes"])
    assert "val_roc_auc" not in scores and "one class" in caplog.text


def test_multilabel_per_label_scores_by_hand():
    p = np.array([[0.9, 0.2, 0.7], [0.4, 0.8, 0.1]], dtype="float32")
    y = np.array([[1, 0, 0], [0, 1, 1]], dtype="float32")
    scores = _class_scores("test", p, y, "multilabel", ["red", "round", "ripe"])
    assert scores["test_f1_red"] == pytest.approx(1.0) and scores["test_f1_round"] == pytest.approx(1.0)
    assert scores["test_precision_ripe"] == 0.0 and scores["test_recall_ripe"] == 0.0
    assert scores["test_macro_f1"] == pytest.approx(2 / 3)


def test_class_names_become_valid_unique_mlflow_metric_names():
    names = metric_names(["tabby cat", "a/b", "tabby_cat", "", "x:y!"])
    assert names == ["tabby_cat", "a_b", "tabby_cat_2", "class_3", "x_y"]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", name) for name in names)


def test_evaluate_scores_each_split_through_the_model():
    # The model is the identity, so its "images" are the probabilities themselves; a batch
    # size that does not divide the split checks that labels stay aligned across batches.
    val = (PROBABILITIES[:2], LABELS[:2])
    data = _bundle(val, (PROBABILITIES, LABELS))
    metrics = Evaluator(splits=["val", "test"], top_k=3, batch_size=3).evaluate(
        _adapted(_identity_model(4)), data
    ).metrics
    per_class = {f"{split}_{kind}_{c}" for split in ("val", "test") for kind in PER_CLASS for c in "abcd"}
    macros = {f"{split}_macro_{kind}" for split in ("val", "test") for kind in PER_CLASS}
    assert set(metrics) == {
        "val_loss", "val_accuracy", "val_top_3_accuracy",
        "test_loss", "test_accuracy", "test_top_3_accuracy",
    } | per_class | macros
    assert metrics["test_loss"] == pytest.approx(LOSS, rel=1e-5)
    assert metrics["test_accuracy"] == pytest.approx(0.5)
    assert metrics["test_top_3_accuracy"] == pytest.approx(0.75)
    assert metrics["val_accuracy"] == pytest.approx(0.5)
    assert metrics["val_loss"] == pytest.approx(-(math.log(0.7) + math.log(0.2)) / 2, rel=1e-5)
    for kind, by_class in PER_CLASS.items():
        for name, value in by_class.items():
            assert metrics[f"test_{kind}_{name}"] == pytest.approx(value), (kind, name)
    assert metrics["test_macro_f1"] == pytest.approx(0.5)


def test_evaluate_binary_through_the_model():
    p = np.array([[0.9], [0.2], [0.6], [0.3]], dtype="float32")
    y = np.array([1, 0, 0, 1])
    data = _bundle((p, y), (p, y), "binary", class_names=("no", "yes"))
    metrics = Evaluator(splits=["test"]).evaluate(
        _adapted(_identity_model(1), "binary", class_names=("no", "yes")), data
    ).metrics
    assert {"test_loss", "test_accuracy", "test_roc_auc", "test_f1_yes", "test_macro_f1"} <= set(metrics)
    assert not any("top_" in key for key in metrics)
    assert metrics["test_accuracy"] == pytest.approx(0.5)
    assert metrics["test_roc_auc"] == pytest.approx(0.75)


def test_evaluate_writes_confusion_matrices_and_training_curves(tmp_path):
    from PIL import Image

    data = _bundle((PROBABILITIES[:2], LABELS[:2]), (PROBABILITIES, LABELS))
    history = {"loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.8, 0.7], "accuracy": [0.3, 0.6, 0.8]}
    result = Evaluator(splits=["val", "test"]).evaluate(
        _adapted(_identity_model(4)), data, tmp_path / "evaluation", history=history
    )
    names = sorted(path.name for path in result.artifacts)
    assert names == [
        "confusion_matrix_test.json", "confusion_matrix_test.png",
        "confusion_matrix_val.json", "confusion_matrix_val.png",
        "training_curves.png",
    ]
    assert all(path.parent == tmp_path / "evaluation" and path.is_file() for path in result.artifacts)
    content = json.loads((tmp_path / "evaluation" / "confusion_matrix_test.json").read_text())
    assert content["class_names"] == list("abcd")
    # rows true, columns predicted: a->a, b->d, d->b, c->c
    assert content["matrix"] == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0]]
    for png in ("confusion_matrix_test.png", "training_curves.png"):
        with Image.open(tmp_path / "evaluation" / png) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_multilabel_confusion_is_one_matrix_per_label(tmp_path):
    p = np.array([[0.9, 0.2, 0.7, 0.1], [0.4, 0.8, 0.1, 0.9]], dtype="float32")
    y = np.array([[1, 0, 0, 1], [0, 1, 1, 1]], dtype="float32")
    data = _bundle((p, y), (p, y), "multilabel")
    result = Evaluator(splits=["test"]).evaluate(_adapted(_identity_model(4), "multilabel"), data, tmp_path)
    content = json.loads((tmp_path / "confusion_matrix_test.json").read_text())
    assert content["matrices"]["a"] == [[1, 0], [0, 1]]  # [[tn, fp], [fn, tp]]
    assert content["matrices"]["c"] == [[0, 1], [1, 0]]
    assert content["matrices"]["d"] == [[0, 0], [1, 1]]
    assert (tmp_path / "confusion_matrix_test.png").is_file()
    assert "training_curves.png" not in {path.name for path in result.artifacts}  # no history given


def test_an_empty_split_is_skipped_not_a_crash(caplog):
    empty = (PROBABILITIES[:0], LABELS[:0])  # data.val_split=0
    data = _bundle(empty, (PROBABILITIES, LABELS))
    with caplog.at_level(logging.WARNING):
        metrics = Evaluator(splits=["val", "test"]).evaluate(_adapted(_identity_model(4)), data).metrics
    assert not any(key.startswith("val_") for key in metrics)
    assert metrics["test_accuracy"] == pytest.approx(0.5)
    assert "val split is empty" in caplog.text


def test_an_unknown_split_names_the_key():
    with pytest.raises(ConfigError, match=r"evaluate\.splits=.*'tset'"):
        Evaluator(splits=["val", "tset"])


def test_a_top_k_below_one_names_the_key():
    with pytest.raises(ConfigError, match=r"evaluate\.top_k=0"):
        Evaluator(top_k=0)
