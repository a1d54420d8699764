"""The fast lane (service/lane.py): which stacks get one, and what it keeps of the layers it skips
(the admission's release, the request timeout's 504). The lane on a real ``bentoml serve``, with
BentoML's request metrics counting what it serves: tests/e2e/test_observability.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from service import lane
from service.app import ADMISSION, OverloadShortcut

pytest.importorskip("opentelemetry.instrumentation.asgi")
from _bentoml_impl.server.app import ContextMiddleware  # noqa: E402
from modelstore._bentoml import timeout_middleware_class  # noqa: E402
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.middleware.cors import CORSMiddleware  # noqa: E402
from starlette.routing import Mount  # noqa: E402
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware  # noqa: E402

TimeoutMiddleware = timeout_middleware_class()

# what service.py excludes from tracing unless CLF_TRACE_REQUESTS=true (BentoML joins the list)
EXCLUDED = r"/v1/classify,/v2/models/[^/]+(?:/versions/[^/]+)?/infer"


async def route(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def stack(*middleware: Middleware, built: bool = True):
    """What uvicorn runs in a worker, shaped as BentoML builds it: the proxy-headers middleware
    around a Starlette app whose middlewares are ``middleware`` and whose routes are mounts."""
    app = Starlette(routes=[Mount("/v1", app=route), Mount("/v2", app=route)],
                    middleware=list(middleware))
    if built:  # Starlette builds it on its first call (the lifespan's, in a worker)
        app.middleware_stack = app.build_middleware_stack()
    return ProxyHeadersMiddleware(app)


BENTOML_LIKE = (Middleware(OverloadShortcut, api=None),
                Middleware(OpenTelemetryMiddleware, excluded_urls=EXCLUDED),
                Middleware(TimeoutMiddleware, timeout=60.0),
                Middleware(ContextMiddleware, context=None))


def test_a_stack_of_layers_it_knows_gets_a_lane_with_bentomls_timeout():
    built = lane.build(stack(*BENTOML_LIKE), route)
    assert isinstance(built, lane.Lane) and built.timeout_s == 60.0
    assert not built.counts_metrics  # no metrics middleware in this stack (metrics disabled)
    shortcut = built.app  # the admission's keeper, then the timeout, then the route
    assert isinstance(shortcut, OverloadShortcut) and isinstance(shortcut.app, lane.Timeout)
    assert shortcut.app.app is route


def test_before_starlette_builds_its_stack_the_door_tries_again_later():
    with pytest.raises(lane.NotYet):
        lane.build(stack(*BENTOML_LIKE, built=False), route)


@pytest.mark.parametrize("extra, why", [
    (Middleware(CORSMiddleware, allow_origins=["*"]), "CORSMiddleware is in the stack"),
    (Middleware(OpenTelemetryMiddleware, excluded_urls=None), "OpenTelemetry traces /v1/classify"),
    (Middleware(OpenTelemetryMiddleware, excluded_urls="/v1/classify"),
     "OpenTelemetry traces /v2/models/m/infer"),
])
def test_a_layer_that_does_something_for_the_request_means_no_lane(extra, why):
    with pytest.raises(ValueError, match=why):
        lane.build(stack(*BENTOML_LIKE, extra), route)


class Admitted:
    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


def call(app, scope=None):
    """Run ``app`` on one request; (messages sent, the scope)."""
    scope = scope or {"type": "http", "method": "POST", "path": "/v1/classify/image",
                      "headers": [], ADMISSION: Admitted()}  # as the door hands it over
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def go():
        await app(scope, receive, send)

    asyncio.run(go())
    return sent, scope


def test_an_admission_that_never_reaches_the_route_is_released_once():
    model = Admitted()

    async def failing(scope, receive, send):
        raise RuntimeError("before the route")

    with pytest.raises(RuntimeError):  # uvicorn's cycle logs it and answers 500
        call(lane.Lane(failing, None, None), {"type": "http", "path": "/v1/classify/image",
                                               ADMISSION: model})
    assert model.released == 1

    async def taking_it(scope, receive, send):  # what _classify does: takes the admission over
        scope[ADMISSION] = None
        await route(scope, receive, send)

    model = Admitted()
    call(lane.Lane(taking_it, None, None), {"type": "http", "path": "/v1/classify/image",
                                             ADMISSION: model})
    assert model.released == 0


def test_a_request_unanswered_by_the_timeout_gets_bentomls_504_and_its_work_is_cancelled():
    cancelled = []

    async def stuck(scope, receive, send):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    sent, _ = call(lane.Lane(stuck, None, 0.05))
    assert cancelled == [True]
    assert sent[0]["status"] == 504
    assert json.loads(sent[1]["body"]) == {
        "error": "Not able to process the request in 0.05 seconds"}


def test_an_answer_under_way_when_the_timeout_passes_is_left_to_finish():
    async def slow_body(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.1)  # past the timeout, but the answer has started
        await send({"type": "http.response.body", "body": b"late"})

    sent, _ = call(lane.Lane(slow_body, None, 0.02))
    assert [m.get("status") or m.get("body") for m in sent] == [200, b"late"]


def test_a_cancellation_that_is_not_the_timeouts_goes_on():
    async def cancelled_from_outside(scope, receive, send):
        raise asyncio.CancelledError()

    with pytest.raises(asyncio.CancelledError):
        call(lane.Lane(cancelled_from_outside, None, 30.0))
