"""A cold frozen run against its physical limit and against a hand-written script (issue 17).

    python scripts/benchmark_cold_run.py           # 1500 JPEGs of 224x224, 10 epochs: about 20 min on 2 cores
    python scripts/benchmark_cold_run.py --quick   # 300 JPEGs of 96x96 (the "small run"): about 5 min
    python scripts/benchmark_cold_run.py --kinds keras_app,hub --num-images 600
    python scripts/benchmark_cold_run.py --quick --repeat 3   # each measurement 3 times, the fastest kept

Each measurement is its own subprocess, one after the other, on the same synthetic JPEG
folder (scripts/benchmark_input.py's generator, 5 classes) and the same backbone,
`keras.applications.MobileNetV2` without its top (random weights: nothing is downloaded):

1. **The backbone pass, per source kind.** For each of `keras_app`, `keras_file` (the same
   network saved with `model.save`), `saved_model` (`model.export`) and `hub` (a tf_keras
   MobileNetV2 saved with `tf.saved_model.save`, the TF Hub format): a plain loop a user
   would write (`image_dataset_from_directory`, then `model.predict` on every image, the
   model loaded as its kind is loaded by hand), beside the pipeline's own backbone pass
   (`seconds_backbone_pass` of a one-epoch cold run with that source, which computes the
   feature cache for all splits: the same images).
   1b. **The same two passes side by side in one process**: the pipeline's own pass
   (`FeatureCache` over its data stage and its source, built from the same config) and
   the plain loop, alternating, after one untimed run of each; every run traces its
   function anew, as one run of either does. On this shared 2-core machine speed drifts between processes by up to 2x, which separate runs cannot tell
   from a slower pass; in one process, wall and CPU seconds compare like with like.
2. **A cold frozen run**: `python -m pipeline freeze=all` with an empty feature cache, the
   default export (SavedModel + MLflow model), `--epochs` epochs, next to
   `scripts/plain_keras_transfer.py` (frozen; it runs the backbone in every epoch, as a
   hand-written per-epoch script does) for the same epochs.
3. **The same run warm**: the pipeline command again, on the cache the cold run left.
4. **The imports alone**: a process that imports what a run imports (Hydra and the
   pipeline's modules, TensorFlow and Keras, scikit-learn's metrics and matplotlib, while
   a second process imports MLflow with its SQL store, as the tracker's process of a run
   does) and exits. No run costs less than that: the fixed costs above it are the stages'
   own work.

For the pipeline's runs it prints the seconds per stage that the run logged itself
(`seconds_*` MLflow metrics, `pipeline/timing.py`): start-up, imports, setup, data, source,
backbone pass, head epochs, evaluation, export, verification and MLflow, and the fixed
costs (everything but the backbone pass and the epochs). Wall times come from the parent
(`time.perf_counter` around each subprocess), so they include the interpreter's start and
exit. Nothing is asserted; the targets of issue 17 are printed next to the figures.

`--repeat N` runs every measurement N times, interleaved (plain, pipeline, plain, ...; each
pipeline run on its own empty cache), and reports the fastest of each with the range: on a
shared 2-core machine the same pass moves by 30% or more from one run to the next, so one
run per side cannot show a 10% difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
KINDS = ("keras_app", "keras_file", "saved_model", "hub")
STAGES = ("startup", "imports", "setup", "data", "source", "backbone_pass", "head_epochs", "evaluate", "export",
          "verify", "mlflow")
CLASSES = 5


def make_sources(work: Path, size: int) -> dict[str, list[str]]:
    """The pipeline's `source` overrides for each kind, writing the files the kinds load."""
    import keras
    import tensorflow as tf
    import tf_keras

    shape = [size, size, 3]
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=tuple(shape), include_top=False, weights=None,
                                           pooling="avg")
    model.save(work / "mobilenet.keras")
    model.export(str(work / "mobilenet_savedmodel"), verbose=False)
    hub_model = tf_keras.applications.MobileNetV2(input_shape=tuple(shape), include_top=False, weights=None,
                                                  pooling="avg")
    tf.saved_model.save(hub_model, str(work / "mobilenet_hub"))
    size_key = f"source.input_shape=[{size},{size},3]"
    return {
        "keras_app": ["source=keras_app", "source.name=MobileNetV2", "source.weights=null", size_key],
        "keras_file": ["source=keras_file", f"source.path={work / 'mobilenet.keras'}", "source.preprocess=tf"],
        "saved_model": ["source=saved_model", f"source.path={work / 'mobilenet_savedmodel'}", size_key,
                        "source.preprocess=tf"],
        "hub": ["source=hub", f"source.handle={work / 'mobilenet_hub'}", size_key],
    }


