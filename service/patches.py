"""A targeted fix to BentoML 1.4's request-timeout middleware, applied when the service loads.

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
import logging
from typing import Any

logger = logging.getLogger(__name__)


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
        from bentoml._internal.server.http.traffic import TimeoutMiddleware
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
