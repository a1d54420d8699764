"""Refusal at the door: under overload, a classify request to a full model is answered 503
``overloaded`` by the HTTP protocol itself, from its request line and headers, and never becomes
an ASGI request; a client that keeps sending to a full model on the same connection is paced.

Why. Under a flood of connections (the benchmark's overload cell: 1,000 keep-alive connections
posting images on 2 cores) nearly every request is refused, and each connection sends its next
request the moment it has its answer. Every event-loop pass then reads a request from nearly
every connection (~500 per worker), so a pass takes 100-150 ms, and an accepted request, which
needs several passes (read, hand-off to the batcher, the batch's results, answer), waits through
all of them: its latency is made of other requests' refusals, not of the queue the settings
bound, and the refusals take the CPU the model needs. Two things shorten the passes:

* a cheaper refusal: through ASGI a refusal is the scope and the request's task, Starlette's
  error middleware, ``app.OverloadShortcut``, two ``send()`` calls through uvicorn's response
  cycle (75-125 us of Python before BentoML's own middlewares); here it is ``admit()`` raising,
  one ``transport.write`` of the formatted answer, and the body skipped by the parser as it
  arrives (about 30 us);
* fewer of them: a connection refused again sooner than the ``Retry-After`` it was given gets
  its answer ``PACE_S`` later, and nothing more is read from it meanwhile. A client that waits
  as told, a first refusal and one that closes its connection are answered at once.

How. ``SheddingProtocol`` is uvicorn's httptools protocol with ``on_headers_complete`` in front:
a ``POST`` to a classify route (``app.SHED_ROUTES``, and the v2 ``infer`` routes:
``App.admitting_model``) whose model is ready is admitted right there
(``ServedModel.admit``, the very call ``OverloadShortcut`` makes) or refused:

* refused: the answer ``App.refuse`` would send (503, ``Retry-After``, ``X-Request-ID``, the
  error body with reason ``overloaded``, byte for byte; uvicorn's default headers first) is
  written to the transport, at once or after the pace; the body is discarded; once both are done
  the connection is ready for the next request (keep-alive), or closed where uvicorn would close
  it (HTTP/1.0, ``Connection: close``, a stop under way) and where the client sent ``Expect:
  100-continue`` (it may never send the body: closing at once is what RFC 9110 allows). A request
  pipelined behind a paced refusal makes it go out at once, so answers keep their order. No ASGI
  task, no BentoML request metric; ``clf_shed_requests_total{reason="overloaded"}`` counts it,
  as it counts every refusal.
* admitted: the admission rides in the scope (``app.ADMISSION``) and uvicorn carries on as
  usual, except that its response cycle runs the fast lane (``lane.py``) instead of BentoML's
  whole stack where the lane exists; the lane, or else ``OverloadShortcut``, the first
  middleware BentoML runs (``patches.run_first``), takes the admission over and releases it if
  the request never reaches the route, exactly as for one the shortcut admitted itself. If its
  client closes the connection before the answer is complete, its task is cancelled
  (``_until_gone``): what it awaits is dropped, the admission released on the way out, nothing
  answered; ``clf_abandoned_requests_total`` counts it. Left running, it held its admission
  until its model call, so a load generator that stopped with 64 requests on their way had the
  next run's first requests refused. If its body is still on its way once the data that brought
  its headers has been parsed, it gives the admission back (``body_on_its_way``) and its
  handler admits it when the body is whole: a slow upload holds no capacity.

A request whose ``Content-Length`` would take its worker past the request bodies it may hold
(``app.BodyBudget``, ``CLF_MAX_BUFFERED_BYTES``) is refused the same way, none of its body read.

Every request's head is bounded (``max_header_bytes``, ``CLF_MAX_HEADER_BYTES``): uvicorn's
httptools protocol has no bound and httptools buffers a header's value whole, so a head over it
is answered 431 ``headers_too_large`` and its connection closed (``data_received`` counts the
reads that belong to an open head whole); and in time: a head still incomplete after a read has
``head_timeout_s`` (``CLF_REQUEST_TIMEOUT_S``) to complete, or its connection is closed. A new
connection that sends nothing is closed after uvicorn's keep-alive timeout, as an idle one is
between requests (uvicorn arms that timer only after an answer). Bytes the HTTP parser refuses
are answered 400 ``bad_request`` in the API's JSON error shape (``send_400_response``; uvicorn's
was plain text) and the connection closed.

Everything else goes the usual way, and ``OverloadShortcut`` admits or refuses it as before: other
routes and methods, a percent-encoded or absolute-form target, a request pipelined behind one
still under way (its task starts only when the one before it is answered; a closed connection
would leave its admission held), a server draining after SIGTERM (``lifecycle.DRAIN``: its own
answers and ``Connection: close`` rules apply), uvicorn's own ``limit_concurrency``. One case
loses an admission: a task that uvicorn cancels before it ever ran, which happens only at the end
of a stop, when the counts die with the process.

``install`` puts the class where uvicorn's ``Config.load`` finds it (``http="auto"``, BentoML's
choice, and ``http="httptools"``), once the service is loaded and before its worker builds the
server. Where uvicorn is not the version this was written against, its protocol lacks what the
subclass relies on, httptools is missing, or ``OverloadShortcut`` is not BentoML's first
middleware, nothing is installed and that is logged: refusals stay in ``OverloadShortcut``,
correct and dearer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from http import HTTPStatus
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any

from . import lane, requests
from .app import ADMISSION, ADMITTED_AT, BODY_PENDING, SHED_ROUTES, STATUS
from .lifecycle import DRAIN
from .served import UNDER_WAY, Overloaded
from .settings import Settings

if TYPE_CHECKING:
    from .app import App
    from .served import ServedModel

logger = logging.getLogger(__name__)

# the uvicorn releases whose httptools protocol this subclass was written against and tested on
# (``tests/integration/test_shedding.py``): on_headers_complete builds the cycle and starts its
# task, on_body/on_message_complete feed that cycle (``more_body`` false once the body is whole),
# on_response_complete re-arms keep-alive
TESTED_UVICORN = ("0.54.",)
_PROTOCOL_NEEDS = ("connection_made", "data_received", "on_message_begin", "on_headers_complete",
                   "on_body", "on_message_complete", "on_response_complete",
                   "_unset_keepalive_if_required", "timeout_keep_alive_handler",
                   "send_400_response", "connection_lost", "shutdown")

# A connection whose client sends again sooner than the Retry-After it was given, and is refused
# again, hears back only after this pause (seconds), and nothing more is read from it meanwhile:
# a client that hammers a full model is paced instead of answered as fast as it can send (see
# the module docstring). Measured with the overload cell's wrk command (1,000 connections, 20 s
# runs, 2 cores, every refusal held): accepted answers 268/s -> 528/s and their p99 981 -> 414 ms
# with a 0.3 s pause, the same (528/s, 387 ms) with 0.6 s; refusals' p99 280 -> 454 ms. So a
# short one, 0.25 s (the overload cell in the README runs with it): refusals stay quick, well
# inside the Retry-After of 1 s or more they carry. 0 turns pacing off. With far more
# connections per worker than the cell's ~500, a fixed pause paces them less (refusals are then
# about connections / PACE_S a second).
PACE_S = 0.25
DEFAULT_MAX_HEADER_BYTES = Settings.max_header_bytes  # CLF_MAX_HEADER_BYTES's default
DEFAULT_HEAD_TIMEOUT_S = Settings.request_timeout_s  # a head's time: CLF_REQUEST_TIMEOUT_S

_PATHS = frozenset(path.encode() for path in SHED_ROUTES)  # the /v1 classify routes, as sent
_STATUS = STATUS["overloaded"]
# error_body("overloaded", message, request_id) as app.py's dump_json writes it, in pieces;
# and v2.v2_error's shape, for the v2 routes
_BODY_HEAD = b'{"error":{"reason":"overloaded","message":'
_BODY_ID = b'},"request_id":"'
_V2_HEAD = b'{"error":'
_V2_ID = b',"reason":"overloaded","request_id":"'
_STATUS_LINE = f"HTTP/1.1 {_STATUS} {HTTPStatus(_STATUS).phrase}\r\n".encode()


def refusal(exc: Overloaded, request_id: str, default_headers: list[tuple[bytes, bytes]],
            close: bool, v2: bool = False) -> bytes:
    """The whole HTTP/1.1 answer ``App.refuse`` sends for ``exc`` (``v2``: to a v2 route), as
    bytes on the wire: the same status, headers and body, byte for byte
    (``requests.request_id`` only yields ids that need no JSON escaping)."""
    head, tail = (_V2_HEAD, _V2_ID) if v2 else (_BODY_HEAD, _BODY_ID)
    body = b"".join([head, encode_basestring_ascii(exc.message).encode(), tail,
                     request_id.encode(), b'"}'])
    return _json_answer(_STATUS_LINE, default_headers, body, request_id,
                        [b"retry-after: ", str(exc.retry_after_s).encode(), b"\r\n"], close)


def _json_answer(status_line: bytes, default_headers: list[tuple[bytes, bytes]], body: bytes,
                 request_id: str, extra: list[bytes], close: bool) -> bytes:
    """An HTTP/1.1 answer with a JSON ``body`` written by the door: uvicorn's default headers,
    then ours (``extra``: whole header lines), in the order ``App``'s answers have them."""
    lines = [status_line]
    for name, value in default_headers:
        lines += [name, b": ", value, b"\r\n"]
    lines += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
              b"\r\nx-request-id: ", request_id.encode(), b"\r\n", *extra]
    if close:
        lines.append(b"connection: close\r\n")
    lines += [b"\r\n", body]
    return b"".join(lines)


