"""Surviving faults: a named resume, SIGTERM, NaN loss, reruns (kills at each stage: test_faults.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from cli import pipeline_command, run_pipeline, runs
from conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow
# Enough epochs to stop a run in the middle; a kill at each stage boundary is tests/test_faults.py.
SETTINGS = ("train.epochs=8", "train.deterministic=true", "data.classes=[5,6,7]")


def _start(tmp_path, run_dir, *overrides):
    return subprocess.Popen(
        pipeline_command(tmp_path, f"hydra.run.dir={run_dir}", *SETTINGS, *overrides),
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for_epochs(run_dir, epochs: int, process, timeout=300) -> int:
    state = run_dir / "checkpoints" / "state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.exists():
            completed = json.loads(state.read_text())["epochs_completed"]
            if completed >= epochs:
                return completed
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.02)
    raise AssertionError("training never reached the checkpoint")


def test_explicit_resume_names_the_run_directory(tmp_path):
    process = _start(tmp_path, tmp_path / "run1")
    _wait_for_epochs(tmp_path / "run1", 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = run_pipeline(tmp_path, f"hydra.run.dir={tmp_path / 'run2'}", *SETTINGS, f"resume={tmp_path / 'run1'}")
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.metrics["epochs_completed"] == 8


def test_sigterm_marks_the_run_killed_and_auto_resume_picks_it_up(tmp_path):
    process = _start(tmp_path, tmp_path / "run1", "train.epochs=30")  # the signal lands mid-training
    _wait_for_epochs(tmp_path / "run1", 2, process)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    assert process.returncode != 0
    (run,) = runs(tmp_path)
    assert run.info.status == "KILLED"
    done = run_pipeline(tmp_path, f"hydra.run.dir={tmp_path / 'run2'}", *SETTINGS, "train.epochs=30")
    assert done.returncode == 0 and "resuming run" in done.stdout + done.stderr
    assert [r.info.status for r in runs(tmp_path)] == ["FINISHED"]


def test_resume_never_starts_a_fresh_run(tmp_path):
    process = _start(tmp_path, tmp_path / "run1")
    _wait_for_epochs(tmp_path / "run1", 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = run_pipeline(tmp_path, f"hydra.run.dir={tmp_path / 'run2'}", "train.epochs=2", "resume=never",
                        "data.classes=[5,6,7]")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(r.info.status for r in runs(tmp_path)) == ["FINISHED", "RUNNING"]


def test_a_diverging_run_stops_with_a_clear_reason(tmp_path):
    done = run_pipeline(tmp_path, f"hydra.run.dir={tmp_path / 'run'}", "train.learning_rate=1e12",
                        "train.optimizer._target_=keras.optimizers.SGD", "train.epochs=3")
    assert done.returncode != 0
    assert "training diverged" in done.stderr and "train.learning_rate" in done.stderr
    (run,) = runs(tmp_path)
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["error"]


def test_rerun_repeats_a_run_exactly_and_warns_about_what_changed(tmp_path, hub_model_dir):
    import shutil

    import tensorflow as tf

    from conftest import make_tf_keras_extractor

    source = tmp_path / "source"
    shutil.copytree(hub_model_dir, source)
    settings = ("source=hub", f"source.handle={source}", "source.input_shape=[8,8,1]",
                "train.epochs=3", "train.deterministic=true")
    first = run_pipeline(tmp_path, f"hydra.run.dir={tmp_path / 'run'}", *settings)
    assert first.returncode == 0, first.stderr[-3000:]
    (original,) = runs(tmp_path)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rerun = subprocess.run(
        [*pipeline_command(tmp_path, module="pipeline.rerun")[:3], original.info.run_id,
         "--tracking-uri", uri, "--output-dir", str(tmp_path / "rerun")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "rerun:" not in rerun.stderr  # nothing differs
    again = json.loads((tmp_path / "rerun" / "metrics.json").read_text())
    before = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again == before  # exactly, with train.deterministic=true on the same CPU
    (copy,) = [r for r in runs(tmp_path) if r.data.tags.get("rerun_of") == original.info.run_id]
    assert copy.data.tags["weights_sha256"] == original.data.tags["weights_sha256"]

    shutil.rmtree(source)
    tf.saved_model.save(make_tf_keras_extractor(seed=5), str(source))  # the source changed since
    changed = subprocess.run(
        [*pipeline_command(tmp_path, module="pipeline.rerun")[:3], original.info.run_id,
         "--tracking-uri", uri, "--output-dir", str(tmp_path / "rerun2")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "rerun: the source model (structure or weights) differs" in changed.stderr
    assert "the data" not in changed.stderr

    # The stored config names the source, not the user: a SavedModel there that reads files
    # is refused before it is loaded (one line, exit 2), unless --allow-unsafe.
    from conftest import write_reading_saved_model

    write_reading_saved_model(source)
    refused = subprocess.run(
        [*pipeline_command(tmp_path, module="pipeline.rerun")[:3], original.info.run_id,
         "--tracking-uri", uri, "--output-dir", str(tmp_path / "rerun3")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"error: source.handle={str(source)!r}, named by the stored config, runs TensorFlow ops that read "
        "or write files, reach the network or run Python (ReadFile)")
    assert "--allow-unsafe" in refused.stderr.strip().splitlines()[-1]
    assert "Traceback" not in refused.stderr
