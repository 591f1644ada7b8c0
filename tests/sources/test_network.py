"""The reachability check that runs before a download: it must answer within `timeout`."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.errors import SourceError
from pipeline.sources.network import check_reachable


def test_a_server_that_answers_passes_at_once():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        check_reachable("source.handle='x'", f"http://127.0.0.1:{server.server_port}/model", 5, "offline help")
        assert time.monotonic() - started < 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_server_that_never_answers_fails_after_the_timeout(silent_server, scheme):
    port, accepted = silent_server
    started = time.monotonic()
    expected = (rf"source\.handle='x' could not be fetched: 127\.0\.0\.1:{port} is unreachable after 1\.\ds "
                r"\(no answer within 1s; no network\?\)\. offline help")
    with pytest.raises(SourceError, match=expected):
        check_reachable("source.handle='x'", f"{scheme}://127.0.0.1:{port}/model", 1, "offline help")
    assert 0.9 <= time.monotonic() - started < 3
    assert len(accepted) == 1
