"""Refusal at the door (service/shedding.py) on a real uvicorn server in a thread, driven with raw
HTTP/1.1 sockets: a classify request to a full model is answered 503 ``overloaded`` by the HTTP
protocol itself (no ASGI task), with the very answer ``OverloadShortcut`` gives; its body is
discarded and the keep-alive connection serves the next request; what the door admits is
released once; and where the door is not installed the middleware answers the same."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time

import pytest

from service import patches, shedding
from service.app import ADMISSION, OverloadShortcut, error_body
from service.lifecycle import DRAIN
from tests.unit.test_overload import GatedModel, bound_app, image_model, png, shed_count

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("httptools")
from uvicorn.protocols.http import auto, httptools_impl  # noqa: E402
from uvicorn.server import Server  # noqa: E402

URL = "/v1/classify/image"
BASE = httptools_impl.HttpToolsProtocol


class Served:
    """One gated image model behind OverloadShortcut on a uvicorn server; ``shortcut_calls``
    counts the requests that became ASGI requests, ``admitted_at_route`` what the route saw."""

    def __init__(self, name: str, max_queue_items: int, door: bool,
                 max_header_bytes: int = shedding.DEFAULT_MAX_HEADER_BYTES,
                 head_timeout_s: float = shedding.DEFAULT_HEAD_TIMEOUT_S,
                 timeout_keep_alive: float = 5, max_queue_requests: int = 0) -> None:
        self.model = GatedModel()
        self.served = image_model(self.model, max_queue_items, name=name,
                                  max_queue_requests=max_queue_requests)
        self.api = bound_app(self.served)
        self.shortcut_calls: list[str] = []
        self.admitted_at_route: list[bool] = []
        self.route = self._route  # what the shortcut calls (a test may wrap it)
        shortcut = OverloadShortcut(lambda *args: self.route(*args), self.api)
        protocol = (shedding.protocol_class(BASE, self.api, max_header_bytes=max_header_bytes,
                                            head_timeout_s=head_timeout_s) if door else BASE)

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                while (await receive())["type"] == "lifespan.startup":
                    self.loop = asyncio.get_running_loop()
                    await self.served.start(warmup_batches=0)
                    await send({"type": "lifespan.startup.complete"})
                await self.served.stop()
                return await send({"type": "lifespan.shutdown.complete"})
            self.shortcut_calls.append(scope["path"])
            await shortcut(scope, receive, send)

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self.server = Server(uvicorn.Config(app, http=protocol, lifespan="on", log_config=None,
                                            access_log=False,
                                            timeout_keep_alive=timeout_keep_alive))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started)

    async def _route(self, scope, receive, send):
        if scope["path"] == URL:
            self.admitted_at_route.append(scope.get(ADMISSION) is self.served)
        await self.api(scope, receive, send)

    def stop(self) -> None:
        self.model.gate.set()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve():
    DRAIN.reset()
    started: list[Served] = []

    def start(name: str, max_queue_items: int = 1, door: bool = True, **kwargs) -> Served:
        started.append(Served(name, max_queue_items, door, **kwargs))
        return started[-1]

    yield start
    for served in started:
        served.stop()


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def post_head(body: bytes, request_id: str = "", extra: str = "", version: str = "1.1") -> bytes:
    rid = f"x-request-id: {request_id}\r\n" if request_id else ""
    return (f"POST {URL} HTTP/{version}\r\nhost: test\r\ncontent-type: image/png\r\n{rid}{extra}"
            f"content-length: {len(body)}\r\n\r\n").encode()


def post(body: bytes, request_id: str = "", extra: str = "", version: str = "1.1") -> bytes:
    return post_head(body, request_id, extra, version) + body


_READERS: dict[int, object] = {}


def _reader(sock: socket.socket):
    """One buffered reader per socket: answers to pipelined requests arrive in one segment."""
    return _READERS.setdefault(id(sock), sock.makefile("rb"))


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    reader = _reader(sock)
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("closed before an answer")
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", 0)))
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return _reader(sock).read(1) == b""
    except ConnectionResetError:
        return False  # a reset is not a clean close


def hold(served: Served) -> socket.socket:
    """One request admitted and held in the (gated) model: the bound of 1 is reached."""
    served.model.gate.clear()
    held = connect(served.port)
    held.sendall(post(png(), "held"))
    wait_for(lambda: served.served.admitted == 1 and served.model.entered.is_set())
    return held


def assert_refused(status: int, headers: dict[str, str], body: bytes, request_id: str) -> dict:
    doc = json.loads(body)
    assert status == 503, body
    assert doc["error"]["reason"] == "overloaded"
    assert "CLF_MAX_QUEUE_ITEMS" in doc["error"]["message"]
    assert doc["request_id"] == request_id == headers["x-request-id"]
    assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
    return doc


@pytest.mark.parametrize("door", [True, False], ids=["at-the-door", "middleware"])
def test_a_request_of_many_inputs_fits_beside_others_and_requests_are_bounded(serve, door):
    """The two bounds, scaled down (2 requests, 5 inputs): a request of 3 inputs is admitted
    beside a held one (with one bound of inputs it was refused unless the worker was idle), and
    the requests' bound, not the inputs', refuses the next one at the door."""
    import base64

    served = serve(f"shed-many-{door}", max_queue_items=5, door=door, max_queue_requests=2)
    held = hold(served)
    many = json.dumps({"images": [base64.b64encode(png()).decode()] * 3}).encode()
    large = connect(served.port)
    large.sendall((f"POST {URL} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                   f"x-request-id: many\r\ncontent-length: {len(many)}\r\n\r\n").encode()
                  + many)
    wait_for(lambda: served.served.admitted == 4)  # 1 + 3 inputs, 2 requests
    client = connect(served.port)
    client.sendall(post(png(), "third"))
    status, headers, body = answer(client)
    doc = json.loads(body)
    assert status == 503 and doc["error"]["reason"] == "overloaded"
    assert "2 requests are admitted" in doc["error"]["message"]
    assert "CLF_MAX_QUEUE_REQUESTS" in doc["error"]["message"]
    served.model.gate.set()
    assert answer(held)[0] == 200
    status, _, body = answer(large)
    assert status == 200 and len(json.loads(body)["predictions"]) == 3
    client.sendall(post(png(), "after"))
    assert answer(client)[0] == 200
    wait_for(lambda: (served.served.admitted, served.served.requests_admitted) == (0, 0))
    for sock in (held, large, client):
        sock.close()


@pytest.mark.parametrize("door", [True, False], ids=["at-the-door", "middleware"])
def test_a_refusal_is_answered_at_the_door_and_the_connection_serves_on(serve, door):
    served = serve(f"shed-door-{door}", door=door)
    refused_before = shed_count(served.served.name, "overloaded")
    held = hold(served)
    calls = len(served.shortcut_calls)
    client = connect(served.port)
    client.sendall(post(png(), "refused-1"))
    first = answer(client)
    assert_refused(*first, "refused-1")
    assert "connection" not in first[1]  # keep-alive
    # the next refused request's body arrives in pieces after its answer: discarded as it comes
    body = png()
    client.sendall(post_head(body, "refused-2"))
    second = answer(client)
    for i in range(0, len(body), 7):
        client.sendall(body[i:i + 7])
        time.sleep(0.001)
    # two more in one write (pipelined), then one to another route: each answered in order
    client.sendall(post(png(), "refused-3") + post(png(), "refused-4")
                   + b"GET /v1/models HTTP/1.1\r\nhost: test\r\n\r\n")
    third, fourth, models = answer(client), answer(client), answer(client)
    assert_refused(*second, "refused-2")
    assert_refused(*third, "refused-3")
    assert_refused(*fourth, "refused-4")
    assert models[0] == 200 and json.loads(models[2])["models"][0]["name"] == served.served.name
    assert first[2].replace(b"refused-1", b"x") == fourth[2].replace(b"refused-4", b"x")
    reached = len(served.shortcut_calls) - calls  # what became an ASGI request
    assert reached == (1 if door else 5), served.shortcut_calls
    assert shed_count(served.served.name, "overloaded") - refused_before == 4
    served.model.gate.set()  # load drops: the held request is answered, the next one too
    assert answer(held)[0] == 200
    wait_for(lambda: served.served.admitted == 0)
    client.sendall(post(png(), "after"))
    status, headers, doc = answer(client)
    assert status == 200 and json.loads(doc)["request_id"] == "after"
    wait_for(lambda: served.served.admitted == 0)
    assert all(served.admitted_at_route), "a request reached the route without its admission"


def test_the_door_answers_exactly_what_the_middleware_answers(serve):
    answers = []
    for door in (True, False):
        served = serve("shed-same", door=door)  # one model name: the same message
        held = hold(served)
        client = connect(served.port)
        client.sendall(post(png(), "same-id"))
        status, headers, body = answer(client)
        headers.pop("date", None)
        answers.append((status, headers, body))
        served.model.gate.set()
        assert answer(held)[0] == 200
    assert answers[0] == answers[1]


def timed(client: socket.socket, request: bytes, answers: int = 1) -> tuple[list, float]:
    t0 = time.monotonic()
    client.sendall(request)
    got = [answer(client) for _ in range(answers)]
    return got, time.monotonic() - t0


def test_a_client_that_comes_back_sooner_than_told_is_paced(serve):
    served = serve("shed-pace")
    held = hold(served)
    before = shed_count("shed-pace", "overloaded")
    client = connect(served.port)
    (first,), at_once = timed(client, post(png(), "p-1"))
    (again,), paced = timed(client, post(png(), "p-2"))  # at once, not after Retry-After
    assert_refused(*first, "p-1")
    assert_refused(*again, "p-2")
    assert at_once < shedding.PACE_S / 2 and paced >= shedding.PACE_S * 0.9
    # behind a paced refusal, a pipelined request is answered in order, the refusal at once
    (third, models), both = timed(client, post(png(), "p-3") + b"GET /v1/models HTTP/1.1\r\n"
                                  b"host: test\r\n\r\n", answers=2)
    assert_refused(*third, "p-3")
    assert models[0] == 200 and both < shedding.PACE_S / 2
    time.sleep(1.05)  # the client waits as long as it was told (Retry-After: 1)
    (fourth,), waited = timed(client, post(png(), "p-4"))
    assert_refused(*fourth, "p-4")
    assert waited < shedding.PACE_S / 2
    other = connect(served.port)  # pacing is per connection
    (fifth,), elsewhere = timed(other, post(png(), "p-5"))
    assert_refused(*fifth, "p-5")
    assert elsewhere < shedding.PACE_S / 2
    other.sendall(post(png(), "p-6"))  # paced; the client leaves before its answer
    other.close()
    (sixth,), _ = timed(client, post(png(), "p-7"))
    assert_refused(*sixth, "p-7")
    served.model.gate.set()
    assert answer(held)[0] == 200
    wait_for(lambda: served.served.admitted == 0)
    client.sendall(post(png(), "p-8"))  # load dropped: served at once, paced or not before
    assert answer(client)[0] == 200
    assert shed_count("shed-pace", "overloaded") - before == 7


@pytest.fixture
def drained():
    """uvicorn's Server with the worker's graceful drain (patches.drain_on_stop), restored after."""
    saved = {name: Server.__dict__[name] for name in ("handle_exit", "shutdown")}
    patches.drain_on_stop(10.0)
    yield
    for name, value in saved.items():
        setattr(Server, name, value)
    if "_clf_patched" in Server.__dict__:
        delattr(Server, "_clf_patched")
    DRAIN.reset()


def test_a_paced_refusal_is_still_answered_when_the_server_stops(serve, drained):
    served = serve("shed-stop")
    held = hold(served)
    client = connect(served.port)
    client.sendall(post(png(), "s-1"))
    assert_refused(*answer(client), "s-1")
    client.sendall(post(png(), "s-2"))  # paced
    time.sleep(shedding.PACE_S / 5)
    served.loop.call_soon_threadsafe(served.server.handle_exit, signal.SIGTERM, None)
    status, headers, body = answer(client)
    assert_refused(status, headers, body, "s-2")
    assert headers.get("connection") == "close" and closed_by_server(client)
    served.model.gate.set()
    status, headers, _ = answer(held)
    assert status == 200 and headers.get("connection") == "close"
    served.thread.join(timeout=10)
    assert not served.thread.is_alive()


def test_what_the_door_admits_is_released_once(serve):
    served = serve("shed-admit", max_queue_items=4)
    seen: list[int] = []
    route = served.route

    async def counting(scope, receive, send):
        seen.append(served.served.admitted)
        if dict(scope["headers"]).get(b"x-drop") == b"1":
            raise RuntimeError("a middleware failed before the route")
        await route(scope, receive, send)

    served.route = counting
    client = connect(served.port)
    for _ in range(3):
        client.sendall(post(png()))
        assert answer(client)[0] == 200
    client.sendall(post(png(), extra="x-drop: 1\r\n"))
    assert answer(client)[0] == 500  # uvicorn's answer to an application error
    wait_for(lambda: served.served.admitted == 0)
    assert seen == [1, 1, 1, 1], "each request admitted once, before the middlewares"
    # a client that leaves while its admitted request is in the model: released all the same
    served.model.gate.clear()
    gone = connect(served.port)
    gone.sendall(post(png()))
    wait_for(lambda: served.model.entered.is_set() and served.served.admitted == 1)
    gone.close()
    served.model.gate.set()
    wait_for(lambda: served.served.admitted == 0)


def abandoned_count(model: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("clf_abandoned_requests_total", {"model": model}) or 0.0


def test_a_client_that_goes_away_is_given_up_and_its_item_never_computed(serve, caplog):
    """Admitted, queued behind a busy model, then the client closes its connection: the
    request is cancelled at once (its admission back while the model is still busy), its item
    is left out of the next model call, nothing is logged as an error, and the server serves
    on."""
    served = serve("shed-gone", max_queue_items=4)
    held = hold(served)
    before = abandoned_count("shed-gone")
    gone = connect(served.port)
    gone.sendall(post(png(), "gone"))
    wait_for(lambda: served.served.admitted == 2 and served.served.batcher.queued == 1)
    gone.close()
    wait_for(lambda: served.served.admitted == 1)  # given up while the model is still busy
    assert abandoned_count("shed-gone") == before + 1
    served.model.gate.set()
    assert answer(held)[0] == 200
    wait_for(lambda: served.served.admitted == 0)
    client = connect(served.port)
    client.sendall(post(png(), "after"))
    assert answer(client)[0] == 200
    assert served.model.calls == [1, 1], "the held request's call and the last one's only"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize("how", ["http/1.0", "connection: close", "expect: 100-continue"])
def test_a_refusal_closes_where_the_client_asks_or_may_never_send_its_body(serve, how):
    served = serve(f"shed-close-{how.split(':')[0]}")
    held = hold(served)
    client = connect(served.port)
    if how == "http/1.0":
        client.sendall(post(png(), "r", version="1.0"))
    elif how == "connection: close":
        client.sendall(post(png(), "r", extra="connection: close\r\n"))
    else:  # headers only: the client waits for 100 Continue before it sends the body
        client.sendall(post_head(png(), "r", extra="expect: 100-continue\r\n"))
    status, headers, body = answer(client)
    assert_refused(status, headers, body, "r")
    assert headers.get("connection") == "close" and closed_by_server(client)
    served.model.gate.set()
    assert answer(held)[0] == 200


@pytest.mark.parametrize("target", [URL, "/v1/classify/%69mage"],
                         ids=["admitted-at-the-door", "percent-encoded-so-the-middleware"])
@pytest.mark.parametrize("sent", [0, 10], ids=["headers-only", "part-of-the-body"])
def test_a_request_whose_body_is_on_its_way_holds_no_admission(serve, target, sent):
    """Slow or stalled uploads must not take the model's capacity: with a bound of 1, a request
    that sent its headers (and part of its body, or none) and stalls holds no admission, so
    others are served meanwhile; once its body is whole it is admitted and answered. Before,
    it held the admission until the request timeout and every other request was refused."""
    served = serve(f"shed-slow-{sent}-{target[-5:]}", max_queue_items=1)
    body = png()
    slow = connect(served.port)
    slow.sendall(post_head(body, "slow").replace(URL.encode(), target.encode()) + body[:sent])
    time.sleep(0.2)  # parsed, its task started and waiting for the rest of the body
    assert served.served.admitted == 0
    for i in range(3):
        client = connect(served.port)
        client.sendall(post(png(), f"fast-{i}"))
        assert answer(client)[0] == 200
        client.close()
    slow.sendall(body[sent:])
    status, _, doc = answer(slow)
    assert status == 200 and json.loads(doc)["request_id"] == "slow"
    wait_for(lambda: served.served.admitted == 0)


def test_a_request_whose_body_completes_while_the_model_is_full_is_refused_then(serve):
    """Checked at its headers (room then), admitted when its body is whole: if the model is
    full by then, it is refused 503 ``overloaded`` (after its body, through the route) and
    nothing stays admitted."""
    served = serve("shed-slow-full", max_queue_items=1)
    before = shed_count(served.served.name, "overloaded")
    body = png()
    slow = connect(served.port)
    slow.sendall(post_head(body, "late"))
    time.sleep(0.2)
    held = hold(served)  # the bound is reached meanwhile
    slow.sendall(body)
    assert_refused(*answer(slow), "late")
    assert shed_count(served.served.name, "overloaded") - before == 1
    served.model.gate.set()
    assert answer(held)[0] == 200
    wait_for(lambda: served.served.admitted == 0)


def test_the_request_bodies_a_worker_holds_are_bounded(serve):
    """Bodies are read before their request is admitted (a slow upload holds no admission), so
    their bytes are bounded apart (``app.BodyBudget``, CLF_MAX_BUFFERED_BYTES): a request whose
    Content-Length would not fit is refused 503 at the door, none of its body read; a chunked
    one when its bytes pass the bound; every byte is given back when a request ends, answered
    or abandoned. Before, 60 connections sending 19 MB bodies grew a worker by 1.1 GB."""
    served = serve("shed-bodies", max_queue_items=8)
    body = png()
    bodies = served.api.bodies
    bodies.limit = len(body) + len(body) // 4
    before = shed_count(served.served.name, "body_bytes")
    slow = connect(served.port)
    slow.sendall(post_head(body, "slow") + body[:len(body) // 2])
    wait_for(lambda: bodies.held == len(body) // 2)
    sized = connect(served.port)
    sized.sendall(post(body, "sized"))
    status, headers, doc = answer(sized)
    assert status == 503 and headers["retry-after"] == "1"
    message = json.loads(doc)["error"]["message"]
    assert json.loads(doc)["error"]["reason"] == "overloaded" and "CLF_MAX_BUFFERED_BYTES" in message
    chunked = connect(served.port)
    chunked.sendall(post_head(b"", "chunked").replace(b"content-length: 0",
                                                        b"transfer-encoding: chunked")
                    + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    status, _, doc = answer(chunked)
    assert status == 503 and "CLF_MAX_BUFFERED_BYTES" in json.loads(doc)["error"]["message"]
    assert shed_count(served.served.name, "body_bytes") - before == 2
    slow.sendall(body[len(body) // 2:])
    assert answer(slow)[0] == 200
    wait_for(lambda: bodies.held == 0)
    gone = connect(served.port)  # a client that leaves mid-body gives its bytes back too
    gone.sendall(post_head(body, "gone") + body[:len(body) // 2])
    wait_for(lambda: bodies.held == len(body) // 2)
    gone.close()
    wait_for(lambda: bodies.held == 0)
    for name in ("after", "after-again"):  # and the worker serves as before
        client = connect(served.port)
        client.sendall(post(body, name))
        assert answer(client)[0] == 200


@pytest.mark.parametrize("path, v2", [(URL, False), ("/v2/models/x/infer", True)],
                         ids=["v1", "v2"])
def test_a_request_head_over_the_limit_is_answered_431_and_its_connection_closed(serve, path,
                                                                                 v2):
    """uvicorn's httptools parser has no bound on a head and buffers a header's value whole
    (a 300 MB header grew a worker by 530 MB): a head over ``max_header_bytes`` is answered 431
    ``headers_too_large`` in its route's error shape once that many bytes of it have come (plus
    at most the read that opened it), and the connection is closed; a head within it, and the
    next connection, are served."""
    served = serve("shed-head", max_queue_items=4, max_header_bytes=8192)
    big = connect(served.port)
    big.sendall(post_head(b"x").replace(URL.encode(), path.encode()).replace(
        b"\r\n\r\n", b"\r\nx-big: "))
    sent = 0
    try:
        for _ in range(64):  # 64 x 4 KB: 32 times the limit, in pieces as a client sends them
            big.sendall(b"a" * 4096)
            sent += 4096
            time.sleep(0.002)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed by the server once it had answered
    status, headers, body = answer(big)
    doc = json.loads(body)
    assert status == 431 and headers["connection"] == "close"
    reason, message = (doc["reason"], doc["error"]) if v2 else (doc["error"]["reason"],
                                                               doc["error"]["message"])
    assert reason == "headers_too_large" and "CLF_MAX_HEADER_BYTES" in message
    assert doc["request_id"] == headers["x-request-id"]
    assert closed_by_server(big)
    assert sent < 8192 * 4, f"{sent} bytes were read before the answer"
    within = connect(served.port)
    within.sendall(post(png(), "within", extra="x-fine: " + "b" * 6000 + "\r\n"))
    assert answer(within)[0] == 200


def test_a_head_that_comes_too_slowly_has_its_connection_closed(serve):
    """A client that sends its head a few bytes at a time (slowloris) held its connection for
    as long as it liked (uvicorn's keep-alive timer stops at the first byte): a head still
    incomplete ``head_timeout_s`` after the read that left it open is cut off; a head that
    completes in time, a body that takes longer (bounded by the request timeout, not this)
    and the next connections are served."""
    served = serve("shed-slow-head", max_queue_items=4, head_timeout_s=0.5)
    slow = connect(served.port)
    head = post_head(png(), "slow-head")
    t0 = time.monotonic()
    closed_at = None
    for i in range(0, len(head), 4):
        try:
            slow.sendall(head[i:i + 4])
        except (BrokenPipeError, ConnectionResetError):
            closed_at = time.monotonic() - t0
            break
        time.sleep(0.1)
    if closed_at is None:  # the head came whole before the cut: only possible if it was fast
        pytest.fail(f"a {len(head)}-byte head sent 4 bytes per 0.1 s was never cut off")
    assert 0.5 <= closed_at < 2.0, closed_at
    in_time = connect(served.port)
    body = png()
    head = post_head(body, "in-time")
    in_time.sendall(head[:20])
    time.sleep(0.2)
    in_time.sendall(head[20:])
    time.sleep(0.8)  # the body after the head's time: the head was whole, so it waits
    in_time.sendall(body)
    assert answer(in_time)[0] == 200


@pytest.mark.parametrize("door", [True, False], ids=["at-the-door", "uvicorn-alone"])
def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_timeout(serve, door):
    """uvicorn arms its keep-alive timer only after an answer, so a connection that never sent
    a byte stayed open for as long as its client liked (a file descriptor each: enough of them
    and the worker can open no file and accept no connection). With the door it is closed after
    the keep-alive timeout, as an idle one is between requests; one that sends in time is
    served, and the timer then runs as uvicorn runs it."""
    served = serve(f"shed-silent-{door}", max_queue_items=4, door=door, timeout_keep_alive=0.5)
    silent = connect(served.port)
    in_time = connect(served.port)
    time.sleep(0.2)
    in_time.sendall(post(png(), "in-time"))
    assert answer(in_time)[0] == 200
    silent.settimeout(3)
    t0 = time.monotonic()
    if not door:  # uvicorn alone: still open after six times the timeout
        with pytest.raises(TimeoutError):
            silent.recv(1)
        return
    assert silent.recv(1) == b"", "the server sent something to a connection that sent nothing"
    assert time.monotonic() - t0 < 1.0
    assert closed_by_server(in_time)  # idle after its answer: uvicorn's own timer


@pytest.mark.parametrize("request_bytes, v2", [
    (b"POST " + URL.encode() + b" HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n"
     b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", False),
    (b"POST /v2/models/x/infer HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n"
     b"content-length: 6\r\n\r\nhello!", True),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False),  # an HTTP/2 client's preface
    (b"GET /v1/models HTTP/1.1\r\nhost: t\r\nbad header\x01: x\r\n\r\n", False),
], ids=["content-length-and-chunked", "two-content-lengths", "http2-preface", "bad-header"])
def test_bytes_the_parser_refuses_get_a_json_400_and_a_closed_connection(serve, request_bytes,
                                                                         v2):
    served = serve("shed-bad-http", max_queue_items=4)
    client = connect(served.port)
    client.sendall(request_bytes)
    status, headers, body = answer(client)
    doc = json.loads(body)
    reason, message = (doc["reason"], doc["error"]) if v2 else (doc["error"]["reason"],
                                                               doc["error"]["message"])
    assert status == 400 and reason == "bad_request" and "not valid HTTP/1.1" in message
    assert doc["request_id"] == headers["x-request-id"]
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert closed_by_server(client)
    fine = connect(served.port)
    fine.sendall(post(png(), "fine"))
    assert answer(fine)[0] == 200


def test_a_pipelined_request_behind_one_under_way_goes_the_usual_way(serve):
    served = serve("shed-pipe", max_queue_items=2)
    served.model.gate.clear()
    client = connect(served.port)
    client.sendall(post(png(), "first") + post(png(), "second"))
    wait_for(lambda: served.model.entered.is_set())
    assert served.served.admitted == 1  # the second waits, unadmitted, behind the first
    served.model.gate.set()
    assert [answer(client)[0] for _ in range(2)] == [200, 200]
    wait_for(lambda: served.served.admitted == 0)


def test_while_draining_the_middleware_decides(serve):
    served = serve("shed-drain")
    held = hold(served)
    DRAIN.begin([])  # every connection is new: the app answers 503 shutting_down
    try:
        client = connect(served.port)
        calls = len(served.shortcut_calls)
        client.sendall(post(png(), "late"))
        status, _, body = answer(client)
        assert status == 503 and len(served.shortcut_calls) == calls + 1
    finally:
        DRAIN.reset()
    served.model.gate.set()
    assert answer(held)[0] == 200


def test_install_puts_the_door_in_uvicorns_place_or_logs_why_not(monkeypatch, caplog):
    api = bound_app(image_model(GatedModel(), 1, name="shed-install"))
    monkeypatch.setattr(auto, "AutoHTTPProtocol", BASE)
    monkeypatch.setattr(httptools_impl, "HttpToolsProtocol", BASE)
    with caplog.at_level(logging.WARNING, logger="service.shedding"):
        assert not shedding.install(api, middleware_first=False)
        monkeypatch.setattr(uvicorn, "__version__", "9.0.0")
        assert not shedding.install(api, middleware_first=True)
    assert auto.AutoHTTPProtocol is BASE and httptools_impl.HttpToolsProtocol is BASE
    assert "not BentoML's first middleware" in caplog.text and "uvicorn 9.0.0" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(auto, "AutoHTTPProtocol", BASE)
    monkeypatch.setattr(httptools_impl, "HttpToolsProtocol", BASE)
    assert shedding.install(api, middleware_first=True)
    installed = auto.AutoHTTPProtocol
    assert installed is httptools_impl.HttpToolsProtocol and issubclass(installed, BASE)
    assert installed.shed_api is api
    other = bound_app(image_model(GatedModel(), 1, name="shed-install-2"))
    assert shedding.install(other, middleware_first=True) and auto.AutoHTTPProtocol is installed
    assert installed.shed_api is other
    config = uvicorn.Config(lambda scope, receive, send: None, log_config=None)
    config.load()
    assert config.http_protocol_class is installed


def test_the_refusal_bytes_are_the_middlewares_answer():
    from service.served import Overloaded

    exc = Overloaded("m is overloaded: full; retry after 2 s", 2)
    raw = shedding.refusal(exc, "rid", [(b"date", b"today")], close=False)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert lines[1:] == [b"date: today", b"content-type: application/json",
                         f"content-length: {len(body)}".encode(), b"x-request-id: rid",
                         b"retry-after: 2"]
    assert body == json.dumps(error_body("overloaded", exc.message, "rid"),
                              separators=(",", ":")).encode()  # what app.py sends
    odd = Overloaded('quotes " and \\ and ü', 1)
    odd_body = shedding.refusal(odd, "a.b:c-1", [], close=False).partition(b"\r\n\r\n")[2]
    assert json.loads(odd_body)["error"]["message"] == odd.message
    closing = shedding.refusal(exc, "rid", [], close=True)
    assert b"\r\nconnection: close\r\n\r\n" in closing
    from service.v2 import v2_error

    v2_body = shedding.refusal(exc, "rid", [], close=False, v2=True).partition(b"\r\n\r\n")[2]
    assert v2_body == json.dumps(v2_error("overloaded", exc.message, "rid"),
                                 separators=(",", ":")).encode()  # what a v2 route sends


def v2_infer(name: str, request_id: str, version: str = "") -> bytes:
    """A v2 infer request with one image as BYTES (JSON)."""
    import base64

    from service.v2 import IMAGE_INPUT

    body = json.dumps({"inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [1],
                                   "data": [base64.b64encode(png()).decode()]}],
                       "parameters": {"binary_data_output": False}}).encode()
    path = f"/v2/models/{name}{f'/versions/{version}' if version else ''}/infer"
    return (f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
            f"x-request-id: {request_id}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


@pytest.mark.parametrize("door", [True, False], ids=["at-the-door", "middleware"])
def test_a_v2_infer_request_is_refused_before_its_body_is_read_in_the_v2_shape(serve, door):
    served = serve(f"shed-v2-{door}", door=door)
    name, version = served.served.name, served.served.version
    held = hold(served)
    calls = len(served.shortcut_calls)
    client = connect(served.port)
    client.sendall(v2_infer(name, "v2-refused") + v2_infer(name, "v2-versioned", version))
    for request_id in ("v2-refused", "v2-versioned"):
        status, headers, body = answer(client)
        doc = json.loads(body)
        assert status == 503 and headers["retry-after"] == "1", body
        assert doc == {"error": doc["error"], "reason": "overloaded", "request_id": request_id}
        assert "CLF_MAX_QUEUE_ITEMS" in doc["error"]
    assert len(served.shortcut_calls) - calls == (0 if door else 2)  # no ASGI request at all
    client.sendall(v2_infer("no-such-model", "v2-unknown"))  # not a model's: its handler's 404
    assert answer(client)[0] == 404
    served.model.gate.set()
    assert answer(held)[0] == 200
    wait_for(lambda: served.served.admitted == 0)
    client.sendall(v2_infer(name, "v2-after"))
    status, _, body = answer(client)
    assert status == 200, body
    wait_for(lambda: served.served.admitted == 0)
