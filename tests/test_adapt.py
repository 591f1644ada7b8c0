"""The adapt stage: `head(backbone(images))` with the freeze applied and shapes checked."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.adapt import adapt
from pipeline.errors import DataError
from pipeline.freeze import FreezeAll, FreezeNone
from pipeline.heads import LinearHead, MLPHead
from pipeline.sources.hub import HubSource

CLASSES = ("a", "b", "c")


def _source(hub_model_dir):
    return HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1]).load()


def _adapt(hub_model_dir, freeze, head=None, task="multiclass", class_names=CLASSES):
    return adapt(
        _source(hub_model_dir),
        head=head or LinearHead(),
        freeze=freeze,
        class_names=class_names,
        input_shape=(8, 8, 1),
        task=task,
    )


def _ids(variables) -> set[int]:
    return {id(v) for v in variables}


def test_model_is_head_of_backbone(hub_model_dir, tiny_images):
    adapted = _adapt(hub_model_dir, FreezeNone(), head=MLPHead(units=[4], dropout=0.0))
    model = adapted.model
    assert model.get_layer("backbone") is adapted.backbone
    assert model.get_layer("head") is adapted.head
    assert adapted.class_names == CLASSES and adapted.task == "multiclass"
    assert tuple(model.input.shape) == (None, 8, 8, 1)
    assert tuple(model.output.shape) == (None, 3)

    expected = adapted.head(adapted.backbone(tiny_images, training=False), training=False).numpy()
    np.testing.assert_allclose(model(tiny_images, training=False).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, atol=1e-5)


def test_task_reaches_the_head(hub_model_dir, tiny_images):
    adapted = _adapt(hub_model_dir, FreezeNone(), task="binary", class_names=("no", "yes"))
    assert tuple(adapted.model.output.shape) == (None, 1)
    p = adapted.model.predict(tiny_images, verbose=0)
    assert p.shape == (len(tiny_images), 1) and np.all((p > 0) & (p < 1))


def test_freeze_all_trains_the_head_alone(hub_model_dir):
    adapted = _adapt(hub_model_dir, FreezeAll())
    backbone_weights = _ids(adapted.backbone.weights)
    assert backbone_weights  # the hub model's variables are tracked at all
    assert not backbone_weights & _ids(adapted.model.trainable_weights)
    assert _ids(adapted.model.trainable_weights) == _ids(adapted.head.trainable_weights)


def test_freeze_none_trains_the_backbone_too(hub_model_dir):
    adapted = _adapt(hub_model_dir, FreezeNone())
    trainable = _ids(adapted.model.trainable_weights)
    # The conv and dense weights of the tiny extractor (BatchNorm has its own setting).
    weights = [v for v in adapted.backbone.weights if "conv" in v.path or "project" in v.path]
    assert len(weights) == 3
    assert _ids(weights) <= trainable
    assert _ids(adapted.head.trainable_weights) <= trainable
    # BatchNorm moving statistics are never optimizer-trainable.
    moving = [v for v in adapted.backbone.weights if "moving" in v.path]
    assert moving and not _ids(moving) & trainable


def test_input_shape_mismatch_names_both_shapes(hub_model_dir):
    source = _source(hub_model_dir)
    with pytest.raises(DataError) as caught:
        adapt(source, LinearHead(), FreezeNone(), CLASSES, input_shape=(28, 28, 3), task="multiclass")
    message = str(caught.value)
    assert "(28, 28, 3)" in message and "(8, 8, 1)" in message
    assert "source.input_shape" in message


def test_a_list_input_shape_matches_its_tuple(hub_model_dir):
    source = _source(hub_model_dir)
    adapted = adapt(source, LinearHead(), FreezeNone(), CLASSES, [8, 8, 1], "multiclass")
    assert tuple(adapted.model.output.shape) == (None, 3)


@pytest.mark.parametrize("data_option, resizable", [("digits", False), ("image_folder", True)])
def test_every_key_the_mismatch_error_suggests_is_a_key_of_the_chosen_options(
    hub_model_dir, tmp_path, data_option, resizable
):
    """Advice that works: each `set key=value` composes and passes the config check."""
    import re

    from conftest import compose

    from pipeline import config

    with pytest.raises(DataError) as caught:
        adapt(_source(hub_model_dir), LinearHead(), FreezeNone(), CLASSES, input_shape=(28, 28, 3),
              task="multiclass", resizable=resizable)
    suggestions = re.findall(r"\b((?:data|source)\.[a-z_]+=\S+?)(?=\s|$| and| to)", str(caught.value))
    assert any(s.startswith("source.input_shape=") for s in suggestions)
    assert any(s.startswith("data.image_size=") for s in suggestions) == resizable
    base = [f"data={data_option}", "source=hub", f"source.handle={hub_model_dir}"]
    if data_option == "image_folder":
        base.append("data.train_dir=/anywhere")
    for suggestion in suggestions:
        config.validate(compose([*base, suggestion], tmp_path))  # raises on a key the option lacks
