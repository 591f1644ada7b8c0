"""Each freeze mode: exactly which backbone variables a fit changes, and which stay bit-identical."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.freeze import FreezeAll, FreezeNone, Gradual, Regex, TopN, backbone_units
from pipeline.heads import LinearHead
from pipeline.schedules import Constant
from pipeline.train import Trainer
from pipeline.types import DataBundle

KERNELS = {"conv1/kernel", "conv1/bias", "conv2/kernel", "conv2/bias", "top/kernel", "top/bias"}
BN_SCALE = {"bn1/gamma", "bn1/beta", "bn2/gamma", "bn2/beta"}
BN_STATS = {"bn1/moving_mean", "bn1/moving_variance", "bn2/moving_mean", "bn2/moving_variance"}


def keras_source():
    """A Keras 3 backbone: conv1 bn1 conv2 bn2 top (five weight units)."""
    import keras

    from pipeline.sources.backbone import build_backbone

    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Conv2D(4, 3, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(6, name="top")(x)
    return build_backbone(keras.Model(inputs, x, name="extractor"), (8, 8, 1), "unit", "test")


def hub_source(hub_model_dir):
    from pipeline.sources.hub import HubSource

    return HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1]).load()


def tiny_data(n=48):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (n, 8, 8, 1)).astype("float32")
    labels = (np.arange(n) % 3).astype("int64")
    split = tf.data.Dataset.from_tensor_slices((images, labels))
    return DataBundle(split, split.take(16), split.take(16), ("a", "b", "c"), (8, 8, 1),
                      num_examples={"train": n, "val": 16, "test": 16})


def train(source, freeze, epochs=2, head_before=None, **trainer_args):
    """`(adapted, backbone weights before, result)`; `head_before` receives the head's."""
    from pipeline.adapt import adapt

    trainer = Trainer(epochs=epochs, batch_size=16, learning_rate=0.05,
                      optimizer=_sgd, lr_schedule=Constant(), checkpoint=False, verbose=0,
                      **trainer_args)
    with trainer.distribute():
        data = tiny_data()
        adapted = adapt(source, LinearHead(), freeze, data.class_names, data.input_shape, data.task)
        before = _snapshot(adapted.backbone)
        if head_before is not None:
            head_before.update(_snapshot(adapted.head))
        result = trainer.fit(adapted, data, on_epoch_end=lambda epoch, logs: None)
    return adapted, before, result


def _sgd(learning_rate):
    import keras

    return keras.optimizers.SGD(learning_rate, momentum=0.9)


def _name(variable) -> str:
    value = getattr(variable, "value", variable)
    name = value.name.split(":")[0]
    return "/".join(name.split("/")[-2:])  # layer/weight, also for hub variable scopes


def _snapshot(backbone):
    return {_name(v): v.numpy().copy() for v in backbone.weights}


def changed(adapted, before):
    after = _snapshot(adapted.backbone)
    return {name for name in before if not np.array_equal(before[name], after[name])}


def test_none_with_frozen_batchnorm_trains_all_but_batchnorm():
    adapted, before, _ = train(keras_source(), FreezeNone(batchnorm="frozen"))
    assert changed(adapted, before) == KERNELS


def test_none_with_trainable_batchnorm_also_moves_batchnorm_and_its_statistics():
    adapted, before, _ = train(keras_source(), FreezeNone(batchnorm="trainable"))
    assert changed(adapted, before) == KERNELS | BN_SCALE | BN_STATS


def test_all_keeps_every_backbone_variable_bit_identical():
    head_before: dict = {}
    adapted, before, _ = train(keras_source(), FreezeAll(), head_before=head_before)
    assert changed(adapted, before) == set()
    head_after = _snapshot(adapted.head)  # the fit did run: the head trained
    assert {name for name in head_before if not np.array_equal(head_before[name], head_after[name])} == {
        "probabilities/kernel", "probabilities/bias"}


