"""The predict command: top-k classes of image files, from an export and from an MLflow model."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import PROJECT_ROOT, write_reading_saved_model
from pipeline.errors import DataError, ExportError
from pipeline.predict import find_images, main, predict
from test_export import CLASSES, _adapted, _data, _encode, _images, _spread


@pytest.fixture(scope="module")
def export(hub_model_dir, tmp_path_factory):
    """`(adapted, export_root, image_dir, pixels)`: an export and PNG files of known pixels."""
    from pipeline.export import Exporter

    root = tmp_path_factory.mktemp("predict")
    adapted = _adapted(hub_model_dir)
    _spread(adapted, seed=1)
    result = Exporter().export(adapted, _data(_images()), root / "export")
    pixels = np.round(_images(5, seed=12)).astype("uint8")
    image_dir = root / "images"
    image_dir.mkdir()
    for index, image in enumerate(pixels):
        (image_dir / f"img_{index}.png").write_bytes(_encode(image, "PNG"))
    (image_dir / "notes.txt").write_text("not an image, and not picked up from a folder")
    return adapted, result.root, image_dir, pixels


def _by_image(predictions):
    table: dict[str, list] = {}
    for p in predictions:
        table.setdefault(Path(p.path).name, []).append(p)
    return table


def test_predict_from_an_export_gives_the_models_top_k(export):
    adapted, root, image_dir, pixels = export
    predictions = predict(str(root), [str(image_dir)], top_k=2)
    expected = adapted.model.predict(pixels.astype("float32"), verbose=0)
    table = _by_image(predictions)
    assert sorted(table) == [f"img_{i}.png" for i in range(5)]
    for index, row in enumerate(expected):
        ranked = table[f"img_{index}.png"]
        order = np.argsort(-row)[:2]
        assert [p.rank for p in ranked] == [1, 2]
        assert [p.class_name for p in ranked] == [CLASSES[i] for i in order]
        np.testing.assert_allclose([p.probability for p in ranked], row[order], atol=1e-5)
    assert len({p.class_name for p in predictions if p.rank == 1}) > 1  # not vacuous


def test_main_prints_a_table_and_writes_the_csv(export, tmp_path):
    _, root, image_dir, _ = export
    lines: list[str] = []
    output = tmp_path / "out" / "predictions.csv"
    code = main(
        [str(root / "saved_model"), str(image_dir / "img_0.png"), str(image_dir / "img_[12].png"),
         "--top-k", "5", "--output", str(output)],
        output=lines.append,
    )
    assert code == 0
    with open(output, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "rank", "class", "probability"]
    assert len(rows) == 3 * 3  # three images, top-5 capped at the three classes
    assert {Path(r["path"]).name for r in rows} == {"img_0.png", "img_1.png", "img_2.png"}
    for name in {r["path"] for r in rows}:
        assert sum(float(r["probability"]) for r in rows if r["path"] == name) == pytest.approx(1.0, abs=1e-4)
    printed = "\n".join(lines)
    assert printed.splitlines()[0].split() == ["path", "rank", "class", "probability"]
    assert "img_2.png" in printed and str(output) in printed


def test_predict_from_an_mlflow_model_matches_the_export(export, tmp_path):
    from pipeline.tracking import MlflowTracker

    _, root, image_dir, _ = export
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri=uri, experiment="predict", artifact_location=str(tmp_path / "art"))
    with tracker.run(params={}, tags={}) as run:
        model_uri = run.log_model(root)
    assert model_uri == f"runs:/{run.run_id}/model"
    from_mlflow = predict(model_uri, [str(image_dir)], top_k=3, tracking_uri=uri)
    from_export = predict(str(root), [str(image_dir)], top_k=3)
    assert [(p.path, p.rank, p.class_name) for p in from_mlflow] == [
        (p.path, p.rank, p.class_name) for p in from_export
    ]
    np.testing.assert_allclose(
        [p.probability for p in from_mlflow], [p.probability for p in from_export], atol=1e-5
    )

    # The store is data: a stored model's Python file is never run, and its SavedModel is
    # checked before it is restored (anyone who can write the store can change both).
    (stored,) = (tmp_path / "art").glob("models/*/artifacts")
    marker = tmp_path / "ran-the-stored-code"
    code = stored / "mlflow_model.py"
    code.write_text(f"open({str(marker)!r}, 'w').close()\n" + code.read_text())
    again = predict(model_uri, [str(image_dir)], top_k=3, tracking_uri=uri)
    assert not marker.exists()
    assert [p.class_name for p in again] == [p.class_name for p in from_export]

    write_reading_saved_model(stored / "artifacts" / "saved_model")
    with pytest.raises(ExportError, match=r"runs TensorFlow ops .*\(ReadFile\).*--allow-unsafe"):
        predict(model_uri, [str(image_dir)], top_k=1, tracking_uri=uri)
    trusted = predict(model_uri, [str(image_dir)], top_k=1, tracking_uri=uri, allow_unsafe=True)
    assert len(trusted) == 5


def test_a_missing_export_names_the_path(tmp_path, export):
    _, _, image_dir, _ = export
    with pytest.raises(ExportError, match=r"SOURCE '.*nowhere' does not exist"):
        predict(str(tmp_path / "nowhere"), [str(image_dir)])
    with pytest.raises(ExportError, match=r"holds no saved_model/"):
        predict(str(tmp_path), [str(image_dir)])


def huge_png(width=20000, height=20000) -> bytes:
    """A tiny file whose PNG header declares `width x height` pixels (1.2 GB decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def test_bad_and_oversized_images_are_reported_and_the_rest_predicted(export, tmp_path, caplog):
    import logging

    _, root, image_dir, _ = export
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    huge = tmp_path / "huge.png"
    huge.write_bytes(huge_png())
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        predictions = predict(str(root), [str(broken), str(image_dir / "img_0.png"), str(huge)], top_k=1)
    assert [Path(p.path).name for p in predictions] == ["img_0.png"]
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "broken.png: not an image" in warnings
    assert "huge.png: 400,000,000 pixels is over the limit of 100,000,000 pixels (--max-pixels)" in warnings
    with pytest.raises(DataError, match=r"none of the 2 file\(s\) is a readable image"):
        predict(str(root), [str(broken), str(huge)])


def test_serving_bytes_refuses_an_oversized_image_before_decoding(export):
    import tensorflow as tf

    _, root, image_dir, _ = export
    serve = tf.saved_model.load(str(root / "saved_model")).signatures["serving_bytes"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"declares more than 100000000 pixels"):
        serve(images=tf.constant([(image_dir / "img_0.png").read_bytes(), huge_png()]))
    assert serve(images=tf.constant([(image_dir / "img_0.png").read_bytes()]))["probabilities"].shape == (1, 3)


def test_image_patterns(export, tmp_path):
    _, _, image_dir, _ = export
    assert [p.name for p in find_images([str(image_dir)])] == [f"img_{i}.png" for i in range(5)]
    assert [p.name for p in find_images([str(image_dir / "*_3.png"), str(image_dir / "img_3.png")])] == [
        "img_3.png"  # named twice, listed once
    ]
    with pytest.raises(DataError, match=r"matches no file"):
        find_images([str(tmp_path / "*.jpg")])
    with pytest.raises(DataError, match=r"does not exist"):
        find_images([str(tmp_path / "missing.jpg")])
    with pytest.raises(DataError, match=r"holds no image files"):
        find_images([str(tmp_path)])


def test_the_command_line_reports_errors_without_a_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", str(tmp_path / "nowhere"), str(tmp_path / "a.png")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 2
    assert "nowhere" in done.stderr and "Traceback" not in done.stderr


def test_binary_models_rank_both_classes(hub_model_dir, tmp_path):
    from pipeline.export import Exporter

    names = ("no", "yes")
    adapted = _adapted(hub_model_dir, task="binary", class_names=names)
    _spread(adapted, seed=2)
    root = Exporter().export(adapted, _data(_images(), class_names=names), tmp_path / "export").root
    pixels = np.round(_images(4, seed=13)).astype("uint8")
    files = []
    for index, image in enumerate(pixels):
        files.append(tmp_path / f"b_{index}.png")
        files[-1].write_bytes(_encode(image, "PNG"))
    predictions = predict(str(root), [str(f) for f in files], top_k=2)
    p_yes = adapted.model.predict(pixels.astype("float32"), verbose=0)[:, 0]
    for index, probability in enumerate(p_yes):
        ranked = [p for p in predictions if Path(p.path).name == f"b_{index}.png"]
        assert {p.class_name for p in ranked} == {"no", "yes"}
        by_name = {p.class_name: p.probability for p in ranked}
        assert by_name["yes"] == pytest.approx(probability, abs=1e-5)
        assert by_name["no"] == pytest.approx(1 - probability, abs=1e-5)
        assert ranked[0].class_name == ("yes" if probability > 0.5 else "no")
