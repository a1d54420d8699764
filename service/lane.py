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
* BentoML's request metrics: the very middleware instance BentoML built (a shallow copy that
  calls ``App``), so ``bentoml_service_request_total`` and ``..._duration_seconds``, which the
  alert rules read, count the request as before, with the same labels;
* the request timeout (``CLF_REQUEST_TIMEOUT_S``, BentoML's ``traffic.timeout``): a timer on the
  request's own task, and the 504 that BentoML's timeout middleware answers, byte for byte;
* ``App``, which resolves the path itself and answers its own failures (an exception escaping it
  is logged and answered 500 by uvicorn's cycle, as by Starlette's error middleware).

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
import copy
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

    def __init__(self, api: Callable, metrics: Any | None, timeout_s: float | None) -> None:
        inner = api if timeout_s is None else Timeout(api, timeout_s)
        if metrics is not None:
            metrics = copy.copy(metrics)  # the same metric objects, in front of the lane's own
            metrics.app = inner
            inner = metrics
        # takes the door's admission over and releases it if the route never does, as in
        # BentoML's stack
        self.app = OverloadShortcut(inner, api)
        self.timeout_s = timeout_s
        self.counts_metrics = metrics is not None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


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
