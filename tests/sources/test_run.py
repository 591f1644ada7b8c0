"""`source=run`: an earlier run's fine-tuned backbone, from its directory or MLflow run id."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import PROJECT_ROOT, compose
from pipeline.errors import ConfigError, SourceError
from pipeline.sources.run import RunSource, read_checkpoint

IMAGES = np.random.default_rng(0).uniform(0, 255, size=(24, 8, 8, 1)).astype("float32")


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """The default digits experiment, one epoch, through the real CLI: (run_dir, store uri)."""
    tmp = tmp_path_factory.mktemp("earlier")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    done = subprocess.run(
        [
            sys.executable, "-m", "pipeline", "train.epochs=1", "train.verbose=0",
            f"hydra.run.dir={tmp / 'run'}", f"tracking.uri={uri}",
            f"tracking.artifact_location={tmp / 'art'}", f"train.feature_cache_dir={tmp / 'cache'}",
        ],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    # Only what training leaves matters here, not the later stages.
    assert (tmp / "run" / "checkpoints" / "last.keras").is_file(), done.stderr[-3000:]
    return tmp / "run", uri


def _run_id(uri: str, run_dir: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("transfer")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["run_dir"] == str(run_dir.resolve())
    return run.info.run_id


def _checkpoint_backbone(run_dir: Path):
    import keras

    import pipeline.sources.backbone  # noqa: F401  (registers the custom layers)
    import pipeline.sources.saved_model_layer  # noqa: F401

    model = keras.saving.load_model(run_dir / "checkpoints" / "last.keras", compile=False)
    return model.get_layer("backbone")


def _fit(source, num_classes: int, images=IMAGES, labels=None, epochs: int = 2, learning_rate: float = 0.5):
    """A new head for `num_classes` on the source, everything open (freeze=none)."""
    import keras

    from pipeline.adapt import adapt
    from pipeline.freeze import FreezeNone
    from pipeline.heads import LinearHead

    names = tuple(str(i) for i in range(num_classes))
    adapted = adapt(source, LinearHead(), FreezeNone(batchnorm="trainable"), names, source.input_shape, "multiclass")
    adapted.model.compile(keras.optimizers.SGD(learning_rate), "sparse_categorical_crossentropy")
    labels = np.arange(len(images)) % num_classes if labels is None else labels
    history = adapted.model.fit(images, labels, epochs=epochs, batch_size=8, verbose=0)
    return adapted, history.history["loss"]


def _weights(model) -> dict[str, np.ndarray]:
    return {v.path: v.numpy().copy() for v in model.weights}


def test_directory_and_run_id_give_the_earlier_runs_fine_tuned_backbone(earlier_run):
    from pipeline.config import ASSETS
    from pipeline.sources.hub import HubSource

    run_dir, uri = earlier_run
    expected = _checkpoint_backbone(run_dir)(IMAGES, training=False).numpy()
    for value in (str(run_dir), _run_id(uri, run_dir)):
        source = RunSource(run=value, tracking_uri=uri).load()
        assert source.backbone.name == "backbone"
        assert (source.input_shape, source.feature_shape, source.preprocess) == ((8, 8, 1), (64,), "unit")
        assert source.description.startswith("run:") and source.description.endswith(run_dir.name)
        np.testing.assert_allclose(source.backbone(IMAGES, training=False).numpy(), expected, rtol=0, atol=1e-6)
    # Fine-tuned, not the shipped source it started from.
    original = HubSource(handle=str(ASSETS / "digits_0to4"), input_shape=[8, 8, 1]).load()
    assert np.abs(original.backbone(IMAGES, training=False).numpy() - expected).max() > 1e-4


def test_a_new_head_for_another_number_of_classes_trains_on_it(earlier_run):
    from sklearn.datasets import load_digits

    run_dir, _ = earlier_run
    digits = load_digits()
    keep = np.flatnonzero(digits.target < 3)[:96]  # digits 0-2; the earlier run learnt 5-9
    images = (digits.images[keep] * (255.0 / 16.0)).astype("float32")[..., None]
    source = RunSource(run=str(run_dir)).load()
    before = _weights(source.backbone)
    adapted, losses = _fit(source, 3, images, digits.target[keep], epochs=3, learning_rate=0.02)
    assert adapted.model.output_shape == (None, 3)  # the earlier head had 5 classes
    assert losses[-1] < 0.5 * losses[0]
    accuracy = np.mean(np.argmax(adapted.model.predict(images, verbose=0), axis=1) == digits.target[keep])
    assert accuracy > 0.8
    changed = [path for path, value in _weights(source.backbone).items() if not np.array_equal(value, before[path])]
    assert changed  # the backbone fine-tunes again


def test_trainable_false_pins_the_backbone_bit_for_bit(earlier_run):
    run_dir, _ = earlier_run
    source = RunSource(run=str(run_dir), trainable=False).load()
    before = _weights(source.backbone)
    assert any("moving_mean" in path for path in before)
    features = source.backbone(IMAGES, training=False).numpy()
    np.testing.assert_allclose(features, _checkpoint_backbone(run_dir)(IMAGES, training=False).numpy(), rtol=0, atol=1e-6)
    source.backbone.trainable = True  # what freeze=none and gradual schedules do
    adapted, _ = _fit(source, num_classes=2)
    for path, value in _weights(source.backbone).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    np.testing.assert_array_equal(source.backbone(IMAGES, training=False).numpy(), features)
    assert len(adapted.model.trainable_weights) == 2  # the head's kernel and bias only


def _fake_run(run_dir: Path, model, state=None) -> Path:
    (run_dir / "checkpoints").mkdir(parents=True)
    model.save(run_dir / "checkpoints" / "last.keras")
    state = {"epochs_completed": 1, "iterations": 3} if state is None else state
    (run_dir / "checkpoints" / "state.json").write_text(json.dumps(state))
    return run_dir


def test_a_backbone_the_earlier_run_froze_fine_tunes_again(hub_model_dir, tmp_path):
    # freeze=all writes trainable=false into the checkpoint, which would come back pinned.
    from pipeline.adapt import adapt
    from pipeline.freeze import FreezeAll
    from pipeline.heads import LinearHead
    from pipeline.sources.hub import HubSource

    hub = HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1]).load()
    frozen = adapt(hub, LinearHead(), FreezeAll(), ("a", "b"), (8, 8, 1), "multiclass")
    run_dir = _fake_run(tmp_path / "run", frozen.model)
    source = RunSource(run=str(run_dir)).load()
    assert source.backbone.trainable_weights  # as other sources come, before freeze/ decides
    before = _weights(source.backbone)
    _fit(source, num_classes=4)
    changed = {path for path, value in _weights(source.backbone).items() if not np.array_equal(value, before[path])}
    assert any("kernel" in path for path in changed) and any("moving_mean" in path for path in changed)


def test_a_directory_without_a_checkpoint_asks_about_train_checkpoint(tmp_path):
    with pytest.raises(ConfigError) as caught:
        RunSource(run=str(tmp_path)).load()
    message = str(caught.value)
    assert f"source.run='{tmp_path}'" in message and "train.checkpoint=true" in message
    (tmp_path / "last.keras").write_bytes(b"")  # pointed at checkpoints/ itself
    with pytest.raises(ConfigError, match=rf"set source\.run='{tmp_path.parent}', the run directory"):
        RunSource(run=str(tmp_path)).load()


def test_a_value_that_is_neither_a_directory_nor_a_run_id_says_what_is_expected(tmp_path):
    with pytest.raises(ConfigError, match=r"source\.run='outputs/runs/nope' is neither a directory nor an MLflow run id"):
        RunSource(run="outputs/runs/nope").load()


def test_an_unknown_run_id_names_the_id_and_the_store(tmp_path):
    from pipeline.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with MlflowTracker(uri, artifact_location=str(tmp_path / "art")).run({}, {}):
        pass  # a store that exists, without the run
    unknown = "0123456789abcdef0123456789abcdef"
    with pytest.raises(ConfigError) as caught:
        RunSource(run=unknown, tracking_uri=uri).load()
    message = str(caught.value)
    assert f"source.run='{unknown}'" in message and uri in message and "mlflow ui" in message


def test_a_checkpoint_without_a_backbone_layer_says_to_use_keras_file(tmp_path):
    import keras

    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(keras.layers.Flatten()(inputs)))
    run_dir = _fake_run(tmp_path / "run", model)
    with pytest.raises(SourceError, match=r"source\.run='.*run'.*without a layer named 'backbone'.*source=keras_file"):
        RunSource(run=str(run_dir)).load()


def test_read_checkpoint_returns_the_model_path_and_state_and_rejects_a_bad_state(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.keras").write_bytes(b"PK")
    with pytest.raises(ConfigError, match=r"resume='.*' has checkpoints/last\.keras but no checkpoints/state\.json"):
        read_checkpoint(tmp_path, key="resume")
    (checkpoints / "state.json").write_text('{"epochs_completed": 2}')
    with pytest.raises(ConfigError, match=r"source\.run='.*': checkpoints/state\.json holds .*expected non-negative"):
        read_checkpoint(tmp_path)
    (checkpoints / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_checkpoint(tmp_path)
    (checkpoints / "state.json").write_text('{"epochs_completed": 2, "iterations": 34}')
    assert read_checkpoint(tmp_path) == (checkpoints / "last.keras", {"epochs_completed": 2, "iterations": 34})


def test_the_option_takes_the_tracking_uri_from_the_tracking_group(tmp_path):
    from hydra.utils import instantiate

    cfg = compose(["source=run", "source.run=/runs/earlier"], tmp_path)
    source = instantiate(cfg.source)
    assert isinstance(source, RunSource)
    assert (source.run, source.tracking_uri, source.allow_unsafe, source.trainable) == (
        "/runs/earlier", cfg.tracking.uri, False, True
    )


def _store_run(uri: str, run_dir: Path) -> str:
    """A run in the store at `uri` whose run_dir tag names `run_dir`, as anyone could set it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("shared"))
    client.set_tag(run.info.run_id, "run_dir", str(run_dir))
    return run.info.run_id