def plain_loop(kind: str, work: Path, folder: Path, size: int, batch_size: int):
    """A user's own loop over every image: the model of `kind` loaded by hand, `predict` on each
    batch. Returns the loop as a function of no arguments giving the images it computed."""
    import keras
    import tensorflow as tf

    images = keras.utils.image_dataset_from_directory(
        str(folder), labels=None, image_size=(size, size), batch_size=batch_size, shuffle=False)
    if kind == "hub":
        import tensorflow_hub as hub
        import tf_keras

        model = tf_keras.Sequential([tf_keras.Input((size, size, 3)),
                                     hub.KerasLayer(str(work / "mobilenet_hub"))])
        images = images.map(lambda x: x / 255.0)
    else:
        if kind == "keras_app":
            model = keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False, weights=None,
                                                   pooling="avg")
        elif kind == "keras_file":
            model = keras.saving.load_model(work / "mobilenet.keras")
        else:
            loaded = tf.saved_model.load(str(work / "mobilenet_savedmodel"))  # run() holds it: it owns the variables
            model = None
        images = images.map(lambda x: x / 127.5 - 1.0)

    def run() -> int:
        # Each run traces its function anew, as a script run once does (and the pipeline's pass).
        if model is None:
            served = tf.function(loaded.serve)
            return sum(int(served(batch).shape[0]) for batch in images.prefetch(tf.data.AUTOTUNE))
        model.predict_function = None
        return len(model.predict(images.prefetch(tf.data.AUTOTUNE), verbose=0))
    return run


def pipeline_pass(source: list[str], work: Path, folder: Path, size: int, batch_size: int):
    """The pipeline's own backbone pass (`FeatureCache`: its data stage, its source, its loop),
    built from the same config a run composes. Returns it as a function of no arguments that
    fills a new, empty cache and gives the images it computed."""
    import tempfile

    from hydra import compose, initialize_config_dir

    from pipeline import config
    from pipeline.features import FeatureCache

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "data=image_folder", f"data.train_dir={folder}", f"data.image_size=[{size},{size}]", *source,
            "freeze=all", f"output_dir={work}/side-by-side"])
    data = config.build(cfg, "data").load()
    backbone = config.build(cfg, "source").load().backbone

    def run() -> int:
        cache = FeatureCache(Path(tempfile.mkdtemp(prefix="cache-", dir=work)))
        cache.load_or_compute(backbone, data, batch_size=batch_size)
        return cache.computed_examples

    return run


