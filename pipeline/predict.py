"""`python -m pipeline.predict SOURCE IMAGES...`: the top classes of image files, printed and as CSV.

SOURCE is an export directory (holding `saved_model/`, or `backbone/` and `estimator.skops`
for a scikit-learn head), a SavedModel directory, or an MLflow
model URI (`runs:/<run_id>/model`, `models:/<name>/<version>`). IMAGES are files, folders
(the images directly inside) or globs (`'photos/**/*.jpg'`, quoted so that the shell leaves
them alone).

    python -m pipeline.predict outputs/runs/<run>/export photos/ --top-k 3
    python -m pipeline.predict runs:/<run_id>/model cat.jpg --output cat.csv
"""

from __future__ import annotations

import argparse
import csv
import glob
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.decode import MAX_PIXELS
from pipeline.errors import DataError, ExportError, PipelineError

log = logging.getLogger("pipeline")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_URI_SCHEMES = ("runs:/", "models:/", "file:/", "s3://", "gs://", "http://", "https://", "dbfs:/")


@dataclass(frozen=True)
class Prediction:
    """One of the top classes of one image: `rank` 1 is the most probable."""

    path: str
    rank: int
    class_name: str
    probability: float


def predict(
    source: str,
    images: Sequence[str],
    top_k: int = 3,
    tracking_uri: str = "sqlite:///mlflow.db",
    batch_size: int = 32,
    max_pixels: int = MAX_PIXELS,
    allow_unsafe: bool = False,
) -> list[Prediction]:
    """The `top_k` classes of every readable image that `images` names, from the model at `source`.

    A file that is not a decodable image, or whose header declares more than `max_pixels`
    pixels, is reported (a warning naming it and why) and left out; the others are predicted.
    An MLflow model is read as data (see `pipeline.tracking.model.load_model`); `allow_unsafe`
    lets its SavedModel run ops that touch files, the network or Python.

    Raises:
        ExportError: the source is not an export, SavedModel or loadable MLflow model.
        DataError: an image pattern matches nothing, or no file is a readable image.
    """
    if top_k < 1:
        raise DataError(f"--top-k={top_k}: expected 1 or more, for example --top-k 3")
    is_uri = source.startswith(_URI_SCHEMES)
    estimator = None if is_uri else _estimator_export(Path(source))
    saved_model = None if is_uri or estimator else _saved_model_dir(Path(source))
    paths, contents = readable_images(find_images(images), max_pixels)  # before TensorFlow: fail fast
    if is_uri:
        probabilities, class_names = _mlflow_model(source, tracking_uri, contents, batch_size, allow_unsafe)
    elif estimator:
        probabilities, class_names = _estimator_model(Path(source), contents, batch_size, allow_unsafe)
    else:
        probabilities, class_names = _saved_model(saved_model, contents, batch_size)
    return _top_k(paths, probabilities, class_names, top_k)


