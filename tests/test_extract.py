"""`python -m pipeline.extract`: features as files, paired with their examples, from the cache.

The oracles are independent of the pipeline: the shipped source's SavedModel loaded with
`tf.saved_model.load` and called on pixels read with Pillow (image files) or taken from
scikit-learn by the row's id (digits).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cli import client, pipeline_command, runs
from conftest import PROJECT_ROOT, compose
from pipeline import config, provenance
from pipeline.errors import ConfigError, DataError
from pipeline.extract import Extractor, extract_features

SPLITS = ("train", "val", "test")


def _oracle(images: np.ndarray) -> np.ndarray:
    """The demo source's outputs computed without the pipeline: its SavedModel on 0-1 pixels."""
    import tensorflow as tf

    from pipeline.config import ASSETS

    loaded = tf.saved_model.load(str(ASSETS / "digits_0to4"))
    return loaded(tf.constant(images / 255.0, tf.float32), training=False).numpy()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two class folders of five distinct 8x8 gray PNGs each: the demo source's input size."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images") / "train"
    rng = np.random.default_rng(0)
    for name in ("ant", "bee"):
        (root / name).mkdir(parents=True)
        for index in range(5):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / name / f"{index}.png")
    return root


def _image_folder(folder: Path, *extra: str) -> list[str]:
    return ["data=image_folder", f"data.train_dir={folder}", "data.image_size=[8,8]", "data.channels=1", *extra]


def test_the_keys_are_checked_before_any_work():
    with pytest.raises(ConfigError, match=r"extract.splits=\['training'\].*\['training'\] are not splits"):
        Extractor(splits=["training"])
    with pytest.raises(ConfigError, match=r"extract.splits=\[\]"):
        Extractor(splits=[])
    with pytest.raises(ConfigError, match=r"extract.format='csv'.*parquet, npz"):
        Extractor(format="csv")
    with pytest.raises(ConfigError, match=r"extract.batch_size=0"):
        Extractor(batch_size=0)
    assert Extractor(splits=["test", "test", "val"]).splits == ("test", "val")


def test_extract_settings_are_no_part_of_a_training_runs_identity(tmp_path):
    """Adding the group (or changing it) leaves `resume=auto` finding the same training runs."""
    plain = config.validate(compose([], tmp_path))
    other = config.validate(compose(["extract.format=npz", "extract.splits=[test]"], tmp_path))
    without_group = {k: v for k, v in plain.items() if k != "extract"}  # the config before the group existed
    assert provenance.config_fingerprint(plain) == provenance.config_fingerprint(other)
    assert provenance.config_fingerprint(plain) == provenance.config_fingerprint(without_group)


