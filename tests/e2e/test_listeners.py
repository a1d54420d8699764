"""Every worker gets its share of connections (service/listeners.py), on a real ``bentoml serve``.

  * with CLF_REUSEPORT (the default) each worker listens on a socket of its own and the parent
    on none; long-lived keep-alive connections opened one after another land on both workers
    (the kernel's hash decides: a handful of connections can all land on one worker, so up to
    16 are opened until both hold one); a second ``bentoml serve`` on the port exits 2 with one
    line; a worker killed with SIGKILL is restarted by circus and listens on a socket of its own
    again;
  * with CLF_REUSEPORT=false the workers share one listening socket, as BentoML makes it, and
    the server serves.

``ss -tnpH`` says which process owns each socket (skipped where ``ss`` is missing).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter

import psutil
import pytest

from service import listeners

from .conftest import BENTOML, ROOT, start_server, stop_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)"),
    pytest.mark.skipif(not listeners.supported(), reason="SO_REUSEPORT spreads on Linux only"),
]

BASE_ENV = {"CLF_WORKERS": "2", "CLF_PREDICTION_LOG": "", "CLF_RELOAD_INTERVAL_S": "0",
            "CLF_DRIFT_REFRESH_S": "0"}
MAX_CONNECTIONS = 16  # all on one worker: p = 2**-15 with two workers
REQUESTS_PER_CONNECTION = 3


def _owners(port: int, *state: str) -> Counter:
    """Sockets on local port ``port`` per owning pid (a shared socket counts for each owner)."""
    out = subprocess.run(["ss", "-tnpH", *state, f"( sport = :{port} )"], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    return Counter(int(pid) for line in out.splitlines()
                   for pid in set(re.findall(r"pid=(\d+)", line)))


def _listening(port: int) -> tuple[int, Counter]:
    """Listening sockets on the port: how many, and per owning pid."""
    out = subprocess.run(["ss", "-tlnpH", f"( sport = :{port} )"], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    return len(out.splitlines()), _owners(port, "state", "listening")


def _workers(server) -> set[int]:
    """The live worker processes (a killed one not yet reaped is not one)."""
    found = set()
    for proc in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if "_bentoml_impl.worker" in " ".join(proc.cmdline()):
                found.add(proc.pid)
        except psutil.Error:  # gone, or a zombie
            pass
    return found


def _port(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _keep_alive(port: int, image: bytes) -> http.client.HTTPConnection:
    """A connection that has been answered a few requests and stays open."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(REQUESTS_PER_CONNECTION):
        conn.request("POST", "/v1/classify/image", body=image,
                     headers={"Content-Type": "image/png"})
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 200, answer.status
        assert answer.getheader("connection", "").lower() != "close"
    return conn


def _wait(condition, bound: float, what: str):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"not within {bound:.0f} s: {what}")


