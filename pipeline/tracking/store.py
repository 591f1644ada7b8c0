"""The tracking store: its URI, and the one way this package reaches it.

Every MLflow call, reads and writes, `log_model` and registration included, goes through
`client(uri)` or `active_store(uri)`, so all of them wait for a busy SQLite store alike.

Parallel sweep jobs share one SQLite file, and SQLite lets one writer in at a time. The
others wait in SQLite's busy handler rather than fail: MLflow sets a 20 s busy timeout in
each of its sessions, and `store_uri` gives the connections it opens before a session
(checking and creating the tables) a timeout too, through the sqlite driver's `timeout`
URI parameter. What a busy timeout cannot cover is two processes creating a new store's
tables at once (each fails on the other's half-made tables), so a store is opened under a
file lock beside the database.

A store that refuses us (a read-only or full database file or folder, a server that says
no) raises TrackingError naming `tracking.uri` and the fix, never MLflow's traceback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pipeline.errors import TrackingError

_SQLITE = "sqlite:///"
# Seconds a connection waits for another process's lock before "database is locked", until
# MLflow's first session on it sets its own 20 s. Writes hold the lock for milliseconds;
# creating a new store's tables takes seconds.
SQLITE_BUSY_TIMEOUT_S = 60


def absolute_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` relative to the working directory becomes an absolute URI."""
    if uri.startswith(_SQLITE) and not uri.startswith(_SQLITE + "/"):
        path = uri[len(_SQLITE) :]
        if path and path != ":memory:":
            return _SQLITE + str(Path(path).resolve())
    return uri


def store_uri(uri: str) -> str:
    """The URI MLflow is given: a SQLite file's URI with the busy timeout as its `timeout`.

    SQLAlchemy's sqlite driver passes `timeout` to `sqlite3.connect`, which sets SQLite's
    busy timeout on every connection of the engine that MLflow builds. A URI that already
    has a query (`?timeout=5`) is the user's choice and stays as given.
    """
    uri = absolute_uri(uri)
    if database_file(uri) is None or "?" in uri:
        return uri
    return f"{uri}?timeout={SQLITE_BUSY_TIMEOUT_S}"


def client(uri: str, timeout: float = 10.0) -> Any:
    """An `MlflowClient` of the store at `uri` (tracking and model registry).

    A tracking server is asked for its health first (once per process), so an unreachable
    one fails within `timeout` seconds instead of after MLflow's minutes of retries.
    """
    from mlflow.tracking import MlflowClient

    check_server(uri, timeout)
    configured = store_uri(uri)
    _quiet_refusals()
    _create_database_file(uri)
    with _opening(configured), refusals(uri):  # MlflowClient builds the store, and its tables if new
        return MlflowClient(tracking_uri=configured)


@contextmanager
def refusals(uri: str) -> Iterator[None]:
    """The store's refusals meanwhile as TrackingError naming `tracking.uri` and the fix.

    A refusal is the database failing as a database (read-only, full, unopenable, locked past
    its timeout) or a server denying us. Other MLflow errors (a bad request: ours to fix) and
    the OSErrors of a local artifact folder (the runner names the folder) pass unchanged.
    """
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    try:
        yield
    except (MlflowException, OperationalError) as error:
        database = next((e for e in _causes(error) if isinstance(e, OperationalError)), None)
        denied = getattr(error, "error_code", "") in ("PERMISSION_DENIED", "UNAUTHENTICATED")
        if database is None and not denied:
            raise
        reason = str(getattr(database, "orig", None) or database or error).splitlines()[0][:300]
        path = database_file(uri)
        if path is None:
            fix = "check that the server lets you write (its permissions, its disk)"
        elif "locked" in reason:
            fix = f"another process held {path} longer than the busy timeout ({SQLITE_BUSY_TIMEOUT_S} s)"
        else:
            fix = f"make {path} and its folder {path.parent} writable (chmod u+w), or free space on its disk"
        raise TrackingError(
            f"the tracking store tracking.uri={uri!r} refused us ({reason}): {fix}; or log to a "
            "store you can write, for example tracking.uri=sqlite:///mlflow.db. Then run the "
            "same command again."
        ) from error


def _create_database_file(uri: str) -> None:
    """Creates a new SQLite store's (empty) file, so that a folder where it cannot be created
    fails now, not after MLflow's retries of a minute and a half."""
    database = database_file(uri)
    if database is None or "?" in uri or str(database).startswith("file:") or database.exists():
        return  # a URI with options (`?mode=ro&uri=true`) is the user's to open as given
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        database.touch()  # an empty file is an empty SQLite database; MLflow adds the tables
    except OSError as error:
        raise TrackingError(
            f"the tracking store tracking.uri={uri!r} cannot be created ({error.strerror}: "
            f"{error.filename}): make the folder {database.parent} writable, or log to a store "
            "you can write, for example tracking.uri=sqlite:///mlflow.db. Then run the same "
            "command again."
        ) from error


