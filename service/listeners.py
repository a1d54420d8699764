"""One listening socket per worker (SO_REUSEPORT), so every worker gets its share of connections.

``bentoml serve`` (BentoML 1.4, ``_bentoml_impl/server/serving.py``) creates one listening socket
in the serving parent (circus's arbiter) and hands its fd to every worker (``--fd``). A new
connection then goes to whichever worker calls ``accept()`` first, and a keep-alive connection
stays where it landed: with a few long-lived connections (a proxy's or load balancer's pool,
``wrk -c4``) one worker can hold all of them while the other idles, and the server runs at one
worker's throughput. With ``CLF_REUSEPORT`` (the default; Linux) the kernel chooses instead, by a
hash of each connection's addresses, among sockets of the workers' own:

- **The parent** (``install_in_arbiter``) binds the API socket BentoML created (SO_REUSEADDR, as
  circus does) but does not listen on it. A listening socket in the group that no worker accepts
  from would take its share of new connections and never answer them; a bound one takes none. It
  still holds the address: since it has no SO_REUSEPORT, its bind fails where anything listens on
  the port already (another server, this one's own kind included), and it claims the address in the
  network namespace's abstract Unix socket names, so a second ``bentoml serve`` started while this
  one's workers are still loading (when none listens yet) is refused too. Either way the second
  one prints ``error: <reason>`` and exits 2, with no worker started.
- **Each worker** (``install_in_worker``), before uvicorn serves, binds a fresh socket with
  SO_REUSEADDR and SO_REUSEPORT to that address and puts it on the inherited fd number
  (``os.dup2``), so that BentoML and uvicorn use it unchanged. The socket starts to listen when
  uvicorn starts serving, which is after the application's startup (models loaded and warmed up):
  a worker still loading (at start, or restarted by circus after a crash) is not in the group,
  and the kernel hands new connections to the others meanwhile. One INFO line per worker names its
  socket.
- **Stop** is unchanged (``patches.drain_on_stop``): each worker accepts what waits in its own
  backlog before it closes its socket (a close resets what it holds), and from that close on the
  kernel chooses among the sockets still listening; a connection that finds none is refused.
- **A worker that dies** (SIGKILL, OOM) takes its socket with it: connections the kernel had
  completed into that socket's backlog, not yet accepted by the worker, are reset (a shared socket
  kept them for the other workers). Linux 5.14+ hands them to another socket of the group instead
  with ``sysctl net.ipv4.tcp_migrate_req=1`` (a host setting, not ours to change). Circus
  restarts the worker, which binds a socket of its own again.
- **Open files** (``raise_open_files_limit``, called as each worker loads): every connection
  holds a file descriptor, so a worker raises its soft limit on them to the hard one.

With ``CLF_REUSEPORT=false``, or where SO_REUSEPORT is missing (not Linux: one INFO line says
so), the workers share the parent's socket as BentoML made it. If BentoML or uvicorn change what
is patched here, the patch is skipped (logged) and the workers share that socket too.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

CLAIM_PREFIX = "clfserve-listen"  # abstract Unix socket names: per network namespace, no file


def supported() -> bool:
    """Whether the kernel spreads connections over SO_REUSEPORT sockets (Linux does; macOS and
    the BSDs accept the option but give every connection to one socket)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def address_text(host: str, port: int) -> str:
    """``127.0.0.1:3000``, ``[::1]:3000``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def claim_name(host: str, port: int) -> str:
    """The abstract Unix socket name that claims ``host:port`` for one server (leading NUL)."""
    return f"\0{CLAIM_PREFIX}:{address_text(host, port)}"


class AddressTaken(OSError):
    """Another server holds (or is starting on) the address."""


def claim(host: str, port: int) -> socket.socket | None:
    """Claim ``host:port`` for this process until it exits (or the returned socket is closed);
    AddressTaken if another process holds the claim. None where the claim cannot be made at all
    (no abstract Unix sockets): the bind alone then decides."""
    if not sys.platform.startswith("linux") or not port:
        return None
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # not inherited by the workers
    try:
        lock.bind(claim_name(host, port))
    except OSError as exc:
        lock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressTaken(errno.EADDRINUSE, f"{address_text(host, port)} is taken by another "
                               "clfserve server on this host (starting or serving)") from None
        return None
    return lock


def listening(sock: socket.socket) -> bool:
    """Whether ``sock`` listens (where the platform cannot say: assumed so)."""
    option = getattr(socket, "SO_ACCEPTCONN", None)
    if option is None:
        return True
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, option))
    except OSError:
        return True


def reserve(sock: Any) -> None:
    """In the parent: bind BentoML's API socket (a circus ``CircusSocket``) without listening,
    and stop circus from doing its own bind and listen."""
    sock.bind((sock.host, sock.port))
    sock.setblocking(False)
    sock.host, sock.port = sock.getsockname()[:2]  # the port the kernel chose for port 0
    sock.bind_and_listen = _bound_already  # an instance attribute: this socket only


def _bound_already() -> None:
    """``CircusSocket.bind_and_listen`` for the socket ``reserve`` bound."""


def take_own(sock: socket.socket) -> bool:
    """In a worker: where the socket it inherited is bound and not listening (the parent left it
    for the workers, ``reserve``), replace it (same fd number) with a socket of its own bound to
    the same address with SO_REUSEPORT, not listening yet (uvicorn listens when it starts
    serving). False where the socket is shared (it listens already) or not a TCP one; OSError
    where the new socket cannot be bound (the inherited one is then left as it was)."""
    if (not supported() or sock.family not in (socket.AF_INET, socket.AF_INET6)
            or sock.type != socket.SOCK_STREAM or listening(sock)):
        return False
    address = sock.getsockname()
    own = socket.socket(sock.family, socket.SOCK_STREAM)
    try:
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sock.family == socket.AF_INET6:
            own.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                           sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        own.bind(address)
        own.setblocking(False)
        os.dup2(own.fileno(), sock.fileno(), inheritable=False)
    finally:
        own.close()
    return True


def describe(sock: socket.socket) -> str:
    """``127.0.0.1:3000, fd 7`` for a log line."""
    try:
        host, port = sock.getsockname()[:2]
        return f"{address_text(host, port)}, fd {sock.fileno()}"
    except (OSError, ValueError):
        return f"fd {sock.fileno()}"


def shared_why(enabled: bool) -> str:
    """Why a worker shares the server's socket, for its log line."""
    if not enabled:
        return "CLF_REUSEPORT=false"
    if not supported():
        return "no SO_REUSEPORT that spreads connections on this platform"
    return "the server did not leave its socket to the workers; see the log above"


