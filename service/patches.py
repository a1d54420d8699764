"""Targeted fixes to BentoML 1.4 (and the uvicorn and circus it runs on), applied when the
service loads.

1. Each server gets its own Prometheus multiprocess directory (``isolate_metrics_dir``).
BentoML keeps every server's multiprocess files in ``$BENTOML_HOME/prometheus_multiproc_dir``
and empties that directory when a server starts. A second server on the same BENTOML_HOME (a
second replica on the host, a benchmark, the demo) therefore deletes the first one's metric
files (its counters restart from zero) and writes its own into the directory the first one's
``/metrics`` sums: each server reports the other's traffic. Found when the demo's ``/metrics``
showed a benchmark server's model.

2. The request-timeout middleware.

``TimeoutMiddleware`` (bentoml/_internal/server/http/traffic.py) arms ``loop.call_later(timeout,
...)`` for every request and never cancels it. With the default 60 s timeout, each request keeps
a timer, a future and its context alive for a minute: under sustained load that is a large and
growing pile of live objects, and every full garbage collection walks them (long pauses that
grow with uptime and show up in the p99; see docs/benchmark-history.md, "Earlier runs", and
service/README.md). The fixed ``__call__`` below behaves the same (504 after ``timeout``
seconds without a response start) but cancels the timer as soon as the response has started.
If BentoML changes the class, the patch is skipped and logged.

3. The OpenAPI document (``fix_openapi_document``). BentoML declares ``/docs.json`` as OpenAPI
3.0.2 but writes one of its own schemas (``TaskStatusResponse``) in 3.1 style (``{"type":
"null"}`` in an ``anyOf``), so the document fails validation and strict clients refuse it. The
fix rewrites such unions as 3.0's ``nullable`` when the document is served, and puts this
service's ``info`` (``openapi.info``) in place of BentoML's.

4. and 5. A graceful stop (``drain_on_stop`` in each worker, ``stop_arbiter_gracefully`` in the
serving parent): uvicorn's shutdown resets requests that are on their way when SIGTERM comes, and
the arbiter keeps the listening socket open (and SIGKILLs a stuck worker only after a day); see
those functions and ``lifecycle.py``.

6. A middleware in front (``run_first``). BentoML puts a service's own ASGI middlewares behind
its request metrics, tracing and timeout middlewares (the last one runs every request in a task
of its own). The overload shortcut (``app.OverloadShortcut``) exists to answer a refusal before
that work, so it is moved to the front, right after Starlette's error handler. If BentoML
changes the factory, it stays where BentoML put it (still correct, only dearer) and that is logged.
In a worker, most refusals happen earlier still, in uvicorn's HTTP protocol (``shedding.py``),
which relies on this: what it admits, the shortcut releases.
"""

from __future__ import annotations

import array
import asyncio
import atexit
import fcntl
import logging
import os
import shutil
import socket
import tempfile
import termios
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)


def isolate_metrics_dir() -> None:
    """Point this server's Prometheus multiprocess files at a fresh directory of its own.

    Runs in the process that starts the server (``bentoml serve`` imports the service before
    it prepares the directory); the workers inherit ``PROMETHEUS_MULTIPROC_DIR`` from it and
    skip this. The directory is removed when that process exits.
    """
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return  # a worker (or a caller that chose one): the directory is already decided
    try:
        from modelstore._bentoml import prometheus_multiproc_dir_provider

        provider = prometheus_multiproc_dir_provider()
    except (ImportError, AttributeError):
        logger.warning("BentoML changed: metrics directory not isolated (see service/patches.py)")
        return
    path = tempfile.mkdtemp(prefix="clfserve-metrics-")
    provider.set(path)
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def timeout_answer(timeout_s: float) -> Any:
    """The 504 BentoML's timeout middleware answers (an ASGI app); the fast lane's timeout
    (lane.py) answers the same."""
    from starlette.responses import JSONResponse

    body = {"error": f"Not able to process the request in {timeout_s} seconds"}
    return JSONResponse(body, status_code=504)


