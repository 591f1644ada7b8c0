"""Fine-tuning images per second with and without mixed precision and XLA (issue 8, item 5).

    python scripts/benchmark_precision.py                 # MobileNetV2, 224x224, on whatever device TF sees
    python scripts/benchmark_precision.py --precision mixed_bfloat16 --num-images 2048
    python scripts/benchmark_precision.py --quick         # 64x64, a smoke run of every setting

Runs `python -m pipeline` once per setting (float32 / `train.mixed_precision` x
`train.jit_compile` false / true), each in its own process, fine-tuning the whole network
(`freeze=none`) of `keras.applications.MobileNetV2` with random weights (nothing is
downloaded) on a synthetic JPEG folder. Images per second = training examples / the median
epoch time after the first (tracing, XLA compilation) epoch, read from the run's per-epoch
MLflow timestamps, so it is what a user's run achieves, input pipeline and logging included.

Mixed float16 and XLA pay off on GPUs (tensor cores, fused kernels); on a CPU mixed float16
is usually slower. The script prints the device TensorFlow used; compare figures only from
the same machine. It asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_transfer import PYTHON, epoch_time, machine, measure, mlflow_runs  # noqa: E402


def devices() -> str:
    """What TensorFlow computes on here: GPU names, or the CPU."""
    import subprocess

    probe = ("import tensorflow as tf; gpus = tf.config.list_physical_devices('GPU'); "
             "print('; '.join(tf.config.experimental.get_device_details(g).get('device_name', g.name) "
             "for g in gpus) or 'CPU only')")
    done = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else f"unknown ({done.stderr[-200:]})"


def settings(precision: str) -> list[tuple[str, list[str]]]:
    return [
        ("float32", ["train.mixed_precision=null", "train.jit_compile=false"]),
        ("float32 + XLA", ["train.mixed_precision=null", "train.jit_compile=true"]),
        (precision, [f"train.mixed_precision={precision}", "train.jit_compile=false"]),
        (f"{precision} + XLA", [f"train.mixed_precision={precision}", "train.jit_compile=true"]),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="an image folder with class subfolders; default: synthetic")
    parser.add_argument("--quick", action="store_true", help="64x64 images, 128 of them, 3 epochs")
    parser.add_argument("--num-images", type=int, help="synthetic images (default 1024, --quick 128)")
    parser.add_argument("--image-size", type=int, help="default 224, --quick 64")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4, help="the first is left out of the rate")
    parser.add_argument("--precision", default="mixed_float16", choices=["mixed_float16", "mixed_bfloat16"])
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    args.num_images = args.num_images or (128 if args.quick else 1024)
    args.image_size = args.image_size or (64 if args.quick else 224)
    args.epochs = 3 if args.quick else args.epochs

    work = Path(tempfile.mkdtemp(prefix="benchmark-precision-"))
    try:
        folder = Path(args.folder).resolve() if args.folder else None
        if folder is None:
            from benchmark_input import synthetic_folder

            side = max(args.image_size, 64)
            folder = synthetic_folder(work / "images", args.num_images, (side, side), 5)
        print(f"machine: {machine()}\ndevice: {devices()}", flush=True)
        db = work / "mlflow.db"
        size = args.image_size
        results = []
        for label, overrides in settings(args.precision):
            command = [
                PYTHON, "-m", "pipeline", "data=image_folder", f"data.train_dir={folder}",
                f"data.image_size=[{size},{size}]", "data.val_split=0.1", "data.test_split=0.1",
                "source=keras_app", "source.name=MobileNetV2", "source.weights=null",
                f"source.input_shape=[{size},{size},3]", "freeze=none", f"train.epochs={args.epochs}",
                f"train.batch_size={args.batch_size}", "train.checkpoint=false", "train.verbose=0",
                "export=none", f"tracking.uri=sqlite:///{db}", f"tracking.artifact_location={work}/mlruns",
                f"hydra.run.dir={work}/runs/{len(results)}", *overrides,
            ]
            process = measure(label, command, work)
            runs = [r for r in mlflow_runs(db) if process.started <= r["start"] <= process.started + process.wall_s]
            seconds = epoch_time(runs[-1]["epoch_ends"])[0] if runs and process.ok else None
            train_examples = _train_examples(process.log)
            rate = train_examples / seconds if seconds and train_examples else None
            results.append((label, rate, seconds, process))
            status = f"{rate:.1f} images/s" if rate else f"FAILED: {process.failure()}"
            print(f"  {label:24} {status}  (process {process.wall_s:.0f} s)", flush=True)

        base = results[0][1]
        print(f"\nfine-tuning MobileNetV2 {size}x{size}, batch {args.batch_size}, "
              f"median of epochs 2-{args.epochs} (images/s, and against float32):")
        for label, rate, seconds, _ in results:
            versus = f"{rate / base:.2f}x" if rate and base else "n/a"
            shown = f"{rate:8.1f}" if rate else "     n/a"
            print(f"  {label:24} {shown}  {versus}")
        print("\ncommand of the last setting:\n  " + " ".join(results[-1][3].command))
    finally:
        if args.keep:
            print(f"work directory: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _train_examples(log: str) -> int | None:
    """The training split's size, from the run's `data: {'train': N, ...} examples` line."""
    import ast

    for line in log.splitlines():
        if "data: {" in line and " examples" in line:
            return int(ast.literal_eval(line.split("data: ", 1)[1].split(" examples")[0])["train"])
    return None


if __name__ == "__main__":
    main()