def worker_label() -> str:
    """``worker 2 (pid 1234)`` for a log line."""
    try:
        from modelstore._bentoml import worker_index

        index = worker_index()
    except (ImportError, AttributeError):
        index = None
    return f"worker {index} (pid {os.getpid()})" if index else f"worker (pid {os.getpid()})"


def install_in_arbiter(enabled: bool, refuse: Callable[[str], Any]) -> None:
    """In the serving parent: BentoML's API socket is bound without listening (``enabled`` and
    supported) and its address claimed (always, on Linux) before circus starts the workers.
    ``refuse(reason)`` stops the command when the address is taken (``lifecycle.refuse``).
    Idempotent; skipped and logged if BentoML changed."""
    try:
        from modelstore._bentoml import api_server_socket_name, arbiter_class

        Arbiter = arbiter_class()
        name = api_server_socket_name()
    except (ImportError, AttributeError) as exc:
        logger.warning("BentoML changed (%s): the workers share one listening socket", exc)
        return
    if getattr(Arbiter, "_clf_listeners", False):
        return
    own_sockets = enabled and supported()  # otherwise each worker's log line says why not
    original_start = Arbiter.start

    def start(self: Any, cb: Any = None) -> Any:
        sock = (getattr(self, "sockets", None) or {}).get(name)
        if sock is not None and not getattr(sock, "is_unix", True) \
                and not getattr(sock, "_clf_prepared", False):
            sock._clf_prepared = True
            where = address_text(sock.host, sock.port)
            try:
                if own_sockets:
                    reserve(sock)
                    where = address_text(sock.host, sock.port)
                sock._clf_claim = claim(sock.host, sock.port)
            except OSError as exc:
                refuse(f"cannot serve on {where}: {exc.strerror or exc}")
            if own_sockets:
                logger.info("each worker listens on %s with a socket of its own (SO_REUSEPORT); "
                            "this process holds the address without listening", where)
        return original_start(self, cb)

    Arbiter.start = start
    Arbiter._clf_listeners = True


