"""Inject the faults users meet and print what each one costs: case -> outcome -> data lost.

    python scripts/fault_injection.py                      # every case (about 10 minutes on 2 cores)
    python scripts/fault_injection.py --cases kills,two_processes
    python scripts/fault_injection.py --keep /tmp/faults   # keep the stores and runs to look at

Each case runs `python -m pipeline` as a user would (a private MLflow store in a temp
folder, the digits demo), injects one fault and then runs the same command again:

- kills:            SIGKILL at every stage boundary in turn (after the data stage, after each
                    epoch's checkpoint, after evaluation, after the export, inside the MLflow
                    model logging, after the model registry), each followed by the same
                    command; the run must end FINISHED in the same MLflow run with the weights
                    of an uninterrupted run, one export and one registered version;
- ctrl_c:           SIGINT mid-training, then the same command;
- full_disk:        ENOSPC while a checkpoint is written, then the same command;
- two_processes:    a second process started in the run directory of a live one;
- unreachable_store: tracking.uri of a port nobody answers on;
- unwritable_cache: train.feature_cache_dir that cannot be created;
- huge_image:       a 48-byte-header PNG declaring 20000x20000 pixels, in training data, given
                    to `pipeline.predict`, and sent to the export's `serving_bytes`.

"data lost" is what the case destroyed of a finished run made at the start (its directory's
bytes and its MLflow record are compared) and of the run the fault hit; it must be `none`.

The child mode (`child --kill-at STAGE [--errno NAME] -- OVERRIDES`) is the injector: it
patches the named boundary to SIGKILL its own process there (or to raise that OSError) and
then runs the pipeline's own entry point. tests/test_faults.py uses it too.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

# The boundaries, in the order a run meets them.
KILL_POINTS = ("data", "epoch:1", "epoch:2", "evaluation", "export", "mlflow_model", "registry")
SETTINGS = ("data.classes=[5,6,7]", "train.epochs=2", "train.deterministic=true", "train.verbose=0")


# --- the injector (child mode) ---------------------------------------------------------


def _strike(where: str, error: str | None) -> None:
    """SIGKILL this process (no cleanup of any kind runs), or raise the OSError `error`."""
    if error is None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    code = getattr(errno, error)
    raise OSError(code, os.strerror(code), where)


def _after(owner: object, name: str, condition: Callable[..., bool], where: str, error: str | None) -> None:
    """Wrap `owner.name` so that the fault strikes once it returned, when `condition(*args)`."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        if condition(*args, **kwargs):
            _strike(where, error)
        return result

    setattr(owner, name, wrapped)


def _before(owner: object, name: str, condition: Callable[..., bool], where: str, error: str | None) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if condition(*args, **kwargs):
            _strike(where, error)
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


def arm(point: str, error: str | None = None) -> None:
    """Make the fault strike at `point` (one of KILL_POINTS) in this process."""
    import mlflow.models

    import pipeline.callbacks
    import pipeline.evaluate
    import pipeline.export
    import pipeline.runner
    import pipeline.tracking.model

    always = lambda *args, **kwargs: True  # noqa: E731
    if point == "data":  # the data stage is done; nothing of the source or training yet
        _before(pipeline.runner, "_adapt", always, point, error)
    elif point.startswith("epoch:"):
        number = int(point.split(":")[1])
        if error is None:  # killed right after the epoch's checkpoint was written
            _after(pipeline.callbacks.AtomicCheckpoint, "on_epoch_end",
                   lambda self, epoch, logs=None: epoch + 1 == number, point, error)
        else:  # the disk fills while the epoch's checkpoint is written
            _before(pipeline.callbacks.AtomicCheckpoint, "on_epoch_end",
                    lambda self, epoch, logs=None: epoch + 1 == number, str(Path("checkpoints") / "last.keras"),
                    error)
    elif point == "evaluation":
        _after(pipeline.evaluate.Evaluator, "evaluate", always, point, error)
    elif point == "export":
        _after(pipeline.export.Exporter, "export", always, point, error)
    elif point == "mlflow_model":  # the logged model exists in the store, PENDING, without files
        _before(mlflow.models.Model, "log", always, point, error)
    elif point == "registry":  # the model is logged and registered; the run is not closed yet
        _after(pipeline.tracking.model, "_registered_version", always, point, error)
    else:
        raise SystemExit(f"unknown point {point!r}; expected one of {', '.join(KILL_POINTS)}")


def child(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="fault_injection.py child")
    parser.add_argument("--kill-at", required=True, choices=KILL_POINTS)
    parser.add_argument("--errno", default=None, help="raise this OSError (ENOSPC, EACCES) instead of SIGKILL")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from pipeline.runner import main

    arm(args.kill_at, args.errno)
    sys.argv = ["pipeline", *args.overrides]
    main()


