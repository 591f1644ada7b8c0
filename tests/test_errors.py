"""User-facing failures: one `error:` line, exit status 2, and a run stopped from outside resumable.

Hydra's own errors (an unknown key or option, a bad override, a run directory it cannot
write), a read-only tracking store, a full disk, Ctrl-C and `pipeline.inspect` on a source
that does not fit `source.input_shape`. A run stopped from outside (signal, disk,
permission, store) ends KILLED, and the same command resumes it; failed starts and resumes
leave no run directory holding only Hydra's files.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from cli import client, pipeline_command, run_pipeline, runs
from conftest import PROJECT_ROOT, compose

# What TensorFlow's C++ start-up and MLflow's own INFO/WARNING logging write to stderr.
_NOISE = re.compile(
    r"^([EWIF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl"
    r"|\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (INFO|WARNING) )"
)


def _the_error(done: subprocess.CompletedProcess | tuple[int, str]) -> str:
    """The one `error:` line a failed command printed, after checking that it is all it printed."""
    returncode, stderr = (done.returncode, done.stderr) if hasattr(done, "stderr") else done
    lines = [line for line in stderr.splitlines() if line.strip() and not _NOISE.match(line)]
    assert returncode == 2, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


# --- Hydra's own errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epoch=3", ["train.epoch=3:", "did you mean train.epochs?", "+train.epoch=3"]),
        ("data=digitz", ["data=digitz:", "did you mean data=digits?", "csv, digits, image_folder"]),
        ("train.epochs=[1", ["'train.epochs=[1'", "not valid override syntax"]),
    ],
)
def test_hydra_errors_name_the_override_the_close_choices_and_the_fix(override, expected):
    from pipeline.hydra_app import start_error

    with pytest.raises(Exception) as caught:
        compose([override])
    message = start_error(caught.value)
    assert message is not None and "\n" not in message
    for part in expected:
        assert part in message, message


def test_a_misspelled_key_on_the_command_line_is_one_line_with_exit_2(tmp_path):
    done = run_pipeline(tmp_path, f"hydra.run.dir={tmp_path / 'run'}", "train.epoch=3", timeout=60)
    error = _the_error(done)
    assert "did you mean train.epochs?" in error and "+train.epoch=3" in error
    assert not (tmp_path / "run").exists()
    shown = run_pipeline(tmp_path, "--cfg=job", "train.epochs=3", timeout=60)  # still works
    assert shown.returncode == 0 and "epochs: 3" in shown.stdout


def test_a_failed_start_leaves_no_run_directory(tmp_path):
    done = run_pipeline(tmp_path, f"hydra.run.dir={tmp_path / 'run'}", "train.epochs=ten", timeout=60)
    assert "train.epochs='ten'" in _the_error(done)
    assert not (tmp_path / "run").exists()  # Hydra made it, with .hydra/ and a log; it is gone


# --- read-only run directory and store (file modes must bind the subprocess) ----------------


def _as_a_user(command: list[str]) -> list[str]:
    """`command` run so that file modes refuse it: as root, without the capabilities that
    write through them (CAP_DAC_OVERRIDE and friends)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: chmod cannot refuse the pipeline a write")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *command]