def test_each_worker_listens_on_its_own_socket_and_gets_its_share(digits_model, digit_pngs,
                                                                   tmp_path):
    server = start_server({**BASE_ENV, "CLF_IMAGE_MODEL": digits_model.tag},
                          tmp_path / "serve.log")
    port, image = _port(server), digit_pngs[0][0]
    connections: list[http.client.HTTPConnection] = []
    try:
        workers = _workers(server)
        assert len(workers) == 2, workers
        # /readyz answers once one worker is ready; a worker listens from when it is ready
        _wait(lambda: _listening(port)[0] == 2, 60, "both workers listen")
        count, owners = _listening(port)
        assert count == 2 and owners == Counter({pid: 1 for pid in workers}), (count, owners)

        held: Counter = Counter()
        while len(connections) < MAX_CONNECTIONS:
            connections.append(_keep_alive(port, image))
            held = _owners(port, "state", "established")
            if len(connections) >= 4 and set(held) == workers:
                break
        assert set(held) == workers and sum(held.values()) == len(connections), (held, workers)
        for conn in connections:  # the connections stay open and keep being answered
            conn.request("GET", "/readyz")
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 200

        second = subprocess.run(
            [BENTOML, "serve", "service.service:Classifier", "--host", "127.0.0.1", "--port",
             str(port)], cwd=ROOT, env={**os.environ, **BASE_ENV,
                                        "CLF_IMAGE_MODEL": digits_model.tag},
            capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"error: cannot serve on 127.0.0.1:{port}: Address already in use" in second.stderr
        assert "Traceback" not in second.stderr
        assert _listening(port)[1] == Counter({pid: 1 for pid in workers})

        for conn in connections:
            conn.close()
        connections.clear()
        killed = min(workers)
        os.kill(killed, signal.SIGKILL)

        def restarted():
            now = _workers(server)
            count, owners = _listening(port)
            return (len(now) == 2 and killed not in now and count == 2
                    and owners == Counter({pid: 1 for pid in now}))

        _wait(restarted, 90, "circus restarts the killed worker, listening on its own socket")
        _keep_alive(port, image).close()
        assert server.log_text().count("listens on its own socket") == 3, server.log_text()[-3000:]
    finally:
        for conn in connections:
            conn.close()
        stop_server(server)
    assert server.process.returncode == 0, server.log_text()[-3000:]


LOW_SOFT_LIMIT = 256  # open files: what a worker would start with here
HELD = 640  # connections held at once, about 320 a worker: over LOW_SOFT_LIMIT in each


def test_a_worker_started_with_few_open_files_holds_more_connections(digits_model, tmp_path):
    """A soft limit of 256 open files (the hard one above it) let a worker accept about 230
    connections: past them libuv resets every new one, and the worker can open no file. Each
    worker raises its soft limit to the hard one at start (``listeners.raise_open_files_limit``),
    so 640 connections held at once are all answered; and a connection that sends nothing is
    closed after the keep-alive timeout (5 s, BentoML's default), not held for good."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4 * HELD:
        pytest.skip(f"the hard limit on open files is {hard}")
    server = start_server({**BASE_ENV, "CLF_IMAGE_MODEL": digits_model.tag},
                          tmp_path / "serve.log", preexec_fn=lambda: resource.setrlimit(
                              resource.RLIMIT_NOFILE, (LOW_SOFT_LIMIT, hard)))
    port = _port(server)
    held: list[socket.socket] = []
    try:
        _wait(lambda: _listening(port)[0] == 2, 60, "both workers listen")
        assert server.log_text().count(f"soft limit raised from {LOW_SOFT_LIMIT} to") == 2, \
            server.log_text()[-3000:]
        silent = socket.create_connection(("127.0.0.1", port), timeout=15)
        held.append(silent)
        opened = time.monotonic()
        for _ in range(HELD):  # each asks at once: an idle new connection is closed after 5 s
            conn = socket.create_connection(("127.0.0.1", port), timeout=15)
            conn.sendall(b"GET /readyz HTTP/1.1\r\nhost: test\r\n\r\n")
            held.append(conn)
        answered = 0
        for conn in held[1:]:
            try:
                answered += conn.recv(64).startswith(b"HTTP/1.1 200 ")
            except ConnectionResetError:
                pass
        assert answered == HELD, f"{HELD - answered} of {HELD} connections were not answered"
        owners = _owners(port, "state", "established")
        assert len(owners) >= 2 and max(owners.values()) > LOW_SOFT_LIMIT, owners
        assert silent.recv(1) == b"", "a connection that sent nothing was sent something"
        assert 4 <= time.monotonic() - opened < 12
    finally:
        for conn in held:
            conn.close()
        stop_server(server)
    assert server.process.returncode == 0, server.log_text()[-3000:]


def test_with_reuseport_off_the_workers_share_one_socket(digits_model, digit_pngs, tmp_path):
    server = start_server({**BASE_ENV, "CLF_IMAGE_MODEL": digits_model.tag,
                           "CLF_REUSEPORT": "false"}, tmp_path / "serve.log")
    port = _port(server)
    try:
        workers = _workers(server)
        _wait(lambda: server.log_text().count("listens on the server's shared socket") == 2, 60,
              "both workers serve")
        count, owners = _listening(port)
        assert count == 1 and workers <= set(owners), (count, owners, workers)
        for _ in range(4):
            _keep_alive(port, digit_pngs[1][0]).close()
        assert "CLF_REUSEPORT=false" in server.log_text()
    finally:
        stop_server(server)
    assert server.process.returncode == 0, server.log_text()[-3000:]
