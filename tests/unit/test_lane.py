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


# ---- an answer in one write, through uvicorn's own protocol ---------------------------------

class Wire(asyncio.Transport):
    """The socket side of uvicorn's protocol: what it writes, one entry per write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = self.closed_by_server = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def get_extra_info(self, name, default=None):
        ends = {"sockname": ("127.0.0.1", 3000), "peername": ("127.0.0.1", 40000)}
        return ends.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Api:
    """``App`` as the lane sees it: answers each request with ``messages`` (after its body)."""

    def __init__(self, messages: list[dict]) -> None:
        self.messages = messages

    def classify_model(self, scope):
        return None  # not a classify route: nothing to admit

    async def __call__(self, scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        for message in self.messages:
            await send(message)


def served(messages: list[dict], one_write: bool, request: bytes) -> Wire:
    """``request`` (bytes, one or more) through uvicorn's httptools protocol running the lane."""
    httptools_impl = pytest.importorskip("uvicorn.protocols.http.httptools_impl")
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    wire = Wire()

    async def go() -> None:
        app = lane.Lane(Api(messages), None, None, one_write=one_write)
        config = Config(app=app, http="httptools", lifespan="off", log_level="warning")
        state = ServerState()
        state.default_headers = [(b"date", b"Thu, 03 Dec 2026 17:00:00 GMT"),
                                 (b"server", b"uvicorn")]
        protocol = httptools_impl.HttpToolsProtocol(config=config, server_state=state,
                                                    app_state={})
        protocol.connection_made(wire)
        protocol.data_received(request)
        for _ in range(20):
            await asyncio.sleep(0.005)
        wire.closed_by_server = wire.closed
        protocol.connection_lost(None)

    asyncio.run(go())
    return wire


HEAD_200 = {"type": "http.response.start", "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"11"),
                        (b"x-request-id", b"r1")]}
BODY = {"type": "http.response.body", "body": b'{"ok":true}'}
POST = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"


def test_an_answer_goes_out_in_one_write_with_the_bytes_uvicorn_would_write():
    usual, one = (served([HEAD_200, BODY], flag, POST + POST) for flag in (False, True))
    assert len(usual.writes) == 4  # uvicorn: a head and a body per answer
    assert len(one.writes) == 2  # the lane: one write per answer, the keep-alive one answered too
    assert one.writes == [usual.writes[0] + usual.writes[1], usual.writes[2] + usual.writes[3]]
    assert one.writes[0].startswith(b"HTTP/1.1 200 OK\r\ndate: Thu, 03 Dec 2026")
    assert not one.closed_by_server


@pytest.mark.parametrize("messages, request_bytes", [
    # no content-length: uvicorn frames it chunked
    ([{"type": "http.response.start", "status": 200, "headers": []}, BODY], POST),
    # a streamed body
    ([{**HEAD_200, "headers": [(b"content-length", b"22")]},
      {**BODY, "more_body": True}, BODY], POST),
    # a head uvicorn acts on
    ([{**HEAD_200, "headers": [*HEAD_200["headers"], (b"connection", b"close")]}, BODY], POST),
    # HEAD: no body on the wire
    ([HEAD_200, {"type": "http.response.body", "body": b""}],
     b"HEAD /v2/models/m HTTP/1.1\r\nHost: x\r\n\r\n"),
    # a client that closes after this answer
    ([HEAD_200, BODY], POST.replace(b"Host: x", b"Host: x\r\nConnection: close")),
])
def test_any_other_answer_goes_out_as_uvicorn_writes_it(messages, request_bytes):
    usual, one = (served(messages, flag, request_bytes) for flag in (False, True))
    assert b"".join(one.writes) == b"".join(usual.writes)
    assert one.closed_by_server == usual.closed_by_server


def test_a_body_that_does_not_match_its_content_length_is_uvicorns_error_as_before():
    short = [HEAD_200, {"type": "http.response.body", "body": b"{}"}]
    usual, one = (served(short, flag, POST) for flag in (False, True))
    assert one.writes == usual.writes and one.closed_by_server and usual.closed_by_server


# ---- BentoML's request metrics, as its middleware records them --------------------------------

def bentoml_metrics(app):
    """BentoML's request-metrics middleware around ``app``, set up on a registry of its own."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from modelstore._bentoml import request_metrics_middleware_class

    registry = CollectorRegistry()
    middleware = request_metrics_middleware_class()(app, namespace="bentoml_service")
    by = ["endpoint", "service_name", "service_version", "http_response_code", "runner_name"]
    service = ["service_name", "service_version", "runner_name"]
    middleware.metrics_request_duration = Histogram("bentoml_service_request_duration_seconds",
                                                    "d", by, registry=registry)
    middleware.metrics_request_total = Counter("bentoml_service_request_total", "t", by,
                                               registry=registry)
    middleware.metrics_request_in_progress = Gauge("bentoml_service_request_in_progress", "p",
                                                   ["endpoint", *service], registry=registry)
    middleware.metrics_last_request_timestamp = Gauge(
        "bentoml_service_last_request_timestamp_seconds", "l", service, registry=registry)
    middleware._is_setup = True
    return middleware, registry


def samples(registry) -> dict:
    """Every sample but the clock's (timestamps, durations), by name and labels."""
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if "timestamp" in s.name or s.name.endswith("_sum") or s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = "clock"
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.parametrize("status", [200, 503])
def test_the_lane_records_bentomls_request_metrics_as_bentoml_does(status):
    async def answer(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        await send({"type": "http.response.body", "body": b"end"})

    theirs, their_registry = bentoml_metrics(answer)
    ours_of, our_registry = bentoml_metrics(None)
    ours = lane.RequestMetrics(answer, ours_of)
    for path in ("/v2/models/a/infer", "/v2/models/a/infer", "/v1/classify/image", "/healthz"):
        scope = {"type": "http", "method": "POST", "path": path, "headers": []}
        for app in (theirs, ours):
            call(app, scope)
    got = samples(our_registry)
    assert got == samples(their_registry)
    counted = {dict(labels)["endpoint"]: value for (name, labels), value in got.items()
               if name == "bentoml_service_request_total"}
    assert counted == {"/v2/models/a/infer": 2.0, "/v1/classify/image": 1.0, "/healthz": 1.0}
    assert all(dict(labels)["http_response_code"] == str(status) for (name, labels) in got
               if name == "bentoml_service_request_total")