def prepared(uri: str) -> Path | None:
    """A new SQLite store's tables, made now in a hidden file beside its database; None where
    the database exists already, the URI has options, or its folder does not exist.

    Creating a store's tables takes MLflow 1.5 s; the tracker's process does it while the
    run's process imports TensorFlow, under a name of its own, so that a run that stops on
    its input leaves no store behind. `adopt` gives it the database's name at the first
    call; `discard` removes it when none came. Where it cannot be made, the first call
    creates the store as before.
    """
    import uuid

    from pipeline.files import remove_stale

    database = database_file(absolute_uri(uri))
    if (database is None or "?" in uri or str(database).startswith("file:") or database.exists()
            or not database.parent.is_dir()):
        return None
    remove_stale(database.parent, f".{database.name}.partial-*")  # of killed tracker processes
    partial = database.with_name(f".{database.name}.partial-{uuid.uuid4().hex[:12]}")
    try:
        from mlflow.tracking import MlflowClient

        _quiet_refusals()
        with _quiet("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
            MlflowClient(tracking_uri=store_uri(_SQLITE + str(partial)))  # builds the tables
    except Exception:  # a folder that refuses us, a full disk: the first call reports it
        discard(partial)
        return None
    return partial


def adopt(partial: Path, uri: str) -> None:
    """Links a `prepared` store into place as `uri`'s database, unless a database appeared
    there meanwhile (another run's: that one is kept), and removes the prepared file.

    A hard link never replaces a file, so two runs adopting at once cannot lose one's runs.
    The connections MLflow keeps open to the prepared file are idle, and never written
    through again.
    """
    database = database_file(absolute_uri(uri))
    try:
        os.link(partial, database)
    except OSError:  # it exists now, or this file system has no hard links: the first call opens it
        pass
    finally:
        discard(partial)


def discard(partial: Path) -> None:
    with suppress(OSError):
        partial.unlink()


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Their INFO records dropped meanwhile: a run that stops on its input prints one line."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


class _Reraised(logging.Filter):
    """Drops MLflow's own log of a database error (a traceback) that it raises to us anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SQLAlchemy database error")


def _quiet_refusals() -> None:
    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _Reraised) for f in logger.filters):
        logger.addFilter(_Reraised())


@contextmanager
def active_store(uri: str) -> Iterator[None]:
    """Points MLflow's global tracking URI at `uri` meanwhile, for the APIs that read it
    (model logging and loading); the previous URI is restored after."""
    import mlflow

    configured = store_uri(uri)
    client(uri)  # builds the store under the lock; MLflow keeps it for this URI
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(configured)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


_ANSWERED: set[str] = set()  # servers that answered in this process


def check_server(uri: str, timeout: float) -> None:
    """Raises TrackingError when the tracking server at an http(s) `uri` does not answer its
    `/health` endpoint within `timeout` seconds; other stores are not servers."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")) or uri in _ANSWERED:
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as reply:
            reply.read(64)
    except urllib.error.HTTPError:
        pass  # it answered (a server without /health, or behind a proxy): MLflow takes it from here
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise TrackingError(
            f"tracking.uri={uri!r} does not answer ({reason}; waited at most {timeout:g} s, "
            "tracking.timeout). Start the server (mlflow server --host 127.0.0.1 --port 5000 "
            "--backend-store-uri sqlite:///mlflow.db) or log locally with "
            "tracking.uri=sqlite:///mlflow.db."
        ) from None
    _ANSWERED.add(uri)


def database_file(uri: str) -> Path | None:
    """The database file of a SQLite URI; None for an in-memory or a non-SQLite store."""
    if not uri.startswith(_SQLITE):
        return None
    path = uri[len(_SQLITE) :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextmanager
def _opening(uri: str) -> Iterator[None]:
    """Holds an exclusive lock on `<database>.lock` while a SQLite store is opened.

    MLflow creates a new store's tables on first use without a lock of its own; two
    processes doing so at once fail with "table ... already exists" or "duplicate column".
    Without `fcntl` (Windows) or where the lock file cannot be written (a read-only store),
    the store is opened unlocked, as MLflow would.
    """
    database = database_file(uri)
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if database is None or fcntl is None:
        yield
        return
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        handle = open(database.with_name(database.name + ".lock"), "a")
    except OSError:
        yield
        return
    with handle:  # closing the file releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
