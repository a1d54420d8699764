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