def test_top_n_trains_the_top_units_only():
    # Units bottom to top: conv1 bn1 conv2 bn2 top; n=3 opens conv2, bn2 (frozen BN), top.
    adapted, before, _ = train(keras_source(), TopN(n=3))
    assert changed(adapted, before) == {"conv2/kernel", "conv2/bias", "top/kernel", "top/bias"}


def test_regex_trains_matching_layers_only():
    adapted, before, _ = train(keras_source(), Regex(patterns=["^conv1$", "bn2"], batchnorm="trainable"))
    assert changed(adapted, before) == {"conv1/kernel", "conv1/bias"} | {
        "bn2/gamma", "bn2/beta", "bn2/moving_mean", "bn2/moving_variance"}


def test_regex_on_a_hub_model_selects_variable_scopes(hub_model_dir):
    source = hub_source(hub_model_dir)
    assert [u.name for u in backbone_units(source.backbone)] == ["conv", "bn", "project"]
    adapted, before, _ = train(source, Regex(patterns=["^conv$", "project"]))
    assert changed(adapted, before) == {"conv/kernel", "project/kernel", "project/bias"}


def test_hub_model_with_frozen_batchnorm_keeps_its_statistics(hub_model_dir):
    adapted, before, _ = train(hub_source(hub_model_dir), FreezeNone(batchnorm="frozen"))
    assert changed(adapted, before) == {"conv/kernel", "project/kernel", "project/bias"}


def test_hub_model_with_trainable_batchnorm_updates_its_statistics(hub_model_dir):
    adapted, before, _ = train(hub_source(hub_model_dir), FreezeNone(batchnorm="trainable"))
    assert {"bn/moving_mean", "bn/moving_variance", "bn/gamma"} <= changed(adapted, before)


def test_regex_that_matches_nothing_names_the_key_and_lists_units():
    with pytest.raises(ConfigError, match=r"freeze\.patterns.*'nope'.*conv2"):
        train(keras_source(), Regex(patterns=["nope"]))


def test_gradual_unfreezes_at_the_configured_epochs_and_keeps_the_optimizer():
    from pipeline.adapt import adapt

    source = keras_source()
    steps = {}
    trainer = Trainer(epochs=3, batch_size=16, learning_rate=0.05, optimizer=_sgd,
                      lr_schedule=Constant(), checkpoint=False, verbose=0)
    snapshots = []
    with trainer.distribute():
        data = tiny_data()
        adapted = adapt(source, LinearHead(), Gradual(epochs=[1, 2], units_per_step=1),
                        data.class_names, data.input_shape, data.task)
        snapshots.append(_snapshot(adapted.backbone))

        def on_epoch_end(epoch, logs):
            snapshots.append(_snapshot(adapted.backbone))
            steps[epoch] = int(adapted.model.optimizer.iterations)

        trainer.fit(adapted, data, on_epoch_end=on_epoch_end)

    def moved(a, b):
        return {k for k in a if not np.array_equal(a[k], b[k])}

    assert moved(snapshots[0], snapshots[1]) == set()  # epoch 0: the head alone
    assert moved(snapshots[1], snapshots[2]) == {"top/kernel", "top/bias"}  # epoch 1: top unit
    # epoch 2: the next unit is bn2 (frozen BatchNorm), so the top unit keeps training alone
    assert moved(snapshots[2], snapshots[3]) == {"top/kernel", "top/bias"}
    assert steps == {0: 3, 1: 6, 2: 9}  # one optimizer: iterations keep counting


def test_gradual_with_patterns_unfreezes_the_named_groups():
    adapted, before, result = train(keras_source(), Gradual(epochs=[1], patterns=["conv2"]), epochs=2)
    assert result.epochs_completed == 2
    assert changed(adapted, before) == {"conv2/kernel", "conv2/bias"}  # opened at epoch 1, nothing else


def test_gradual_rejects_unordered_epochs():
    with pytest.raises(ConfigError, match=r"freeze\.epochs=\[3, 1\]"):
        Gradual(epochs=[3, 1])