async def _timeout_call(self: Any, scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message: dict) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send))
    try:
        await waiter
    except asyncio.TimeoutError:
        if fut.cancel():
            await timeout_answer(self.timeout)(scope, receive, send)
        return
    except asyncio.CancelledError:  # the request's task is cancelled (a stop's bound): so is
        fut.cancel()  # the work it started, which would otherwise run on for nobody
        raise
    finally:
        timer.cancel()
    await fut


def run_first(middleware_cls: type) -> bool:
    """Make the service middlewares of this class the first BentoML's app runs (fix 6); False
    (logged) where BentoML changed and they stay where it puts them."""
    try:
        from _bentoml_impl.server.app import ServiceAppFactory

        original = ServiceAppFactory.middlewares
        if getattr(original.fget, "_clf_first", None) is middleware_cls:
            return True
        if not isinstance(original, property):
            raise AttributeError("ServiceAppFactory.middlewares is not a property")
    except (ImportError, AttributeError) as exc:
        logger.warning("BentoML changed (%s): %s runs where BentoML puts it", exc,
                       middleware_cls.__name__)
        return False

    def middlewares(self: Any) -> list:
        found = original.fget(self)
        first = [m for m in found if m.cls is middleware_cls]
        return first + [m for m in found if m.cls is not middleware_cls]

    middlewares._clf_first = middleware_cls  # type: ignore[attr-defined]
    ServiceAppFactory.middlewares = property(middlewares)
    return True


def apply() -> None:
    """Install the fix once; idempotent."""
    try:
        from modelstore._bentoml import timeout_middleware_class

        TimeoutMiddleware = timeout_middleware_class()
    except ImportError:
        logger.warning("BentoML TimeoutMiddleware not found; timer-leak fix not applied")
        return
    if getattr(TimeoutMiddleware, "_clf_patched", False):
        return
    if not hasattr(TimeoutMiddleware, "_set_timer_out"):
        logger.warning("BentoML TimeoutMiddleware changed shape; timer-leak fix not applied")
        return
    TimeoutMiddleware.__call__ = _timeout_call
    TimeoutMiddleware._clf_patched = True


def _nullable_3_0(node: Any) -> Any:
    """``{"anyOf": [S, {"type": "null"}], ...}`` -> ``{...S, "nullable": true, ...}``, deeply."""
    if isinstance(node, list):
        return [_nullable_3_0(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_3_0(v) for k, v in node.items()}
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            del node[key]
            node = {**(rest[0] if len(rest) == 1 else {key: rest}), **node, "nullable": True}
    return node


class _FixedSpec:
    """BentoML's spec object with ``asdict()`` made valid OpenAPI 3.0 (see the docstring), and
    its ``info`` replaced by ``info`` where given."""

    def __init__(self, spec: Any, info: dict | None = None) -> None:
        self._spec, self._info = spec, info

    def asdict(self) -> dict:
        doc = _nullable_3_0(self._spec.asdict())
        if self._info is not None:
            doc["info"] = dict(self._info)
        return doc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spec, name)


def fix_openapi_document(info: dict | None = None) -> None:
    """Install the document fix once; idempotent; skipped and logged if BentoML moved it.
    ``info``: the document's ``info`` object, in place of BentoML's (``version`` "None" when
    served from source, a description of BentoML badges and a contact at BentoML: what an
    API gateway or a client generator would show the service's users)."""
    try:
        from modelstore._bentoml import openapi_generator_module

        module = openapi_generator_module()
        original = module.generate_spec
    except (ImportError, AttributeError):
        logger.warning("BentoML's OpenAPI generator not found; /docs.json fix not applied")
        return
    if getattr(original, "_clf_patched", False):
        original._clf_info = info  # type: ignore[attr-defined]
        return

    def generate_spec(*args: Any, **kwargs: Any) -> _FixedSpec:
        return _FixedSpec(original(*args, **kwargs), generate_spec._clf_info)

    generate_spec._clf_info = info  # type: ignore[attr-defined]

    generate_spec._clf_patched = True  # type: ignore[attr-defined]
    module.generate_spec = generate_spec


