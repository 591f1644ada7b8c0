"""How fast is the pipeline next to a plain Keras script? Measures, does not claim (issue 8).

    python scripts/benchmark_transfer.py          # the full run: about 15 min on a quiet 2-core CPU
    python scripts/benchmark_transfer.py --quick  # a small run (100 images of 64x64), about 4 min
    python scripts/benchmark_transfer.py --only plain_frozen,pipeline_frozen --num-images 300 --image-size 96

Each measurement is its own subprocess, run one after the other on this machine, so imports
and memory count the same on both sides. Both sides use the same synthetic JPEG folder
(`scripts/benchmark_input.py`'s generator), the same source (`keras.applications.MobileNetV2`
with random weights, so nothing is downloaded), the same splits, batch size and epochs. The
default size is a small real transfer job: 1500 images in 5 classes at 224x224, the size
MobileNetV2 was trained at (`--quick` and smaller sizes show how fixed costs, such as
importing TensorFlow and exporting, dominate tiny runs):

- plain: `scripts/plain_keras_transfer.py` (image_dataset_from_directory, cache, prefetch,
  model.fit, evaluate, save), frozen and with `--fine-tune --batchnorm B`;
- pipeline: `python -m pipeline` with `freeze=all` (feature cache on, first cold-cache
  run, verified SavedModel export and MLflow model included); a Hydra basic-launcher sweep of
  head settings on one fresh cache with `export=none` (sweep jobs are scored, the winner is
  exported by running its overrides), next to one job of that sweep run alone on a fresh
  cache; and `freeze=none freeze.batchnorm=B`;
- the input rate against the train step (`scripts/benchmark_input.py`), MLflow's cost per
  epoch, and a feature-cache probe that writes a large cache to show it streams to disk;
- a profiled frozen run (timers around the pipeline's stages, nothing edited): where the
  time goes (`--no-profile` skips it).

Fine-tuning compares like with like: B is `--fine-tune-batchnorm` (default `frozen`, the
pipeline's default: BatchNorm layers non-trainable, so in inference mode with fixed
gamma/beta; `trainable`: they train on both sides). Each side prints a `work:` line from the
same function (`plain_keras_transfer.describe_work`) once its model is compiled: trainable
variables and parameters, BatchNorm layers in training mode, `jit_compile` and
`steps_per_execution` as Keras resolved them; the pipeline prints it from a wrapper
(`--_describe`, which runs `pipeline.runner.main` and only adds that line), and the report
says whether the two lines agree. (Until this check existed, the plain script called its
unfrozen base with `training=False`, which Keras 3's `fit` overrides: its 52 BatchNorm
layers trained in batch-statistics mode while the pipeline's were frozen, and the pipeline's
epoch came out at 0.33x the plain one.)

Wall time and peak RSS come from `os.wait4` on each child. Epoch time is the median gap
between consecutive epoch ends after the first epoch: the plain script prints a timestamp
at each epoch end; the pipeline's per-epoch MLflow metrics carry one (read from the run's
sqlite store), so its epoch time includes the MLflow logging and per-epoch checkpoint.
"other load" is the CPU time other processes used during a measurement (from /proc/stat),
in cores; a measurement with more than --max-other-load is run again once (if shorter than
--retry-under), and a verdict resting on a noisy measurement says so. CPU time (user +
system of the child) is printed next to wall time: it is the steadier figure under load.

Everything goes to a temporary directory (removed unless --keep), never to outputs/.
It prints figures and the targets next to them; it asserts nothing.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import platform
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
PYTHON = sys.executable
CACHE_PROBE_SIZE = 96  # the probe's "features" are its 96x96x3 float32 inputs: 110 KB an example


@dataclass
class Measured:
    """One subprocess: what ran, how long, how much memory, and what it printed."""

    label: str
    command: list[str]
    wall_s: float
    rc: int
    max_rss_mb: float
    cpu_s: float
    other_load: float  # cores used by other processes while it ran
    started: float  # time.time() at launch
    log: str
    retried: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def failure(self) -> str:
        lines = [line for line in self.log.splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error:" in line]
        return (errors or lines or ["(no output)"])[-1][:200]


def _busy_seconds() -> float:
    """CPU seconds all processes have used since boot (every core together)."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measure(label: str, command: list[str], workdir: Path, env: dict | None = None) -> Measured:
    """Run `command` to completion in its own process; wall time, peak RSS, others' load."""
    log_path = workdir / "logs" / f"{label.replace(' ', '_').replace('/', '_')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    environment.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "w") as log:
        busy, started, start = _busy_seconds(), time.time(), time.perf_counter()
        child = subprocess.Popen(command, cwd=workdir, env=environment, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        busy = _busy_seconds() - busy
    cpu = usage.ru_utime + usage.ru_stime
    return Measured(
        label, command, wall, child.returncode, usage.ru_maxrss / 1024, cpu,
        max(0.0, (busy - cpu) / wall), started, log_path.read_text(errors="replace"),
    )


def wait_for_quiet(limit: float, patience: float) -> None:
    """Wait (up to `patience` s) until other processes use at most `limit` cores."""
    waited = 0.0
    while True:
        busy = _busy_seconds()
        time.sleep(2)
        load = (_busy_seconds() - busy) / 2  # this process sleeps: all of it is others'
        if load <= limit or waited >= patience:
            if waited:
                print(f"    waited {waited:.0f} s for other processes; they use {load:.2f} cores", flush=True)
            return
        waited += 2


def measure_quietly(label, command, workdir, args, env=None, prepare=None) -> Measured:
    """`measure` when the machine is quiet, once more when others used > --max-other-load cores."""
    if prepare:
        prepare()
    wait_for_quiet(args.max_other_load, args.wait_quiet)
    result = measure(label, command, workdir, env)
    if result.other_load > args.max_other_load and args.retry and result.wall_s < args.retry_under:
        print(f"  {label}: other processes used {result.other_load:.2f} cores; measuring again", flush=True)
        if prepare:
            prepare()
        wait_for_quiet(args.max_other_load, args.wait_quiet)
        again = measure(label, command, workdir, env)
        again.retried = True
        if again.other_load < result.other_load or not result.ok:
            result = again
    print(f"  {label}: {result.wall_s:.1f} s, rc {result.rc}, peak RSS {result.max_rss_mb:.0f} MB, "
          f"other load {result.other_load:.2f}", flush=True)
    return result


# --- what each side recorded -------------------------------------------------------------


def plain_epoch_ends(log: str) -> list[float]:
    return [float(line.split()[2]) for line in log.splitlines() if line.startswith("epoch_end ")]


def mlflow_runs(db: Path) -> list[dict]:
    """Each run in the store, in start order: start, end, per-epoch and final timestamps (s)."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        runs = connection.execute(
            "SELECT run_uuid, start_time, end_time, status, experiment_id FROM runs ORDER BY start_time"
        ).fetchall()
        found = []
        for run_id, start, end, status, experiment in runs:
            epochs = connection.execute(
                "SELECT step, timestamp FROM metrics WHERE run_uuid=? AND key='loss' ORDER BY step", (run_id,)
            ).fetchall()
            final = connection.execute(
                "SELECT MAX(timestamp) FROM metrics WHERE run_uuid=? AND key='epochs_completed'", (run_id,)
            ).fetchone()[0]
            tags = dict(connection.execute("SELECT key, value FROM tags WHERE run_uuid=?", (run_id,)).fetchall())
            found.append({
                "run_id": run_id, "status": status, "experiment": experiment, "tags": tags,
                "start": start / 1000, "end": (end or 0) / 1000, "final": (final or 0) / 1000,
                "epoch_ends": [ts / 1000 for _, ts in epochs],
            })
    return found


def epoch_time(ends: list[float]) -> tuple[float | None, list[float]]:
    """The median gap between consecutive epoch ends, leaving out the first (tracing) epoch."""
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    return (statistics.median(gaps) if gaps else None), gaps


def phases(run: dict, process: Measured) -> dict[str, float]:
    """Where a pipeline run's wall time went, from its MLflow timestamps."""
    ends = run["epoch_ends"]
    if not ends:
        return {}
    finish = process.started + process.wall_s
    figures = {
        "start-up to MLflow run (imports, Hydra, config, store)": run["start"] - process.started,
        "data, source, cache, first epoch": ends[0] - run["start"],
        f"epochs 2-{len(ends)}": ends[-1] - ends[0],
    }
    if run["final"]:
        figures["evaluate + export (with verification)"] = run["final"] - ends[-1]
        figures["artifacts, MLflow model, close run"] = run["end"] - run["final"]
        figures["summary + interpreter exit"] = finish - run["end"]
    else:
        figures["after training (failed run)"] = finish - ends[-1]
    return figures


def directory_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


# --- probes run in their own subprocess ----------------------------------------------------


def mlflow_probe(uri: str, epochs: int) -> None:
    """Prints JSON: the store's first open, and the seconds per `log_epoch` (6 metrics)."""
    start = time.perf_counter()
    from pipeline.tracking import MlflowTracker

    tracker = MlflowTracker(uri=uri, experiment="benchmark-probe")
    imported = time.perf_counter() - start
    start = time.perf_counter()
    with tracker.run({"probe": "1"}, {}) as run:
        opened = time.perf_counter() - start
        times = []
        for epoch in range(epochs):
            begin = time.perf_counter()
            run.log_epoch(epoch, {"loss": 1.0, "accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5,
                                  "learning_rate": 0.001, "epoch_seconds": 1.0})
            times.append(time.perf_counter() - begin)
    print(json.dumps({"import_s": imported, "open_s": opened, "log_epoch_s": statistics.median(times)}))


def cache_probe(root: str, examples: int) -> None:
    """Writes `examples` 110 KB feature vectors through FeatureCache, then reads them back."""
    from types import SimpleNamespace

    import keras
    import tensorflow as tf

    from pipeline.features import FeatureCache

    shape = (CACHE_PROBE_SIZE, CACHE_PROBE_SIZE, 3)
    backbone = keras.Sequential([keras.Input(shape), keras.layers.Flatten()])  # features = pixels

    def images(count, offset):
        ids = tf.data.Dataset.range(offset, offset + count)
        return ids.map(lambda i: (tf.random.stateless_uniform(shape, seed=tf.stack([i, 0]), maxval=255.0), i % 5))

    val = test = max(1, examples // 10)
    train = examples - val - test
    data = SimpleNamespace(train=images(train, 0), val=images(val, train), test=images(test, train + val),
                           fingerprint=f"probe-{examples}", num_examples={"train": train, "val": val, "test": test})
    features, _ = FeatureCache(Path(root)).load_or_compute(backbone, data)
    seen = sum(1 for _ in features["train"].batch(64))  # read back, as training would
    print(json.dumps({"examples": examples, "batches_read": seen}))


def profile_pipeline(overrides: list[str]) -> None:
    """Runs `python -m pipeline <overrides>` with timers around its stages; JSON to $BENCH_PROFILE."""
    timers: dict[str, list[float]] = {}
    t0 = float(os.environ.get("BENCH_T0", time.time()))

    def record(name, seconds):
        entry = timers.setdefault(name, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1

    def timed_import(name, module):
        start = time.perf_counter()
        __import__(module)
        record(name, time.perf_counter() - start)

    def wrap(target, name):
        """Times calls of `module:attribute.path`; skipped when the pipeline has no such thing."""
        module, path = target.split(":")
        try:
            owner = importlib.import_module(module)
            *parents, attribute = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            original = getattr(owner, attribute)
        except (ImportError, AttributeError):
            record(f"(not found: {target})", 0.0)
            return

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                record(name, time.perf_counter() - start)

        setattr(owner, attribute, wrapper)

    record("python start-up to profiler", time.time() - t0)
    timed_import("import hydra + omegaconf", "hydra")
    timed_import("import mlflow", "mlflow")
    timed_import("import tensorflow + keras", "keras")
    for method in ("get_experiment_by_name", "create_experiment", "create_run", "get_run", "search_runs",
                   "log_batch", "set_tag", "log_artifact", "log_artifacts", "set_terminated"):
        wrap(f"mlflow.tracking:MlflowClient.{method}", f"mlflow {method}")
    for target, name in (
        ("pipeline.runner:run", "runner.run (all after Hydra's start-up)"),
        ("pipeline.config:validate", "config check"),
        ("pipeline.provenance:environment_tags", "environment tags (git, versions)"),
        ("pipeline.data.image_folder:ImageFolderData.load", "data: scan folder + fingerprint"),
        ("pipeline.sources.keras_app:KerasAppSource.load", "source: build MobileNetV2"),
        ("pipeline.features:backbone_fingerprint", "backbone fingerprint (hash weights)"),
        ("pipeline.adapt:adapt", "adapt (freeze + head)"),
        ("pipeline.train:Trainer.fit", "train: Trainer.fit, all"),
        ("pipeline.train:Trainer._fit", "train: keras fit"),
        ("pipeline.train:weights_sha256", "train: weights sha256"),
        ("pipeline.features:FeatureCache._compute", "train: feature cache compute + save"),
        ("pipeline.callbacks:AtomicCheckpoint.on_epoch_end", "train: per-epoch checkpoint (.keras)"),
        ("pipeline.callbacks:EpochHookCallback.on_epoch_end", "train: per-epoch MLflow log"),
        ("pipeline.evaluate:Evaluator.evaluate", "evaluate, all"),
        ("pipeline.plots:training_curves", "evaluate: training curves PNG"),
        ("pipeline.export:Exporter.export", "export, all"),
        ("pipeline.export:Exporter._saved_model", "export: write + check saved_model"),
        ("pipeline.serving:write_saved_model", "export: write saved_model"),
        ("pipeline.tracking:TrackedRun.log_artifact", "MLflow log_artifact (copies)"),
        ("pipeline.tracking:TrackedRun.log_model", "MLflow log_model (pyfunc)"),
    ):
        wrap(target, name)

    def dump():
        Path(os.environ["BENCH_PROFILE"]).write_text(json.dumps({"timers": timers, "t0": t0, "end": time.time()}))

    atexit.register(dump)
    sys.argv = ["pipeline", *overrides]
    importlib.import_module("pipeline.runner").main()


def describe_pipeline(overrides: list[str]) -> None:
    """`python -m pipeline overrides`, printing a `work:` line for each model it fits.

    The line comes from the plain script's `describe_work`, so both sides are described by
    the same code; nothing else changes (the line is printed before Keras' fit starts).
    """
    from plain_keras_transfer import describe_work

    train = importlib.import_module("pipeline.train")
    original = train.Trainer._fit

    def _fit(self, model, *args, **kwargs):
        print(describe_work(model), flush=True)
        return original(self, model, *args, **kwargs)

    train.Trainer._fit = _fit
    sys.argv = ["pipeline", *overrides]
    importlib.import_module("pipeline.runner").main()


# --- the benchmark -------------------------------------------------------------------------


def machine() -> str:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for package in ("tensorflow", "keras", "mlflow", "hydra-core"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} missing")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cores} cores ({os.cpu_count()} online), {model}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, {', '.join(versions)}")


def pipeline_command(args, folder: Path, work: Path, cache: str, *overrides: str, sweep: bool = False) -> list[str]:
    size = args.image_size
    return [
        PYTHON, "-m", "pipeline", *(["-m"] if sweep else []),  # Hydra wants -m before the overrides
        "data=image_folder", f"data.train_dir={folder}", f"data.image_size=[{size},{size}]",
        "source=keras_app", "source.name=MobileNetV2", "source.weights=null", f"source.input_shape=[{size},{size},3]",
        f"train.batch_size={args.batch_size}",
        f"tracking.uri=sqlite:///{work}/mlflow.db", f"tracking.artifact_location={work}/mlruns",
        f"train.feature_cache_dir={work}/{cache}", *overrides,
    ]


def plain_command(args, folder: Path, work: Path, epochs: int, name: str, *extra: str) -> list[str]:
    return [PYTHON, str(ROOT / "scripts" / "plain_keras_transfer.py"), str(folder),
            "--image-size", str(args.image_size), "--epochs", str(epochs), "--batch-size", str(args.batch_size),
            "--output", str(work / f"{name}.keras"), *extra]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="an image folder with class subfolders; default: synthetic")
    parser.add_argument("--quick", action="store_true",
                        help="fewer images, epochs and sweep jobs; no cache probe or profile")
    parser.add_argument("--num-images", type=int, help="synthetic images (default 1500, --quick 100)")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--source-size", type=int, help="synthetic images' side in pixels (default 256, --quick 128)")
    parser.add_argument("--image-size", type=int, help="side images are resized to (default 224, --quick 64)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, help="frozen-backbone epochs (default 10, --quick 4)")
    parser.add_argument("--fine-tune-epochs", type=int, help="full fine-tuning epochs (default 3, --quick 3)")
    parser.add_argument("--fine-tune-batchnorm", choices=("frozen", "trainable"), default="frozen",
                        help="BatchNorm when fine-tuning, on both sides: frozen (the pipeline's default: "
                             "inference mode, fixed gamma/beta) or trainable")
    parser.add_argument("--sweep-dropout", help="head.dropout values (default 0.0,0.1,0.2,0.3; --quick 0.0,0.2)")
    parser.add_argument("--sweep-lr", default="0.001,0.003", help="train.learning_rate values")
    parser.add_argument("--cache-probe-examples", type=int, nargs=2, default=[200, 2000], metavar=("SMALL", "LARGE"),
                        help="examples in the small and large feature-cache probe (110 KB each); 0 0 skips it")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="time a frozen run's stages in one more run (default: on, off with --quick)")
    parser.add_argument("--checkpoint-variant", action=argparse.BooleanOptionalAction, default=True,
                        help="also run pipeline fine-tuning with train.checkpoint=false")
    parser.add_argument("--max-other-load", type=float, default=0.3,
                        help="cores other processes may use before a measurement is repeated")
    parser.add_argument("--retry", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--retry-under", type=float, default=90,
                        help="only measurements shorter than this (s) are repeated; longer ones keep their figure")
    parser.add_argument("--wait-quiet", type=float, default=10,
                        help="seconds to wait, before each timed run, for other processes to calm down")
    parser.add_argument("--only", help=f"comma-separated steps to run, of: {', '.join(STEPS)}")
    parser.add_argument("--work-dir", help="where runs go (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--_mlflow-probe", nargs=2, metavar=("URI", "EPOCHS"), help=argparse.SUPPRESS)
    parser.add_argument("--_cache-probe", nargs=2, metavar=("DIR", "EXAMPLES"), help=argparse.SUPPRESS)
    parser.add_argument("--_profile", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--_describe", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.num_images = args.num_images or (100 if quick else 1500)
    args.image_size = args.image_size or (64 if quick else 224)
    args.source_size = args.source_size or (128 if quick else 256)
    args.epochs = args.epochs or (4 if quick else 10)
    args.fine_tune_epochs = args.fine_tune_epochs or 3
    args.sweep_dropout = args.sweep_dropout or ("0.0,0.2" if quick else "0.0,0.1,0.2,0.3")
    if quick and "--cache-probe-examples" not in (argv or []):
        args.cache_probe_examples = [0, 0]
    if args.profile is None:
        args.profile = not quick or bool(args.only and "profile" in args.only)
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args._mlflow_probe:
        return mlflow_probe(args._mlflow_probe[0], int(args._mlflow_probe[1]))
    if args._cache_probe:
        return cache_probe(args._cache_probe[0], int(args._cache_probe[1]))
    if args._profile is not None:
        return profile_pipeline(args._profile)
    if args._describe is not None:
        return describe_pipeline(args._describe)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="benchmark-transfer-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.keep and not args.work_dir:
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    print(f"machine: {machine()}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; work dir {work}", flush=True)
    folder = Path(args.folder).resolve() if args.folder else None
    if folder is None:
        from benchmark_input import synthetic_folder

        folder = synthetic_folder(work / "images", args.num_images, (args.source_size, args.source_size), args.classes)
        print(f"wrote {args.num_images} synthetic {args.source_size}x{args.source_size} JPEGs in {args.classes} "
              f"classes to {folder}", flush=True)
    results = run_all(args, folder, work)
    report(args, folder, work, results)


STEPS = ("plain_frozen", "pipeline_frozen", "one_job", "sweep", "plain_ft", "pipeline_ft", "pipeline_ft_nockpt", "input",
         "cache_probe", "profile")


def run_all(args, folder: Path, work: Path) -> dict:
    db = work / "mlflow.db"
    jobs = len(args.sweep_dropout.split(",")) * len(args.sweep_lr.split(","))
    found: dict = {"jobs": jobs}
    frozen = ["freeze=all", f"train.epochs={args.epochs}"]
    ft = args.fine_tune_epochs
    batchnorm = args.fine_tune_batchnorm

    def described(command: list[str]) -> list[str]:  # python -m pipeline ... -> the --_describe wrapper
        return [PYTHON, __file__, "--_describe", *command[3:]]
    small, large = args.cache_probe_examples
    steps = set(args.only.split(",")) if args.only else set(STEPS)
    steps -= set() if args.checkpoint_variant else {"pipeline_ft_nockpt"}
    steps -= set() if large else {"cache_probe"}
    steps -= set() if args.profile else {"profile"}

    def fresh(*paths):
        return lambda: [shutil.rmtree(work / p, ignore_errors=True) for p in paths]

    print("measuring (each line is one subprocess):", flush=True)
    # First: creates the MLflow store (a one-off per store, reported on its own) and times log_epoch.
    found["mlflow"] = measure("mlflow probe", [PYTHON, __file__, "--_mlflow-probe", f"sqlite:///{db}", "20"], work)
    if "plain_frozen" in steps:
        found["plain_frozen"] = measure_quietly(
            "plain frozen", plain_command(args, folder, work, args.epochs, "plain_frozen"), work, args)
    if "pipeline_frozen" in steps:
        found["pipeline_frozen"] = measure_quietly(
            "pipeline frozen", pipeline_command(args, folder, work, "cache_frozen", *frozen,
                                                f"hydra.run.dir={work}/runs/frozen"),
            work, args, prepare=fresh("cache_frozen", "runs/frozen"))
        found["cache_mb"] = directory_mb(work / "cache_frozen")
    first_job = [f"head.dropout={args.sweep_dropout.split(',')[0]}", f"train.learning_rate={args.sweep_lr.split(',')[0]}"]
    if "one_job" in steps:
        found["one_job"] = measure_quietly(
            "pipeline one sweep job",
            pipeline_command(args, folder, work, "cache_one", *frozen, "export=none", *first_job,
                             f"hydra.run.dir={work}/runs/one_job"),
            work, args, prepare=fresh("cache_one", "runs/one_job"))
    if "sweep" in steps:
        found["sweep"] = measure_quietly(
            f"pipeline sweep x{jobs}",
            pipeline_command(args, folder, work, "cache_sweep", *frozen, "export=none",
                             f"head.dropout={args.sweep_dropout}", f"train.learning_rate={args.sweep_lr}",
                             f"hydra.sweep.dir={work}/sweep", sweep=True),
            work, args, prepare=fresh("cache_sweep", "sweep"))
    if "plain_ft" in steps:
        found["plain_ft"] = measure_quietly(
            "plain fine-tune",
            plain_command(args, folder, work, ft, "plain_ft", "--fine-tune", "--batchnorm", batchnorm), work, args)
    if "pipeline_ft" in steps:
        found["pipeline_ft"] = measure_quietly(
            "pipeline fine-tune",
            described(pipeline_command(args, folder, work, "cache_ft", "freeze=none", f"freeze.batchnorm={batchnorm}",
                                       f"train.epochs={ft}", f"hydra.run.dir={work}/runs/ft")),
            work, args, prepare=fresh("runs/ft"))
    if "pipeline_ft_nockpt" in steps:
        found["pipeline_ft_nockpt"] = measure_quietly(
            "pipeline fine-tune, no checkpoint",
            described(pipeline_command(args, folder, work, "cache_ft", "freeze=none", f"freeze.batchnorm={batchnorm}",
                                       f"train.epochs={ft}", "train.checkpoint=false",
                                       f"hydra.run.dir={work}/runs/ft_nockpt")),
            work, args, prepare=fresh("runs/ft_nockpt"))
    if "input" in steps:
        found["input"] = measure_quietly(
            "input vs train step",
            [PYTHON, str(ROOT / "scripts" / "benchmark_input.py"), str(folder), "--image-size", str(args.image_size),
             "--batch-size", str(args.batch_size), "--model", "mobilenet_v2", "--steps", "5"], work, args)
    if "cache_probe" in steps:
        for count in (small, large):
            probe = measure(f"cache probe, {count} examples",
                            [PYTHON, __file__, "--_cache-probe", str(work / f"probe_{count}"), str(count)], work)
            probe.extra["disk_mb"] = directory_mb(work / f"probe_{count}")
            print(f"  {probe.label}: {probe.max_rss_mb:.0f} MB peak RSS, {probe.extra['disk_mb']:.0f} MB on disk",
                  flush=True)
            found[f"cache_probe_{count}"] = probe
            shutil.rmtree(work / f"probe_{count}", ignore_errors=True)
    if "profile" in steps:
        overrides = pipeline_command(args, folder, work, "cache_profile", *frozen,
                                     f"hydra.run.dir={work}/runs/profile")[3:]
        profile_out = work / "profile.json"
        found["profile"] = measure("pipeline frozen, profiled", [PYTHON, __file__, "--_profile", *overrides], work,
                                   env={"BENCH_PROFILE": str(profile_out), "BENCH_T0": str(time.time())})
        found["profile"].extra = json.loads(profile_out.read_text()) if profile_out.exists() else {}
        print(f"  {found['profile'].label}: {found['profile'].wall_s:.1f} s, rc {found['profile'].rc}", flush=True)
    found["runs"] = mlflow_runs(db)
    return found


def _run_of(runs: list[dict], process: Measured) -> list[dict]:
    """The MLflow runs a process made (by time)."""
    finish = process.started + process.wall_s
    return [r for r in runs if process.started <= r["start"] <= finish and r["experiment"] != "0" and
            r["tags"].get("mlflow.runName") != "probe" and "run_dir" in r["tags"]]


def _fmt(value, unit="", digits=1):
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def report(args, folder: Path, work: Path, found: dict) -> None:
    runs = found["runs"]
    rows = []  # (figure, value, target, verdict)

    def row(name, value, target=None, met=None, *measured: Measured):
        verdict = "" if met is None else ("met" if met else "MISSED")
        load = max([m.other_load for m in measured if m] + [0.0])
        if verdict and load > args.max_other_load:
            verdict += f" (others used {load:.1f} cores: noisy)"
        rows.append((name, value, target or "", verdict))

    print("\nprocesses (wall: launch to exit; CPU: user + system, all threads; RSS: peak, from wait4;")
    print("other: cores other processes used meanwhile):")
    print(f"  {'process':40} {'wall s':>7} {'CPU s':>7} {'RSS MB':>7} {'other':>6}  rc")
    for value in found.values():
        if isinstance(value, Measured):
            note = "" if value.ok else f"  FAILED: {value.failure()}"
            label = value.label + (" (2nd try)" if value.retried else "")
            print(f"  {label:40} {value.wall_s:7.1f} {value.cpu_s:7.1f} {value.max_rss_mb:7.0f} "
                  f"{value.other_load:6.2f}  {value.rc}{note}")

    plain, pipe = found.get("plain_frozen"), found.get("pipeline_frozen")
    if plain and pipe:
        ratio = pipe.wall_s / plain.wall_s
        row(f"frozen, {args.epochs} epochs: pipeline / plain wall",
            f"{ratio:.2f}x ({pipe.wall_s:.1f} / {plain.wall_s:.1f} s)", "<= 0.30x",
            pipe.ok and plain.ok and ratio <= 0.3, pipe, plain)
        row("  the same in CPU time", f"{pipe.cpu_s / plain.cpu_s:.2f}x ({pipe.cpu_s:.1f} / {plain.cpu_s:.1f} s)")
        plain_epoch = epoch_time(plain_epoch_ends(plain.log))[0]
        frozen_runs = _run_of(runs, pipe)
        pipe_epoch = epoch_time(frozen_runs[0]["epoch_ends"])[0] if frozen_runs else None
        row("  epoch time: pipeline (cached) / plain", f"{_fmt(pipe_epoch, ' s', 2)} / {_fmt(plain_epoch, ' s', 2)}")

    sweep, jobs, one = found.get("sweep"), found["jobs"], found.get("one_job")
    if sweep and one:
        target = 1 + 1.5 * (jobs - 1) / 7  # 2.5x for 8 jobs; the same per-job budget for other counts
        sweep_ratio = sweep.wall_s / one.wall_s
        row(f"sweep of {jobs} heads, one cache: sweep / one job (both export=none)",
            f"{sweep_ratio:.2f}x ({sweep.wall_s:.1f} / {one.wall_s:.1f} s)", f"<= {target:.2f}x",
            sweep.ok and one.ok and sweep_ratio <= target, sweep, one)
        row("  the same in CPU time", f"{sweep.cpu_s / one.cpu_s:.2f}x ({sweep.cpu_s:.1f} / {one.cpu_s:.1f} s)")
        row("  sweep jobs that hit the cache", f"{sweep.log.count('feature cache hit')} of {jobs}")
    if sweep and pipe:
        row("  sweep / one exporting run (the frozen run above)",
            f"{sweep.wall_s / pipe.wall_s:.2f}x ({sweep.wall_s:.1f} / {pipe.wall_s:.1f} s)")

    plain_gaps = pipe_gaps = []
    if found.get("plain_ft") and found.get("pipeline_ft"):
        plain_epoch, plain_gaps = epoch_time(plain_epoch_ends(found["plain_ft"].log))
        ft_runs = _run_of(runs, found["pipeline_ft"])
        pipe_epoch, pipe_gaps = epoch_time(ft_runs[0]["epoch_ends"]) if ft_runs else (None, [])
        epoch_ratio = pipe_epoch / plain_epoch if pipe_epoch and plain_epoch else None
        row(f"fine-tune, {args.fine_tune_epochs} epochs: pipeline / plain epoch",
            f"{_fmt(epoch_ratio, 'x', 2)} ({_fmt(pipe_epoch, '', 2)} / {_fmt(plain_epoch, ' s', 2)})",
            "<= 1.10x", epoch_ratio is not None and epoch_ratio <= 1.10, found["plain_ft"], found["pipeline_ft"])
        if found.get("pipeline_ft_nockpt"):
            nock = _run_of(runs, found["pipeline_ft_nockpt"])
            nock_epoch = epoch_time(nock[0]["epoch_ends"])[0] if nock else None
            nock_ratio = nock_epoch / plain_epoch if nock_epoch and plain_epoch else None
            row("  the same with train.checkpoint=false",
                f"{_fmt(nock_ratio, 'x', 2)} ({_fmt(nock_epoch, '', 2)} / {_fmt(plain_epoch, ' s', 2)})")
        plain_work, pipe_work = _work_line(found["plain_ft"].log), _work_line(found["pipeline_ft"].log)
        row(f"  same work on both sides (batchnorm={args.fine_tune_batchnorm})",
            "yes" if plain_work and plain_work == pipe_work else "NO: see the work lines below")
        row("  process wall: pipeline / plain",
            f"{found['pipeline_ft'].wall_s / found['plain_ft'].wall_s:.2f}x "
            f"({found['pipeline_ft'].wall_s:.1f} / {found['plain_ft'].wall_s:.1f} s)")
        probe = _json_line(found["mlflow"].log)
        if probe:
            share = f" ({100 * probe['log_epoch_s'] / pipe_epoch:.1f}% of an epoch)" if pipe_epoch else ""
            row("  MLflow log_epoch, sqlite, 6 metrics", f"{1000 * probe['log_epoch_s']:.1f} ms{share}")
            row("  MLflow store creation (one-off)", f"{probe['open_s']:.1f} s")

    rates = _input_rates(found["input"].log) if found.get("input") else None
    if rates:
        row("input / train step, images/s", f"{rates[0] / rates[1]:.1f}x ({rates[0]:.0f} / {rates[1]:.0f})",
            ">= 3x", rates[0] / rates[1] >= 3, found["input"])
    for key in ("plain_frozen", "pipeline_frozen", "one_job", "sweep", "plain_ft", "pipeline_ft"):
        if found.get(key):
            row(f"peak RSS, {found[key].label}", f"{found[key].max_rss_mb:.0f} MB")
    if "cache_mb" in found:
        row("feature cache on disk, frozen run", f"{found['cache_mb']:.2f} MB")
    small, large = args.cache_probe_examples
    if found.get(f"cache_probe_{large}") and found.get(f"cache_probe_{small}"):
        a, b = found[f"cache_probe_{small}"], found[f"cache_probe_{large}"]
        grown, written = b.max_rss_mb - a.max_rss_mb, b.extra["disk_mb"] - a.extra["disk_mb"]
        row(f"cache probe, {small} -> {large} examples: disk",
            f"{a.extra['disk_mb']:.0f} -> {b.extra['disk_mb']:.0f} MB")
        row("cache probe: peak RSS", f"{a.max_rss_mb:.0f} -> {b.max_rss_mb:.0f} MB ({grown:+.0f} MB)",
            "<< +cache", grown < 0.25 * written)

    print(f"\nfigures ({args.num_images} images, {args.classes} classes, {args.image_size}x{args.image_size}, "
          f"batch {args.batch_size}; load average now {' '.join(f'{v:.2f}' for v in os.getloadavg())}):")
    width = max([len(r[0]) for r in rows] + [6])
    values = max([len(r[1]) for r in rows] + [8])
    print(f"  {'figure':{width}}  {'measured':{values}}  {'target':10} verdict")
    for name, value, target, verdict in rows:
        print(f"  {name:{width}}  {value:{values}}  {target:10} {verdict}".rstrip())

    if pipe:
        print_phases(plain, pipe, _run_of(runs, pipe))
    if sweep:
        print_sweep(sweep, _run_of(runs, sweep))
    if plain_gaps or pipe_gaps:
        print(f"\nfine-tune epoch gaps (s), epochs 2-n: plain {' '.join(f'{g:.2f}' for g in plain_gaps)}; "
              f"pipeline {' '.join(f'{g:.2f}' for g in pipe_gaps)}")
    for key in ("plain_ft", "pipeline_ft"):
        if found.get(key):
            print(f"fine-tune {key.split('_')[0]:8} {_work_line(found[key].log) or 'work: (no line printed)'}")
    if "profile" in found:
        print_profile(found["profile"])

    print("\ncommands (run in the work directory, with TF_CPP_MIN_LOG_LEVEL=2):")
    for value in found.values():
        if isinstance(value, Measured):
            print(f"  {value.label}: {shlex.join(value.command)}")
    print(f"\nlogs: {work / 'logs'}" + ("" if args.keep or args.work_dir else " (removed at exit; --keep keeps them)"))


def print_phases(plain: Measured, pipe: Measured, runs: list[dict]) -> None:
    """Side by side: where the frozen runs' wall time went."""
    ends = plain_epoch_ends(plain.log) if plain else []
    if ends:
        finish = plain.started + plain.wall_s
        print("\nwhere the plain frozen run went (from its epoch-end timestamps):")
        print(f"  {'launch to first epoch end (imports, data, model, epoch 1)':56} {ends[0] - plain.started:6.1f} s")
        print(f"  {f'epochs 2-{len(ends)}':56} {ends[-1] - ends[0]:6.1f} s")
        print(f"  {'evaluate + save + exit':56} {finish - ends[-1]:6.1f} s")
    if runs:
        print("where the pipeline's frozen run went (from its MLflow timestamps):")
        for name, seconds in phases(runs[0], pipe).items():
            print(f"  {name:56} {seconds:6.1f} s")


def print_sweep(sweep: Measured, runs: list[dict]) -> None:
    if not runs:
        return
    durations = [r["end"] - r["start"] for r in runs if r["end"]]
    gaps = [b["start"] - a["end"] for a, b in zip(runs, runs[1:]) if a["end"]]
    print(f"\nsweep: {len(runs)} MLflow runs of {' '.join(f'{d:.1f}' for d in durations)} s; start-up to the "
          f"first {runs[0]['start'] - sweep.started:.1f} s; "
          f"between runs {_fmt(statistics.mean(gaps) if gaps else None, ' s', 2)}")
    later = [phases(r, sweep) for r in runs[1:]]
    if later and all(later):
        print("  a cache-hit job (mean of jobs 2-n):")
        for name in later[0]:
            if "start-up" not in name and "exit" not in name:
                print(f"    {name:54} {statistics.mean(p[name] for p in later):6.2f} s")


def print_profile(profiled: Measured) -> None:
    data = profiled.extra
    if not data:
        print(f"\nprofile: no figures ({profiled.failure()})")
        return
    print(f"\nprofile of one frozen run (wall {profiled.wall_s:.1f} s; inclusive seconds, calls):")
    for name, (seconds, calls) in sorted(data["timers"].items(), key=lambda item: -item[1][0]):
        print(f"  {name:44} {seconds:6.2f} s  x{calls}")
    mlflow_total = sum(s for name, (s, _) in data["timers"].items() if name.startswith("mlflow "))
    print(f"  {'(all MlflowClient calls together)':44} {mlflow_total:6.2f} s")


def _work_line(log: str) -> str | None:
    """The `work:` line a fine-tuning run printed (the last model it fitted)."""
    lines = [line for line in log.splitlines() if line.startswith("work: ")]
    return lines[-1] if lines else None


def _json_line(log: str) -> dict | None:
    for line in reversed(log.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def _input_rates(log: str) -> tuple[float, float] | None:
    rates = {}
    for line in log.splitlines():
        for key, prefix in (("input", "input pipeline"), ("train", "train step")):
            if line.startswith(prefix):
                rates[key] = float(line.split(":", 1)[1].split()[0])
    return (rates["input"], rates["train"]) if len(rates) == 2 else None


if __name__ == "__main__":
    main()
