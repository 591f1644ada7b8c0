"""The same Optuna search with and without pruning: wall time, epochs trained, best value found.

    python scripts/benchmark_pruning.py                  # hparams_search=digits_optuna, 16 trials of 20 epochs
    python scripts/benchmark_pruning.py --epochs 8       # shorter trials, a quicker look
    python scripts/benchmark_pruning.py --launcher joblib --n-jobs 2   # two trials at a time

Each side is one `python -m pipeline -m hparams_search=digits_optuna` process with its own
fresh study, MLflow store and feature cache in a temporary folder, the same sampler seed and
the same 16 trials' budget; "pruned" keeps the overlay's `optuna.pruners.MedianPruner`,
"unpruned" sets `hydra.sweeper.pruner=null`. Wall time is the whole process (Python and
TensorFlow start-up included, the same on both sides). The best value is the study's best
`val_accuracy`; epochs are those the trials reported to the study.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def search(folder: Path, pruned: bool, args: argparse.Namespace) -> dict:
    import optuna

    storage = f"sqlite:///{folder / 'optuna.db'}"
    command = [
        sys.executable, "-m", "pipeline", "-m", "hparams_search=digits_optuna",
        f"hydra.sweep.dir={folder / 'sweep'}", f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.n_trials={args.trials}", f"hydra.sweeper.n_jobs={args.n_jobs}",
        f"train.epochs={args.epochs}", "train.verbose=0", f"seed={args.seed}",
        f"tracking.uri=sqlite:///{folder / 'mlflow.db'}", f"tracking.artifact_location={folder / 'mlartifacts'}",
        f"train.feature_cache_dir={folder / 'feature_cache'}",
    ]
    if args.launcher == "joblib":
        command += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.n_jobs}"]
    if not pruned:
        command.append("hydra.sweeper.pruner=null")
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the {'pruned' if pruned else 'unpruned'} search failed:\n{done.stderr[-3000:]}")
    study = optuna.load_study(study_name="digits-transfer", storage=storage)
    states = [t.state.name for t in study.trials]
    return {
        "seconds": seconds,
        "best": study.best_value,
        "pruned": states.count("PRUNED"),
        "complete": states.count("COMPLETE"),
        "epochs": sum(len(t.intermediate_values) for t in study.trials),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20, help="train.epochs of every trial")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampler and the runs")
    parser.add_argument("--launcher", choices=("basic", "joblib"), default="basic")
    parser.add_argument("--n-jobs", type=int, default=1, help="trials launched together")
    args = parser.parse_args()
    results = {}
    for pruned in (False, True):
        with tempfile.TemporaryDirectory(prefix="benchmark-pruning-") as folder:
            results[pruned] = search(Path(folder), pruned, args)
            print(f"{'pruned' if pruned else 'unpruned'}: {results[pruned]}", file=sys.stderr, flush=True)
    print(f"{args.trials} trials of up to {args.epochs} epochs (hparams_search=digits_optuna, "
          f"seed {args.seed}, {args.launcher} launcher, {args.n_jobs} at a time)")
    print(f"{'':14}{'wall s':>9}{'epochs':>8}{'pruned':>8}{'best val_accuracy':>19}")
    for pruned, name in ((False, "no pruner"), (True, "MedianPruner")):
        r = results[pruned]
        print(f"{name:14}{r['seconds']:9.1f}{r['epochs']:8d}{r['pruned']:8d}{r['best']:19.4f}")
    speedup = results[False]["seconds"] / results[True]["seconds"]
    print(f"pruning: {speedup:.2f}x faster, best value {results[True]['best'] - results[False]['best']:+.4f}")


if __name__ == "__main__":
    main()