# Below this many open files a worker warns at start: each connection takes one, and the model
# files, the prediction log and its journal need theirs.
FEW_OPEN_FILES = 4096


def raise_open_files_limit(resource_module: Any = None) -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit (as Go's runtime does),
    and return ``(before, after)``. Every connection holds a file descriptor, and a soft limit
    of 1024 (systemd's and many shells' default, whatever the hard limit) let a worker hold
    about a thousand connections: past it ``accept`` fails (libuv resets the connection) and so
    does every file the worker opens, the prediction log's journal included. Logged when raised,
    warned when still under ``FEW_OPEN_FILES``; where the platform has no such limit, or
    refuses, nothing changes."""
    if resource_module is None:
        try:
            import resource as resource_module
        except ImportError:  # not POSIX
            return (-1, -1)
    res = resource_module
    soft, hard = res.getrlimit(res.RLIMIT_NOFILE)
    target = hard
    if hard == res.RLIM_INFINITY:  # Linux caps the limit at fs.nr_open, macOS at OPEN_MAX
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 10240
    after = soft
    if soft != res.RLIM_INFINITY and soft < target:
        try:
            res.setrlimit(res.RLIMIT_NOFILE, (target, hard))
            after = target
            logger.info("open files: soft limit raised from %d to %d (the hard limit): each "
                        "connection holds one", soft, target)
        except (OSError, ValueError) as exc:
            logger.info("open files: soft limit %d left as it is (raising it to %d: %s)", soft,
                        target, exc)
    if after != res.RLIM_INFINITY and after < FEW_OPEN_FILES:
        logger.warning("open files: a worker may open at most %d files, so it holds fewer "
                       "connections than that; raise the hard limit (ulimit -Hn, systemd's "
                       "LimitNOFILE=, docker run --ulimit nofile=...)", after)
    return (soft, after)


def install_in_worker(enabled: bool) -> None:
    """In a worker: its own listening socket (``take_own``) before uvicorn serves, and one INFO
    line naming the socket it listens on. Idempotent; skipped and logged if uvicorn changed."""
    try:
        from uvicorn.server import Server
    except ImportError:
        logger.warning("uvicorn not found; the workers share one listening socket")
        return
    if getattr(Server, "_clf_listeners", False):
        return
    if not hasattr(Server, "startup"):
        logger.warning("uvicorn's Server changed shape; the workers share one listening socket")
        return
    original_startup = Server.startup

    async def startup(self: Any, sockets: list | None = None) -> None:
        owned = set()
        for sock in sockets or ():
            try:
                if enabled and take_own(sock):
                    owned.add(sock.fileno())
            except OSError as exc:
                logger.warning("could not bind a listening socket of this worker's own (%s); "
                               "using the server's: %s", describe(sock), exc)
        await original_startup(self, sockets)
        if getattr(self, "should_exit", False):
            return
        for sock in sockets or ():
            if sock.fileno() in owned:
                logger.info("%s listens on its own socket (%s, SO_REUSEPORT, backlog %d)",
                            worker_label(), describe(sock), self.config.backlog)
            else:
                logger.info("%s listens on the server's shared socket (%s; %s)", worker_label(),
                            describe(sock), shared_why(enabled))

    Server.startup = startup
    Server._clf_listeners = True