# ---- 4 and 5: a graceful stop (see lifecycle.py for what it promises) -------------------------

CLOSE_HEADER = (b"connection", b"close")
EXIT_RESERVE_S = 1.5  # of the drain bound, for the parent's own exit once its workers are gone
CLEANUP_RESERVE_S = 2.0  # for a worker's application shutdown: batchers, the prediction log
IDLE_GRACE_S = 1.0  # an idle keep-alive connection may still bring one request this long
LATE_CONNECTION_GRACE_S = 0.25  # a connection opened just before the socket closed, likewise
POLL_S = 0.02


def kill_after(drain_timeout_s: float) -> float:
    """When the parent SIGKILLs a worker still running after SIGTERM."""
    return max(drain_timeout_s * 0.75, drain_timeout_s - EXIT_RESERVE_S)


def request_budget(drain_timeout_s: float) -> float:
    """How long a worker answers what is on its way after SIGTERM (then it cuts it off)."""
    return max(drain_timeout_s * 0.5, kill_after(drain_timeout_s) - CLEANUP_RESERVE_S)


def _unread_bytes(transport: Any) -> int:
    """Bytes the kernel holds for this connection that the server has not read yet."""
    try:
        fd = transport.get_extra_info("socket").fileno()
        buf = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, buf, True)
        return buf[0]
    except (AttributeError, OSError, ValueError):
        return 0


def _in_request(conn: Any) -> bool:
    """Whether a request is under way on a uvicorn connection, or has begun to arrive: uvicorn
    arms a connection's keep-alive timer when an answer is complete and disarms it when bytes
    come in; bytes the event loop has not read yet are in the kernel's buffer."""
    cycle = getattr(conn, "cycle", None)
    if cycle is not None and not cycle.response_complete:
        return True
    if getattr(conn, "pipeline", None) or getattr(conn, "owed", None) is not None:
        return True  # (owed: a refusal at the door waiting for its pace, shedding.py)
    if cycle is not None and getattr(conn, "timeout_keep_alive_task", None) is None:
        return True
    return _unread_bytes(conn.transport) > 0


def _settle(connections: list, close_idle: bool) -> None:
    """Answers under way will close their connection; idle connections close if ``close_idle``."""
    for conn in connections:
        transport = getattr(conn, "transport", None)
        if transport is None or transport.is_closing():
            continue
        cycle = getattr(conn, "cycle", None)
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
        elif close_idle and not _in_request(conn):
            transport.close()


def _hold_listeners(servers: list) -> list[socket.socket]:
    """A copy of each listening socket, so that closing the servers' own leaves it listening."""
    held = []
    for server in servers:
        for sock in list(server.sockets or ()):
            try:
                held.append(socket.socket(fileno=os.dup(sock.fileno())))
            except OSError:
                pass
    return held


async def _accept_backlog(server: Any, held: list[socket.socket]) -> None:
    """Accept what waits in the backlog (it gets 503 like any new connection), then close.

    Closing a listening socket resets every connection still waiting in its backlog; with the
    event loop busy, a backlog is never empty for long under load. Taking those connections
    first leaves only the microseconds between the last accept and the close."""
    loop = asyncio.get_running_loop()
    config = server.config

    def protocol() -> Any:  # what uvicorn's own create_protocol builds
        return config.http_protocol_class(config=config, server_state=server.server_state,
                                          app_state=server.lifespan.state)

    for listener in held:
        try:
            listener.setblocking(False)
            for _ in range(10_000):
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                conn.setblocking(False)
                await loop.connect_accepted_socket(protocol, conn, ssl=config.ssl)
        except OSError:
            pass
        finally:
            listener.close()


