"""The evaluate stage: loss, accuracy and top-k accuracy, checked against hand computations."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.evaluate import Evaluator, _scores
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


def _bundle(val, test, task="multiclass"):
    import tensorflow as tf

    def dataset(pair):
        return tf.data.Dataset.from_tensor_slices(pair)

    return DataBundle(
        train=dataset(test),
        val=dataset(val),
        test=dataset(test),
        class_names=tuple("abcd"),
        input_shape=(4,),
        task=task,
    )


def _adapted(model, task="multiclass"):
    return AdaptedModel(model=model, backbone=None, head=None, task=task, class_names=tuple("abcd"))


def test_evaluate_scores_each_split_through_the_model():
    # The model is the identity, so its "images" are the probabilities themselves; a batch
    # size that does not divide the split checks that labels stay aligned across batches.
    val = (PROBABILITIES[:2], LABELS[:2])
    data = _bundle(val, (PROBABILITIES, LABELS))
    metrics = Evaluator(splits=["val", "test"], top_k=3, batch_size=3).evaluate(
        _adapted(_identity_model(4)), data
    )
    assert set(metrics) == {
        "val_loss", "val_accuracy", "val_top_3_accuracy",
        "test_loss", "test_accuracy", "test_top_3_accuracy",
    }
    assert metrics["test_loss"] == pytest.approx(LOSS, rel=1e-5)
    assert metrics["test_accuracy"] == pytest.approx(0.5)
    assert metrics["test_top_3_accuracy"] == pytest.approx(0.75)
    assert metrics["val_accuracy"] == pytest.approx(0.5)
    assert metrics["val_loss"] == pytest.approx(-(math.log(0.7) + math.log(0.2)) / 2, rel=1e-5)


def test_evaluate_binary_through_the_model():
    p = np.array([[0.9], [0.2], [0.6], [0.3]], dtype="float32")
    y = np.array([1, 0, 0, 1])
    data = _bundle((p, y), (p, y), "binary")
    metrics = Evaluator(splits=["test"]).evaluate(_adapted(_identity_model(1), "binary"), data)
    assert set(metrics) == {"test_loss", "test_accuracy"}
    assert metrics["test_accuracy"] == pytest.approx(0.5)


def test_an_empty_split_is_skipped_not_a_crash(caplog):
    empty = (PROBABILITIES[:0], LABELS[:0])  # data.val_split=0
    data = _bundle(empty, (PROBABILITIES, LABELS))
    with caplog.at_level(logging.WARNING):
        metrics = Evaluator(splits=["val", "test"]).evaluate(_adapted(_identity_model(4)), data)
    assert not any(key.startswith("val_") for key in metrics)
    assert metrics["test_accuracy"] == pytest.approx(0.5)
    assert "val split is empty" in caplog.text


def test_an_unknown_split_names_the_key():
    with pytest.raises(ConfigError, match=r"evaluate\.splits=.*'tset'"):
        Evaluator(splits=["val", "tset"])
