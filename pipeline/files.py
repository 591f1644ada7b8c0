"""Leftovers of killed processes: staging folders that were never renamed into place.

Exports and feature-cache entries are written beside their final name and renamed when
complete; a process killed halfway leaves the staging folder behind. Nothing ever reads
one, and after a day no live process can still be writing it, so it is removed at start.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

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