# --- running the pipeline -------------------------------------------------------------


def store_overrides(work: Path) -> list[str]:
    """A private MLflow store, artifact root and feature cache under `work`."""
    return [
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"tracking.artifact_location={work / 'mlartifacts'}",
        f"train.feature_cache_dir={work / 'cache'}",
    ]


def pipeline_command(work: Path, run_dir: Path, *overrides: str, kill_at: str | None = None,
                     error: str | None = None) -> list[str]:
    arguments = [*store_overrides(work), f"hydra.run.dir={run_dir}", *overrides]
    if kill_at is None:
        return [sys.executable, "-m", "pipeline", *arguments]
    inject = ["--kill-at", kill_at] + (["--errno", error] if error else [])
    return [sys.executable, str(Path(__file__).resolve()), "child", *inject, "--", *arguments]


def run(command: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def error_lines(stderr: str, width: int = 90) -> list[str]:
    """What the user sees of an error: stderr's lines (cut to `width`), less TensorFlow's start-up noise."""
    noise = ("WARNING: All log messages before absl", "I0000 ", "W0000 ", "E0000 ", "To enable the following")
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(noise)
             and " - pipeline - " not in line and not line.startswith("[")]
    return [line if len(line) <= width else line[: width - 3] + "..." for line in lines]