def head_too_large(limit: int, default_headers: list[tuple[bytes, bytes]], v2: bool) -> bytes:
    """The whole answer to a request whose head is over ``limit`` bytes: 431
    ``headers_too_large`` in the error shape of its route, closing the connection."""
    return _closing_error("headers_too_large", f"the request line and headers are over the "
                          f"limit of {limit} bytes (CLF_MAX_HEADER_BYTES)", default_headers, v2)


BAD_HTTP_MESSAGE = ("the request is not valid HTTP/1.1: its request line, a header, or its "
                    "body's framing (Content-Length, chunked) could not be parsed; the "
                    "connection is closed")


def bad_http(default_headers: list[tuple[bytes, bytes]], v2: bool) -> bytes:
    """The whole answer to bytes the HTTP parser refuses: 400 ``bad_request`` in the error
    shape of the route (as far as its path was read), closing the connection."""
    return _closing_error("bad_request", BAD_HTTP_MESSAGE, default_headers, v2)


def _closing_error(reason: str, message: str, default_headers: list[tuple[bytes, bytes]],
                   v2: bool) -> bytes:
    """An error answer the door writes itself, with a new request id, in the error shape of
    the route (``v2``: a v2 route), closing the connection."""
    from .app import error_body
    from .v2 import v2_error

    request_id = requests.new_request_id()
    body = requests.dump_json((v2_error if v2 else error_body)(reason, message, request_id))
    status = STATUS[reason]
    return _json_answer(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode(),
                        default_headers, body, request_id, [], close=True)


