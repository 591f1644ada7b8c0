"""`python -m pipeline.predict SOURCE INPUTS...`: the top classes of images or texts, printed and as CSV.

SOURCE is an export directory (holding `saved_model/`, or `backbone/` and `estimator.skops`
for a scikit-learn head), a SavedModel directory, or an MLflow
model URI (`runs:/<run_id>/model`, `models:/<name>/<version>`). For an image model, INPUTS
are files, folders (the images directly inside) or globs (`'photos/**/*.jpg'`, quoted so
that the shell leaves them alone). For a text model (its `serving_default` takes strings),
each example is a `--text` value, a `.txt` file (given, in a folder, or matched by a glob)
or a cell of `--csv FILE`'s `--text-column`; each is named in the output by `text[<i>]`,
its path or `FILE:<line>`.

    python -m pipeline.predict outputs/runs/<run>/export photos/ --top-k 3
    python -m pipeline.predict runs:/<run_id>/model cat.jpg --output cat.csv
    python -m pipeline.predict outputs/runs/<run>/export --text "A quiet, patient film." reviews/
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
from pipeline.sources.signatures import load_with_text_ops

log = logging.getLogger("pipeline")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
TEXT_SUFFIXES = (".txt",)
# Each signature takes a batch of strings: encoded image files (`images`), or texts (`text`).
_SIGNATURES = {"image": "serving_bytes", "text": "serving_default"}
_URI_SCHEMES = ("runs:/", "models:/", "file:/", "s3://", "gs://", "http://", "https://", "dbfs:/")


@dataclass(frozen=True)
class Prediction:
    """One of the top classes of one image or text: `rank` 1 is the most probable.

    `path` names the example: an image's or `.txt` file's path, `text[<i>]` for the i-th
    `--text`, `<csv file>:<line>` for a CSV row.
    """

    path: str
    rank: int
    class_name: str
    probability: float


def predict(
    source: str,
    inputs: Sequence[str] = (),
    top_k: int = 3,
    tracking_uri: str = "sqlite:///mlflow.db",
    batch_size: int = 32,
    max_pixels: int = MAX_PIXELS,
    allow_unsafe: bool = False,
    texts: Sequence[str] = (),
    csv_file: str | None = None,
    text_column: str | None = None,
    encoding: str = "utf-8",
) -> list[Prediction]:
    """The `top_k` classes of every readable example the inputs name, from the model at `source`.

    `inputs` are image files, folders and globs, or for a text model `.txt` files and folders
    of them; `texts` (`--text`) and the `text_column` of `csv_file` (`--csv`, default column
    `text`) add texts. Images and texts cannot be mixed, and must be what the model takes.
    A file that is not a decodable image, or whose header declares more than `max_pixels`
    pixels, is reported (a warning naming it and why) and left out; the others are predicted.
    So is a text that is not valid in `encoding` (`--encoding`: the `.txt` files' and the
    CSV's), or is empty or only whitespace (`pipeline.data.text`).
    An MLflow model is read as data (see `pipeline.tracking.model.load_model`); `allow_unsafe`
    lets its SavedModel run ops that touch files, the network or Python.

    Raises:
        ExportError: the source is not an export, SavedModel or loadable MLflow model.
        DataError: a pattern matches nothing, no example is readable, or the inputs are
            images for a text model or texts for an image model.
    """
    if top_k < 1:
        raise DataError(f"--top-k={top_k}: expected 1 or more, for example --top-k 3")
    if text_column is not None and csv_file is None:
        raise DataError(f"--text-column {text_column!r} without --csv: pass the CSV file too, --csv FILE")
    _check_encoding(encoding)
    is_uri = source.startswith(_URI_SCHEMES)
    estimator = None if is_uri else _estimator_export(Path(source))
    served = None  # the SavedModel of an export or SavedModel directory
    if not is_uri:
        served = Path(source) / "backbone" if estimator else _saved_model_dir(Path(source))
    kind = input_kind(inputs, texts, csv_file)
    model_kind = None  # what the model takes, from its saved_model.pb (read when it decides)
    if kind is None and served is not None:
        model_kind = _served_kind(served)
    kind = kind or model_kind or "image"
    files = find_texts(inputs) if kind == "text" else find_images(inputs)  # before TensorFlow: fail fast
    if served is not None:  # before any input is read
        shown = [*map(str, files), *(text[:40] for text in texts), *([csv_file] if csv_file else [])]
        _check_kind(source, model_kind or _served_kind(served), kind, shown)
    if kind == "text":
        names, contents = readable_texts(files, texts, csv_file, text_column or "text", encoding)
    else:
        names, contents = readable_images(files, max_pixels)
    if is_uri:
        from pipeline.tracking import load_model

        model = load_model(source, tracking_uri, allow_unsafe)  # read as data, never run
        _check_kind(source, model[0].input_kind, kind, names)
        probabilities, class_names = _mlflow_probabilities(model, contents, batch_size, kind)
    elif estimator:
        probabilities, class_names = _estimator_model(Path(source), contents, batch_size, allow_unsafe, kind)
    else:
        probabilities, class_names = _saved_model(served, contents, batch_size, kind)
    return _top_k(names, probabilities, class_names, top_k)


def input_kind(patterns: Sequence[str], texts: Sequence[str] = (), csv_file: str | None = None) -> str | None:
    """`text` for `--text`, `--csv`, `.txt` files and folders of them, `image` for other files
    and folders of images; None when only folders that hold both (or neither) are given:
    then the export's model decides (for an MLflow model, images are assumed).

    Raises DataError when the inputs mix the two.
    """
    kinds: dict[str, str] = {}  # kind -> the first input of that kind, for the error
    if texts:
        kinds["text"] = "--text"
    if csv_file is not None:
        kinds.setdefault("text", f"--csv {csv_file}")
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            inside = {_file_kind(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + TEXT_SUFFIXES}
            found = list(inside) if len(inside) == 1 else []  # both or neither: the model decides
        elif any(char in pattern for char in "*?[") and not path.exists():
            found = [_file_kind(Path(p)) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
        else:
            found = [_file_kind(path)]
        for kind in found:
            kinds.setdefault(kind, pattern)
    if len(kinds) > 1:
        raise DataError(
            f"the inputs mix images ({kinds['image']!r}) and texts ({kinds['text']!r}): a model takes one "
            "kind; predict images and texts in separate commands"
        )
    return next(iter(kinds), None)


def _file_kind(path: Path) -> str:
    return "text" if path.suffix.lower() in TEXT_SUFFIXES else "image"


def find_images(patterns: Sequence[str]) -> list[Path]:
    """Files as given, the images directly inside folders, and the files globs match; in order."""
    return _find_files(patterns, IMAGE_SUFFIXES, "image")


def find_texts(patterns: Sequence[str]) -> list[Path]:
    """Files as given, the `.txt` files directly inside folders, and the files globs match; in order."""
    return _find_files(patterns, TEXT_SUFFIXES, "text")


def _find_files(patterns: Sequence[str], suffixes: tuple[str, ...], noun: str) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes and p.is_file())
            if not matches:
                raise DataError(
                    f"folder {pattern!r} holds no {noun} files ({', '.join(suffixes)}); "
                    f"point at the {noun}s or at a folder that holds them"
                )
        elif path.is_file():
            matches = [path]
        elif any(char in pattern for char in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"the pattern {pattern!r} matches no file; check it (quote it for the shell)")
        else:
            raise DataError(f"{noun} {pattern!r} does not exist; pass files, folders or globs of {noun}s")
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


def readable_texts(
    paths: Sequence[Path], texts: Sequence[str] = (), csv_file: str | None = None, text_column: str = "text",
    encoding: str = "utf-8",
) -> tuple[list[str], list[str]]:
    """The usable texts of `.txt` files, `--text` values and a CSV column, with their names.

    Each file is one example; so is each value and each CSV row. Files and the CSV are read
    in `encoding`. One that is not valid in it, or is empty or only whitespace, is reported
    in one warning line and left out, as training leaves it out
    (`pipeline.data.text.read_text`). Raises DataError when none is left.
    """
    from pipeline.data.text import TextSettings, read_text

    examples: list[tuple[str, bytes | str | OSError]] = []
    for path in paths:
        try:
            examples.append((str(path), path.read_bytes()))
        except OSError as error:
            examples.append((str(path), error))
    examples += [(f"text[{index}]", text) for index, text in enumerate(texts)]
    if csv_file is not None:
        examples += _csv_texts(csv_file, text_column, encoding)
    settings = TextSettings(encoding=encoding)
    kept_names, kept = [], []
    for name, raw in examples:
        if isinstance(raw, OSError):
            text, problem = None, f"cannot be read ({raw.strerror})"
        else:
            text, problem = read_text(raw, settings)
        if problem:
            log.warning("skipped %s: %s", name, problem)
            continue
        kept_names.append(name)
        kept.append(text)
    if not kept:
        raise DataError(
            f"none of the {len(examples)} text(s) is usable (see the warnings above); expected "
            f"non-empty {encoding} text. Fix or remove them, or pass the files' --encoding."
        )
    return kept_names, kept


def _check_encoding(encoding: str) -> None:
    """Raises DataError naming `--encoding` when Python knows no such text encoding."""
    from pipeline.data.text import text_settings
    from pipeline.errors import ConfigError

    try:
        text_settings(encoding)
    except ConfigError:
        raise DataError(f"--encoding {encoding!r} is not a text encoding Python knows; pass the files' "
                        "encoding, for example --encoding utf-8, latin-1, cp1252 or utf-16") from None


def _csv_texts(csv_file: str, column: str, encoding: str = "utf-8") -> list[tuple[str, str]]:
    """`(FILE:line, cell)` of `column` in every row of the CSV (in `encoding`, a header row first)."""
    import codecs

    rows = []
    # A byte order mark, as spreadsheets write, is not part of the header.
    opened = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        with open(csv_file, newline="", encoding=opened) as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or column not in header:
                raise DataError(
                    f"--csv {csv_file!r} has no column {column!r} (its header: {header or 'none, the file is empty'}); "
                    "pass --text-column with the column that holds the texts"
                )
            index = header.index(column)
            line = reader.line_num + 1
            for row in reader:
                if row:  # a blank line is no example
                    rows.append((f"{csv_file}:{line}", row[index] if index < len(row) else ""))
                line = reader.line_num + 1
    except OSError as error:
        raise DataError(f"--csv {csv_file!r} cannot be read ({error.strerror}); pass a readable CSV file") from None
    except UnicodeDecodeError as error:
        raise DataError(
            f"--csv {csv_file!r} is not {encoding} text ({error.reason} at byte {error.start}); pass its "
            "--encoding (for example --encoding latin-1), or convert it, for example with iconv -f latin1 -t utf-8"
        ) from None
    except csv.Error as error:
        raise DataError(f"--csv {csv_file!r} cannot be parsed as CSV ({error}); fix the file or pass the texts as .txt files") from None
    return rows


def _served_kind(saved_model: Path) -> str:
    """What the SavedModel's `serving_default` takes, `text` or `image` (read, not loaded)."""
    from pipeline.serving import served_input_kind

    return served_input_kind(saved_model) or "image"


def _check_kind(source: str, model_kind: str, kind: str, inputs: Sequence[str]) -> None:
    """Raises DataError when the model takes images and the inputs are texts, or the reverse."""
    if model_kind == kind:
        return
    shown = ", ".join(repr(str(name)) for name in inputs[:3]) + (", ..." if len(inputs) > 3 else "")
    if model_kind == "text":
        raise DataError(
            f"SOURCE {source!r} is a text model, but the inputs are images ({shown}): pass texts as "
            "--text 'some text', .txt files or folders of them, or --csv FILE --text-column COLUMN"
        )
    raise DataError(
        f"SOURCE {source!r} is an image model, but the inputs are texts ({shown}): pass image files, "
        "folders of images or quoted globs; --text, --csv and .txt files are for text models"
    )


def _serve(signature, kind: str, contents: Sequence, batch_size: int) -> list:
    """The outputs of `signature` on `contents` (encoded image files or texts: both a string
    batch), one dict per `batch_size` of them."""
    import tensorflow as tf

    name = "images" if kind == "image" else "text"
    return [
        signature(**{name: tf.constant(list(contents[start : start + batch_size]), dtype=tf.string)})
        for start in range(0, len(contents), batch_size)
    ]


def _saved_model(directory: Path, contents: Sequence, batch_size: int, kind: str = "image"):
    """Probabilities from the SavedModel's `serving_bytes` signature, which decodes inside;
    for a text model, its `serving_default` on the texts."""
    import numpy as np

    signatures = load_with_text_ops(str(directory)).signatures
    if _SIGNATURES[kind] not in signatures:
        raise ExportError(
            f"the SavedModel at {directory} has no {_SIGNATURES[kind]} signature (signatures: "
            f"{', '.join(signatures.keys())}); export it with this pipeline's export stage"
        )
    batches = _serve(signatures[_SIGNATURES[kind]], kind, contents, batch_size)
    probabilities = np.concatenate([b["probabilities"].numpy() for b in batches])
    class_names = [n.decode() for n in batches[0]["class_names"].numpy()[0]]
    return probabilities, class_names


def _estimator_model(export: Path, contents: Sequence, batch_size: int, allow_unsafe: bool, kind: str = "image"):
    """Probabilities of a scikit-learn head's export: the backbone's `serving_bytes` (a text
    model's: `serving_default`), then the estimator.

    The estimator file is read as data (`pipeline.estimators.load_estimator`): only
    scikit-learn's own types unless `allow_unsafe`.
    """
    import numpy as np

    from pipeline.estimators import SKOPS_FILE, estimator_probabilities, load_estimator

    class_names = (export / "labels.txt").read_text().splitlines()
    estimator = load_estimator((export / SKOPS_FILE).read_bytes(), str(export / SKOPS_FILE), allow_unsafe)
    signatures = load_with_text_ops(str(export / "backbone")).signatures
    if _SIGNATURES[kind] not in signatures:
        raise ExportError(
            f"the SavedModel at {export / 'backbone'} has no serving_bytes signature (its images "
            "have 2 or 4 channels); pass the images through the MLflow model instead"
        )
    batches = _serve(signatures[_SIGNATURES[kind]], kind, contents, batch_size)
    features = np.concatenate([b["features"].numpy() for b in batches])
    return estimator_probabilities(estimator, features, len(class_names), "multiclass"), class_names


def _mlflow_probabilities(model, contents: Sequence, batch_size: int, kind: str):
    """Probabilities from an MLflow model's SavedModel, on decoded pixels (as the pyfunc takes),
    or on the texts, `batch_size` at a time.

    The files are decoded to RGB as the data stage decodes them; the model's own graph then
    converts channels and resizes, as it does for every served image.
    """
    import numpy as np

    from pipeline.data.decode import read_pixels

    probabilities_of, class_names = model
    if kind == "text":
        batches = [contents[start : start + batch_size] for start in range(0, len(contents), batch_size)]
        return np.concatenate([probabilities_of(batch) for batch in batches]), class_names
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
    """`path,rank,class,probability`, one row per image (or text) and rank."""
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
        description="Print and write (CSV) the top classes of images or texts, from an export or an MLflow model.",
    )
    parser.add_argument(
        "source",
        help="an export directory (holding saved_model/), a SavedModel directory, or an MLflow "
        "model URI: runs:/<run_id>/model, models:/<name>/<version>",
    )
    parser.add_argument(
        "inputs", nargs="*",
        help="image files, folders of images, or quoted globs; for a text model, .txt files (one "
        "example each) or folders of them",
    )
    parser.add_argument("--text", action="append", default=[], metavar="TEXT",
                        help="a text to classify (repeatable; text models)")
    parser.add_argument("--csv", dest="csv_file", metavar="FILE",
                        help="a CSV file (a header row) whose --text-column holds one text per row")
    parser.add_argument("--text-column", metavar="COLUMN", help="the --csv column that holds the texts (default text)")
    parser.add_argument("--encoding", default="utf-8",
                        help="the text encoding of .txt files and the --csv file (default utf-8; as data.encoding)")
    parser.add_argument("--top-k", type=int, default=3, help="classes per image or text (default 3)")
    parser.add_argument(
        "--output", type=Path, default=Path("predictions.csv"), help="CSV to write (default predictions.csv)"
    )
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="the MLflow store for runs:/ and models:/ URIs (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images or texts per model call")
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
    if not (args.inputs or args.text or args.csv_file):
        parser.error("no inputs: pass image files, folders or globs, or for a text model --text, .txt files or --csv")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        predictions = predict(args.source, args.inputs, args.top_k, args.tracking_uri, args.batch_size,
                              args.max_pixels, args.allow_unsafe, args.text, args.csv_file, args.text_column,
                              args.encoding)
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
    from pipeline.quick_exit import exit_after

    exit_after(main)