def _begin_drain(server: Any) -> None:
    """SIGTERM reached this worker: ``DRAIN`` begins (readiness off, new connections answered 503)
    and every answer from now on closes its connection. Runs in the signal handler: no logging,
    no waiting, nothing that can raise into the code it interrupted."""
    try:
        from .lifecycle import DRAIN

        state = server.server_state
        DRAIN.begin([getattr(c, "client", None) for c in list(state.connections)])
        config = server.config
        if hasattr(config, "encoded_headers") and CLOSE_HEADER not in config.encoded_headers:
            config.encoded_headers = [*config.encoded_headers, CLOSE_HEADER]
        if CLOSE_HEADER not in state.default_headers:
            state.default_headers.append(CLOSE_HEADER)  # in place: answers not yet begun see it
    except Exception:  # noqa: BLE001 - never raise out of a signal handler
        pass


def _drain_shutdown(drain_timeout_s: float, original: Any) -> Any:
    budget = request_budget(drain_timeout_s)
    idle_grace = min(IDLE_GRACE_S, budget / 4)

    async def shutdown(self: Any, sockets: list | None = None) -> None:
        from .lifecycle import DRAIN

        try:
            _begin_drain(self)
            state = self.server_state
            started = DRAIN.started_at or time.monotonic()
            deadline = started + budget
            old = [c for c in list(state.connections) if DRAIN.is_old(getattr(c, "client", None))]
            logger.info("stopping: answering what %d open connection(s) bring (up to %.1f s); new "
                        "connections get 503 shutting_down", len(old), budget)
            # 1. The connections open at SIGTERM: each finishes the request under way or brings
            # one more (its answer closes it); one still idle after the grace is closed. The
            # socket keeps accepting meanwhile, and what comes in on a new connection gets 503.
            while not self.force_exit and time.monotonic() < deadline:
                old = [c for c in list(state.connections)
                       if DRAIN.is_old(getattr(c, "client", None))]
                if not old:
                    break
                _settle(old, close_idle=time.monotonic() >= started + idle_grace)
                await asyncio.sleep(POLL_S)
            # 2. Stop listening. The parent closed its copy of the socket when it began to stop,
            # so once every worker has closed its own a new connection is refused.
            backlog = _hold_listeners(self.servers)
            for server in self.servers:
                server.close()
            for sock in sockets or []:
                sock.close()
            await _accept_backlog(self, backlog)
            closed_at = time.monotonic()
            # 3. What is left (answers under way, connections opened just before the close).
            while not self.force_exit and time.monotonic() < deadline:
                if not state.connections and not state.tasks:
                    break
                _settle(list(state.connections),
                        close_idle=time.monotonic() >= closed_at + LATE_CONNECTION_GRACE_S)
                await asyncio.sleep(POLL_S)
            left = [t for t in list(state.tasks) if not t.done()]
            if left or state.connections:
                why = ("a second interrupt" if self.force_exit else
                       f"the drain bound (CLF_DRAIN_TIMEOUT_S={drain_timeout_s:g}) is reached")
                logger.error("stopping: %s; %d request(s) cut off", why, len(left))
                for conn in list(state.connections):
                    conn.transport.close()
                for task in left:
                    task.cancel()
            for server in self.servers:
                try:
                    await asyncio.wait_for(server.wait_closed(), timeout=1.0)
                except (asyncio.TimeoutError, RuntimeError):
                    pass
        except Exception:  # uvicorn changed under us: its own shutdown is better than none
            logger.exception("graceful drain failed; falling back to uvicorn's shutdown")
            return await original(self, sockets)
        # 4. The application's own shutdown: reloaders, batchers, the prediction log.
        if not self.force_exit:
            await self.lifespan.shutdown()
        logger.info("stopped after %.2f s", time.monotonic() - started)

    return shutdown


