"""Files shared between processes: who owns a run directory, and leftovers of killed ones.

A run holds a lock on its directory for as long as its process lives (an `flock`, which the
kernel releases when the process dies, also on shared storage that supports locks), so a
second process is refused and `resume=auto` never takes over a live run.

Exports and feature-cache entries are written beside their final name and renamed when
complete; a process killed halfway leaves the staging folder behind. Nothing ever reads
one, and after a day no live process can still be writing it, so it is removed at start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import ConfigError

log = logging.getLogger("pipeline")
STALE_AFTER = 24 * 3600.0  # seconds; no export or cache entry takes a day to write


def remove_stale(folder: Path, pattern: str, older_than: float = STALE_AFTER) -> list[Path]:
    """Deletes the entries of `folder` matching `pattern` not modified for `older_than` seconds.

    Returns what it removed. A folder that does not exist, or an entry that vanishes or
    cannot be removed meanwhile (another process cleaning up), is not an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    cutoff = time.time() - older_than
    for entry in folder.glob(pattern):
        try:
            if entry.lstat().st_mtime >= cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    if removed:
        log.info("removed %d stale partial write(s) of killed runs in %s", len(removed), folder)
    return removed


LOCK_FILE = ".run.lock"  # in each run directory, held by the process that runs it


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Holds `run_dir`'s lock meanwhile; raises ConfigError when another process holds it.

    Without `fcntl` (Windows) the directory is used unlocked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as handle:  # closing it (or dying) releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = _describe_owner(handle.read())
            raise ConfigError(
                f"the run directory {run_dir} is in use by {owner}: one run, one directory. Wait "
                "for it to finish, or start this run elsewhere (output_dir=..., or a new Hydra "
                "run directory, as each plain `python -m pipeline` gets)."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.ctime()}))
        handle.flush()
        yield


def in_use(run_dir: Path) -> bool:
    """Whether a live process holds `run_dir`'s lock (False where locks are unsupported)."""
    try:
        import fcntl
    except ImportError:
        return False
    lock = Path(run_dir) / LOCK_FILE
    if not lock.exists():
        return False
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _describe_owner(text: str) -> str:
    """`process 123 on host vm (since ...)` from a lock file's record, or what it holds."""
    try:
        record = json.loads(text)
        return f"process {record['pid']} on host {record['host']} (since {record['since']})"
    except (ValueError, KeyError, TypeError):
        return text.strip() or "another process"
