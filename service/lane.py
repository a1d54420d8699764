"""The fast lane: a request the door admitted skips the ASGI layers that do nothing for it.

Why. Through BentoML, a classify request crosses about a dozen ASGI layers before ``App``:
uvicorn's proxy-headers middleware, Starlette's error middleware, ``OverloadShortcut``,
BentoML's request metrics, OpenTelemetry (which, with the classify routes excluded from tracing,
the default, only checks the URL), BentoML's timeout (a second task, a future and a timer per
request), its request context (a Starlette ``Request`` that ``App`` never reads), Starlette's
exception middleware, the router, the mount and the documented mount. On the reference CNN on 2
cores, skipping them served 1.20-1.29x the requests a second at one connection and 1.05-1.37x at
64 (README, Benchmark: "The fast lane, paired").

What. For a request the door admitted (``shedding.py``: a ``POST`` to a classify or v2 infer
route of a ready model), uvicorn's response cycle runs the lane instead of BentoML's app:

* ``OverloadShortcut``, which takes the door's admission over and releases it if the route
  never does;
* BentoML's request metrics (``RequestMetrics``): the metric objects of the middleware BentoML
  built, updated as it updates them, so ``bentoml_service_request_total``,
  ``..._duration_seconds``, ``..._in_progress`` and the last request's timestamp, which the alert
  rules and dashboards read, count the request as before, with the same labels; each label
  set's child is looked up once, not by keyword four times a request as there: 24 us a request
  against BentoML's 46 (in-process around a bare answer, Prometheus's multiprocess files, the
  2-core box, median of 7 rounds of 5,000);
* the request timeout (``CLF_REQUEST_TIMEOUT_S``, BentoML's ``traffic.timeout``): a timer on the
  request's own task, and the 504 that BentoML's timeout middleware answers, byte for byte;
* ``App``, which resolves the path itself and answers its own failures (an exception escaping it
  is logged and answered 500 by uvicorn's cycle, as by Starlette's error middleware);
* an answer in one write (``OneWrite``): uvicorn writes a response's head when the app sends it
  and the body when that follows, two ``send`` system calls and, on loopback, two segments the
  client reads apart. The lane holds the head back and hands uvicorn head and body as one body
  of the length it then expects; uvicorn's own body path writes it and completes the cycle
  (keep-alive, the next pipelined request) as for any answer. The bytes on the wire are the
  ones uvicorn would write (its default headers first). Measured in the serving worker at c=1
  on a 2-core box: 106 us from the app's first ``send`` to the last one's return, against 151.
  A head whose headers uvicorn would act on (``connection``, ``transfer-encoding``), a HEAD
  request, a paused transport, or anything but one body after the head: the usual way.

Left out: the proxy-headers middleware (``App`` reads neither the client address nor the
scheme), OpenTelemetry (only where it excludes every classify route: with
``CLF_TRACE_REQUESTS=true`` there is no lane), BentoML's request context, Starlette's error and
exception middlewares and its routing.

Built once per worker, from the stack uvicorn runs, when the first admitted request arrives
(Starlette builds its middleware stack at startup). Where the stack holds anything else (an
access log, CORS, a concurrency limit, another middleware, tracing on a classify route) or has
another shape, there is no lane, the log says why once, and every request goes the usual way.
``CLF_FAST_LANE=false`` turns it off.
"""

from __future__ import annotations

import asyncio
from timeit import default_timer
from typing import Any, Callable

from .app import OverloadShortcut
from .patches import timeout_answer

# URLs that OpenTelemetry must exclude for the lane to skip it: every route the door admits
TRACED_PATHS = ("/v1/classify/image", "/v1/classify/text", "/v2/models/m/infer",
                "/v2/models/m/versions/1/infer")


class NotYet(Exception):
    """The stack is not built yet (before Starlette's first call): try again later."""


