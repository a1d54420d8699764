"""Two targeted fixes to BentoML 1.4, applied when the service loads.

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
a timer, a future and its context alive for a minute: at ~1,000 requests/s that is tens of
thousands of live objects, and every full garbage collection walks them (pauses of 50-100 ms
that grow with uptime: the benchmark's p99). The fixed ``__call__`` below behaves the same
(504 after ``timeout`` seconds without a response start) but cancels the timer as soon as the
response has started. If BentoML changes the class, the patch is skipped and logged.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import tempfile
from typing import Any

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


async def _timeout_call(self: Any, scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    from starlette.responses import JSONResponse

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
            body = {"error": f"Not able to process the request in {self.timeout} seconds"}
            await JSONResponse(body, status_code=504)(scope, receive, send)
        return
    finally:
        timer.cancel()
    await fut


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
