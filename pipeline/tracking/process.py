"""The tracker in a process of its own, importing MLflow while the run imports TensorFlow.

A command's run imports TensorFlow and Keras (5-7 s on 2 cores), then MLflow with its SQL
store (2.5-3.5 s, and more when the store's tables are checked or created), one after the
other on one core. `in_own_process(tracker)` starts a Python process that imports MLflow and
opens an existing store at once (or makes a new one's tables under another name, which the
first call adopts: `store.prepared`), on the other core, while the run imports TensorFlow;
the run's MLflow calls are then answered there, and the run's process never imports MLflow.

`TrackerProcess` and `ProcessRun` have `MlflowTracker`'s and `TrackedRun`'s methods; each
call is a request answered before it returns (JSON on a pipe: plain values only, nothing in
a reply chooses what code runs). What the other process logs through the `pipeline` logger
and Python's warnings is logged here. Its errors are raised here as they were there: the
pipeline's own errors (TrackingError, ExportError: one line and exit 2) by their class, an
OSError with its number and file (the runner names a full disk or a refused folder); any
other error, a bug, as `TrackerProcessError` with the traceback from there. An MLflow model
is logged there from what `served_model` read here (TensorFlow's protocol buffers).

If the run's process dies, the other one reads the end of its pipe and exits, leaving the
MLflow run RUNNING: `resume=auto` resumes it (its process is gone), as before. If the other
process dies, the next call raises TrackingError (run the same command again). It is in
a session of its own, and ignores SIGINT and SIGTERM: Ctrl-C, or a signal to every process
of a job, stops the run, which ends its MLflow run KILLED through this process.

Example:
    >>> with in_own_process(MlflowTracker("sqlite:///mlflow.db", "digits")) as tracker:
    ...     import keras  # meanwhile, the other process imports MLflow
    ...     with tracker.run(params, tags) as run:
    ...         run.log_metrics({"test_accuracy": 0.97})
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline import errors
from pipeline.errors import PipelineError, TrackingError
from pipeline.tracking import store
from pipeline.tracking.tracker import Ending, MlflowTracker, Opens, TrackedRun

log = logging.getLogger("pipeline")
_ROOT = Path(__file__).resolve().parents[2]  # where the `pipeline` package is
_FORWARDED = ("pipeline", "py.warnings")  # the loggers whose records come back to the run


class TrackerProcessError(RuntimeError):
    """The tracker's process failed on a bug; the message holds its traceback."""


@contextmanager
def in_own_process(tracker: Any) -> Iterator[Any]:
    """`tracker` answered by a process of its own (`TrackerProcess`) while this one has yet
    to import TensorFlow and MLflow: a command's run. Otherwise `tracker` itself: where Keras
    or MLflow is loaded already (a test, a notebook, a multirun's later jobs) there is no
    import to overlap. Any other tracker than `MlflowTracker` is used as it is."""
    if (type(tracker) is not MlflowTracker or {"keras", "tensorflow", "mlflow"} & set(sys.modules)
            or os.name != "posix"):  # the pipes are passed as POSIX file descriptors
        yield tracker
        return
    process = TrackerProcess(tracker)
    try:
        yield process
    finally:
        process.close()


