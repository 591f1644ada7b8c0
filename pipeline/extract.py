"""`python -m pipeline.extract [overrides]`: the backbone's features of every example, as files.

Takes the same config and overrides as `python -m pipeline` (only `source`, `data`,
`extract`, `tracking` and `train.feature_cache_dir` matter) and writes, in the run's
directory, `features/<split>.parquet` (or `.npz`): one row per example with its id (the
image file, `<file>:<record>` for TFRecords, or the index), its label and class name, and
the backbone's output. The outputs come from the feature cache, so a second extract of the
same backbone and data (or one after a frozen-backbone training run) computes nothing. The
files are logged to MLflow as the artifact folder `features/` of a run tagged `job=extract`,
which `resume=auto` never takes for a training run.

    python -m pipeline.extract source=keras_app source.name=MobileNetV2 \\
        data=image_folder data.train_dir=/data/flowers extract.splits=[train,test]
    python -c "import pandas; print(pandas.read_parquet('outputs/runs/<run>/features/test.parquet'))"
"""

from __future__ import annotations

import copy
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.types import DataBundle, SourceModel

log = logging.getLogger("pipeline")
SPLITS = ("train", "val", "test")
PROGRESS_EVERY_S = 5.0

USAGE = """\
usage: python -m pipeline.extract [key=value | group=option ...]

Writes the source backbone's features of each example of the data to the run's directory as
features/<split>.parquet (extract.format=npz: .npz), logs them to MLflow and prints where they
are. Takes the same overrides as `python -m pipeline`; extract.splits, extract.format and
extract.batch_size choose what and how. The feature cache (train.feature_cache_dir) is reused.

example: python -m pipeline.extract source=keras_app source.name=MobileNetV2 \\
             data=image_folder data.train_dir=/data/flowers extract.format=npz
"""


@dataclass(frozen=True)
class Extracted:
    """What an extract wrote: a file and its row count per split, and whether the cache hit."""

    root: Path
    files: dict[str, Path]
    rows: dict[str, int]
    feature_shape: tuple[int, ...]
    feature_cache: str  # hit or computed
    computed_examples: int  # backbone outputs computed by this extract (0 on a hit)


class Extractor:
    """Writes a backbone's outputs for the chosen splits, one file per split, from the feature cache.

    The cache computes (once per backbone and data) all three splits, in the data's order,
    and the files are written from it batch by batch, so memory stays flat as data grows.

    Args:
        splits: the splits to write, any of train, val and test.
        format: parquet (one row per example; `pandas.read_parquet` reads it) or npz
            (`numpy.load`: arrays `ids`, `labels`, `features`, `class_names`).
        batch_size: images through the backbone at a time (also the unit of progress).

    Example:
        >>> Extractor(splits=["test"]).extract(source, data, Path("outputs/feature_cache"), Path("run/features"))
        Extracted(root=PosixPath('run/features'), files={'test': ...}, rows={'test': 108}, ...)
    """

    def __init__(
        self,
        splits: Sequence[str] = SPLITS,
        format: Literal["parquet", "npz"] = "parquet",
        batch_size: int = 64,
    ):
        from pipeline.feature_files import WRITERS

        chosen = list(dict.fromkeys(splits))
        unknown = [s for s in chosen if s not in SPLITS]
        if unknown or not chosen:
            raise ConfigError(
                f"extract.splits={list(splits)!r}: expected a non-empty list of the splits "
                f"{', '.join(SPLITS)}" + (f"; {unknown} are not splits" if unknown else "")
                + ". Set it like extract.splits=[train,test]."
            )
        if format not in WRITERS:
            raise ConfigError(
                f"extract.format={format!r}: expected one of {', '.join(WRITERS)}. Set it like "
                "extract.format=parquet."
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"extract.batch_size={batch_size!r}: expected a positive number, like 64")
        self.splits = tuple(chosen)
        self.format = format
        self.batch_size = batch_size

    def extract(self, source: SourceModel, data: DataBundle, cache_dir: Path, root: Path) -> Extracted:
        """The features of `data` under `source.backbone`, as `root/<split>.<format>`."""
        from pipeline.feature_files import WRITERS, Split
        from pipeline.features import FeatureCache

        if not data.fingerprint:
            raise DataError(
                "the data option gives no fingerprint, so its features cannot be cached and paired "
                "with its examples: use an option of pipeline/data/ or give yours a fingerprint."
            )
        for split in self.splits:
            ids = data.example_ids.get(split)
            if ids is not None and len(ids) != data.num_examples[split]:
                raise DataError(f"the data gives {len(ids)} ids for the {split} split but "
                                f"{data.num_examples[split]} examples; the ids cannot be paired with rows.")
        progress = Progress({split: data.num_examples[split] for split in SPLITS})
        cache = FeatureCache(Path(cache_dir))
        cached, hit = cache.load_or_compute(source.backbone, data, self.batch_size, ordered=True,
                                            on_batch=progress.computed)
        root.mkdir(parents=True, exist_ok=True)
        files, rows = {}, {}
        for split in self.splits:
            described = Split(split, _ids(data.example_ids.get(split)), data.num_examples[split],
                              tuple(data.class_names), data.task, tuple(source.feature_shape), source.description)
            files[split] = root / f"{split}.{self.format}"
            batches = cached[split].batch(self.batch_size).as_numpy_iterator()
            rows[split] = WRITERS[self.format](files[split], described, batches,
                                               lambda done, s=split: progress.written(s, done))
            log.info("extract: wrote %s (%s rows)", files[split], f"{rows[split]:,}")
        return Extracted(root, files, rows, tuple(source.feature_shape), "hit" if hit else "computed",
                         cache.computed_examples)