def plain_predict(kind: str, work: Path, folder: Path, size: int, batch_size: int) -> None:
    """One timed plain loop (a child process of its own), printed as JSON."""
    run = plain_loop(kind, work, folder, size, batch_size)
    start, cpu = time.perf_counter(), time.process_time()
    count = run()
    print(json.dumps({"images": count, "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}),
          flush=True)


def side_by_side(kind: str, work: Path, folder: Path, size: int, batch_size: int, repeat: int) -> None:
    """Both passes in one process, alternating, `repeat` times each after one untimed run of
    each (traces, first calls, file cache): the machine's drift between processes is out of
    the comparison. Prints each side's wall and CPU seconds as JSON."""
    sources = json.loads((work / "sources.json").read_text())
    sides = {"plain": plain_loop(kind, work, folder, size, batch_size),
             "pipeline": pipeline_pass(sources[kind], work, folder, size, batch_size)}
    counts = {name: run() for name, run in sides.items()}
    if len(set(counts.values())) != 1:
        raise SystemExit(f"side by side: the two passes computed different numbers of images: {counts}")
    found: dict[str, dict[str, list[float]]] = {name: {"seconds": [], "cpu_seconds": []} for name in sides}
    for _ in range(repeat):
        for name, run in sides.items():
            start, cpu = time.perf_counter(), time.process_time()
            run()
            found[name]["seconds"].append(time.perf_counter() - start)
            found[name]["cpu_seconds"].append(time.process_time() - cpu)
    print(json.dumps(found), flush=True)


# What a frozen run imports, in the order it does (`python -X importtime -m pipeline` lists them).
IMPORT_GROUPS = {
    "hydra_and_pipeline": ("hydra", "omegaconf", "pipeline.runner"),
    "tensorflow_keras": ("keras",),
    "sklearn_matplotlib": ("sklearn.metrics", "matplotlib.figure"),
}
# Imported by the tracker's own process meanwhile, as a run does (`pipeline.tracking.process`).
OTHER_PROCESS_IMPORTS = ("mlflow", "mlflow.store.tracking.sqlalchemy_store")


def import_floor() -> None:
    """Imports what a run imports, timing each group, with MLflow imported by a second
    process meanwhile (its wall time is the `mlflow_other_process` group); prints them as
    JSON and exits as the pipeline's command does (without the interpreter's teardown:
    `pipeline.quick_exit`)."""
    import importlib
    import threading

    start = time.perf_counter()
    other = subprocess.Popen([PYTHON, "-c", f"import {', '.join(OTHER_PROCESS_IMPORTS)}"])
    ended: list[float] = []
    waiting = threading.Thread(target=lambda: (other.wait(), ended.append(time.perf_counter())))
    waiting.start()
    found = {}
    for group, modules in IMPORT_GROUPS.items():
        began = time.perf_counter()
        for module in modules:
            importlib.import_module(module)
        found[group] = time.perf_counter() - began
    waiting.join()
    found["mlflow_other_process"] = ended[0] - start
    print(json.dumps(found), flush=True)
    os._exit(0)


def child(command: list[str], log: Path) -> tuple[float, str]:
    """Runs `command`; its wall seconds and output (stdout then stderr, also kept in `log`)."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])}... failed ({done.returncode}); see {log}:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def stage_seconds(db: Path) -> list[dict[str, float]]:
    """The `seconds_*` metrics of each run in the store, in start order."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        runs = [r for (r,) in connection.execute("SELECT run_uuid FROM runs ORDER BY start_time")]
        return [
            {key.removeprefix("seconds_"): value for key, value in connection.execute(
                "SELECT key, value FROM latest_metrics WHERE run_uuid=? AND key LIKE 'seconds_%'", (run,))}
            for run in runs
        ]


def spread(seconds: list[float]) -> str:
    """The fastest of `seconds`, with the range when there is more than one: `3.1 [3.1-4.0]`."""
    if len(seconds) == 1:
        return f"{seconds[0]:.1f}"
    return f"{min(seconds):.1f} [{min(seconds):.1f}-{max(seconds):.1f}]"


def pipeline_command(work: Path, folder: Path, size: int, batch_size: int, source: list[str], cache: str,
                     *overrides: str) -> list[str]:
    return [
        PYTHON, "-m", "pipeline", "data=image_folder", f"data.train_dir={folder}", f"data.image_size=[{size},{size}]",
        *source, "freeze=all", f"train.batch_size={batch_size}", "train.verbose=0",
        f"tracking.uri=sqlite:///{work}/mlflow.db", f"tracking.artifact_location={work}/mlruns",
        f"train.feature_cache_dir={work}/{cache}", f"hydra.run.dir={work}/runs/{cache}-{time.time_ns()}",
        *overrides,
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--kinds", default=",".join(KINDS), help="source kinds whose backbone pass is compared")
    parser.add_argument("--quick", action="store_true", help="300 images of 96x96")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each measurement this many times, interleaved, and report the fastest")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--plain-predict", nargs=5, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--make-sources", nargs=2, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--side-by-side", nargs=6, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--import-floor", action="store_true", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.import_floor:
        return import_floor()
    if args.plain_predict:
        kind, work, folder, size, batch = args.plain_predict
        return plain_predict(kind, Path(work), Path(folder), int(size), int(batch))
    if args.side_by_side:
        kind, work, folder, size, batch, repeat = args.side_by_side
        return side_by_side(kind, Path(work), Path(folder), int(size), int(batch), int(repeat))
    if args.make_sources:
        work, size = args.make_sources
        print(json.dumps(make_sources(Path(work), int(size))))
        return None
    if args.quick:
        args.num_images, args.image_size = 300, 96
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: expected 1 or more runs of each measurement")
    kinds = [k for k in args.kinds.split(",") if k]
    work = Path(tempfile.mkdtemp(prefix="benchmark-cold-"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark_input import synthetic_folder

    size, batch = args.image_size, args.batch_size
    folder = synthetic_folder(work / "images", args.num_images, (size, size), classes=CLASSES)
    print(f"{args.num_images} JPEGs of {size}x{size} in {CLASSES} classes, MobileNetV2 (random weights), "
          f"batch {batch}, {os.cpu_count()} CPUs; work directory {work}", flush=True)
    _, out = child([PYTHON, __file__, "--make-sources", str(work), str(size)], work / "make_sources.log")
    sources = json.loads(out.strip().splitlines()[-1])
    (work / "sources.json").write_text(json.dumps(sources))

    print(f"\n1. the backbone pass over every image, per source kind (seconds; fastest of {args.repeat}, "
          "range in brackets)")
    print(f"  {'kind':12} {'plain predict':>20} {'pipeline':>20} {'ratio':>6}")
    db = work / "mlflow.db"
    for kind in kinds:
        plain, ours = [], []
        for attempt in range(args.repeat):
            _, out = child([PYTHON, __file__, "--plain-predict", kind, str(work), str(folder), str(size), str(batch)],
                           work / f"predict-{kind}-{attempt}.log")
            plain.append(json.loads(out.strip().splitlines()[-1])["seconds"])
            before = len(stage_seconds(db)) if db.exists() else 0
            child(pipeline_command(work, folder, size, batch, sources[kind], f"cache-{kind}-{attempt}",
                                   "train.epochs=1", "export=none"), work / f"pipeline-{kind}-{attempt}.log")
            ours.append(stage_seconds(db)[before]["backbone_pass"])
        print(f"  {kind:12} {spread(plain):>20} {spread(ours):>20} {min(ours) / min(plain):6.2f}", flush=True)
    print("  target: the pipeline within 10% of the plain predict (ratio <= 1.10)")

    print(f"\n1b. the same two passes in one process, alternating (fastest of {args.repeat} each, after one "
          "untimed run of each; range in brackets)")
    print(f"  {'kind':12} {'plain wall':>18} {'pipeline wall':>18} {'ratio':>6} {'plain CPU':>18} "
          f"{'pipeline CPU':>18} {'ratio':>6}")
    for kind in kinds:
        _, out = child([PYTHON, __file__, "--side-by-side", kind, str(work), str(folder), str(size), str(batch),
                        str(args.repeat)], work / f"side-by-side-{kind}.log")
        found = json.loads(out.strip().splitlines()[-1])
        cells = []
        for measure in ("seconds", "cpu_seconds"):
            plain, ours = found["plain"][measure], found["pipeline"][measure]
            cells.append(f"{spread(plain):>18} {spread(ours):>18} {min(ours) / min(plain):6.2f}")
        print(f"  {kind:12} " + " ".join(cells), flush=True)
    print("  the machine's drift between processes is out of this comparison; same target (ratio <= 1.10)")

    print(f"\n2. a frozen run of {args.epochs} epochs, keras_app source (seconds)")
    plain_walls = []
    runs: dict[str, list[tuple[float, dict[str, float]]]] = {"cold": [], "warm": []}
    for attempt in range(args.repeat):
        wall, _ = child([PYTHON, str(ROOT / "scripts" / "plain_keras_transfer.py"), str(folder),
                         "--image-size", str(size), "--epochs", str(args.epochs), "--batch-size", str(batch),
                         "--output", str(work / f"plain-{attempt}.keras")], work / f"plain-{attempt}.log")
        plain_walls.append(wall)
        for name in ("cold", "warm"):  # warm: the same command again, on the cache the cold run left
            before = len(stage_seconds(db)) if db.exists() else 0  # none yet without section 1's kinds
            wall, _ = child(pipeline_command(work, folder, size, batch, sources["keras_app"], f"cache-run-{attempt}",
                                             f"train.epochs={args.epochs}"), work / f"pipeline-{name}-{attempt}.log")
            runs[name].append((wall, stage_seconds(db)[before]))
    fastest = {name: min(found, key=lambda run: run[0]) for name, found in runs.items()}
    print(f"  {'stage':16} {'cold':>8} {'warm':>8}   (the fastest run of each, by wall time)")
    for stage in (*STAGES, "fixed", "total"):
        print(f"  {stage:16} " + " ".join(f"{run[1].get(stage, 0.0):8.1f}" for run in fastest.values()))
    print(f"  {'wall (process)':16} " + " ".join(f"{run[0]:8.1f}" for run in fastest.values()))
    plain_wall = min(plain_walls)
    print(f"  plain script (wall): {spread(plain_walls)}")
    for name, found in runs.items():
        print(f"  pipeline {name} / plain script: {fastest[name][0] / plain_wall:.2f} "
              f"(walls {spread([wall for wall, _ in found])})")
    print("  targets: fixed costs < 10 s; cold / plain <= 0.25 at 1500 images of 224x224, 10 epochs; "
          "<= 1.0 for the small run (--quick)")

    print(f"\n4. the imports alone: a process that imports what a run imports and exits (seconds; fastest "
          f"of {args.repeat}, by wall time)")
    floors = []
    for attempt in range(args.repeat):
        wall, out = child([PYTHON, __file__, "--import-floor"], work / f"import-floor-{attempt}.log")
        floors.append((wall, json.loads(out.strip().splitlines()[-1])))
    wall, groups = min(floors, key=lambda floor: floor[0])
    for group, seconds in groups.items():
        print(f"  {group:20} {seconds:6.1f}")
    print(f"  {'wall (process)':20} {wall:6.1f}   (range {spread([w for w, _ in floors])}; interpreter start "
          "and exit included)")
    for name, run in fastest.items():
        print(f"  {name} run: fixed costs {run[1].get('fixed', 0.0):.1f}, of which {run[1].get('fixed', 0.0) - wall:.1f} "
              "above the imports alone")
    if args.keep:
        print(f"\nkept {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return None


if __name__ == "__main__":
    main()
