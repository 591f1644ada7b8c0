"""`pipeline.extract` against a plain `model.predict` over the same image files: images/s, peak RSS.

    python scripts/benchmark_extract.py                      # 1,500 synthetic 224x224 JPEGs
    python scripts/benchmark_extract.py --num-images 3000    # twice the data: the peak stays flat?
    python scripts/benchmark_extract.py --quick              # 120 images of 96x96, a smoke test

Each side runs as its own process, one after the other, on the same folder (written once,
as scripts/benchmark_input.py does) with MobileNetV2 without weights (`source=keras_app
source.name=MobileNetV2 source.weights=null`: the same work as with ImageNet weights, and
offline), batch 64:

- plain: the classic recipe, `image_dataset_from_directory(shuffle=False)` + `prefetch`,
  `preprocess_input`, one `model.predict` over the whole set, `np.savez` of the features.
- extract (cold): `pipeline.extract.extract_features` on a config with an empty feature
  cache: pre-scan and hash the files, load the source, open an MLflow run, compute the
  backbone's outputs into the cache, write `features/*.parquet`, log them as artifacts.
- extract (warm): the same again; the cache hits, so only the files are written.

Each child times its own work, model construction included (imports of TensorFlow, Keras,
MLflow and pyarrow, and the creation of a fresh MLflow store, excluded); the parent also
times each whole process and reads its peak resident memory from the kernel (`wait4`), so
one side's peak never hides the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
BATCH = 64


def plain(folder: str, size: int, out: str) -> dict:
    """What a user writes without the pipeline; returns its timing."""
    import keras
    import numpy as np
    import tensorflow as tf

    start = time.perf_counter()
    model = keras.applications.MobileNetV2(include_top=False, weights=None, pooling="avg",
                                           input_shape=(size, size, 3))
    images = keras.utils.image_dataset_from_directory(folder, image_size=(size, size), batch_size=BATCH,
                                                      shuffle=False, verbose=False)
    paths = images.file_paths
    batches = images.map(lambda x, y: keras.applications.mobilenet_v2.preprocess_input(x))
    features = model.predict(batches.prefetch(tf.data.AUTOTUNE), verbose=0)
    np.savez(out, features=features, ids=np.asarray(paths))
    return {"seconds": time.perf_counter() - start, "rows": len(features)}


def extract(folder: str, size: int, out: str, cache: str, tracking: str) -> dict:
    """`pipeline.extract` as its command runs it (config composed from the same overrides)."""
    import keras  # noqa: F401  (imported before the clock starts, as on the plain side)
    import pyarrow.parquet  # noqa: F401
    from hydra import compose, initialize_config_dir
    from mlflow.tracking import MlflowClient

    from pipeline.extract import extract_features
    from pipeline.runner import CONFIG_DIR

    MlflowClient(f"sqlite:///{tracking}/mlflow.db").search_experiments()  # a store that exists, as usual

    overrides = [
        "source=keras_app", "source.name=MobileNetV2", "source.weights=null", f"source.input_shape=[{size},{size},3]",
        "data=image_folder", f"data.train_dir={folder}", f"data.image_size=[{size},{size}]",
        f"extract.batch_size={BATCH}", f"train.feature_cache_dir={cache}", f"output_dir={out}",
        f"tracking.uri=sqlite:///{tracking}/mlflow.db", f"tracking.artifact_location={tracking}/artifacts",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    start = time.perf_counter()
    extracted, _ = extract_features(cfg)
    return {"seconds": time.perf_counter() - start, "rows": sum(extracted.rows.values()),
            "feature_cache": extracted.feature_cache}


def child(role: str, *args: str) -> tuple[dict, float]:
    """Runs `role` in a fresh process; its result (with the whole process's wall time) and
    its peak resident memory in MB."""
    command = [sys.executable, __file__, "--child", role, *args]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"{role} failed ({process.returncode}):\n{stderr.read()[-3000:]}")
        result = json.loads(stdout.read().strip().splitlines()[-1])
        return {**result, "process_seconds": wall}, usage.ru_maxrss / 1024  # KB on Linux


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=224, help="the JPEGs' size and the model's input")
    parser.add_argument("--quick", action="store_true", help="120 images of 96x96")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        role, *rest = args.child
        result = plain(rest[0], int(rest[1]), rest[2]) if role == "plain" else extract(rest[0], int(rest[1]), *rest[2:])
        print(json.dumps(result), flush=True)
        return
    if args.quick:
        args.num_images, args.image_size = 120, 96

    from benchmark_input import synthetic_folder

    size = args.image_size
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        start = time.perf_counter()
        folder = str(synthetic_folder(scratch / "images", args.num_images, (size, size), classes=5))
        print(f"wrote {args.num_images} synthetic {size}x{size} JPEGs in {time.perf_counter() - start:.1f} s")
        results = {"plain": child("plain", folder, str(size), str(scratch / "plain.npz"))}
        for run in ("cold", "warm"):
            results[f"extract ({run})"] = child("extract", folder, str(size), str(scratch / f"run-{run}"),
                                                str(scratch / "cache"), str(scratch))
    report(results, args.num_images, size)


def report(results: dict, num_images: int, size: int) -> None:
    import platform

    import tensorflow as tf

    print(f"\n{num_images} images of {size}x{size}, MobileNetV2 (no weights), batch {BATCH}; "
          f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), TensorFlow {tf.__version__}")
    print("images/s and seconds of the work (imports excluded); process: the whole command's seconds")
    print(f"{'':17}{'images/s':>10}{'seconds':>10}{'process':>10}{'peak RSS':>11}  rows")
    for name, (result, peak) in results.items():
        note = f"  (cache {result['feature_cache']})" if "feature_cache" in result else ""
        print(f"{name:17}{result['rows'] / result['seconds']:10.1f}{result['seconds']:10.1f}"
              f"{result['process_seconds']:10.1f}{peak:8.0f} MB  {result['rows']}{note}")
    plain_result = results["plain"][0]
    for run in ("cold", "warm"):
        mine = results[f"extract ({run})"][0]
        print(f"extract ({run}) / plain: work {mine['seconds'] / plain_result['seconds']:.2f}x, "
              f"process {mine['process_seconds'] / plain_result['process_seconds']:.2f}x")


if __name__ == "__main__":
    main()