class TrackerProcess(Opens):
    """`MlflowTracker`'s methods, answered by a process of its own (see the module)."""

    def __init__(self, tracker: MlflowTracker):
        self.uri, self.experiment, self.register_as = tracker.uri, tracker.experiment, tracker.register_as
        from multiprocessing.connection import Connection

        requests_read, requests_write = os.pipe()
        replies_read, replies_write = os.pipe()
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.tracking.process", str(requests_read), str(replies_write)],
                pass_fds=(requests_read, replies_write), stdin=subprocess.DEVNULL, env=environment,
                start_new_session=True,
            )
        finally:
            os.close(requests_read)
            os.close(replies_write)
        self._requests = Connection(requests_write, readable=False)
        self._replies = Connection(replies_read, writable=False)
        self._unanswered = 0  # calls sent whose reply is not read yet
        self._send({"settings": tracker.settings(), "level": logging.getLogger("pipeline").getEffectiveLevel()})

    def find_resumable(self, config_sha256: str) -> tuple[str, str] | None:
        found = self.call("find_resumable", config_sha256)
        return tuple(found) if found else None

    def finished_child(self, parent_run_id: str, config_sha256: str) -> tuple[str, dict[str, float]] | None:
        found = self.call("finished_child", parent_run_id, config_sha256)
        return tuple(found) if found else None

    def open(self, params: Mapping[str, str], tags: Mapping[str, str], resume_run_id: str | None = None,
             parent_run_id: str | None = None) -> TrackedRun:
        """As `MlflowTracker.open`, there; `run` (of `Opens`) ends it with this process's outcome."""
        params = {key: str(value) for key, value in params.items()}
        tags = {key: str(value) for key, value in tags.items()}
        return ProcessRun(self, self.call("open", params, tags, resume_run_id, parent_run_id))

    def call(self, name: str, *args: Any) -> Any:
        """`name(*args)` answered by the other process; raises its error here.

        A call interrupted while it waited (Ctrl-C) leaves its reply in the pipe: the next
        call reads it first (its log records are logged, its result dropped).
        """
        try:
            self._send({"call": name, "args": args})
            self._unanswered += 1
            while self._unanswered:
                reply = json.loads(self._replies.recv_bytes())
                self._unanswered -= 1
                for logger, level, message in reply.get("logs", ()):
                    logging.getLogger(logger).log(level, "%s", message)
        except (EOFError, OSError) as error:
            self._process.poll()
            raise TrackingError(
                f"the tracker's process (pid {self._process.pid}, which talks to tracking.uri={self.uri!r}) "
                f"ended before answering {name} (exit status {self._process.returncode}; {type(error).__name__}). "
                "Run the same command again: the run resumes (resume=auto)."
            ) from None
        if "error" in reply:
            raise _rebuilt(reply["error"])
        return reply["ok"]

    def close(self) -> None:
        """Ends the other process (it has answered every call) and waits for it."""
        try:
            self._requests.close()  # the end of its requests: it exits
        finally:
            self._replies.close()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def _send(self, message: Mapping[str, Any]) -> None:
        """Writes `message` whole: a signal meanwhile is handled after (a request cut short
        would leave the other process reading half of it)."""
        import signal

        data = json.dumps(message).encode()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._requests.send_bytes(data)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class ProcessRun(TrackedRun):
    """`TrackedRun`'s methods for a run opened in the tracker's process."""

    def __init__(self, tracker: TrackerProcess, run_id: str):
        super().__init__(None, run_id, tracker.uri, tracker.experiment, tracker.register_as)
        self._tracker = tracker

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self._tracker.call("log_metrics", self.run_id, {key: float(value) for key, value in metrics.items()}, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._tracker.call("log_artifact", self.run_id, str(Path(path).resolve()), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._tracker.call("set_tags", self.run_id, {key: str(value) for key, value in tags.items()})

    def log_model(self, export_root: Path) -> str:
        from pipeline.tracking.model import served_model

        root = Path(export_root).resolve()
        return self._tracker.call("log_model", self.run_id, str(root), asdict(served_model(root)))

    def end(self, ending: Ending) -> None:
        if ending.status == "FINISHED":
            self._tracker.call("end", self.run_id, asdict(ending))
            return
        try:  # as `TrackedRun.end`: the error that ended the run is the one to report
            self._tracker.call("end", self.run_id, asdict(ending))
        except TrackingError as error:
            log.warning("MLflow run %s could not be marked %s: %s", self.run_id, ending.status, error)


def _rebuilt(error: Mapping[str, Any]) -> BaseException:
    """The other process's error, as raised there: only the pipeline's own classes are made."""
    kind = error.get("type")
    if kind == "OSError":
        return OSError(error["errno"], error["strerror"], error["filename"])
    found = getattr(errors, str(kind), None)
    if isinstance(found, type) and issubclass(found, PipelineError):
        return found(error["message"])
    return TrackerProcessError(f"the tracker's process failed:\n{error.get('traceback', '')}")


# The other process's side.


class _Forward(logging.Handler):
    """Keeps the records logged meanwhile, to be sent with the next reply."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def serve(requests_fd: int, replies_fd: int) -> None:
    """Answers one run's tracker calls until the end of the requests; then exits.

    It ignores SIGINT and SIGTERM: the run's process, which gets them too where a whole
    process tree is signalled (a batch scheduler's cancel), ends its MLflow run KILLED
    through this one, and closes its pipe after.
    """
    import signal
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    requests = Connection(requests_fd, writable=False)
    replies = Connection(replies_fd, readable=False)
    try:
        first = json.loads(requests.recv_bytes())
    except EOFError:
        os._exit(0)
    forward = _Forward()
    logging.captureWarnings(True)
    for name in _FORWARDED:
        logging.getLogger(name).addHandler(forward)
        logging.getLogger(name).propagate = False
    logging.getLogger("pipeline").setLevel(first["level"])
    tracker = MlflowTracker(**first["settings"])
    new_store = _warm_up(tracker)
    runs: dict[str, TrackedRun] = {}
    calls = {
        "find_resumable": tracker.find_resumable,
        "finished_child": tracker.finished_child,
        "open": lambda *args: _opened(tracker, runs, *args),
        "log_metrics": lambda run_id, metrics, step: runs[run_id].log_metrics(metrics, step),
        "log_artifact": lambda run_id, path, artifact_path: runs[run_id].log_artifact(Path(path), artifact_path),
        "set_tags": lambda run_id, tags: runs[run_id].set_tags(tags),
        "log_model": lambda run_id, root, served: _log_model(runs[run_id], root, served),
        "end": lambda run_id, ending: runs.pop(run_id).end(Ending(**ending)),
    }
    while True:
        try:
            request = json.loads(requests.recv_bytes())
        except EOFError:  # the run is over, or its process died: its MLflow run stays as it is
            break
        if new_store is not None:  # the run's process has checked its input: the store is wanted
            store.adopt(new_store, tracker.uri)
            new_store = None
        try:
            reply: dict[str, Any] = {"ok": calls[request["call"]](*request["args"])}
        except PipelineError as error:
            reply = {"error": {"type": type(error).__name__, "message": str(error)}}
        except OSError as error:
            reply = {"error": {"type": "OSError", "errno": error.errno, "strerror": error.strerror,
                               "filename": None if error.filename is None else str(error.filename)}}
        except Exception:
            reply = {"error": {"type": None, "traceback": traceback.format_exc()}}
        reply["logs"], forward.records = forward.records, []
        try:
            replies.send_bytes(json.dumps(reply).encode())
        except OSError:  # the run's process is gone
            break
    if new_store is not None:  # no call came: the run stopped before it needed a store
        store.discard(new_store)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)  # MLflow's threads and Python's teardown have nothing left to do


def _warm_up(tracker: MlflowTracker) -> Path | None:
    """Imports MLflow and opens an existing SQLite store (its tables checked) before the first
    call. A new store's tables are made under another name (`store.prepared`), which the
    first call adopts, so that a run that stops on its input creates nothing; returns it.
    A server is first asked by the first call."""
    import mlflow  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    database = store.database_file(tracker.uri)
    if database is not None and database.is_file() and database.stat().st_size > 0:
        try:
            tracker.open_store()
        except Exception:  # the first call meets the same error, and reports it
            pass
        return None
    return store.prepared(tracker.uri)


def _opened(tracker: MlflowTracker, runs: dict[str, TrackedRun], params, tags, resume_run_id, parent_run_id) -> str:
    run = tracker.open(params, tags, resume_run_id, parent_run_id)
    runs[run.run_id] = run
    return run.run_id


def _log_model(run: TrackedRun, root: str, served: Mapping[str, Any]) -> str:
    from pipeline.tracking import model

    chosen = model.ServedModel(dict(served["artifacts"]), tuple(served["requirements"]), bool(served["text"]))
    return model.log_model(run._client, run.run_id, run.tracking_uri, Path(root), run.register_as, chosen)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