def _ids(ids: Sequence[str] | None):
    """`ids(start, stop)`: the given ids, or the row numbers when a data option gives none."""
    if ids is None:
        return lambda start, stop: [str(i) for i in range(start, stop)]
    return lambda start, stop: ids[start:stop]


class Progress:
    """Logs `extract: train 12,800/50,000` (computed) or `... written` at most every
    `PROGRESS_EVERY_S` seconds, so long work shows that it moves and short work stays quiet."""

    def __init__(self, totals: dict[str, int]):
        self.totals = totals
        self.done = dict.fromkeys(totals, 0)
        self.last = time.monotonic()

    def computed(self, split: str, examples: int) -> None:
        self.done[split] += examples
        self._log(split, self.done[split], "")

    def written(self, split: str, rows: int) -> None:
        self._log(split, rows, " written")

    def _log(self, split: str, done: int, what: str) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            log.info("extract: %s %s/%s%s", split, f"{done:,}", f"{self.totals[split]:,}", what)


def extract_features(cfg: Any) -> tuple[Extracted, Any]:
    """Check the config, load the data and the source, then extract inside an MLflow run.

    Returns what was written and the MLflow run (`TrackedRun`). Every user mistake (config,
    data, source, a data/source mismatch) raises before the backbone runs.
    """
    from pipeline import config
    from pipeline.tracking.process import in_own_process

    cfg = _in_data_order(cfg)
    resolved = config.validate(cfg)  # before TensorFlow is imported
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    extractor, source_option, data_option, tracker = (
        config.build(cfg, group) for group in ("extract", "source", "data", "tracking"))
    # MLflow is imported by the tracker's own process meanwhile, as in a run (`pipeline.tracking.process`).
    with in_own_process(tracker) as tracking:
        return _extract(cfg, resolved, extractor, source_option, data_option, tracking)


def _extract(cfg: Any, resolved: dict[str, Any], extractor: Any, source_option: Any, data_option: Any,
             tracker: Any) -> tuple[Extracted, Any]:
    from pipeline import config, provenance
    from pipeline.adapt import check_input_kind, check_input_shape
    from pipeline.features import backbone_fingerprint
    from pipeline.files import run_dir_lock

    import keras

    # As a training run seeds before it loads: a source with random weights (weights=null) is
    # then the same network, and shares the feature cache with the runs of the same config.
    keras.utils.set_random_seed(resolved["train"]["seed"])
    data = data_option.load()
    log.info("data: %s examples, classes %s", data.num_examples, list(data.class_names))
    source = source_option.load()
    log.info("source: %s, features %s", source.description, source.feature_shape)
    check_input_kind(source, data.input_kind)
    check_input_shape(source, data.input_shape, data.resizable)

    output_dir = Path(cfg.output_dir)
    cache_dir = Path(resolved["train"]["feature_cache_dir"])
    params = {**{k: resolved[k] for k in ("source", "data", "extract")},
              "train": {"feature_cache_dir": str(cache_dir)}}
    tags = {
        **provenance.environment_tags(),
        "command": shlex.join(["python", "-m", "pipeline.extract", *sys.argv[1:]]),
        "job": "extract",
        # Not `config_sha256`: resume=auto looks for that tag, and this is no training run.
        "extract_sha256": provenance.config_fingerprint({"job": "extract", **params}),
    }
    with run_dir_lock(output_dir), tracker.run(config.flatten(params), tags) as tracked:
        tracked.set_tags({"run_dir": str(output_dir.resolve()), "data.fingerprint": data.fingerprint,
                          "source.fingerprint": backbone_fingerprint(source.backbone)})
        extracted = extractor.extract(source, data, cache_dir, output_dir / "features")
        tracked.set_tags({"feature_cache": extracted.feature_cache})
        tracked.log_metrics({f"extract_{split}_rows": rows for split, rows in extracted.rows.items()})
        tracked.log_artifact(extracted.root, "features")
    return extracted, tracked