def test_rows_pair_with_their_files_even_after_a_reordering_run_filled_the_cache(folder, tmp_path):
    """`data.deterministic=false` may reorder elements; ids, labels and features must still pair.

    A cache entry written from a reordered stream (what a deterministic=false training run
    may leave) is put under the very key the extract looks up: were rows taken from it, the
    features of row i would belong to another file and the oracle would fail.
    """
    import tensorflow as tf
    from PIL import Image

    from pipeline.features import FeatureCache

    cache_dir = f"train.feature_cache_dir={tmp_path / 'cache'}"
    cfg = compose(_image_folder(folder, "data.deterministic=false", cache_dir), tmp_path)
    data = config.build(compose(_image_folder(folder, cache_dir), tmp_path), "data").load()  # in order
    source = config.build(cfg, "source").load()
    options = tf.data.Options()
    options.deterministic = False

    def backwards(dataset):
        images, labels = (np.stack(column) for column in zip(*dataset.as_numpy_iterator()))
        return tf.data.Dataset.from_tensor_slices((images[::-1], labels[::-1])).with_options(options)

    reordered = replace(data, **{s: backwards(getattr(data, s)) for s in SPLITS})
    cache = FeatureCache(tmp_path / "cache")
    scrambled, _ = cache.load_or_compute(source.backbone, reordered)
    key = cache.key(source.backbone, data.fingerprint)
    assert json.loads((tmp_path / "cache" / key / "meta.json").read_text())["ordered"] is False

    extracted, tracked = extract_features(cfg)

    import pandas as pd

    for split in SPLITS:
        table = pd.read_parquet(extracted.files[split])
        assert len(table) == data.num_examples[split] == extracted.rows[split]
        assert list(table.columns) == ["id", "label", "class_name", "features"]
        paths = [Path(i) for i in table["id"]]
        assert {p.parent.parent for p in paths} == {folder} and len(set(paths)) == len(paths)
        assert list(table["class_name"]) == [p.parent.name for p in paths]
        assert [data.class_names[label] for label in table["label"]] == list(table["class_name"])
        pixels = np.stack([np.asarray(Image.open(p), dtype="float32")[..., None] for p in paths])
        features = np.stack(table["features"])
        assert features.dtype == np.float32 and features.shape == (len(paths), *source.feature_shape)
        np.testing.assert_allclose(features, _oracle(pixels), atol=1e-5)
        stale = np.stack([f.numpy() for f, _ in scrambled[split]])
        np.testing.assert_allclose(stale, features[::-1], atol=1e-5)  # the trap was real
    assert extracted.feature_cache == "computed"  # the reordered entry was not trusted...
    assert (tmp_path / "cache" / f"{key}-ordered" / "meta.json").exists()  # ...an ordered one was written

    store = client(tmp_path)
    run = store.get_run(tracked.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["job"] == "extract"
    assert run.data.params["data.deterministic"] == "True"  # read in order, whatever was asked
    assert sorted(a.path for a in store.list_artifacts(tracked.run_id, "features")) == [
        f"features/{s}.parquet" for s in ("test", "train", "val")]


def test_a_data_source_mismatch_stops_before_the_backbone_runs(folder, tmp_path, monkeypatch):
    from pipeline.features import FeatureCache

    def forbidden(*args, **kwargs):
        raise AssertionError("the backbone ran although the data does not fit the source")

    monkeypatch.setattr(FeatureCache, "_compute", forbidden)
    cfg = compose(_image_folder(folder, "data.image_size=[16,16]"), tmp_path)
    with pytest.raises(DataError, match=r"shape \(16, 16, 1\) but the source .* set data.image_size=\[8,8\]"):
        extract_features(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_extract_command_writes_the_backbone_features_logs_them_and_reuses_the_cache(tmp_path):
    import pandas as pd
    from sklearn.datasets import load_digits

    from pipeline.tracking import MlflowTracker

    overrides = ["data.classes=[5,6,7]", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(pipeline_command(tmp_path, *overrides, module="pipeline.extract"),
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    features_dir = tmp_path / "run" / "features"
    assert f"Features:      {features_dir}  (feature size 64)" in done.stdout
    assert "Feature cache: computed" in done.stdout

    digits = load_digits()
    cfg = compose(["data.classes=[5,6,7]", f"train.feature_cache_dir={tmp_path / 'feature_cache'}"], tmp_path)
    counts = config.build(cfg, "data").load().num_examples
    tables = {split: pd.read_parquet(features_dir / f"{split}.parquet") for split in SPLITS}
    for split, table in tables.items():
        assert f"{features_dir / split}.parquet  ({counts[split]:,} rows)" in done.stdout
        assert len(table) == counts[split]
        index = table["id"].astype(int).to_numpy()  # the row's image in scikit-learn's digits
        assert list(table["class_name"]) == [str(d) for d in digits.target[index]]
        assert list(table["label"]) == [[5, 6, 7].index(d) for d in digits.target[index]]
    test = tables["test"]
    pixels = digits.images[test["id"].astype(int)][..., None] * (255.0 / 16.0)
    np.testing.assert_allclose(np.stack(test["features"]), _oracle(pixels), atol=1e-5)

    # The MLflow run: the files as artifacts, and no training run of this config resumes it,
    # not even once it looks killed.
    store = client(tmp_path)
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["job"] == "extract"
    assert f"MLflow run:    {run.info.run_id}" in done.stdout
    assert sorted(a.path for a in store.list_artifacts(run.info.run_id, "features")) == [
        f"features/{s}.parquet" for s in ("test", "train", "val")]
    store.set_terminated(run.info.run_id, status="KILLED")
    training = provenance.config_fingerprint(config.validate(cfg))
    assert MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment).find_resumable(training) is None

    # A second extract of the same backbone and data computes nothing; npz holds the same rows.
    again, _ = extract_features(compose([*overrides[:1], "extract.format=npz", "extract.splits=[val]",
                                         f"train.feature_cache_dir={tmp_path / 'feature_cache'}"], tmp_path))
    assert again.feature_cache == "hit" and again.computed_examples == 0
    with np.load(again.files["val"]) as arrays:
        assert sorted(arrays.files) == ["class_names", "features", "ids", "labels"]
        val = tables["val"]
        assert arrays["ids"].tolist() == list(val["id"]) and arrays["labels"].tolist() == list(val["label"])
        assert arrays["class_names"].tolist() == ["5", "6", "7"]
        np.testing.assert_array_equal(arrays["features"], np.stack(val["features"]))


@pytest.mark.slow
def test_a_bad_format_is_one_line_and_status_2(tmp_path):
    done = subprocess.run(
        pipeline_command(tmp_path, "extract.format=csv", f"hydra.run.dir={tmp_path / 'run'}", module="pipeline.extract"),
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [(
        "error: extract.format='csv' has the wrong type: expected one of 'parquet', 'npz'. "
        "Set it like `extract.format=parquet`."
    )]
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()