def _classes() -> dict[str, type]:
    """The layers the lane knows, by role; ImportError where one is missing."""
    from _bentoml_impl.server.app import ContextMiddleware
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from starlette.applications import Starlette
    from starlette.middleware.errors import ServerErrorMiddleware
    from starlette.middleware.exceptions import ExceptionMiddleware
    from starlette.routing import Router
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    from modelstore._bentoml import request_metrics_middleware_class, timeout_middleware_class

    return {"starlette": Starlette, "router": Router, "metrics": request_metrics_middleware_class(),
            "tracing": OpenTelemetryMiddleware, "timeout": timeout_middleware_class(),
            "skipped": (ProxyHeadersMiddleware, ServerErrorMiddleware, ExceptionMiddleware,
                        ContextMiddleware, OverloadShortcut)}


def build(app: Any, api: Callable) -> "Lane":
    """The lane for ``app`` (what uvicorn runs) in front of ``api`` (``App``). Raises
    ``NotYet`` before the stack is built, ``ValueError`` (the reason) where there is no lane."""
    try:
        known = _classes()
    except ImportError as exc:
        raise ValueError(f"a layer it knows is gone ({exc})") from exc
    metrics = timeout_s = None
    node = app
    for _ in range(64):  # a stack is a dozen layers; a cycle would be a bug
        if isinstance(node, known["router"]):
            return Lane(api, metrics, timeout_s)
        if isinstance(node, known["starlette"]):
            if node.middleware_stack is None:
                raise NotYet()
            node = node.middleware_stack
            continue
        if isinstance(node, known["metrics"]):
            if not getattr(node, "_is_setup", False):
                raise NotYet()  # it registers its metrics on its first call
            metrics = node
        elif isinstance(node, known["tracing"]):
            excluded = getattr(node, "excluded_urls", None)
            traced = [path for path in TRACED_PATHS
                      if excluded is None or not excluded.url_disabled(f"http://host{path}")]
            if traced:
                raise ValueError(f"OpenTelemetry traces {traced[0]} (CLF_TRACE_REQUESTS)")
        elif isinstance(node, known["timeout"]):
            timeout_s = node.timeout
        elif not isinstance(node, known["skipped"]):
            raise ValueError(f"{type(node).__module__}.{type(node).__qualname__} is in the stack")
        node = getattr(node, "app", None)
    raise ValueError("the stack has a shape it does not know")


class Lane:
    """ASGI callable: the admission's release, BentoML's request metrics, the timeout, ``App``
    (the module docstring)."""

    def __init__(self, api: Callable, metrics: Any | None, timeout_s: float | None,
                 one_write: bool = True) -> None:
        inner = api if timeout_s is None else Timeout(api, timeout_s)
        if metrics is not None:
            inner = RequestMetrics(inner, metrics)
        # takes the door's admission over and releases it if the route never does, as in
        # BentoML's stack
        self.app = OverloadShortcut(inner, api)
        self.timeout_s = timeout_s
        self.counts_metrics = metrics is not None
        self.one_write = one_write

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.app(scope, receive, OneWrite(send) if self.one_write else send)


class RequestMetrics:
    """ASGI: what BentoML's request metrics middleware records for an HTTP request, with its
    metric objects and label values (``bentoml._internal.server.http.instruments``:
    the last request's timestamp, requests in progress, and at the last body message the
    request count and duration by status), each label set's child kept after its first use."""

    MAX_CHILDREN = 256  # label sets kept (paths reaching the lane are few: its routes)

    def __init__(self, app: Callable, bentoml_middleware: Any) -> None:
        self.app = app
        self.of = bentoml_middleware  # set up: its metric objects exist
        self.skipped = tuple(bentoml_middleware.skip_paths)  # no timestamp for these, as there
        self._children: dict[tuple, Any] = {}

    def _child(self, key: tuple) -> Any:
        """The child of label set ``key``: ("last",), ("in_progress", path), ("total" or
        "duration", path, status)."""
        child = self._children.get(key)
        if child is None:
            from modelstore._bentoml import service_labels

            of, labels = self.of, service_labels()
            if key[0] == "last":
                child = of.metrics_last_request_timestamp.labels(**labels)
            elif key[0] == "in_progress":
                child = of.metrics_request_in_progress.labels(endpoint=key[1], **labels)
            else:
                metric = of.metrics_request_total if key[0] == "total" else (
                    of.metrics_request_duration)
                child = metric.labels(endpoint=key[1], http_response_code=key[2], **labels)
            if len(self._children) < self.MAX_CHILDREN:
                self._children[key] = child
        return child

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope["path"]
        if not path.startswith(self.skipped):
            self._child(("last",)).set_to_current_time()
        started = default_timer()
        status = 0

        async def counted_send(message: dict) -> None:
            nonlocal status
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
            elif kind == "http.response.body" and not message.get("more_body", False):
                self._child(("total", path, status)).inc()
                self._child(("duration", path, status)).observe(
                    max(default_timer() - started, 0))
            await send(message)

        with self._child(("in_progress", path)).track_inprogress():
            await self.app(scope, receive, counted_send)