def runs(work: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    found = client.get_experiment_by_name("transfer")
    return [] if found is None else client.search_runs([found.experiment_id])


def tree_digest(root: Path) -> str:
    """A hash of every file's relative path and bytes under `root` (logs aside)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".log"):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass
class Witness:
    """A finished run whose directory and MLflow record no fault may touch."""

    work: Path
    run_dir: Path
    run_id: str
    digest: str
    metrics: dict

    @classmethod
    def make(cls, work: Path) -> Witness:
        done = run(pipeline_command(work, work / "witness", *SETTINGS))
        if done.returncode != 0:
            raise SystemExit(f"the witness run failed:\n{done.stderr[-3000:]}")
        (record,) = runs(work)
        return cls(work, work / "witness", record.info.run_id, tree_digest(work / "witness"), record.data.metrics)

    def lost(self) -> list[str]:
        record = next((r for r in runs(self.work) if r.info.run_id == self.run_id), None)
        lost = []
        if record is None or record.info.status != "FINISHED" or record.data.metrics != self.metrics:
            lost.append("the finished run's MLflow record")
        if not self.run_dir.is_dir() or tree_digest(self.run_dir) != self.digest:
            lost.append("the finished run's directory")
        return lost


# --- the cases -------------------------------------------------------------------------

Row = tuple[str, str, str]  # case, outcome, data lost


def case_kills(work: Path, witness: Witness) -> list[Row]:
    """SIGKILL at each boundary in turn, each followed by the same command, to one FINISHED run."""
    rows = []
    for number, point in enumerate(KILL_POINTS):
        killed = run(pipeline_command(work, work / f"kills-{number}", *SETTINGS, "tracking.register_as=faults",
                                      kill_at=point))
        statuses = [r.info.status for r in runs(work) if r.info.run_id != witness.run_id]
        outcome = f"killed (exit {killed.returncode}), run {'/'.join(statuses) or 'not created'}"
        if killed.returncode != -signal.SIGKILL:
            outcome = f"NOT KILLED (exit {killed.returncode}): {error_lines(killed.stderr)[-1:]}"
        rows.append((f"SIGKILL at {point}", outcome, ", ".join(witness.lost()) or "none"))
    again = run(pipeline_command(work, work / "kills-final", *SETTINGS, "tracking.register_as=faults"))
    mine = [r for r in runs(work) if r.info.run_id != witness.run_id]
    reference = witness  # the same settings, never interrupted
    lost = witness.lost()
    if again.returncode != 0:
        return [*rows, ("same command after the kills", f"exit {again.returncode}: {error_lines(again.stderr)[-1:]}",
                        "the run")]
    (final,) = mine or [None]
    same_weights = final is not None and final.data.tags.get("weights_sha256") == _weights(work, witness.run_id)
    run_dir = Path(final.data.tags["run_dir"]) if final else None
    exports = sorted(p.name for p in run_dir.iterdir() if "export" in p.name) if run_dir else []
    versions = _versions(work, "faults")
    outcome = (f"{len(mine)} run, {final.info.status if final else '-'}, same weights as uninterrupted: "
               f"{'yes' if same_weights else 'NO'}, exports {exports}, registered versions {versions}, "
               f"test_accuracy {final.data.metrics.get('test_accuracy', float('nan')):.4f} "
               f"(uninterrupted {reference.metrics['test_accuracy']:.4f})")
    if not (len(mine) == 1 and final.info.status == "FINISHED" and same_weights and exports == ["export"]
            and versions == [1]):
        lost.append("the interrupted run")
    return [*rows, ("same command after the kills", outcome, ", ".join(lost) or "none")]


def _weights(work: Path, run_id: str) -> str | None:
    return next((r.data.tags.get("weights_sha256") for r in runs(work) if r.info.run_id == run_id), None)


def _versions(work: Path, name: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    return sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def _start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for_epoch(run_dir: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    state = run_dir / "checkpoints" / "state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists():
            return
        time.sleep(0.05)
    raise SystemExit(f"the run never reached its first checkpoint in {run_dir}")


def _resumes(work: Path, run_dir: Path, settings: Sequence[str], first_id: str | None) -> str:
    """The same command again: how it ended, and whether it continued the same MLflow run."""
    again = run(pipeline_command(work, run_dir, *settings))
    if again.returncode != 0:
        return f"same command: exit {again.returncode} {error_lines(again.stderr)[-1:]}"
    record = next((r for r in runs(work) if r.info.run_id == first_id), None)
    same = record is not None and record.info.status == "FINISHED"
    return f"same command: {'resumed the same run to FINISHED' if same else 'a NEW run (the first is abandoned)'}"


def _new_run(work: Path, before: set[str]):
    return next((r for r in runs(work) if r.info.run_id not in before), None)


def case_ctrl_c(work: Path, witness: Witness) -> list[Row]:
    settings = (*SETTINGS, "train.epochs=20")
    before = {r.info.run_id for r in runs(work)}
    process = _start(pipeline_command(work, work / "ctrl_c", *settings))
    _wait_for_epoch(work / "ctrl_c", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    hit = _new_run(work, before)
    lines = error_lines(stderr)
    outcome = f"exit {process.returncode}, {len(lines)} line(s) {lines[-1:]}, run {hit.info.status if hit else '-'}; "
    outcome += _resumes(work, work / "ctrl_c-again", settings, hit.info.run_id if hit else None)
    return [("Ctrl-C mid-training", outcome, ", ".join(witness.lost()) or "none")]


def case_full_disk(work: Path, witness: Witness) -> list[Row]:
    before = {r.info.run_id for r in runs(work)}
    settings = (*SETTINGS, "seed=1")
    full = run(pipeline_command(work, work / "full_disk", *settings, kill_at="epoch:2", error="ENOSPC"))
    hit = _new_run(work, before)
    lines = error_lines(full.stderr)
    outcome = f"exit {full.returncode}, {len(lines)} line(s) {lines[-1:]}, run {hit.info.status if hit else '-'}; "
    outcome += _resumes(work, work / "full_disk-again", settings, hit.info.run_id if hit else None)
    return [("disk full while checkpointing", outcome, ", ".join(witness.lost()) or "none")]


def case_two_processes(work: Path, witness: Witness) -> list[Row]:
    settings = (*SETTINGS, "train.epochs=20", "seed=2")
    before = {r.info.run_id for r in runs(work)}
    first = _start(pipeline_command(work, work / "shared", *settings))
    _wait_for_epoch(work / "shared", first)
    second = run(pipeline_command(work, work / "shared", *settings, "resume=never"))
    first.communicate(timeout=600)
    lines = error_lines(second.stderr)
    new = [r for r in runs(work) if r.info.run_id not in before]
    recorded = json.loads((work / "shared" / "mlflow_run.json").read_text())["run_id"]
    outcome = (f"second: exit {second.returncode}, {lines[-1:] if lines else 'no error'}; first: exit "
               f"{first.returncode}, runs {[r.info.status for r in new]}")
    lost = witness.lost()
    if first.returncode != 0 or len(new) != 1 or new[0].info.run_id != recorded:
        lost.append("the first run's directory or record")
    return [("second process in a live run's directory", outcome, ", ".join(lost) or "none")]


def case_unreachable_store(work: Path, witness: Witness) -> list[Row]:
    started = time.monotonic()
    done = run([sys.executable, "-m", "pipeline", "tracking.uri=http://127.0.0.1:9", "tracking.timeout=5",
                f"hydra.run.dir={work / 'unreachable'}", *SETTINGS])
    seconds = time.monotonic() - started
    lines = error_lines(done.stderr)
    outcome = f"exit {done.returncode} after {seconds:.0f} s (tracking.timeout=5), {len(lines)} line(s) {lines[-1:]}"
    return [("unreachable tracking server", outcome, ", ".join(witness.lost()) or "none")]


def case_unwritable_cache(work: Path, witness: Witness) -> list[Row]:
    blocked = work / "not-a-folder"
    blocked.write_text("a file where the cache folder should be\n")
    before = {r.info.run_id for r in runs(work)}
    done = run([*pipeline_command(work, work / "cache_run", *SETTINGS, "freeze=all", "seed=3"),
                f"train.feature_cache_dir={blocked}"])
    hit = _new_run(work, before)
    status = hit.info.status if hit else "-"
    cache = hit.data.tags.get("feature_cache", "-") if hit else "-"
    outcome = f"exit {done.returncode}, run {status}, feature_cache: {cache[:70]}"
    return [("feature cache folder unwritable", outcome, ", ".join(witness.lost()) or "none")]


def case_huge_image(work: Path, witness: Witness) -> list[Row]:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from pipeline.data.decode import MAX_PIXELS

    folder = work / "images"
    digits = load_digits()
    for index in range(60):
        label = int(digits.target[index]) % 2
        (folder / f"class_{label}").mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[index] * 255 / 16).astype("uint8")
        Image.fromarray(np.kron(pixels, np.ones((4, 4), dtype="uint8"))).save(folder / f"class_{label}" / f"{index}.png")
    bomb = huge_png(20000, 20000)
    (folder / "class_0" / "bomb.png").write_bytes(bomb)
    before = {r.info.run_id for r in runs(work)}
    trained = run(pipeline_command(work, work / "huge", "data=image_folder", f"data.train_dir={folder}",
                                   "data.image_size=[8,8]", "data.channels=1", "train.epochs=1",
                                   "train.verbose=0"))
    hit = _new_run(work, before)
    skipped = int(hit.data.metrics.get("data_skipped_files", 0)) if hit else 0
    rows = [("training data holds a 20000x20000 PNG (48 KB)",
             f"exit {trained.returncode}, run {hit.info.status if hit else '-'}, files skipped: {skipped}",
             ", ".join(witness.lost()) or "none")]
    export = work / "huge" / "export"
    process = subprocess.Popen([sys.executable, "-m", "pipeline.predict", str(export), str(folder / "class_0"),
                                "--top-k", "1", "--output", str(work / "predictions.csv")], cwd=PROJECT_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    _, _, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read()
    predicted = len((work / "predictions.csv").read_text().splitlines()) - 1 if (work / "predictions.csv").exists() else 0
    warned = "bomb.png" in stderr
    rows.append(("pipeline.predict on a folder holding it",
                 f"{'reported and skipped' if warned else 'NOT reported'}, {predicted} rows for the other images, "
                 f"peak memory {usage.ru_maxrss / 1024:.0f} MB (decoding it would take "
                 f"{20000 * 20000 * 3 / 2**30:.1f} GB as uint8 alone)", "none"))
    served = run([sys.executable, "-c", (
        "import sys, tensorflow as tf\n"
        f"model = tf.saved_model.load({str(export / 'saved_model')!r})\n"
        f"data = open({str(folder / 'class_0' / 'bomb.png')!r}, 'rb').read()\n"
        "try:\n"
        "    model.signatures['serving_bytes'](images=tf.constant([data]))\n"
        "    print('decoded')\n"
        "except tf.errors.InvalidArgumentError as error:\n"
        "    reason = [line for line in error.message.splitlines() if 'pixels' in line]\n"
        "    print('rejected:', (reason or ['?'])[0].strip()[:90])\n")])
    answer = (served.stdout.strip().splitlines() or [f"exit {served.returncode}"])[-1]
    rows.append((f"serving_bytes given it (limit {MAX_PIXELS:,} pixels)", answer, "none"))
    return rows


def huge_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares `width x height` RGB pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


CASES = {
    "kills": case_kills,
    "ctrl_c": case_ctrl_c,
    "full_disk": case_full_disk,
    "two_processes": case_two_processes,
    "unreachable_store": case_unreachable_store,
    "unwritable_cache": case_unwritable_cache,
    "huge_image": case_huge_image,
}


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["child"]:
        child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp folder)")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="fault-injection-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    witness = Witness.make(work)
    rows: list[Row] = []
    for name in chosen:
        print(f"... {name}", file=sys.stderr, flush=True)
        rows.extend(CASES[name](work, witness))
    widths = [max(len(row[i]) for row in [("case", "outcome", "data lost"), *rows]) for i in range(3)]
    for row in [("case", "outcome", "data lost"), tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"\n{len(rows)} cases in {time.monotonic() - started:.0f} s; work folder {work}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(row[2] == "none" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