def _tiny_model():
    import keras

    inputs = keras.Input((8, 8, 1))
    features = keras.layers.Dense(4, name="features")(keras.layers.Flatten()(inputs))
    backbone = keras.Model(inputs, features, name="backbone")
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(backbone(inputs)))


def test_a_run_id_whose_run_dir_tag_names_another_runs_directory_is_refused(tmp_path):
    from pipeline.resume import RUN_FILE
    from pipeline.sources.run import resolve_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    other = _fake_run(tmp_path / "other", _tiny_model())  # a loadable checkpoint of another run
    (other / RUN_FILE).write_text(json.dumps({"run_id": "f" * 32, "tracking_uri": uri}))
    run_id = _store_run(uri, other)
    with pytest.raises(ConfigError) as caught:
        RunSource(run=run_id, tracking_uri=uri).load()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"source.run={run_id!r}: the store's run_dir tag names {str(other)!r}")
    assert f"records run_id {'f' * 32!r}" in message and "Set source.run to the run's directory" in message

    (other / RUN_FILE).unlink()  # a directory that no run of this pipeline wrote
    with pytest.raises(ConfigError, match=rf"source\.run='{run_id}': .*it has no {RUN_FILE}"):
        RunSource(run=run_id, tracking_uri=uri).load()

    (other / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))  # its own
    assert resolve_run(run_id, uri) == other