def find_images(patterns: Sequence[str]) -> list[Path]:
    """Files as given, the images directly inside folders, and the files globs match; in order."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not matches:
                raise DataError(
                    f"folder {pattern!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                    "point at the images or at a folder that holds them"
                )
        elif path.is_file():
            matches = [path]
        elif any(char in pattern for char in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"the pattern {pattern!r} matches no file; check it (quote it for the shell)")
        else:
            raise DataError(f"image {pattern!r} does not exist; pass files, folders or globs of images")
        found += [m for m in matches if m not in found]
    return found


def _estimator_export(source: Path) -> bool:
    """Whether `source` is the export of a scikit-learn head: `backbone/` and `estimator.skops`."""
    from pipeline.estimators import SKOPS_FILE

    return (source / SKOPS_FILE).is_file() and (source / "backbone" / "saved_model.pb").is_file()


def _saved_model_dir(source: Path) -> Path:
    for candidate in (source / "saved_model", source):
        if (candidate / "saved_model.pb").is_file():
            return candidate
    if not source.exists():
        raise ExportError(
            f"SOURCE {str(source)!r} does not exist; expected an export directory (holding "
            "saved_model/), a SavedModel directory, or an MLflow URI such as runs:/<run_id>/model"
        )
    raise ExportError(
        f"SOURCE {str(source)!r} holds no saved_model/ nor saved_model.pb; expected a run's "
        "export directory (outputs/runs/<run>/export, exported with export.formats including "
        "saved_model) or an MLflow URI such as runs:/<run_id>/model"
    )


def readable_images(paths: Sequence[Path], max_pixels: int = MAX_PIXELS) -> tuple[list[Path], list[bytes]]:
    """The files that training would read too (the data stage's pre-scan), with their bytes.

    Each other file is reported in one warning line and left out. Raises DataError when
    none is left.
    """
    from pipeline.data.scan import image_problem

    kept_paths, kept = [], []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as error:
            problem = f"cannot be read ({error.strerror})"
        else:
            problem = image_problem(data, max_pixels)
        if problem:
            log.warning("skipped %s: %s", path, problem.replace("(data.max_pixels)", "(--max-pixels)"))
            continue
        kept_paths.append(path)
        kept.append(data)
    if not kept:
        raise DataError(
            f"none of the {len(paths)} file(s) is a readable image (see the warnings above); expected "
            "JPEG, PNG, BMP, GIF or WebP files. Fix or convert them."
        )
    return kept_paths, kept


def _saved_model(directory: Path, contents: Sequence[bytes], batch_size: int):
    """Probabilities from the SavedModel's `serving_bytes` signature, which decodes inside."""
    import numpy as np
    import tensorflow as tf

    signatures = tf.saved_model.load(str(directory)).signatures
    if "serving_bytes" not in signatures:
        raise ExportError(
            f"the SavedModel at {directory} has no serving_bytes signature (signatures: "
            f"{', '.join(signatures.keys())}); export it with this pipeline's export stage"
        )
    serve = signatures["serving_bytes"]
    batches = [
        serve(images=tf.constant(list(contents[start : start + batch_size])))
        for start in range(0, len(contents), batch_size)
    ]
    probabilities = np.concatenate([b["probabilities"].numpy() for b in batches])
    class_names = [n.decode() for n in batches[0]["class_names"].numpy()[0]]
    return probabilities, class_names


def _estimator_model(export: Path, contents: Sequence[bytes], batch_size: int, allow_unsafe: bool):
    """Probabilities of a scikit-learn head's export: the backbone's `serving_bytes`, then the estimator.

    The estimator file is read as data (`pipeline.estimators.load_estimator`): only
    scikit-learn's own types unless `allow_unsafe`.
    """
    import numpy as np
    import tensorflow as tf

    from pipeline.estimators import SKOPS_FILE, estimator_probabilities, load_estimator

    class_names = (export / "labels.txt").read_text().splitlines()
    estimator = load_estimator((export / SKOPS_FILE).read_bytes(), str(export / SKOPS_FILE), allow_unsafe)
    signatures = tf.saved_model.load(str(export / "backbone")).signatures
    if "serving_bytes" not in signatures:
        raise ExportError(
            f"the SavedModel at {export / 'backbone'} has no serving_bytes signature (its images "
            "have 2 or 4 channels); pass the images through the MLflow model instead"
        )
    serve = signatures["serving_bytes"]
    features = np.concatenate([
        serve(images=tf.constant(list(contents[start : start + batch_size])))["features"].numpy()
        for start in range(0, len(contents), batch_size)
    ])
    return estimator_probabilities(estimator, features, len(class_names), "multiclass"), class_names


def _mlflow_model(uri: str, tracking_uri: str, contents: Sequence[bytes], batch_size: int, allow_unsafe: bool):
    """Probabilities from an MLflow model's SavedModel, on decoded pixels (as the pyfunc takes).

    The files are decoded to RGB as the data stage decodes them; the model's own graph then
    converts channels and resizes, as it does for every served image.
    """
    import numpy as np

    from pipeline.data.decode import read_pixels
    from pipeline.tracking import load_model

    probabilities_of, class_names = load_model(uri, tracking_uri, allow_unsafe)
    rows = []
    for data in contents:  # one at a time: the images may differ in size
        rows.append(probabilities_of(read_pixels(data).numpy()[None].astype("float32")))
    return np.concatenate(rows), class_names


def _top_k(paths, probabilities, class_names, top_k) -> list[Prediction]:
    import numpy as np

    k = min(top_k, probabilities.shape[1])
    predictions = []
    for path, row in zip(paths, probabilities):
        for rank, index in enumerate(np.argsort(-row, kind="stable")[:k], start=1):
            predictions.append(Prediction(str(path), rank, class_names[index], float(row[index])))
    return predictions


def write_csv(predictions: Sequence[Prediction], path: Path) -> None:
    """`path,rank,class,probability`, one row per image and rank."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "rank", "class", "probability"])
        for p in predictions:
            writer.writerow([p.path, p.rank, p.class_name, f"{p.probability:.6f}"])


def format_table(predictions: Sequence[Prediction]) -> str:
    width = max([len("path"), *(len(p.path) for p in predictions)])
    names = max([len("class"), *(len(p.class_name) for p in predictions)])
    lines = [f"{'path':<{width}}  rank  {'class':<{names}}  probability"]
    lines += [
        f"{p.path:<{width}}  {p.rank:>4}  {p.class_name:<{names}}  {p.probability:11.4f}" for p in predictions
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, output: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description="Print and write (CSV) the top classes of images, from an export or an MLflow model.",
    )
    parser.add_argument(
        "source",
        help="an export directory (holding saved_model/), a SavedModel directory, or an MLflow "
        "model URI: runs:/<run_id>/model, models:/<name>/<version>",
    )
    parser.add_argument("images", nargs="+", help="image files, folders of images, or quoted globs")
    parser.add_argument("--top-k", type=int, default=3, help="classes per image (default 3)")
    parser.add_argument(
        "--output", type=Path, default=Path("predictions.csv"), help="CSV to write (default predictions.csv)"
    )
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="the MLflow store for runs:/ and models:/ URIs (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call")
    parser.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS,
        help=f"skip files whose header declares more pixels, width x height (default {MAX_PIXELS:,})",
    )
    parser.add_argument(
        "--allow-unsafe", action="store_true",
        help="let an MLflow model's SavedModel run ops that touch files, the network or Python, "
        "and an estimator.skops build types outside scikit-learn (only for files you trust)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        predictions = predict(args.source, args.images, args.top_k, args.tracking_uri, args.batch_size,
                              args.max_pixels, args.allow_unsafe)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.output}", file=sys.stderr, flush=True)
        return 2
    write_csv(predictions, args.output)
    output(format_table(predictions))
    output(f"\nWrote {len(predictions)} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