def _in_data_order(cfg: Any) -> Any:
    """The config with `data.deterministic=true` where the option has it: the files pair row
    `i` with the split's `i`-th id, which needs the data's own order."""
    from omegaconf import OmegaConf, open_dict

    if OmegaConf.select(cfg, "data.deterministic") is False:
        log.info("extract: reading the data in order (data.deterministic=true) to pair each row with its id")
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.data.deterministic = True
    return cfg


def _summary(extracted: Extracted, tracked: Any) -> str:
    size = 1
    for dim in extracted.feature_shape:
        size *= int(dim)
    shape = f", shape {list(extracted.feature_shape)}" if len(extracted.feature_shape) > 1 else ""
    first = next(iter(extracted.files.values())).resolve()
    reader = "pandas.read_parquet" if first.suffix == ".parquet" else "numpy.load"
    computed = f", {extracted.computed_examples:,} examples computed" if extracted.computed_examples else ""
    return "\n".join([
        "",
        f"Features:      {extracted.root.resolve()}  (feature size {size:,}{shape})",
        *(f"  {split:<12}{path.resolve()}  ({extracted.rows[split]:,} rows)"
          for split, path in extracted.files.items()),
        f"Feature cache: {extracted.feature_cache}{computed}",
        f"MLflow run:    {tracked.run_id} (experiment '{tracked.experiment}'), artifact folder features/",
        f"Read it:       {reader}('{first}')",
    ])


def _job(cfg: Any) -> None:
    """The Hydra job: one extract; a user's mistake ends with one `error:` line and status 2."""
    from hydra.core.hydra_config import HydraConfig

    from pipeline.errors import describe_write_fault, write_fault
    from pipeline.hydra_app import tidy_run_dir

    hydra_cfg = HydraConfig.get()
    try:
        extracted, tracked = extract_features(cfg)
    except PipelineError as error:
        log.error("%s", error)
        _exit_with(str(error))
    except KeyboardInterrupt as error:
        _exit_with(f"interrupted ({str(error) or 'Ctrl-C'}); run the same command again")
    except Exception as error:
        fault = write_fault(error)
        if fault is None:
            raise
        _exit_with(f"{describe_write_fault(fault)}; make room or choose a writable output_dir or "
                   "train.feature_cache_dir, then run the same command again")
    finally:
        own = [name for name in (hydra_cfg.output_subdir, f"{hydra_cfg.job.name}.log") if name]
        run_dir = Path(str(cfg.output_dir))
        tidy_run_dir(Path(hydra_cfg.runtime.output_dir), own, run_dir if run_dir.is_dir() else None, False)
    print(_summary(extracted, tracked), flush=True)


def _exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pipeline.extract [overrides]`; exits 2 with one line on a user's mistake."""
    import hydra

    from pipeline.hydra_app import start_error
    from pipeline.runner import CONFIG_DIR

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE, end="")
        return
    if any(a in ("-m", "--multirun") for a in argv):
        _exit_with("python -m pipeline.extract does not sweep (-m): run it once per source or data")
    sys.argv = [sys.argv[0], *argv]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own errors reach us, to become one line
    try:
        hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(_job)()
    except KeyboardInterrupt:
        _exit_with("interrupted; run the same command again")
    except Exception as error:
        message = None if tracebacks else start_error(error)
        if message is None:
            raise
        _exit_with(message)


if __name__ == "__main__":
    from pipeline.quick_exit import exit_after

    exit_after(main)
