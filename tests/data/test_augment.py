"""augment.py: config to random Keras layers; training batches change, inference is the identity."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.augment import Augmentation
from pipeline.errors import ConfigError

ON = {
    "flip": {"flip": "horizontal"},
    "rotation": {"rotation": 0.1},
    "zoom": {"zoom": 0.2},
    "crop": {"crop": 0.3},
    "brightness": {"brightness": 0.2},
    "contrast": {"contrast": 0.3},
}


@pytest.fixture(scope="module")
def images():
    """A batch of lopsided raw 0-255 images: any flip, turn, zoom or crop shows."""
    rng = np.random.default_rng(0)
    batch = rng.uniform(0, 255, size=(8, 16, 16, 3)).astype("float32")
    batch[:, :, :5] = 250.0  # a bright left band
    return batch


def test_everything_off_builds_nothing():
    assert Augmentation().build() is None
    assert Augmentation(flip="none", rotation=0.0, zoom=0, crop=0, brightness=0, contrast=0).build() is None


@pytest.mark.parametrize("name", list(ON))
def test_each_change_alters_training_images_only(name, images):
    augment = Augmentation(seed=1, **ON[name]).build()
    trained = np.asarray(augment(images, training=True))
    assert trained.shape == images.shape
    assert np.abs(trained - images).max() > 1.0, name
    assert trained.min() >= -1e-3 and trained.max() <= 255.0 + 1e-3  # stays raw 0-255
    np.testing.assert_array_equal(np.asarray(augment(images, training=False)), images)


def test_all_changes_together_in_a_tf_data_map(images):
    import tensorflow as tf

    augment = Augmentation(flip="horizontal_and_vertical", rotation=0.05, zoom=0.1, crop=0.2,
                           brightness=0.1, contrast=0.1, seed=0).build()
    batches = tf.data.Dataset.from_tensors(images).repeat(2).map(lambda x: augment(x, training=True))
    first, second = [b.numpy() for b in batches]
    assert first.shape == images.shape and not np.allclose(first, images)
    assert not np.allclose(first, second)  # new random values for every batch


def test_the_seed_repeats_the_sequence(images):
    def run(seed):
        return np.asarray(Augmentation(rotation=0.1, crop=0.2, seed=seed).build()(images, training=True))

    np.testing.assert_allclose(run(3), run(3))
    assert not np.allclose(run(3), run(4))


def test_flip_modes():
    import keras

    layer = Augmentation(flip="vertical").build().layers[0]
    assert isinstance(layer, keras.layers.RandomFlip) and layer.mode == "vertical"


@pytest.mark.parametrize(
    "kwargs, key",
    [({"flip": "sideways"}, "flip"), ({"rotation": -0.1}, "rotation"), ({"zoom": 2.0}, "zoom"),
     ({"crop": 1.0}, "crop"), ({"brightness": 1.5}, "brightness"), ({"contrast": True}, "contrast")],
)
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=rf"data\.augmentation\.{key}="):
        Augmentation(**kwargs)
