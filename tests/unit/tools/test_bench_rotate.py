"""wrk with ``rotate.lua`` sends every body of the file in turn, each with its own length and the
-H headers (a 1 s run against a tiny loopback server; skipped where wrk is not installed)."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tools.bench.textmix import MixItem, write_text_body
from tools.bench.wrk import run_wrk

pytestmark = [
    pytest.mark.tools,  # the benchmark tool's own tests (fast; in `make test`)
    pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("taskset") is None,
                       reason="wrk (and taskset) not installed"),
]


class Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as wrk expects
    seen: list[tuple[bytes, str, str]] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Recorder.seen.append((body, self.headers.get("Host", ""),
                              self.headers.get("Content-Type", "")))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def test_wrk_rotates_through_every_body(tmp_path) -> None:
    texts = ["a", "bb bb", "ccc " * 40, "ёжик в тумане", 'q "uote"']
    body = write_text_body(tmp_path, "mix", [MixItem(t, "xx", "short") for t in texts], "test")
    lines = body.path.read_bytes().splitlines()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Recorder.seen = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}{body.route}"
        result, _ = run_wrk(url, body, conc=2, seconds=1, latency=False)
    finally:
        server.shutdown()
        server.server_close()
    assert result.requests > 20 and result.non2xx == 0 and not result.socket_errors
    bodies = [b for b, _, _ in Recorder.seen]
    assert set(bodies) == set(lines)  # every body arrived whole (its own Content-Length)
    # in turn, not at random: sent counts differ by at most 1, and at most c=2 requests were
    # still in flight when wrk stopped
    counts = Counter(bodies)
    assert max(counts.values()) - min(counts.values()) <= 3
    hosts = {h for _, h, _ in Recorder.seen}
    assert hosts == {f"127.0.0.1:{server.server_address[1]}"}
    assert {ct for _, _, ct in Recorder.seen} == {"application/json"}
