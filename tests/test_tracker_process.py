"""The tracker in a process of its own: the same store contents, errors and ends as inline.

Each test starts a `TrackerProcess` itself (this process has Keras and MLflow loaded, so
`in_own_process` would keep the tracker inline here); the default CLI run goes through
`in_own_process` (tests/test_end_to_end.py).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from pipeline.errors import ExportError, TrackingError
from pipeline.tracking import MlflowTracker
from pipeline.tracking.process import TrackerProcess, TrackerProcessError, _rebuilt, in_own_process


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


def _tracker(store: Path, experiment: str) -> MlflowTracker:
    return MlflowTracker(uri=f"sqlite:///{store / 'mlflow.db'}", experiment=experiment,
                         artifact_location=str(store / "art" / experiment))


def _client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


@pytest.fixture
def process(store):
    started = TrackerProcess(_tracker(store, "process"))
    yield started
    started.close()


def _log_a_run(tracker, files: Path, fail: BaseException | None = None) -> str:
    (files / "export").mkdir(exist_ok=True)
    (files / "export" / "labels.txt").write_text("a\nb\n")
    (files / "metrics.json").write_text("{}")
    try:
        with tracker.run(params={"a": 1, "b": "x" * 7000}, tags={"config_sha256": "c0ffee"}) as run:
            for epoch, loss in enumerate([1.0, 0.5]):
                run.log_epoch(epoch, {"loss": loss})
            run.log_artifact(files / "metrics.json")
            run.log_artifact(files / "export", "export")
            run.set_tags({"git.dirty": "False"})
            run.log_skipped_files(["bad.jpg"])
            if fail is not None:
                raise fail
    except type(fail) if fail is not None else ():
        pass
    return run.run_id


def _contents(store: Path, run_id: str) -> dict:
    client = _client(store)
    run = client.get_run(run_id)
    tags = {k: v for k, v in run.data.tags.items() if k != "mlflow.runName"}
    return {
        "status": run.info.status,
        "params": run.data.params,
        "tags": tags,
        "loss": sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")),
        "metrics": run.data.metrics,
        "artifacts": sorted(a.path for a in client.list_artifacts(run_id)),
        "export": sorted(a.path for a in client.list_artifacts(run_id, "export")),
    }


@pytest.mark.parametrize("fail", [None, ValueError("the data is odd"), KeyboardInterrupt()],
                         ids=["finished", "failed", "killed"])
def test_a_run_through_the_process_leaves_what_an_inline_run_leaves(store, tmp_path, fail):
    inline = _log_a_run(_tracker(store, f"inline-{type(fail).__name__}"), tmp_path, fail)
    process = TrackerProcess(_tracker(store, f"process-{type(fail).__name__}"))
    try:
        remote = _log_a_run(process, tmp_path, fail)
    finally:
        process.close()
    found, wanted = _contents(store, remote), _contents(store, inline)
    assert found == wanted
    assert found["status"] == {None: "FINISHED", ValueError: "FAILED", KeyboardInterrupt: "KILLED"}[
        None if fail is None else type(fail)]
    assert found["params"]["a"] == "1" and found["metrics"]["data_skipped_files"] == 1.0
    if isinstance(fail, ValueError):  # its traceback is this process's, written there
        text = Path(_client(store).download_artifacts(remote, "traceback.txt", str(tmp_path))).read_text()
        assert "_log_a_run" in text and "ValueError: the data is odd" in text
    assert process._process.returncode == 0


def test_resuming_and_finding_runs_are_answered_there(store, process):
    with pytest.raises(KeyboardInterrupt), process.run(params={}, tags={"config_sha256": "resume-me",
                                                                          "run_dir": "/runs/1"}) as run:
        raise KeyboardInterrupt
    assert process.find_resumable("resume-me") == (run.run_id, "/runs/1")
    assert process.find_resumable("nothing-like-it") is None
    with process.run(params={}, tags={}, resume_run_id=run.run_id):
        pass
    assert _client(store).get_run(run.run_id).info.status == "FINISHED"
    assert process.finished_child(run.run_id, "resume-me") is None


def test_a_store_refusal_is_the_same_tracking_error_as_inline():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(TrackingError) as inline:
        MlflowTracker(uri=uri, timeout=5).find_resumable("any")
    process = TrackerProcess(MlflowTracker(uri=uri, timeout=5))
    try:
        with pytest.raises(TrackingError) as remote:
            process.find_resumable("any")
    finally:
        process.close()
    assert str(remote.value) == str(inline.value) and "does not answer" in str(remote.value)


def test_a_file_error_comes_back_as_the_os_error_it_was(process, tmp_path):
    missing = tmp_path / "not-written.json"
    with process.run(params={}, tags={}) as run:
        with pytest.raises(FileNotFoundError) as raised:
            run.log_artifact(missing)
    assert raised.value.filename == str(missing)


def test_a_bug_there_is_raised_here_with_its_traceback(process):
    with pytest.raises(TrackerProcessError, match=r"(?s)Traceback.*KeyError: 'no-such-run'"):
        process.call("log_metrics", "no-such-run", {"loss": 1.0}, 0)
    with pytest.raises(TrackerProcessError, match="KeyError: 'format_disk'"):
        process.call("format_disk")  # only the tracker's calls are answered


def test_only_the_pipelines_own_errors_are_made_from_a_reply():
    assert type(_rebuilt({"type": "ExportError", "message": "m"})) is ExportError
    assert type(_rebuilt({"type": "PermissionError", "message": "m"})) is TrackerProcessError
    assert type(_rebuilt({"type": "__class__", "message": "m"})) is TrackerProcessError
    denied = _rebuilt({"type": "OSError", "errno": 13, "strerror": "Permission denied", "filename": "/x"})
    assert isinstance(denied, PermissionError) and denied.filename == "/x"


def test_its_log_records_are_logged_here(store, process, caplog):
    # A run deleted meanwhile cannot be marked KILLED: the tracker's process logs a warning
    # (and goes on), which must reach this process's log.
    run_id = process.call("open", {}, {}, None, None)
    _client(store).delete_run(run_id)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        process.call("end", run_id, {"status": "KILLED", "reason": "interrupted (Ctrl-C)", "traceback": None,
                                     "error": ""})
    (warning,) = [r for r in caplog.records if r.name == "pipeline"]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(f"MLflow run {run_id} could not be marked KILLED in the store")


def test_a_dead_tracker_process_is_a_tracking_error_and_the_run_stays_resumable(store):
    process = TrackerProcess(_tracker(store, "dead"))
    with pytest.raises(TrackingError, match=r"tracker's process .* ended before answering log_metrics .*"
                                            r"Run the same command again"):
        with process.run(params={}, tags={}) as run:
            process._process.kill()
            process._process.wait()
            run.log_metrics({"loss": 1.0})
    process.close()
    assert _client(store).get_run(run.run_id).info.status == "RUNNING"  # resume=auto takes it


def test_a_sigterm_to_every_process_still_lets_the_run_end_killed(store):
    # A batch scheduler's cancel signals every process of the job: the tracker's process
    # waits for the run's to end its MLflow run.
    import signal

    process = TrackerProcess(_tracker(store, "cancelled"))
    try:
        with pytest.raises(KeyboardInterrupt), process.run(params={}, tags={}) as run:
            os.kill(process._process.pid, signal.SIGTERM)
            os.kill(process._process.pid, signal.SIGINT)
            time.sleep(0.5)
            raise KeyboardInterrupt  # what the run's process makes of its own SIGTERM
    finally:
        process.close()
    found = _client(store).get_run(run.run_id)
    assert found.info.status == "KILLED" and found.data.tags["killed_reason"] == "interrupted (Ctrl-C)"


_DIES = """
import os, signal, sys
from pipeline.tracking import MlflowTracker
from pipeline.tracking.process import TrackerProcess
process = TrackerProcess(MlflowTracker(uri=sys.argv[1], experiment="orphan"))
opened = process.run(params={}, tags={})  # held, as a run holds it, until the kill
run = opened.__enter__()
print(process._process.pid, run.run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_when_the_runs_process_dies_the_tracker_process_ends_and_the_run_stays_running(store):
    done = subprocess.run([sys.executable, "-c", _DIES, f"sqlite:///{store / 'mlflow.db'}"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]
    pid, run_id = done.stdout.split()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the tracker's process outlived its run's by 30 s"
        time.sleep(0.1)
    assert _client(store).get_run(run_id).info.status == "RUNNING"


def test_in_own_process_keeps_the_tracker_inline_where_tensorflow_is_loaded(store):
    tracker = _tracker(store, "inline")
    with in_own_process(tracker) as kept:
        assert kept is tracker  # this test process has Keras loaded: nothing to overlap

    class Custom(MlflowTracker):
        pass

    custom = Custom(uri=f"sqlite:///{store / 'mlflow.db'}")
    probe = ("import sys; from pipeline.tracking import MlflowTracker; from pipeline.tracking.process import "
             "in_own_process, TrackerProcess\n"
             "with in_own_process(MlflowTracker(uri=sys.argv[1])) as t: print(type(t).__name__)\n"
             "print('mlflow' in sys.modules, 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, f"sqlite:///{store / 'mlflow.db'}"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["TrackerProcess", "False", "False"], done.stderr[-2000:]
    with in_own_process(custom) as kept:
        assert kept is custom  # another tracker class is the user's to run


def test_odd_values_arrive_unchanged(store, process):
    odd = 'a "quoted"\nvalue, ünïcode'
    with process.run(params={"odd": odd}, tags={"odd": odd}) as run:
        run.log_metrics({"nan": float("nan"), "big": 1e300})
    found = _client(store).get_run(run.run_id)
    assert found.data.params["odd"] == odd and found.data.tags["odd"] == odd
    assert found.data.metrics["big"] == 1e300 and found.data.metrics["nan"] != found.data.metrics["nan"]


def _prepared_while_waiting(folder: Path) -> list[Path]:
    """The tracker process's new store under its own name, once it appears (within 60 s)."""
    deadline = time.monotonic() + 60
    while not (found := sorted(folder.glob(".mlflow.db.partial-*"))):
        assert time.monotonic() < deadline, "the tracker's process made no new store meanwhile"
        time.sleep(0.05)
    return found


def test_a_new_stores_tables_are_made_meanwhile_and_the_first_call_adopts_them(tmp_path):
    process = TrackerProcess(_tracker(tmp_path, "new"))
    try:
        assert _prepared_while_waiting(tmp_path) and not (tmp_path / "mlflow.db").exists()
        with process.run(params={"a": 1}, tags={}) as run:
            run.log_metrics({"loss": 0.5})
    finally:
        process.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "mlflow"))) == [
        "mlflow.db", "mlflow.db.lock"]
    found = _client(tmp_path).get_run(run.run_id)
    assert found.info.status == "FINISHED" and found.data.metrics == {"loss": 0.5}
    experiments = {e.name: e.artifact_location for e in _client(tmp_path).search_experiments()}
    assert experiments["new"] == str(tmp_path / "art" / "new")
    assert set(experiments) == {"Default", "new"}


def test_a_run_that_stops_before_its_first_call_leaves_no_store(tmp_path):
    process = TrackerProcess(_tracker(tmp_path, "stopped"))
    _prepared_while_waiting(tmp_path)
    process.close()  # the run's input was refused: no call came
    assert list(tmp_path.iterdir()) == []


def test_a_store_another_run_made_meanwhile_is_kept(tmp_path):
    process = TrackerProcess(_tracker(tmp_path, "late"))
    try:
        _prepared_while_waiting(tmp_path)
        (tmp_path / "files").mkdir()
        other = _log_a_run(_tracker(tmp_path, "first"), tmp_path / "files")  # inline: its own store
        with process.run(params={}, tags={}) as run:
            pass
    finally:
        process.close()
    client = _client(tmp_path)
    assert client.get_run(other).info.status == "FINISHED"  # the other run's store was not replaced
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert not list(tmp_path.glob(".mlflow.db.partial-*"))
