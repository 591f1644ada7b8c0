"""The heads: a Keras model named `head` with the task's output layer, in float32."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.heads import LinearHead, MLPHead


def _features(shape, n=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _output_logits(model, x):
    kernel, bias = model.get_layer("probabilities").get_weights()
    return x @ kernel + bias


def _layers_of(model, kind):
    import keras

    return [layer for layer in model.layers if isinstance(layer, getattr(keras.layers, kind))]


def test_linear_multiclass_is_softmax_over_the_classes():
    head = LinearHead().build((6,), num_classes=4, task="multiclass")
    x = _features((6,))
    p = head.predict(x, verbose=0)
    assert head.name == "head"
    assert tuple(head.output.shape) == (None, 4)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p, _softmax(_output_logits(head, x)), atol=1e-5)


def test_linear_multilabel_is_independent_sigmoids():
    head = LinearHead().build((6,), num_classes=4, task="multilabel")
    x = _features((6,))
    p = head.predict(x, verbose=0)
    assert tuple(head.output.shape) == (None, 4)
    np.testing.assert_allclose(p, _sigmoid(_output_logits(head, x)), atol=1e-5)
    assert np.abs(p.sum(axis=1) - 1.0).max() > 0.05  # not normalized across classes


def test_binary_has_one_sigmoid_unit():
    head = LinearHead().build((6,), num_classes=2, task="binary")
    x = _features((6,))
    p = head.predict(x, verbose=0)
    assert tuple(head.output.shape) == (None, 1)
    assert p.shape == (16, 1)
    np.testing.assert_allclose(p, _sigmoid(_output_logits(head, x)), atol=1e-5)


@pytest.mark.parametrize("head", [LinearHead(dropout=0.1), MLPHead(units=[8], batch_norm=True)])
def test_outputs_are_float32_under_mixed_precision(head):
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = head.build((6,), num_classes=3, task="multiclass")
        p = model.predict(_features((6,)), verbose=0)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert model.output.dtype == "float32"
    assert p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)


def test_spatial_features_are_average_pooled():
    head = LinearHead().build((4, 4, 6), num_classes=3, task="multiclass")
    x = _features((4, 4, 6))
    p = head.predict(x, verbose=0)
    assert tuple(head.output.shape) == (None, 3)
    assert len(_layers_of(head, "GlobalAveragePooling2D")) == 1
    np.testing.assert_allclose(p, _softmax(_output_logits(head, x.mean(axis=(1, 2)))), atol=1e-5)


def test_sequence_features_are_flattened():
    head = MLPHead(units=[5], dropout=0.0).build((3, 6), num_classes=2, task="binary")
    assert tuple(head.output.shape) == (None, 1)
    assert len(_layers_of(head, "Flatten")) == 1
    assert head.get_layer("dense_0").kernel.shape == (18, 5)


def test_linear_dropout_only_when_asked():
    assert not _layers_of(LinearHead(dropout=0.0).build((6,), 3, "multiclass"), "Dropout")
    (dropout,) = _layers_of(LinearHead(dropout=0.25).build((6,), 3, "multiclass"), "Dropout")
    assert dropout.rate == 0.25


def test_mlp_layers_follow_the_config():
    head = MLPHead(units=[16, 8], dropout=0.3, activation="tanh", batch_norm=True).build(
        (6,), num_classes=3, task="multiclass"
    )
    dense = [layer for layer in _layers_of(head, "Dense") if layer.name != "probabilities"]
    assert [layer.units for layer in dense] == [16, 8]
    assert len(_layers_of(head, "BatchNormalization")) == 2
    assert [layer.rate for layer in _layers_of(head, "Dropout")] == [0.3, 0.3]
    activations = _layers_of(head, "Activation")
    assert len(activations) == 2
    x = _features((6,))
    np.testing.assert_allclose(
        activations[0](np.array([[-2.0, 0.5]], "float32")).numpy(), np.tanh([[-2.0, 0.5]]), atol=1e-6
    )
    # Dropout is active in training only; inference is deterministic.
    np.testing.assert_array_equal(head(x, training=False).numpy(), head(x, training=False).numpy())
    assert np.abs(head(x, training=True).numpy() - head(x, training=False).numpy()).max() > 1e-4
    assert tuple(head.output.shape) == (None, 3)


def test_mlp_without_batch_norm_or_dropout():
    head = MLPHead(units=[4], dropout=0.0, batch_norm=False).build((6,), 5, "multilabel")
    assert not _layers_of(head, "BatchNormalization")
    assert not _layers_of(head, "Dropout")
    assert [layer.units for layer in _layers_of(head, "Dense")] == [4, 5]
    x = _features((6,))
    p = head.predict(x, verbose=0)
    assert p.shape == (16, 5)
    hidden_kernel, hidden_bias = head.get_layer("dense_0").get_weights()
    hidden = np.maximum(x @ hidden_kernel + hidden_bias, 0.0)  # relu, nothing between the layers
    np.testing.assert_allclose(p, _sigmoid(_output_logits(head, hidden)), atol=1e-5)


class CosineHead:
    """A user's own head, outside the package: anything with `build(...) -> keras.Model`."""

    def __init__(self, scale: float = 10.0):
        self.scale = scale

    def build(self, feature_shape, num_classes, task):
        import keras

        features = keras.Input(feature_shape)
        normalized = keras.layers.UnitNormalization()(features)
        logits = keras.layers.Dense(num_classes, use_bias=False)(normalized)
        scaled = keras.layers.Rescaling(self.scale)(logits)
        return keras.Model(features, keras.layers.Softmax(dtype="float32")(scaled), name="head")


