"""Fail fast, with offline advice, when a model or weights URL cannot be reached."""

from __future__ import annotations

import socket
import ssl
import time
from urllib.parse import urlparse

from pipeline.errors import SourceError


def check_reachable(what: str, url: str, timeout: float, offline_help: str) -> None:
    """Raise `SourceError` within about `timeout` seconds unless the server of `url` answers.

    A connection alone proves little: a proxy or firewall that accepts connections and
    never answers would hang the download itself, which neither tensorflow_hub nor Keras'
    `get_file` bounds. So an https server must also complete the TLS handshake, and an
    http server must send the first byte of its answer to a HEAD request, in that time.

    Args:
        what: the config key and value being fetched, quoted in the error
            (`source.handle='https://...'`).
        url: what is about to be downloaded; its host and port are checked.
        offline_help: how to do without the network (a local path, a cache variable).
    """
    parsed = urlparse(url)
    host = parsed.hostname or url
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.settimeout(max(timeout - (time.monotonic() - start), 0.01))
            _await_answer(connection, host, parsed)
    except OSError as error:  # also socket.timeout and ssl.SSLError
        waited = time.monotonic() - start
        reason = f"no answer within {timeout:g}s" if isinstance(error, TimeoutError) else str(error)
        raise SourceError(
            f"{what} could not be fetched: {host}:{port} is unreachable after {waited:.1f}s "
            f"({reason or type(error).__name__}; no network?). {offline_help}"
        ) from error


def _await_answer(connection: socket.socket, host: str, parsed) -> None:
    if parsed.scheme == "http":
        path = parsed.path or "/"
        connection.sendall(f"HEAD {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        connection.recv(1)
        return
    # Only whether the server answers is checked here, no data is exchanged; the download
    # that follows verifies the certificate.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(connection, server_hostname=host):
        pass
