"""The frozen-backbone feature cache: reuse, invalidation, bypass, and the same results."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.adapt import adapt
from pipeline.data.digits import DigitsData
from pipeline.features import FeatureCache, backbone_fingerprint
from pipeline.freeze import FreezeAll, FreezeNone, Gradual
from pipeline.heads import LinearHead
from pipeline.schedules import Constant
from pipeline.sources.hub import HubSource
from pipeline.train import Trainer


def _optimizer(learning_rate):
    import keras

    return keras.optimizers.Adam(learning_rate)


def _trainer(tmp_path, **overrides):
    args = dict(epochs=4, batch_size=32, learning_rate=0.01, optimizer=_optimizer, lr_schedule=Constant(),
                checkpoint=False, verbose=0, feature_cache_dir=str(tmp_path / "cache"))
    args.update(overrides)
    return Trainer(**args)


def _source(hub_model_dir):
    return HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1]).load()


def _run(trainer, hub_model_dir, freeze=None, data=None, initial=None):
    """`(adapted, result, data)`; `initial`, if given, receives the weights before training."""
    with trainer.distribute():
        data = data or DigitsData(classes=[5, 6, 7]).load()
        adapted = adapt(_source(hub_model_dir), LinearHead(), freeze or FreezeAll(),
                        data.class_names, data.input_shape, data.task)
        if initial is not None:
            initial.extend(w.numpy().copy() for w in adapted.model.weights)
        result = trainer.fit(adapted, data, on_epoch_end=lambda e, logs: None)
    return adapted, result, data


LEARNED_EPOCHS = 5


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """`(adapted, result, data, initial, cache_dir)`: a head trained on the cache that learns.

    The shipped source (trained on digits 0-4) gives features that separate 5, 6 and 7,
    so the head leaves chance level (1/3) within a few epochs; a random backbone would not.
    """
    from pipeline.config import ASSETS

    tmp_path = tmp_path_factory.mktemp("learned")
    initial: list = []
    adapted, result, data = _run(_trainer(tmp_path, epochs=LEARNED_EPOCHS), ASSETS / "digits_0to4", initial=initial)
    return adapted, result, data, initial, tmp_path


def test_second_run_with_the_same_key_computes_no_backbone_outputs(tmp_path, hub_model_dir, monkeypatch):
    _, first, _ = _run(_trainer(tmp_path), hub_model_dir)
    assert first.feature_cache == "computed"

    def forbidden(*args, **kwargs):
        raise AssertionError("the backbone ran although the cache holds its outputs")

    monkeypatch.setattr(FeatureCache, "_compute", forbidden)
    _, second, _ = _run(_trainer(tmp_path), hub_model_dir)
    assert second.feature_cache == "hit"
    assert second.history["loss"] == pytest.approx(first.history["loss"])


def test_cache_counts_each_example_once_and_reads_back_the_backbone_outputs(tmp_path, hub_model_dir):
    data = DigitsData(classes=[5, 6, 7]).load()
    backbone = _source(hub_model_dir).backbone
    cache = FeatureCache(tmp_path)
    splits, hit = cache.load_or_compute(backbone, data)
    assert not hit and cache.computed_examples == sum(data.num_examples[s] for s in ("train", "val", "test"))
    features = np.stack([f.numpy() for f, _ in splits["val"]])
    images = np.stack([x.numpy() for x, _ in data.val])
    np.testing.assert_allclose(features, backbone(images, training=False).numpy(), atol=1e-5)

    again = FeatureCache(tmp_path)
    _, hit = again.load_or_compute(backbone, data)
    assert hit and again.computed_examples == 0


def test_another_source_or_other_data_or_preprocessing_changes_the_key(tmp_path, hub_model_dir):
    import tensorflow as tf

    from conftest import make_tf_keras_extractor

    data = DigitsData(classes=[5, 6, 7]).load()
    cache = FeatureCache(tmp_path)
    key = cache.key(_source(hub_model_dir).backbone, data.fingerprint)
    tf.saved_model.save(make_tf_keras_extractor(seed=7), str(tmp_path / "other"))
    other_source = HubSource(handle=str(tmp_path / "other"), input_shape=[8, 8, 1]).load()
    other_preprocess = HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1], preprocess="tf").load()
    other_split = DigitsData(classes=[5, 6, 7], seed=1).load()
    assert cache.key(_source(hub_model_dir).backbone, data.fingerprint) == key
    assert cache.key(other_source.backbone, data.fingerprint) != key
    assert cache.key(other_preprocess.backbone, data.fingerprint) != key
    assert cache.key(_source(hub_model_dir).backbone, other_split.fingerprint) != key
    assert backbone_fingerprint(other_source.backbone) != backbone_fingerprint(_source(hub_model_dir).backbone)


def test_image_size_is_part_of_the_key(tmp_path):
    from PIL import Image

    from pipeline.data.image_folder import ImageFolderData

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(6):
            pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{index}.png")
    prints = {
        size: ImageFolderData(train_dir=str(tmp_path / "images"), image_size=[size, size],
                              val_split=0.34, test_split=0.34).load().fingerprint
        for size in (8, 10)
    }
    assert prints[8] and prints[8] != prints[10]


def test_training_on_the_cache_gives_the_weights_and_history_of_training_without_it(learned, tmp_path):
    from pipeline.config import ASSETS

    adapted, cached, data, initial, _ = learned
    direct_adapted, direct, _ = _run(_trainer(tmp_path, epochs=LEARNED_EPOCHS, feature_cache=False),
                                     ASSETS / "digits_0to4")
    assert cached.feature_cache == "computed" and direct.feature_cache.startswith("off")
    # The same batches through the same function: the same run, up to float rounding.
    assert cached.history.keys() == direct.history.keys() >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key, series in cached.history.items():
        assert series == pytest.approx(direct.history[key], abs=1e-5), key
    for mine, theirs in zip(adapted.model.weights, direct_adapted.model.weights, strict=True):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=0, atol=1e-5, err_msg=mine.path)

    # ... and a run that learned: the equality above is not two models stuck at chance.
    head = {id(w) for w in adapted.head.weights}
    moved = [np.abs(w.numpy() - before).max() for w, before in zip(adapted.model.weights, initial, strict=True)
             if id(w) in head]
    assert min(moved) > 1e-2  # every head weight, a thousand times the tolerance above
    assert cached.history["val_accuracy"][-1] > 0.8 and cached.history["loss"][-1] < 0.6 * cached.history["loss"][0]
    images = np.stack([x.numpy() for x, _ in data.test])
    labels = np.array([int(y) for _, y in data.test])
    # The trained model is the whole model (backbone + head), whatever was cached.
    probabilities = adapted.model.predict(images, verbose=0)
    np.testing.assert_allclose(
        probabilities, adapted.head.predict(adapted.backbone.predict(images, verbose=0), verbose=0), atol=1e-5
    )
    assert np.mean(probabilities.argmax(axis=1) == labels) > 0.8  # chance is 1/3


def test_a_head_only_run_is_evaluated_on_the_cached_outputs_with_the_same_scores(learned):
    from dataclasses import replace

    from pipeline.evaluate import Evaluator

    adapted, result, data, _, _ = learned
    assert set(result.features) == {"train", "val", "test"}
    through_backbone = Evaluator().evaluate(adapted, data).metrics
    assert through_backbone["test_accuracy"] > 0.8  # a model that learned: misaligned labels would show

    class NoFullModel:  # the backbone must not run again: only the head may be called
        def predict(self, *args, **kwargs):
            raise AssertionError("evaluation ran the full model although the cache holds the backbone outputs")

        __call__ = predict

    on_cache = Evaluator().evaluate(replace(adapted, model=NoFullModel()), data, features=result.features).metrics
    assert on_cache.keys() == through_backbone.keys() and "test_accuracy" in on_cache
    for name, value in through_backbone.items():
        assert on_cache[name] == pytest.approx(value, abs=1e-5), name


def test_cached_outputs_are_not_handed_on_once_the_backbone_trained(tmp_path, hub_model_dir):
    _, gradual, _ = _run(_trainer(tmp_path, epochs=3), hub_model_dir, freeze=Gradual(epochs=[1], units_per_step=1))
    assert gradual.feature_cache == "computed" and gradual.features is None
    _, trains, _ = _run(_trainer(tmp_path, epochs=1), hub_model_dir, freeze=FreezeNone())
    assert trains.features is None


def test_cache_is_bypassed_when_the_backbone_trains_or_data_is_augmented(tmp_path, hub_model_dir):
    from pipeline.data.augment import Augmentation

    _, trains, _ = _run(_trainer(tmp_path, epochs=1), hub_model_dir, freeze=FreezeNone())
    assert trains.feature_cache.startswith("bypassed: backbone")

    digits = DigitsData(classes=[5, 6, 7]).load()
    augmented = type(digits)(**{**digits.__dict__, "augmentation": Augmentation(flip="horizontal").build()})
    _, augments, _ = _run(_trainer(tmp_path, epochs=1), hub_model_dir, data=augmented)
    assert augments.feature_cache.startswith("bypassed: augmentation")
    assert not (tmp_path / "cache").exists()


def test_gradual_schedule_uses_the_cache_for_its_frozen_phase(tmp_path, hub_model_dir):
    adapted, result, data = _run(_trainer(tmp_path, epochs=4), hub_model_dir,
                                 freeze=Gradual(epochs=[2], units_per_step=1))
    assert result.feature_cache == "computed"
    assert result.epochs_completed == 4 and len(result.history["loss"]) == 4
    steps_per_epoch = -(-data.num_examples["train"] // 32)  # batch_size 32
    assert int(adapted.model.optimizer.iterations) == 4 * steps_per_epoch  # one optimizer for both phases


def test_a_partial_entry_left_by_a_killed_job_is_never_read(tmp_path, hub_model_dir):
    data = DigitsData(classes=[5, 6, 7]).load()
    backbone = _source(hub_model_dir).backbone
    cache = FeatureCache(tmp_path)
    key = cache.key(backbone, data.fingerprint)
    (tmp_path / f".partial-{key}-deadbeef" / "train").mkdir(parents=True)  # a killed writer's leftovers
    splits, hit = cache.load_or_compute(backbone, data)
    assert not hit and sum(1 for _ in splits["train"]) == data.num_examples["train"]


def test_the_same_source_built_twice_in_one_process_has_one_key(tmp_path, hub_model_dir):
    # Keras numbers auto-named layers per process (input_layer, input_layer_1, ...); sweep
    # jobs in one process must still share the cache.
    data = DigitsData(classes=[5, 6, 7]).load()
    cache = FeatureCache(tmp_path)
    keys = {cache.key(_source(hub_model_dir).backbone, data.fingerprint) for _ in range(3)}
    assert len(keys) == 1


def test_head_only_epochs_checkpoint_once_at_the_end_of_the_cached_phase(tmp_path, hub_model_dir, monkeypatch):
    import json

    saves = []
    import keras

    original = keras.Model.save
    monkeypatch.setattr(keras.Model, "save", lambda self, path, *a, **k: (saves.append(path), original(self, path, *a, **k)))
    trainer = _trainer(tmp_path, epochs=4, checkpoint=True)
    with trainer.distribute():
        data = DigitsData(classes=[5, 6, 7]).load()
        adapted = adapt(_source(hub_model_dir), LinearHead(), FreezeAll(), data.class_names, data.input_shape, data.task)
        trainer.fit(adapted, data, on_epoch_end=lambda e, logs: None, checkpoint_dir=tmp_path / "checkpoints")
    assert len(saves) == 1
    assert json.loads((tmp_path / "checkpoints" / "state.json").read_text())["epochs_completed"] == 4


@pytest.mark.parametrize("fault", ["not_a_folder", "disk_full"])
def test_an_unusable_cache_folder_costs_speed_not_the_run(learned, tmp_path, monkeypatch, caplog, fault):
    """The cache is optional: a folder that cannot be written trains as without it."""
    import errno
    import logging

    import tensorflow as tf

    from pipeline.config import ASSETS

    adapted, cached, _, _, _ = learned
    cache_dir = tmp_path / "cache"
    if fault == "not_a_folder":  # as root, permissions would not stop a write: a file in the way does
        (tmp_path / "file").write_text("")
        cache_dir = tmp_path / "file" / "cache"
    else:
        class FullDisk:  # as TensorFlow's file writer fails on a full disk
            def __init__(self, path):
                pass

            def write(self, record):
                raise tf.errors.ResourceExhaustedError(None, None, f"{errno.ENOSPC}: No space left on device")

            def close(self):
                pass

        monkeypatch.setattr(tf.io, "TFRecordWriter", FullDisk)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        uncached_adapted, uncached, _ = _run(
            _trainer(tmp_path, epochs=LEARNED_EPOCHS, feature_cache_dir=str(cache_dir)), ASSETS / "digits_0to4"
        )
    assert uncached.feature_cache.startswith("unusable") and uncached.features is None
    assert uncached.epochs_completed == LEARNED_EPOCHS
    assert any("train.feature_cache_dir" in r.getMessage() and "not usable" in r.getMessage() for r in caplog.records)
    for mine, theirs in zip(uncached_adapted.model.weights, adapted.model.weights, strict=True):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=0, atol=1e-5, err_msg=mine.path)
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


def test_only_an_entry_in_the_datas_order_serves_an_ordered_read(tmp_path, hub_model_dir):
    """Training takes any entry; `ordered=True` (pipeline.extract) only one whose rows follow
    the data's order, and writes one beside an entry that may not (`<key>-ordered`)."""
    import json
    from dataclasses import replace

    import tensorflow as tf

    data = DigitsData(classes=[5, 6, 7]).load()
    options = tf.data.Options()
    options.deterministic = False  # what data.deterministic=false sets
    unordered = replace(data, **{s: getattr(data, s).with_options(options) for s in ("train", "val", "test")})
    backbone = _source(hub_model_dir).backbone
    cache = FeatureCache(tmp_path)
    key = cache.key(backbone, data.fingerprint)

    assert cache.load_or_compute(backbone, unordered)[1] is False
    assert json.loads((tmp_path / key / "meta.json").read_text())["ordered"] is False
    assert cache.load_or_compute(backbone, data)[1] is True  # order does not matter to training
    with pytest.raises(ValueError, match="data.deterministic=true"):
        cache.load_or_compute(backbone, unordered, ordered=True)

    splits, hit = cache.load_or_compute(backbone, data, ordered=True)
    assert not hit and json.loads((tmp_path / f"{key}-ordered" / "meta.json").read_text())["ordered"] is True
    images = np.stack([x.numpy() for x, _ in data.train])
    np.testing.assert_allclose(np.stack([f.numpy() for f, _ in splits["train"]]),
                               backbone(images, training=False).numpy(), atol=1e-5)
    again = FeatureCache(tmp_path)
    assert again.load_or_compute(backbone, data, ordered=True)[1] is True and again.computed_examples == 0


def test_a_pass_stopped_mid_split_lets_go_of_its_files_and_leaves_no_entry(tmp_path, hub_model_dir, monkeypatch):
    import tensorflow as tf

    real, opened = tf.io.TFRecordWriter, []

    class Recording:  # TensorFlow's writer, noting whether it was closed
        def __init__(self, path):
            self.writer, self.closed = real(path), False
            opened.append(self)

        def write(self, record):
            self.writer.write(record)

        def close(self):
            self.closed = True
            self.writer.close()

    def stopped(split, examples):  # Ctrl-C after the first batch
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.io, "TFRecordWriter", Recording)
    data = DigitsData(classes=[5, 6, 7]).load()
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(tmp_path).load_or_compute(_source(hub_model_dir).backbone, data, batch_size=32, on_batch=stopped)
    assert len(opened) == 2 and all(writer.closed for writer in opened)
    assert list(tmp_path.iterdir()) == []
