"""Fail fast, with offline advice, when a model or weights URL cannot be reached."""

from __future__ import annotations

import socket
import time

from pipeline.errors import SourceError


def check_reachable(what: str, host: str, timeout: float, offline_help: str, port: int = 443) -> None:
    """Raise `SourceError` within about `timeout` seconds if `host` cannot be connected to.

    Args:
        what: the config key and value being fetched, quoted in the error
            (`source.handle='https://...'`).
        offline_help: how to do without the network (a local path, a cache variable).
    """
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as error:
        waited = time.monotonic() - start
        raise SourceError(
            f"{what} could not be fetched: {host} is unreachable after {waited:.1f}s "
            f"({error}; no network?). {offline_help}"
        ) from error
