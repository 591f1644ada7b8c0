"""The train stage: learning rates per group, schedules, losses, callbacks, precision, strategies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.freeze import FreezeNone
from pipeline.heads import LinearHead
from pipeline.schedules import Constant, Cosine, Step
from pipeline.train import Trainer, _loss
from test_freeze import keras_source, tiny_data


def _adam(learning_rate):
    import keras

    return keras.optimizers.Adam(learning_rate)


def _sgd(learning_rate):
    import keras

    return keras.optimizers.SGD(learning_rate)


def _fit(trainer, freeze=None, data=None, task="multiclass", **fit_args):
    from pipeline.adapt import adapt

    with trainer.distribute():
        data = data or tiny_data()
        adapted = adapt(keras_source(), LinearHead(), freeze or FreezeNone(batchnorm="trainable"),
                        data.class_names, data.input_shape, task)
        epochs = []
        result = trainer.fit(adapted, data, on_epoch_end=lambda e, logs: epochs.append((e, logs)), **fit_args)
    return adapted, result, epochs


def _trainer(**overrides):
    args = dict(epochs=1, batch_size=48, learning_rate=0.01, optimizer=_adam,
                lr_schedule=Constant(), checkpoint=False, verbose=0)
    args.update(overrides)
    return Trainer(**args)


def _one_step_backbone_change(multiplier, optimizer):

    adapted, _, _ = None, None, None
    from pipeline.adapt import adapt

    trainer = _trainer(optimizer=optimizer, backbone_lr_multiplier=multiplier)
    with trainer.distribute():
        data = tiny_data()
        adapted = adapt(keras_source(), LinearHead(), FreezeNone(batchnorm="trainable"),
                        data.class_names, data.input_shape, data.task)
        kernel = adapted.backbone.get_layer("extractor").get_layer("conv1").kernel
        head_kernel = adapted.head.get_layer("probabilities").kernel
        before, head_before = kernel.numpy().copy(), head_kernel.numpy().copy()
        trainer.fit(adapted, data, on_epoch_end=lambda e, logs: None)  # one step: 48 / 48
    return kernel.numpy() - before, head_kernel.numpy() - head_before


@pytest.mark.parametrize("optimizer", [_adam, _sgd], ids=["adam", "sgd"])
def test_backbone_lr_multiplier_scales_the_backbone_update_not_the_heads(optimizer):
    full, head_full = _one_step_backbone_change(1.0, optimizer)
    tenth, head_tenth = _one_step_backbone_change(0.1, optimizer)
    # Same seed, same first step: the backbone moves exactly 10x less (also under Adam,
    # where scaling the gradient instead would change nothing), the head the same.
    assert np.abs(full).max() > 0
    rounding = 1e-3 * np.abs(full).max()  # float32 subtraction of nearby weights
    np.testing.assert_allclose(tenth, full * 0.1, rtol=1e-3, atol=rounding)
    np.testing.assert_allclose(head_tenth, head_full, rtol=1e-3, atol=1e-3 * np.abs(head_full).max())


def test_backbone_lr_decay_gives_lower_units_smaller_steps():
    from pipeline.adapt import adapt

    trainer = _trainer(optimizer=_sgd, backbone_lr_decay=0.5)
    with trainer.distribute():
        data = tiny_data()
        adapted = adapt(keras_source(), LinearHead(), FreezeNone(batchnorm="trainable"),
                        data.class_names, data.input_shape, data.task)
    from pipeline.train import _backbone_factors

    factors = {id(v): f for v, f in _backbone_factors(adapted, 1.0, 0.5)}
    extractor = adapted.backbone.get_layer("extractor")
    # Units bottom to top: conv1 bn1 conv2 bn2 top -> factors 1/16 1/8 1/4 1/2 1.
    assert factors[id(extractor.get_layer("conv1").kernel)] == 0.0625
    assert factors[id(extractor.get_layer("bn2").gamma)] == 0.5
    assert id(extractor.get_layer("top").kernel) not in factors


def test_cosine_schedule_warms_up_then_decays():
    schedule = Cosine(warmup_epochs=1, min_ratio=0.1).build(1.0, steps_per_epoch=10, epochs=5)
    values = [float(schedule(step)) for step in (0, 5, 10, 30, 50)]
    assert values[0] == pytest.approx(0.0)
    assert values[1] == pytest.approx(0.5, abs=1e-6)
    assert values[2] == pytest.approx(1.0, abs=1e-6)
    assert 0.1 < values[3] < 1.0
    assert values[4] == pytest.approx(0.1, abs=1e-6)


def test_step_schedule_drops_by_factor_every_n_epochs():
    schedule = Step(every_epochs=2, factor=0.1).build(1.0, steps_per_epoch=10, epochs=6)
    assert [round(float(schedule(s)), 6) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.1, 0.01]
    assert Constant().build(0.3, 10, 5) == 0.3


def test_learning_rate_reaches_mlflow_each_epoch():
    _, _, epochs = _fit(_trainer(epochs=2, batch_size=16, lr_schedule=Step(every_epochs=1, factor=0.5)))
    rates = [logs["learning_rate"] for _, logs in epochs]
    assert rates == pytest.approx([0.005, 0.0025])  # read after each epoch's 3 steps


def test_label_smoothing_loss_matches_the_definition():
    import keras

    y_true = np.array([0, 2])
    y_pred = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype="float32")
    loss = _loss("multiclass", 3, 0.3)(y_true, y_pred)
    smoothed = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    expected = -(smoothed * np.log(y_pred)).sum(axis=1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loss), expected, rtol=1e-5)


def test_early_stopping_stops_when_val_loss_stalls():
    _, result, _ = _fit(_trainer(epochs=10, learning_rate=0.0, early_stopping_patience=1, batch_size=16))
    assert result.epochs_completed == 2


def test_checkpoint_each_epoch_holds_model_and_optimizer_state(tmp_path):
    import keras

    adapted, _, _ = _fit(_trainer(epochs=2, batch_size=16, checkpoint=True), checkpoint_dir=tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state == {"epochs_completed": 2, "iterations": 6}
    restored = keras.saving.load_model(tmp_path / "last.keras")
    assert int(restored.optimizer.iterations) == 6
    images = np.random.default_rng(1).uniform(0, 255, (4, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(restored.predict(images, verbose=0), adapted.model.predict(images, verbose=0), atol=1e-6)
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_keeps_float32_outputs_and_exports_float32_input(policy, tmp_path):
    import keras
    import tensorflow as tf

    from pipeline.export import Exporter

    trainer = _trainer(epochs=2, batch_size=16, mixed_precision=policy)
    with trainer.distribute():
        data = tiny_data()
        from pipeline.adapt import adapt

        adapted = adapt(keras_source(), LinearHead(), FreezeNone(batchnorm="trainable"),
                        data.class_names, data.input_shape, data.task)
        assert adapted.head.get_layer("probabilities").dtype_policy.name == "float32"
        result = trainer.fit(adapted, data, on_epoch_end=lambda e, logs: None)
        assert adapted.backbone.get_layer("extractor").get_layer("conv1").compute_dtype == policy.split("_")[1]
        exported = Exporter(formats=["saved_model"], tolerance=1e-2).export(adapted, data, tmp_path / "export")
    assert keras.mixed_precision.dtype_policy().name == "float32"  # restored after the run
    assert np.isfinite(result.history["loss"]).all()
    assert result.history["loss"][-1] < result.history["loss"][0]
    serving = tf.saved_model.load(str(exported.paths["saved_model"])).signatures["serving_default"]
    (spec,) = serving.structured_input_signature[1].values()
    assert spec.dtype == tf.float32
    assert serving(images=tf.zeros((2, 8, 8, 1)))["probabilities"].dtype == tf.float32


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_binary_and_multilabel_tasks_train_with_sigmoid_outputs(task):
    import tensorflow as tf

    from pipeline.types import DataBundle

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (48, 8, 8, 1)).astype("float32")
    if task == "binary":
        labels, names = (np.arange(48) % 2).astype("int64"), ("no", "yes")
    else:
        labels, names = (rng.uniform(size=(48, 3)) > 0.5).astype("float32"), ("a", "b", "c")
    split = tf.data.Dataset.from_tensor_slices((images, labels))
    data = DataBundle(split, split, split, names, (8, 8, 1), task=task, num_examples={"train": 48})
    adapted, result, _ = _fit(_trainer(epochs=3, batch_size=16), data=data, task=task)
    width = 1 if task == "binary" else 3
    assert adapted.model.output_shape == (None, width)
    assert result.history["loss"][-1] < result.history["loss"][0]


def test_mirrored_strategy_trains_on_cpu_like_the_default_strategy():
    initial = keras_source().backbone.get_layer("extractor").get_weights()  # the seeded weights _fit starts from
    mirrored, result, _ = _fit(_trainer(epochs=1, batch_size=16, strategy="mirrored"))
    reference, _, _ = _fit(_trainer(epochs=1, batch_size=16))
    assert result.epochs_completed == 1
    # One CPU replica: the same batches and updates as without a strategy.
    for mine, theirs in zip(mirrored.model.weights, reference.model.weights, strict=True):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=0, atol=1e-5, err_msg=mine.path)
    trained = mirrored.backbone.get_layer("extractor").get_weights()
    assert min(np.abs(a - b).max() for a, b in zip(trained, initial) if a.ndim > 1) > 1e-3  # kernels moved


def test_multi_worker_without_tf_config_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        with _trainer(strategy="multi_worker").distribute():
            pass


def test_chief_is_worker_zero_or_the_chief_task(monkeypatch):
    from pipeline.distribute import is_chief

    assert is_chief("default")
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert not is_chief("multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    assert is_chief("multi_worker")
