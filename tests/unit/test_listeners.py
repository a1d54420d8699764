"""service/listeners.py: one listening socket per worker (SO_REUSEPORT), on real loopback sockets.

The parent's socket is bound without listening and claims its address; a worker's socket takes
the inherited fd number, bound with SO_REUSEPORT beside the parent's; the kernel spreads new
connections over the workers' sockets; a second server's bind or claim fails.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest
from circus.sockets import CircusSocket

from service import listeners

linux_only = pytest.mark.skipif(not listeners.supported(), reason="SO_REUSEPORT spreads on Linux")


def _circus_socket(port: int = 0) -> CircusSocket:
    """The socket ``bentoml serve`` creates for its workers (SO_REUSEADDR, not bound yet)."""
    return CircusSocket(name="_bento_api_server", host="127.0.0.1", port=port, backlog=64)


def _inherited(parent: socket.socket) -> socket.socket:
    """What a worker gets: the parent's socket on an fd of its own (as ``--fd``)."""
    return socket.socket(fileno=os.dup(parent.fileno()))


def test_addresses_and_claim_names():
    assert listeners.address_text("127.0.0.1", 3000) == "127.0.0.1:3000"
    assert listeners.address_text("::1", 3000) == "[::1]:3000"
    assert listeners.claim_name("0.0.0.0", 80) == "\0clfserve-listen:0.0.0.0:80"


def test_why_a_worker_shares_the_socket():
    assert listeners.shared_why(False) == "CLF_REUSEPORT=false"
    assert "did not leave" in listeners.shared_why(True) or not listeners.supported()


@linux_only
def test_a_claim_is_one_servers_until_released():
    port = 40000 + os.getpid() % 20000
    first = listeners.claim("127.0.0.1", port)
    assert first is not None
    try:
        with pytest.raises(listeners.AddressTaken) as taken:
            listeners.claim("127.0.0.1", port)
        assert taken.value.errno == errno.EADDRINUSE
        assert "another clfserve server" in str(taken.value)
        other = listeners.claim("127.0.0.2", port)  # another address is another claim
        assert other is not None
        other.close()
    finally:
        first.close()
    again = listeners.claim("127.0.0.1", port)
    assert again is not None
    again.close()
    assert listeners.claim("127.0.0.1", 0) is None  # port 0: the kernel picks a free one


@linux_only
def test_the_parents_socket_is_bound_and_does_not_listen():
    sock = _circus_socket()
    try:
        listeners.reserve(sock)
        assert sock.port != 0 and sock.getsockname() == ("127.0.0.1", sock.port)
        assert not listeners.listening(sock)
        sock.bind_and_listen()  # circus's own call is now a no-op
        assert not listeners.listening(sock)
        with socket.socket() as client:  # nothing listens: refused, not queued
            assert client.connect_ex(("127.0.0.1", sock.port)) == errno.ECONNREFUSED
    finally:
        sock.close()


@linux_only
def test_workers_get_sockets_of_their_own_and_the_kernel_spreads_connections():
    parent = _circus_socket()
    listeners.reserve(parent)
    workers = [_inherited(parent) for _ in range(2)]
    fds = [w.fileno() for w in workers]
    try:
        assert all(listeners.take_own(w) for w in workers)
        assert [w.fileno() for w in workers] == fds  # same fd numbers: BentoML's --fd unchanged
        for w in workers:
            assert w.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
            assert w.getsockname() == ("127.0.0.1", parent.port)
            assert not listeners.listening(w)  # uvicorn listens when it starts serving
            assert not os.get_inheritable(w.fileno())
            w.listen(64)
        assert not listeners.listening(parent)
        clients = []
        for _ in range(32):
            c = socket.create_connection(("127.0.0.1", parent.port), timeout=5)
            clients.append(c)
        accepted = []
        for w in workers:
            w.setblocking(False)
            n = 0
            while True:
                try:
                    conn, _ = w.accept()
                except BlockingIOError:
                    break
                conn.close()
                n += 1
            accepted.append(n)
        for c in clients:
            c.close()
        assert sum(accepted) == 32 and min(accepted) > 0, accepted  # all on one: p = 2**-31
        assert not listeners.take_own(workers[0])  # listening already: left as it is
    finally:
        for w in workers:
            w.close()
        parent.close()


@linux_only
def test_a_second_server_cannot_bind_where_a_worker_listens():
    parent = _circus_socket()
    listeners.reserve(parent)
    worker = _inherited(parent)
    second = _circus_socket(parent.port)
    try:
        assert listeners.take_own(worker)
        worker.listen(16)
        with pytest.raises(OSError) as busy:
            listeners.reserve(second)
        assert busy.value.errno == errno.EADDRINUSE
    finally:
        for s in (second, worker, parent):
            s.close()


def test_a_shared_socket_is_left_as_it_is():
    parent = _circus_socket()
    parent.bind_and_listen()  # CLF_REUSEPORT=false: circus's listening socket, shared
    worker = _inherited(parent)
    try:
        assert listeners.listening(parent)
        assert not listeners.take_own(worker)
        assert listeners.listening(worker)
    finally:
        worker.close()
        parent.close()


class FakeResource:
    """``resource``'s RLIMIT_NOFILE calls over given limits; ``refuse``: setrlimit raises."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limits, self.refuse, self.set_to = (soft, hard), refuse, None

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed to raise maximum limit")
        self.set_to = self.limits = limits


def test_the_open_files_soft_limit_is_raised_to_the_hard_limit(caplog):
    caplog.set_level("INFO", logger=listeners.logger.name)
    fake = FakeResource(1024, 524288)
    assert listeners.raise_open_files_limit(fake) == (1024, 524288)
    assert fake.set_to == (524288, 524288)
    assert "raised from 1024 to 524288" in caplog.text and "WARNING" not in caplog.text


def test_an_open_files_limit_already_at_its_hard_limit_is_left_alone(caplog):
    fake = FakeResource(65536, 65536)
    assert listeners.raise_open_files_limit(fake) == (65536, 65536)
    assert fake.set_to is None and not caplog.records


def test_an_unlimited_hard_limit_raises_the_soft_one_to_what_the_kernel_allows(monkeypatch):
    fake = FakeResource(1024, FakeResource.RLIM_INFINITY)
    monkeypatch.setattr(listeners, "Path", lambda path: type("P", (), {
        "read_text": staticmethod(lambda: "1048576\n")})())
    assert listeners.raise_open_files_limit(fake) == (1024, 1048576)
    assert fake.set_to == (1048576, FakeResource.RLIM_INFINITY)


@pytest.mark.parametrize("refuse", [False, True], ids=["low-hard-limit", "refused"])
def test_few_open_files_are_warned_about(caplog, refuse):
    caplog.set_level("INFO", logger=listeners.logger.name)
    fake = FakeResource(256, 2048 if not refuse else 4096, refuse=refuse)
    soft, after = listeners.raise_open_files_limit(fake)
    assert (soft, after) == ((256, 2048) if not refuse else (256, 256))
    warning = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and f"at most {after} files" in warning[0].getMessage()
    assert "ulimit -Hn" in warning[0].getMessage()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX rlimits")
def test_the_raise_is_real_in_a_process_started_with_a_low_soft_limit():
    import resource
    import subprocess
    import sys

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit is {hard}")
    code = ("import resource; from service import listeners; listeners.raise_open_files_limit(); "
            "print(*resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
        cwd=listeners.Path(listeners.__file__).resolve().parents[1]).stdout.split()
    assert int(out[0]) > 256 and int(out[1]) == hard