def _run_as_a_user(tmp_path, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(_as_a_user(pipeline_command(tmp_path, *overrides)), cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def read_only(tmp_path):
    """A folder made read-only (mode 555) that the command cannot write, or a skip."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    probe = subprocess.run(_as_a_user(["touch", str(folder / "probe")]), capture_output=True)
    if probe.returncode == 0:
        pytest.skip("file modes do not bind this process")
    yield folder
    folder.chmod(0o755)


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path, read_only):
    inside = _run_as_a_user(tmp_path, f"hydra.run.dir={read_only / 'run'}", timeout=60)
    error = _the_error(inside)
    assert f"permission denied on {read_only / 'run'}" in error and "hydra.run.dir=" in error

    existing = _run_as_a_user(tmp_path, f"hydra.run.dir={read_only}", timeout=60)  # exists, read-only
    assert str(read_only) in _the_error(existing)


@pytest.mark.slow
def test_a_read_only_store_is_one_line_naming_it_and_leaves_no_run_directory(tmp_path):
    database = tmp_path / "mlflow.db"
    client(tmp_path).search_experiments()  # an existing store
    database.chmod(0o444)
    probe = subprocess.run(_as_a_user(["sh", "-c", f"echo >> {database}"]), capture_output=True)
    if probe.returncode == 0:
        pytest.skip("file modes do not bind this process")
    done = _run_as_a_user(tmp_path, f"hydra.run.dir={tmp_path / 'run'}")
    error = _the_error(done)
    assert f"tracking.uri='sqlite:///{database}'" in error and "readonly database" in error
    assert "writable" in error
    assert not (tmp_path / "run").exists()


def test_a_store_whose_folder_refuses_the_database_fails_at_once(tmp_path, monkeypatch):
    import pathlib

    from pipeline.errors import TrackingError
    from pipeline.tracking import store

    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "touch", refused)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    with pytest.raises(TrackingError, match=re.escape(f"tracking.uri={uri!r} cannot be created")):
        store.client(uri)  # not after MLflow's minute and a half of retries


# --- stopped from outside: KILLED with the reason, and the same command resumes -------------


def test_a_run_stopped_from_outside_ends_killed_with_the_reason(tmp_path):
    from pipeline.tracking import MlflowTracker

    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "art"))
    for error in (OSError(errno.ENOSPC, "No space left on device", "/runs/x/export"), KeyboardInterrupt(),
                  PermissionError(errno.EACCES, "Permission denied", "/runs/x"), ValueError("a bug")):
        with pytest.raises(type(error)), tracker.run({}, {"case": type(error).__name__}):
            raise error
    ended = {r.data.tags["case"]: r for r in runs(tmp_path)}
    assert ended["OSError"].info.status == "KILLED"
    assert ended["OSError"].data.tags["killed_reason"] == "no space left on device writing /runs/x/export"
    assert ended["KeyboardInterrupt"].data.tags["killed_reason"] == "interrupted (Ctrl-C)"
    assert ended["PermissionError"].data.tags["killed_reason"] == "permission denied on /runs/x"
    failed = ended["ValueError"]
    assert failed.info.status == "FAILED" and "killed_reason" not in failed.data.tags


@pytest.mark.slow
def test_a_full_disk_at_the_export_stops_in_one_line_and_the_same_command_resumes(tmp_path, monkeypatch):
    from pipeline import export
    from pipeline.errors import RunStopped
    from pipeline.runner import run

    settings = ["train.epochs=1", "data.classes=[5,6,7]", "train.verbose=0",
                f"train.feature_cache_dir={tmp_path / 'cache'}"]
    move_into_place = export._move_into_place

    def full(staging, destination, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(destination))

    monkeypatch.setattr(export, "_move_into_place", full)
    with pytest.raises(RunStopped) as caught:
        run(compose(settings, tmp_path))
    message = str(caught.value)
    assert message == (f"no space left on device writing {tmp_path / 'run' / 'export'}; free space and "
                       "run the same command again: it resumes this run")
    (stopped,) = runs(tmp_path)
    assert stopped.info.status == "KILLED" and "no space left" in stopped.data.tags["killed_reason"]

    monkeypatch.setattr(export, "_move_into_place", move_into_place)  # space freed
    run(compose([*settings, f"output_dir={tmp_path / 'second'}"], tmp_path))  # the same command
    (resumed,) = runs(tmp_path)
    assert resumed.info.run_id == stopped.info.run_id and resumed.info.status == "FINISHED"
    assert "killed_reason" not in resumed.data.tags
    assert (tmp_path / "run" / "export" / "saved_model").is_dir() and not (tmp_path / "second").exists()


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_the_same_command_resumes_leaving_no_empty_directory(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    command = pipeline_command(tmp_path, "train.epochs=2", "data.classes=[5,6,7]")
    # A child inherits an ignored SIGINT (pytest started in the background) and then has no
    # Ctrl-C; handled here, it is reset to the default in the child, as in a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        started = subprocess.Popen([*command, f"hydra.run.dir={first}"], cwd=PROJECT_ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 120
    while not (first / "mlflow_run.json").exists() and started.poll() is None:  # its MLflow run is open
        assert time.monotonic() < deadline, "the run did not start in 120 s"
        time.sleep(0.1)
    started.send_signal(signal.SIGINT)
    _, stderr = started.communicate(timeout=120)
    error = _the_error((started.returncode, stderr))
    assert error == "error: interrupted (Ctrl-C); run the same command again: it resumes this run"
    (killed,) = runs(tmp_path)
    assert killed.info.status == "KILLED" and killed.data.tags["killed_reason"] == "interrupted (Ctrl-C)"

    again = subprocess.run([*command, f"hydra.run.dir={second}"], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    (finished,) = runs(tmp_path)
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
    assert not second.exists()  # the resume wrote into `first`, keeping its log there
    assert "resuming run" in (first / "resume-second.log").read_text()


# --- Hydra's directory: removed when it holds only Hydra's files ----------------------------


def _hydra_dir(path):
    (path / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (path / ".hydra" / name).write_text("{}\n")
    (path / "pipeline.log").write_text("resuming run abc\n")
    return path


def test_only_a_directory_holding_nothing_but_hydra_files_is_removed(tmp_path):
    from pipeline.hydra_app import tidy_run_dir

    own = [".hydra", "pipeline.log"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    assert tidy_run_dir(_hydra_dir(tmp_path / "2026-01-01_00-00-00"), own, resumed, resumed=True)
    assert (resumed / "resume-2026-01-01_00-00-00.log").read_text() == "resuming run abc\n"
    assert not (tmp_path / "2026-01-01_00-00-00").exists()

    assert tidy_run_dir(_hydra_dir(tmp_path / "failed"), own, None, resumed=False)  # a failed start
    assert not (tmp_path / "failed").exists()

    kept = _hydra_dir(tmp_path / "kept")
    (kept / "metrics.json").write_text("{}")  # the run's own file: never removed
    assert not tidy_run_dir(kept, own, None, resumed=False) and (kept / "metrics.json").exists()
    (kept / "metrics.json").unlink()
    (kept / ".hydra" / "notes.txt").write_text("mine")
    assert not tidy_run_dir(kept, own, None, resumed=False) and (kept / ".hydra" / "notes.txt").exists()

    unkept = _hydra_dir(tmp_path / "unkept")
    assert not tidy_run_dir(unkept, own, tmp_path / "gone", resumed=True)  # its log could not be kept
    assert (unkept / "pipeline.log").exists()


# --- pipeline.inspect -----------------------------------------------------------------------


def test_inspect_a_source_that_does_not_fit_the_input_shape_is_one_line(capsys):
    from pipeline.inspect import main

    with pytest.raises(SystemExit) as caught:
        main(["source.input_shape=[32,32,1]"])
    error = _the_error((caught.value.code, capsys.readouterr().err))
    assert "source.input_shape=[32, 32, 1]" in error and "set source.input_shape=[8,8,1]" in error
