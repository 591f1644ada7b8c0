"""Shared fixtures: tiny models and configs that the tests make themselves (no network)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "conf"


def compose(overrides: list[str] | tuple[str, ...] = (), tmp_path: Path | None = None):
    """The composed config for `overrides`, writing under `tmp_path` instead of outputs/."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import pipeline.config  # noqa: F401  (registers ${asset:...})

    extra = []
    if tmp_path is not None:
        extra = [
            f"output_dir={tmp_path / 'run'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_location={tmp_path / 'mlartifacts'}",
        ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*extra, *overrides])


def write_reading_saved_model(path) -> None:
    """A SavedModel at `path` (replacing what is there) whose serving_default reads a file:
    what `pipeline.sources.graph_check` refuses."""
    import shutil

    import tensorflow as tf

    class Reading(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, None], tf.float32, name="images")])
        def serve(self, images):
            secret = tf.cast(tf.strings.length(tf.io.read_file(__file__)), tf.float32)
            rows = tf.shape(images)[0]
            return {"probabilities": tf.fill([rows, 3], 1.0 / 3.0) + 0.0 * secret,
                    "class_name": tf.fill([rows], "a")}

    shutil.rmtree(path, ignore_errors=True)
    module = Reading()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def make_tf_keras_extractor(seed: int = 0, dropout: float = 0.0):
    """A tiny tf_keras (Keras 2) CNN on 8x8x1 images with BatchNorm: a TF Hub-style model."""
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    layers = tf_keras.layers
    inputs = tf_keras.Input(shape=(8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    if dropout:
        x = layers.Dropout(dropout)(x)
    x = layers.Dense(6, name="project")(x)
    return tf_keras.Model(inputs, x, name="tiny_extractor")


@pytest.fixture(scope="session")
def hub_model_dir(tmp_path_factory) -> Path:
    """A tf_keras model written with `tf.saved_model.save`: the TF Hub reusable format."""
    import tensorflow as tf

    directory = tmp_path_factory.mktemp("hub") / "tiny"
    tf.saved_model.save(make_tf_keras_extractor(), str(directory))
    return directory


@pytest.fixture
def tiny_images():
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, size=(32, 8, 8, 1)).astype("float32")


@pytest.fixture
def silent_server():
    """`(port, accepted)`: a server on 127.0.0.1 that accepts connections and never answers.

    What a stalled proxy or firewall looks like. It lets go of its connections after 20
    seconds at the latest, so that code that waits for an answer forever fails instead of
    hanging the suite; `accepted` lists the connections it took.
    """
    import socket
    import threading
    import time

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    accepted: list = []
    stop = threading.Event()
    deadline = time.monotonic() + 20

    def hold():
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                accepted.append(server.accept()[0])
            except socket.timeout:
                continue
        for connection in accepted:
            connection.close()
        server.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join(timeout=5)