def protocol_class(base: type, api: "App", fast: bool = False,
                   max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                   head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S) -> type:
    """``base`` (uvicorn's ``HttpToolsProtocol``) with refusal at the door for ``api``'s models;
    ``fast``: what it admits takes the fast lane (``lane.py``) where the stack allows; a request
    head over ``max_header_bytes`` is answered 431 and its connection closed, one still
    incomplete ``head_timeout_s`` after the read that left it open has its connection closed."""

    class SheddingProtocol(base):  # type: ignore[misc, valid-type]
        shed_api = api
        # the fast lane: True until built (then the Lane), None where there is none (lane.py)
        fast_lane: "lane.Lane | bool | None" = True if fast else None
        max_head = max_header_bytes
        head_time_s = head_timeout_s

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # the request head being parsed: its number on this connection (None: none open)
            # and the bytes counted for it (``data_received``)
            self.head: int | None = None
            self.heads = 0
            self.head_bytes = 0
            self.head_timer: asyncio.TimerHandle | None = None  # armed while a head stays open
            UNDER_WAY.state = self.server_state  # one per worker: the batcher's "alone"
            self.refused = False  # the message being parsed was refused: skip its body
            self.close_after_refusal = False
            self.last_refused = -math.inf  # loop.time() of this connection's last refusal
            # a paced refusal not yet sent: (why, request id, to a v2 route)
            self.owed: tuple[Overloaded, str, bool] | None = None
            self.paced: asyncio.TimerHandle | None = None  # when it will be

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # A new connection is idle until its first byte: uvicorn arms its keep-alive timer
            # only after an answer, so one that never sent anything stayed open (its file
            # descriptor held) for as long as its client liked. data_received disarms it.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def on_message_begin(self) -> None:
            if self.owed is not None:  # a request pipelined behind a paced refusal: its
                self._answer()  # answer first, at once, so answers keep their order
            # a refusal's end armed the keep-alive timer: a request pipelined behind it, parsed
            # in the same data_received, must not be cut off by it
            self._unset_keepalive_if_required()
            self.refused = False
            self.heads += 1
            self.head, self.head_bytes = self.heads, 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self.head = None
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None
            model = self._door_model()
            if model is None:
                return super().on_headers_complete()
            bodies = self.shed_api.bodies
            if bodies.held and bodies.refuses(self._declared_length()):
                model.metrics.shed("body_bytes")  # its body would not fit: none of it is read
                return self._refuse(bodies.overloaded())
            try:
                model.admit(self.shed_api.budget_s)
            except Overloaded as exc:
                return self._refuse(exc)
            self.scope[ADMISSION] = model  # OverloadShortcut takes it over (and the release)
            self.scope[ADMITTED_AT] = time.perf_counter()  # its deadline counts from here
            app = self.app
            fast = self._lane(app)
            # what uvicorn's cycle runs for this request: the lane (lane.py) or the app, given up
            # if the client goes away first
            self.app = functools.partial(_until_gone, app if fast is None else fast, model)
            try:
                super().on_headers_complete()
            except BaseException:
                if self.scope.get(ADMISSION) is model:
                    self.scope[ADMISSION] = None
                    model.release()
                raise
            finally:
                self.app = app

        @classmethod
        def _lane(cls, app: Any) -> "lane.Lane | None":
            """The fast lane (lane.py), built on the first admitted request; None: none (yet)."""
            if cls.fast_lane is None or isinstance(cls.fast_lane, lane.Lane):
                return cls.fast_lane
            try:
                cls.fast_lane = lane.build(app, cls.shed_api)
            except lane.NotYet:
                return None
            except ValueError as exc:
                logger.warning("no fast lane: %s; admitted requests cross BentoML's whole stack",
                               exc)
                cls.fast_lane = None
                return None
            logger.info("fast lane: admitted requests skip to the route (request metrics %s, "
                        "timeout %s s)", "kept" if cls.fast_lane.counts_metrics else "off",
                        cls.fast_lane.timeout_s)
            return cls.fast_lane

        def _declared_length(self) -> int:
            """The request's Content-Length, 0 where it has none (chunked) or it is over the
            body limit (the route answers that 413 without reading the body)."""
            for name, value in self.headers:
                if name == b"content-length":
                    length = int(value) if value.isdigit() else 0
                    settings = self.shed_api.settings
                    return length if settings is None or length <= settings.max_body_bytes else 0
            return 0

        def _door_model(self) -> "ServedModel | None":
            """The ready model this request's classify route is for, when the door may decide
            for it (see the module docstring); None: the usual way."""
            if self.parser.get_method() != b"POST":
                return None
            if self.root_path or DRAIN.active:
                return None
            path = self.url.partition(b"?")[0]
            if path not in _PATHS and not path.startswith(b"/v2/models/"):
                return None
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                return None  # pipelined behind a request under way
            if self.limit_concurrency is not None or self.parser.should_upgrade():
                return None
            return self.shed_api.admitting_model(path.decode("latin-1"))

        def _head_too_large(self) -> None:
            self.head = None
            logger.info("a request head over %d bytes from %s: answered 431, connection closed",
                        self.max_head, self.client)
            if not self.transport.is_closing():
                self.transport.write(head_too_large(self.max_head,
                                                    self.server_state.default_headers,
                                                    self.url.startswith(b"/v2/")))
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to bytes httptools refuses (both Content-Length and
            Transfer-Encoding, a bad header character, broken chunks, an HTTP/2 preface): in
            the API's JSON error shape with a request id, where uvicorn's was plain text."""
            if not self.transport.is_closing():
                url = getattr(self, "url", None) or b""
                self.transport.write(bad_http(self.server_state.default_headers,
                                              url.startswith(b"/v2/")))
                self.transport.close()

        def _head_too_slow(self, head: int) -> None:
            """A client that sends a head a few bytes at a time (slowloris) would hold its
            connection for as long as it likes: uvicorn's keep-alive timer stops at its first
            byte and nothing else bounds a head."""
            self.head_timer = None
            if self.head == head and not self.transport.is_closing():
                logger.info("a request head from %s incomplete after %g s: connection closed",
                            self.client, self.head_time_s)
                self.transport.close()

        def _refuse(self, exc: Overloaded) -> None:
            self.refused = True
            given = next((v for k, v in self.headers if k == b"x-request-id"), b"")
            request_id = requests.request_id({"x-request-id": given.decode("latin-1")})
            keep_alive = (self.parser.get_http_version() != "1.0"
                          and self.parser.should_keep_alive())
            # a client that waits for 100 Continue may never send the body: close at once
            self.close_after_refusal = not keep_alive or self.expect_100_continue
            self.owed = (exc, request_id, self.url.startswith(b"/v2/"))
            now = self.loop.time()
            again = now - self.last_refused < exc.retry_after_s  # sooner than it was told
            self.last_refused = now
            if again and not self.close_after_refusal and PACE_S > 0:
                self.flow.pause_reading()  # nothing more from it until this answer is out
                self.paced = self.loop.call_later(PACE_S, self._answer)
            else:
                self._answer()

        def _answer(self) -> None:
            """Send the refusal owed; finish it when its message has been read whole."""
            if self.paced is not None:
                self.paced.cancel()
                self.paced = None
            exc, request_id, v2 = self.owed
            self.owed = None
            transport = self.transport
            if transport.is_closing():
                return
            # after SIGTERM every answer closes its connection (patches.drain_on_stop)
            self.close_after_refusal = self.close_after_refusal or DRAIN.active
            transport.write(refusal(exc, request_id, self.server_state.default_headers,
                                    self.close_after_refusal, v2))
            if self.expect_100_continue:
                transport.close()
            elif not self.refused:  # its message is complete
                self._finish_refusal()
            else:
                self.flow.resume_reading()  # the rest of its body, to be skipped

        def _finish_refusal(self) -> None:
            if self.close_after_refusal:
                self.transport.close()
            self.on_response_complete()  # counts it; keep-alive: re-arms its timer, reads on

        def data_received(self, data: bytes) -> None:
            head = self.head
            super().data_received(data)
            if head is not None and self.head == head:
                # the same head was open before and after: all of ``data`` belongs to it
                # (the read that opens a head is not counted, so no body or earlier request
                # is taken for head bytes; a head is refused within the limit plus one read)
                self.head_bytes += len(data)
                if self.head_bytes > self.max_head:
                    return self._head_too_large()
            if self.head is not None and self.head_timer is None:
                # a head still open after a read (a request's head nearly always comes in
                # one): it has head_timeout_s to complete, or its connection is closed
                self.head_timer = self.loop.call_later(self.head_time_s, self._head_too_slow,
                                                       self.head)
            cycle = self.cycle
            if cycle is not None and cycle.more_body and not cycle.response_complete:
                body_on_its_way(cycle.scope)

        def on_body(self, body: bytes) -> None:
            if not self.refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self.refused:
                return super().on_message_complete()
            self.refused = False
            if self.owed is None:  # answered already
                self._finish_refusal()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.paced is not None:
                self.paced.cancel()
                self.paced = None
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None
            self.owed = None
            cycle = self.cycle
            super().connection_lost(exc)
            if cycle is not None and not cycle.response_complete:
                task = cycle.scope.get(REQUEST_TASK)
                if task is not None and not task.done():  # an admitted request under way
                    cycle.scope[GONE] = True
                    task.cancel()

        def shutdown(self) -> None:  # uvicorn's own stop (where drain_on_stop is not in place)
            if self.owed is not None:
                self._answer()
            super().shutdown()

    SheddingProtocol.__qualname__ = SheddingProtocol.__name__ = f"Shedding{base.__name__}"
    return SheddingProtocol


# scope keys of a request the door admitted: its task, and whether its client went away
REQUEST_TASK = "clf.request_task"
GONE = "clf.client_gone"


def body_on_its_way(scope: dict) -> None:
    """A request whose body is still on its way once what arrived has been parsed (a large
    upload, a slow client, one that sends its headers and stalls): it gives back an admission
    the door made (its task has not run yet, so nothing took it over) and is marked, so that
    ``OverloadShortcut`` only checks it and its handler admits it once the body is here
    (``App.read_then_admit``). Before, 64 connections that sent headers and never their body
    held a worker's 64 admissions until the 60-s request timeout, and every other request to it
    was refused 503 meanwhile."""
    if scope.get(BODY_PENDING):
        return
    scope[BODY_PENDING] = True
    model = scope.get(ADMISSION)
    if model is not None:
        scope[ADMISSION] = None
        scope.pop(ADMITTED_AT, None)
        model.release()


async def _until_gone(app: Any, model: "ServedModel", scope: dict, receive: Any,
                      send: Any) -> None:
    """Run an admitted request's ``app``; if its client closes the connection before the answer
    is complete, ``connection_lost`` cancels it: what it awaits is dropped (a queued item is
    left out of the next model call), its admission is released on the way out, as for a
    request past its timeout, and nothing is answered (nobody is there to read it)."""
    task = asyncio.current_task()
    scope[REQUEST_TASK] = task
    try:
        await app(scope, receive, send)
    except asyncio.CancelledError:
        if not scope.get(GONE) or task.uncancel() > 0:  # not ours, or cancelled again since
            raise
        model.metrics.abandoned()
    finally:
        scope[REQUEST_TASK] = None


def install(api: "App", middleware_first: bool, fast_lane: bool = False,
            max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
            head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S) -> bool:
    """Make uvicorn's httptools protocol refuse at the door for ``api`` (the module docstring).
    ``middleware_first``: ``OverloadShortcut`` is the first middleware BentoML runs, so what the
    door admits is released however the request ends. ``fast_lane``: what the door admits takes
    the fast lane where the stack allows (``lane.py``). Idempotent; False (logged) where it is
    not installed (and then there is no fast lane either)."""
    try:
        import uvicorn
        from uvicorn.protocols.http import auto, httptools_impl
    except ImportError as exc:
        logger.warning("refusal at the door not installed (%s): OverloadShortcut refuses", exc)
        return False
    base = httptools_impl.HttpToolsProtocol
    if getattr(base, "shed_api", None) is not None:  # installed before
        base.shed_api = api
        base.fast_lane = True if fast_lane else None
        base.max_head = max_header_bytes
        base.head_time_s = head_timeout_s
        return True
    why = None
    if not middleware_first:
        why = "OverloadShortcut is not BentoML's first middleware"
    elif not uvicorn.__version__.startswith(TESTED_UVICORN):
        why = f"uvicorn {uvicorn.__version__} is not one it was tested on ({TESTED_UVICORN})"
    elif not all(hasattr(base, name) for name in _PROTOCOL_NEEDS):
        why = "uvicorn's HttpToolsProtocol changed shape"
    elif auto.AutoHTTPProtocol is not base:
        why = "uvicorn's automatic HTTP protocol is not httptools"
    if why is not None:
        logger.warning("refusal at the door not installed: %s; OverloadShortcut refuses "
                       "(correct, dearer under a flood)", why)
        return False
    shedding = protocol_class(base, api, fast_lane, max_header_bytes, head_timeout_s)
    auto.AutoHTTPProtocol = shedding
    httptools_impl.HttpToolsProtocol = shedding
    return True
