"""The worker's graceful drain (service/patches.py ``drain_on_stop``) on a real uvicorn server in
a thread, driven with raw HTTP/1.1 sockets so every step is deterministic.

uvicorn's own shutdown closes every idle keep-alive connection the moment it begins: a client
whose next request is on its way (or already in the kernel's buffer) gets a reset, the root cause
of the resets under load at SIGTERM. With the drain, that request is answered (``Connection:
close``), a request under way finishes, a new connection gets 503, and the server is gone within
the bound even when a request never finishes.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time

import pytest

from service import patches
from service.lifecycle import DRAIN

uvicorn = pytest.importorskip("uvicorn")
from uvicorn.server import Server  # noqa: E402


async def app(scope, receive, send):
    assert scope["type"] == "http"
    app.loop = asyncio.get_running_loop()
    more = True
    while more:  # read the whole body first
        more = (await receive()).get("more_body", False)
    status = 200
    if DRAIN.refuses(scope):
        status = 503
    elif scope["path"] == "/slow":
        await asyncio.sleep(0.5)
    elif scope["path"] == "/hang":
        await asyncio.sleep(60)
    body = scope["path"].encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def serve():
    """Start a drained uvicorn server: ``serve(drain_timeout_s) -> (port, server, thread)``."""
    saved = {name: Server.__dict__[name] for name in ("handle_exit", "shutdown")}
    started: list[tuple[Server, threading.Thread, socket.socket]] = []

    def start(drain_timeout_s: float):
        DRAIN.reset()
        patches.drain_on_stop(drain_timeout_s)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        server = Server(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started
        started.append((server, thread, sock))
        return sock.getsockname()[1], server, thread

    yield start
    for server, thread, _ in started:
        server.should_exit = server.force_exit = True
        thread.join(timeout=10)
    for name, value in saved.items():
        setattr(Server, name, value)
    if "_clf_patched" in Server.__dict__:
        delattr(Server, "_clf_patched")
    DRAIN.reset()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def send(sock: socket.socket, method: str, path: str) -> None:
    sock.sendall(f"{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n".encode())


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer ({data!r})")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return False  # a reset is not a clean close


def begin_drain(server: Server) -> float:
    app.loop.call_soon_threadsafe(server.handle_exit, signal.SIGTERM, None)
    deadline = time.monotonic() + 5
    while not DRAIN.active and time.monotonic() < deadline:
        time.sleep(0.001)
    assert DRAIN.active
    return time.monotonic()


def test_the_drain_answers_what_is_on_its_way_and_refuses_new_connections(serve) -> None:
    port, server, thread = serve(10.0)
    idle, busy = connect(port), connect(port)
    for sock in (idle, busy):  # both keep-alive connections, open before the signal
        send(sock, "GET", "/fast")
        assert answer(sock)[0] == 200
    send(busy, "POST", "/slow")
    time.sleep(0.1)
    begun = begin_drain(server)
    time.sleep(0.3)  # uvicorn's own shutdown would have closed `idle` by now
    send(idle, "GET", "/fast")  # the keep-alive client's next request, after the signal
    status, headers, _ = answer(idle)
    assert status == 200 and headers.get("connection") == "close"
    assert closed_by_server(idle)
    late = connect(port)  # a new connection while draining
    send(late, "GET", "/fast")
    status, headers, _ = answer(late)
    assert status == 503 and headers.get("connection") == "close"
    status, headers, body = answer(busy)  # the request under way at the signal
    assert (status, body) == (200, b"/slow") and headers.get("connection") == "close"
    assert closed_by_server(busy)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert time.monotonic() - begun < 3.0
    with pytest.raises(OSError):  # nothing listens any more: refused
        connect(port)


def test_an_idle_connection_is_closed_after_the_grace_without_a_reset(serve) -> None:
    port, server, thread = serve(10.0)
    idle = connect(port)
    send(idle, "GET", "/fast")
    assert answer(idle)[0] == 200
    begun = begin_drain(server)
    assert closed_by_server(idle)  # a clean FIN once the grace is over, not a reset
    assert patches.IDLE_GRACE_S * 0.5 <= time.monotonic() - begun < patches.IDLE_GRACE_S + 2
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_request_that_never_finishes_is_cut_off_at_the_bound(serve) -> None:
    port, server, thread = serve(1.0)  # the bound: requests get half of it, the rest cleanup
    hung = connect(port)
    send(hung, "GET", "/hang")
    time.sleep(0.1)
    begun = begin_drain(server)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert time.monotonic() - begun < 1.5
    with pytest.raises((ConnectionError, OSError)):
        answer(hung)