def test_a_checkpoint_with_a_lambda_layer_is_refused_unless_allow_unsafe(tmp_path):
    import keras

    inputs = keras.Input((8, 8, 1))
    features = keras.layers.Lambda(lambda x: x * 2.0, name="code")(keras.layers.Flatten()(inputs))
    backbone = keras.Model(inputs, features, name="backbone")
    run_dir = _fake_run(tmp_path / "run", keras.Model(inputs, keras.layers.Dense(2)(backbone(inputs))))
    with pytest.raises(SourceError) as caught:
        RunSource(run=str(run_dir)).load()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"source.run={str(run_dir)!r}: its checkpoint {run_dir / 'checkpoints' / 'last.keras'}")
    assert "Lambda" in message and "source.allow_unsafe=true" in message
    source = RunSource(run=str(run_dir), allow_unsafe=True).load()
    np.testing.assert_allclose(source.backbone(IMAGES).numpy(), IMAGES.reshape(len(IMAGES), -1) * 2.0, rtol=1e-6)


# Keras goes on restoring the other layers after the refusal, and says so; the load still fails.
@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_a_checkpoint_whose_saved_model_reads_files_is_refused_unless_allow_unsafe(tmp_path):
    from test_saved_model_layer import reading_keras_file

    path, _ = reading_keras_file(tmp_path, IMAGES)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    path.rename(run_dir / "checkpoints" / "last.keras")
    (run_dir / "checkpoints" / "state.json").write_text(json.dumps({"epochs_completed": 1, "iterations": 3}))
    with pytest.raises(SourceError) as caught:
        RunSource(run=str(run_dir)).load()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"source.run={str(run_dir)!r}: its checkpoint ")
    assert "layer 'hub'" in message and "(ReadFile)" in message and "source.allow_unsafe=true" in message
    source = RunSource(run=str(run_dir), allow_unsafe=True).load()
    assert source.feature_shape == (1,)