def test_a_custom_head_class_builds_through_target(hub_model_dir):
    from hydra.utils import instantiate

    from pipeline.adapt import adapt
    from pipeline.freeze import FreezeAll
    from pipeline.sources.hub import HubSource

    head = instantiate({"_target_": "test_heads.CosineHead", "scale": 5.0})
    source = HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1]).load()
    adapted = adapt(source, head, FreezeAll(), ("a", "b", "c", "d"), (8, 8, 1), "multiclass")
    probabilities = adapted.model.predict(np.zeros((2, 8, 8, 1), "float32") + 100, verbose=0)
    assert probabilities.shape == (2, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert adapted.head.get_layer(index=-1).__class__.__name__ == "Softmax"


# --- head=sklearn: the fitted estimator, folded into the Dense layer, is what is served ----


def _blobs(num_classes, n=240, width=6, seed=0):
    """Features where each class shifts a few of them: learnable, not separable."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    x = rng.normal(size=(n, width)) * 1.5
    x[np.arange(n), labels % width] += 2.0
    return (x * 3 + 5).astype("float32"), labels.astype("int64")  # off-centre, for the scaler


@pytest.mark.parametrize(("task", "num_classes"), [("multiclass", 4), ("binary", 2), ("multiclass", 2)])
@pytest.mark.parametrize("scaled", [False, True])
def test_sklearn_logistic_regression_serves_its_own_predict_proba(task, num_classes, scaled):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.heads import SklearnHead, class_probabilities

    estimator = LogisticRegression(C=0.3, max_iter=2000)
    head = SklearnHead(make_pipeline(StandardScaler(), estimator) if scaled else estimator)
    x, y = _blobs(num_classes)
    model = head.build((x.shape[1],), num_classes, task)
    head.fit(model, x, y, task)
    served = np.asarray(class_probabilities(model.predict(x, verbose=0), task))
    expected = head.fitted.predict_proba(x)  # the oracle: scikit-learn itself
    np.testing.assert_allclose(served, expected, atol=2e-5)
    assert 0.5 < np.mean(expected.argmax(1) == y) < 1.0  # it learned, and not trivially


@pytest.mark.parametrize("name", ["LinearSVC", "RidgeClassifier"])
def test_sklearn_estimators_without_probabilities_serve_their_decisions(name):
    import sklearn.linear_model
    import sklearn.svm

    from pipeline.heads import SklearnHead, class_probabilities

    estimator = getattr(sklearn.svm, name, None) or getattr(sklearn.linear_model, name)
    head = SklearnHead(estimator())
    x, y = _blobs(3)
    model = head.build((x.shape[1],), 3, "multiclass")
    head.fit(model, x, y, "multiclass")
    served = np.asarray(class_probabilities(model.predict(x, verbose=0), "multiclass"))
    np.testing.assert_array_equal(served.argmax(1), head.fitted.predict(x))
    np.testing.assert_allclose(served, _softmax(head.fitted.decision_function(x)), atol=2e-5)


def test_sklearn_a_class_missing_from_training_is_never_predicted():
    from sklearn.linear_model import LogisticRegression

    from pipeline.heads import SklearnHead

    head = SklearnHead(LogisticRegression(max_iter=1000))
    x, y = _blobs(3)
    keep = y != 1  # class 1 of 3 has no training example
    model = head.build((x.shape[1],), 3, "multiclass")
    head.fit(model, x[keep], y[keep], "multiclass")
    served = model.predict(x, verbose=0)
    assert served[:, 1].max() < 1e-6
    np.testing.assert_allclose(served[:, [0, 2]], head.fitted.predict_proba(x), atol=2e-5)


def test_sklearn_refuses_what_it_cannot_serve_before_any_work():
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LinearRegression

    from pipeline.errors import ConfigError
    from pipeline.heads import SklearnHead

    with pytest.raises(ConfigError, match=r"LinearRegression, which is not a scikit-learn classifier"):
        SklearnHead(LinearRegression())
    with pytest.raises(ConfigError, match=r"KMeans, which is not a scikit-learn classifier"):
        SklearnHead(KMeans())
    with pytest.raises(ConfigError, match=r"data\.task=multilabel needs a Keras head"):
        from sklearn.linear_model import LogisticRegression

        SklearnHead(LogisticRegression()).build((4,), 3, "multilabel")


def _nonlinear(name):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler
    from sklearn.svm import SVC

    return {
        "knn": lambda: KNeighborsClassifier(n_neighbors=5),
        "svc": lambda: SVC(C=1.0),  # no predict_proba: a softmax of its decisions
        "forest": lambda: make_pipeline(MinMaxScaler(), RandomForestClassifier(n_estimators=10, random_state=0)),
    }[name]()


@pytest.mark.parametrize("name,task,num_classes", [("knn", "multiclass", 3), ("svc", "binary", 2),
                                                   ("svc", "multiclass", 4), ("forest", "binary", 2)])
def test_sklearn_nonlinear_heads_serve_the_fitted_estimator(name, task, num_classes):
    from pipeline.heads import SklearnHead, class_probabilities

    head = SklearnHead(_nonlinear(name))
    assert not head.linear
    x, y = _blobs(num_classes)
    model = head.build((x.shape[1],), num_classes, task)
    head.fit(model, x, y, task)
    served = np.asarray(class_probabilities(model.predict(x, verbose=0), task))
    assert served.shape == (len(x), num_classes)
    fitted = head.fitted
    if hasattr(fitted, "predict_proba"):
        np.testing.assert_array_equal(served.argmax(1), fitted.predict(x))  # its decisions, exactly
        np.testing.assert_allclose(served, fitted.predict_proba(x), atol=1e-6)
    elif task == "binary":
        z = fitted.decision_function(x)
        np.testing.assert_allclose(served[:, 1], 1 / (1 + np.exp(-z)), atol=1e-6)
    else:  # SVC's one-vs-rest decisions: its predict(x) with break_ties=True
        np.testing.assert_allclose(served, _softmax(fitted.decision_function(x)), atol=1e-6)
        np.testing.assert_array_equal(served.argmax(1), fitted.set_params(break_ties=True).predict(x))
    assert 0.5 < np.mean(served.argmax(1) == y)


def test_sklearn_nonlinear_head_is_the_layer_state_of_a_keras_checkpoint(tmp_path):
    import keras

    from pipeline.heads import SklearnHead
    from pipeline.train import weights_sha256

    head = SklearnHead(_nonlinear("knn"))
    x, y = _blobs(3)
    model = head.build((x.shape[1],), 3, "multiclass")
    untrained = weights_sha256(model)
    head.fit(model, x, y, "multiclass")
    fitted = weights_sha256(model)
    assert fitted != untrained  # a resumed run is compared by this digest
    model.predict(x, verbose=0)  # KNN's trees count their queries in their state
    assert weights_sha256(model) == fitted
    model.save(tmp_path / "last.keras")
    loaded = keras.saving.load_model(tmp_path / "last.keras", compile=False)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    fresh = SklearnHead(_nonlinear("knn")).build((x.shape[1],), 3, "multiclass")
    fresh.load_weights(tmp_path / "last.keras")  # what a resumed run does
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), model.predict(x, verbose=0))
    assert weights_sha256(fresh) == fitted


def test_a_skops_file_naming_types_outside_scikit_learn_is_refused():
    import os

    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    from pipeline.errors import ExportError
    from pipeline.estimators import dump_estimator, load_estimator

    x, y = _blobs(3)
    honest = _nonlinear("forest").fit(x, y)
    assert np.array_equal(load_estimator(dump_estimator(honest), "estimator.skops").predict(x), honest.predict(x))
    hostile = skops.io.dumps(FunctionTransformer(func=os.getcwd))
    with pytest.raises(ExportError, match=r"estimator\.skops names types outside scikit-learn \(.*getcwd"):
        load_estimator(hostile, "estimator.skops")
    assert load_estimator(hostile, "estimator.skops", allow_unsafe=True).func is os.getcwd
    with pytest.raises(ExportError, match=r"not a scikit-learn estimator in skops format"):
        load_estimator(b"PK not a zip", "estimator.skops")


def test_a_resumed_nonlinear_sklearn_run_restores_the_fitted_estimator_without_refitting(tmp_path):
    from pipeline.adapt import adapt
    from pipeline.freeze import FreezeAll
    from pipeline.heads import SklearnHead, class_probabilities
    from pipeline.schedules import Constant
    from pipeline.train import Trainer
    from test_freeze import keras_source, tiny_data

    def adapted_and_trainer():
        data = tiny_data()
        adapted = adapt(keras_source(), SklearnHead(_nonlinear("svc")), FreezeAll(), data.class_names,
                        data.input_shape, data.task)
        import keras

        trainer = Trainer(epochs=1, batch_size=16, learning_rate=0.01, optimizer=keras.optimizers.Adam,
                          lr_schedule=Constant(), checkpoint=True, feature_cache=False, verbose=0)
        return data, adapted, trainer

    data, first, trainer = adapted_and_trainer()
    logged = []
    result = trainer.fit(first, data, on_epoch_end=lambda e, logs: logged.append(e), checkpoint_dir=tmp_path)
    assert logged == [0] and result.epochs_completed == 1
    images = np.stack([x for x, _ in data.test.as_numpy_iterator()])
    expected = np.asarray(class_probabilities(first.model.predict(images, verbose=0), "multiclass"))

    data, resumed, trainer = adapted_and_trainer()
    refits = []
    fit_head = resumed.fit_head
    resumed = type(resumed)(**{**resumed.__dict__, "fit_head": lambda *a: refits.append(fit_head(*a))})
    again = trainer.fit(resumed, data, on_epoch_end=lambda e, logs: logged.append(e), resume=tmp_path)
    assert refits == [] and logged == [0]  # the fit is the run's one epoch, checkpointed
    assert again.weights_sha256 == result.weights_sha256
    np.testing.assert_array_equal(
        np.asarray(class_probabilities(resumed.model.predict(images, verbose=0), "multiclass")), expected)