def drain_on_stop(drain_timeout_s: float) -> None:
    """4. In a worker: a graceful stop (``lifecycle.py`` says what it promises).

    uvicorn's own shutdown (uvicorn/server.py ``Server.shutdown``) closes the listening socket and
    at once every connection whose last answer is complete, then waits for the answers under way.
    Under load that drops requests: a keep-alive client's next request is often already in the
    kernel's buffer or half-parsed when its connection is closed, and closing a socket with unread
    data sends a reset (the 18 resets of 16 clients at SIGTERM). And it closes only this
    worker's copy of the listening socket: circus's arbiter keeps its own open, so new
    connections still complete their handshake, wait in the backlog that nobody accepts any more,
    and are reset when the arbiter exits. The replacement: readiness off and ``Connection:
    close`` on every answer from the signal on (``_begin_drain``); requests on connections open at
    the signal are answered, idle ones are closed only when nothing has arrived on them; new
    connections are answered 503 until those are done; then the socket closes (once what waits
    in its backlog is accepted: a close resets it), the rest drains, and the application shuts
    down (its batchers and the prediction log finish); all within
    ``drain_timeout_s``. Idempotent; skipped and logged if uvicorn changed.
    """
    try:
        from uvicorn.server import Server
    except ImportError:
        logger.warning("uvicorn not found; graceful drain not installed")
        return
    if getattr(Server, "_clf_patched", False):
        return
    if not (hasattr(Server, "handle_exit") and hasattr(Server, "shutdown")):
        logger.warning("uvicorn's Server changed shape; graceful drain not installed")
        return
    original_exit, original_shutdown = Server.handle_exit, Server.shutdown

    def handle_exit(self: Any, sig: int, frame: Any) -> None:
        original_exit(self, sig, frame)
        _begin_drain(self)

    Server.handle_exit = handle_exit
    Server.shutdown = _drain_shutdown(drain_timeout_s, original_shutdown)
    Server._clf_patched = True


def stop_arbiter_gracefully(drain_timeout_s: float, after: Callable[[], None]) -> None:
    """5. In the serving parent (circus's arbiter, through BentoML's subclass).

    When it begins to stop, the arbiter closes its own copy of the listening socket (see 4.),
    and retries a stop that circus refuses because another arbiter command is running (circus
    answers a SIGTERM that arrives during its periodic worker check with ConflictError and
    drops it). A worker still running ``kill_after(drain_timeout_s)`` after SIGTERM is killed
    (BentoML sets circus's graceful timeout to 86,400 s), which leaves the parent the rest of the
    bound to exit. ``after`` runs when the arbiter's loop has ended (it exits 2
    where a worker could not start). Idempotent; skipped and logged if BentoML changed.
    """
    try:
        from circus.exc import ConflictError

        from modelstore._bentoml import arbiter_class

        Arbiter = arbiter_class()
    except ImportError:
        logger.warning("BentoML's arbiter not found; graceful stop not installed")
        return
    if getattr(Arbiter, "_clf_patched", False):
        return
    original_start, original_stop = Arbiter.start, Arbiter.stop

    def start(self: Any, cb: Any = None) -> None:
        for watcher in getattr(self, "watchers", ()):
            watcher.graceful_timeout = min(float(watcher.graceful_timeout),
                                           kill_after(drain_timeout_s))
        try:
            original_start(self, cb)
        finally:
            after()

    def stop(self: Any) -> Any:
        if getattr(self, "_stopping", False):
            return None
        for sock in list((getattr(self, "sockets", None) or {}).values()):
            try:
                sock.close()
            except OSError:
                pass
        try:
            return original_stop(self)
        except ConflictError:
            self.loop.call_later(0.1, stop, self)
            return None

    Arbiter.start, Arbiter.stop = start, stop
    Arbiter._clf_patched = True