class OneWrite:
    """ASGI send for one request: its head and a whole body go to uvicorn's response cycle as one
    write (the module doc). Anything else is passed on as it comes, the head first."""

    __slots__ = ("send", "cycle", "head", "length")

    def __init__(self, send: Any) -> None:
        self.send = send
        cycle = getattr(send, "__self__", None)
        self.cycle = cycle if _CYCLE is not None and type(cycle) is _CYCLE else None
        self.head: dict | None = None
        self.length = -1  # the held head's content-length

    async def __call__(self, message: dict) -> None:
        head = self.head
        if head is None:
            if message["type"] == "http.response.start" and self._can_hold(message):
                self.head = message
                return
            return await self.send(message)
        self.head = None
        if (message["type"] == "http.response.body" and not message.get("more_body", False)
                and len(message.get("body", b"")) == self.length
                and not self.cycle.flow.write_paused):
            return await self._send_whole(head, message.get("body", b""))
        await self.send(head)  # uvicorn's way, its checks and errors included
        await self.send(message)

    def _can_hold(self, message: dict) -> bool:
        """A head uvicorn would write as it is: a content-length and nothing it acts on."""
        cycle = self.cycle
        if (cycle is None or cycle.response_started or cycle.disconnected
                or cycle.scope["method"] == "HEAD" or cycle.chunked_encoding is not None):
            return False
        length = -1
        for name, value in message.get("headers", ()):
            name = name.lower()
            if name in _ACTED_ON:
                return False
            if name == b"content-length":
                if not value.isdigit():
                    return False
                length = int(value)
        self.length = length
        return length >= 0

    async def _send_whole(self, head: dict, body: bytes) -> None:
        cycle = self.cycle
        content = [STATUS_LINE[head["status"]]]
        for name, value in [*cycle.default_headers, *head.get("headers", ())]:
            if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
                raise RuntimeError("Invalid HTTP header name or value.")  # as uvicorn raises
            content.extend((name.lower(), b": ", value, b"\r\n"))
        if not cycle.keep_alive:
            content.append(b"connection: close\r\n")
        content.extend((b"\r\n", body))
        whole = b"".join(content)
        # what uvicorn's cycle records when it writes a head with a content-length itself
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        cycle.chunked_encoding = False
        cycle.expected_content_length = len(whole)
        await self.send({"type": "http.response.body", "body": whole})


# head fields uvicorn's cycle acts on when it writes the head itself
_ACTED_ON = (b"connection", b"transfer-encoding")

try:  # the cycle OneWrite completes, and what uvicorn writes a head with
    from uvicorn.protocols.http.httptools_impl import (HEADER_RE, HEADER_VALUE_RE, STATUS_LINE,
                                                       RequestResponseCycle as _CYCLE)
except ImportError:  # no httptools: uvicorn's h11 cycle, whose answers go the usual way
    _CYCLE = None


class Timeout:
    """BentoML's request timeout without its extra task: a request with no answer started after
    ``timeout_s`` has its task cancelled (so is the work it awaits, as there) and gets the 504
    BentoML answers."""

    def __init__(self, app: Callable, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        started = expired = False

        async def started_send(message: dict) -> None:
            nonlocal started
            started = True
            await send(message)

        def expire() -> None:
            nonlocal expired
            if not started:
                expired = True
                task.cancel()

        timer = asyncio.get_running_loop().call_later(self.timeout_s, expire)
        try:
            await self.app(scope, receive, started_send)
        except asyncio.CancelledError:
            if not expired or task.uncancel() > 0:  # not ours, or cancelled again since
                raise
            await timeout_answer(self.timeout_s)(scope, receive, send)
        finally:
            timer.cancel()
