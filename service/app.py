"""The HTTP shell: a lean ASGI app mounted inside the BentoML service at ``/v1``; step 1 of the
request path (``service.py`` lists them all).

Why raw ASGI rather than ``@bentoml.api``: BentoML's own request handling of an upload costs
about as much CPU as a small model's inference (docs/benchmark-history.md, "Earlier runs"). This
app reads the body once, hands it to ``requests.py`` to parse, calls the served model
(``served.py``) and answers with one ``requests.dump_json``; BentoML still owns the server, the
workers, ``/metrics``, ``/readyz`` and its traffic middlewares around it.

Routes (exact paths):
  POST /v1/classify/image   one or many images (multipart, JSON with base64, or a raw image body)
  POST /v1/classify/text    one or many texts (JSON, or a text/plain body in its charset)
  POST /v1/feedback         ground truth by request id (``Authorization: Bearer <token>``)
  GET  /v1/models           what is served: name, version, task, labels, spec
  /v2/...                   the Open Inference Protocol v2 (KServe/Triton): health, metadata and
                            infer per model, registered by ``v2.register`` (its errors carry
                            ``error`` as a string; see ``v2.py``)

A classify request may carry ``?top_k=N``, ``X-Request-ID`` (echoed, and the key of its log
records), slice tags in ``X-Slices: key=value; key2=value2`` (keys the settings allow) and
``X-Request-Deadline-Ms`` (shortens ``CLF_REQUEST_DEADLINE_MS`` for this request). Under
overload a classify request is answered 503 ``overloaded`` with ``Retry-After`` before its body
is read, or 504 ``deadline_exceeded`` when its deadline passed before its model call. Every
error is ``{"error": {"reason", "message"}, "request_id"}`` with the status ``STATUS`` gives its
reason: this table is the one place where a reason becomes an HTTP status.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from monitoring.slices import SliceRules
from monitoring.store import FeedbackError, PredictionLog, UnknownRequestError
from preprocessing import InputError

from . import openapi, requests, v2
from .batching import BatchError
from .lifecycle import DRAIN
from .metrics import get_metrics
from .recording import LogUnavailable
from .requests import RequestError
from .served import DeadlineExceeded, Overloaded, RequestContext, ServedModel, Slot

if TYPE_CHECKING:
    from .settings import Settings

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

MAX_FEEDBACK_BYTES = 1024 * 1024

# Every error reason -> its HTTP status: the input's (preprocessing.REASONS), the request's
# (requests.REASONS) and the service's own. 413 for size, 415 for a kind of input we do not
# decode, 422 for content that does not fit, 400 for a malformed request.
STATUS: dict[str, int] = {
    # what is wrong with an input (preprocessing)
    "empty": 422,
    "not_an_image": 415,
    "corrupt": 422,
    "too_many_pixels": 413,
    "bad_field": 422,
    "empty_text": 422,
    "text_too_long": 413,
    "bad_encoding": 422,
    # what is wrong with the request (requests.py)
    "bad_request": 400,
    "too_large": 413,
    "too_many_items": 413,
    "headers_too_large": 431,
    "unsupported_encoding": 415,
    # the service's own
    "not_found": 404,
    "method_not_allowed": 405,
    "unauthorized": 401,
    "feedback_disabled": 403,
    "unknown_request_id": 404,
    "bad_labels": 422,
    "not_ready": 503,
    "overloaded": 503,
    "shutting_down": 503,
    "deadline_exceeded": 504,
    "log_unavailable": 503,
    "internal": 500,
}


class Failure(Exception):
    """An error answer decided by the service itself (not by the input or the request)."""

    def __init__(self, reason: str, message: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.reason, self.message, self.headers = reason, message, headers or []


@dataclass
class Answer:
    """What a handler returns: a JSON document (``dict``) or raw bytes with their content type."""

    status: int
    body: dict | bytes
    content_type: str = "application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


# handler(scope, receive, headers, request_id, **path_params) -> Answer | (status, dict)
Handler = Callable[..., Awaitable["Answer | tuple[int, dict]"]]


@dataclass
class Route:
    """One path of the route table: its template (``{name}`` segments match one path segment),
    a handler per method, and its OpenAPI operation per method (``openapi.py`` reads them)."""

    template: str
    handlers: dict[str, Handler]
    docs: dict[str, dict] = field(default_factory=dict)
    pattern: re.Pattern | None = None

    def __post_init__(self) -> None:
        if "{" in self.template:
            regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.template))
            self.pattern = re.compile(f"^{regex}$")

    def match(self, path: str) -> dict[str, str] | None:
        if self.pattern is None:
            return {} if path == self.template else None
        found = self.pattern.match(path)
        return None if found is None else found.groupdict()


# the classify routes the overload shortcut answers for: path -> model kind
SHED_ROUTES = {"/v1/classify/image": "image", "/v1/classify/text": "text"}


# scope key: the model that OverloadShortcut admitted this request to, until _classify takes
# the admission over (and with it the release)
ADMISSION = "clf.admission"
# scope key: when it was admitted (time.perf_counter()); the request's deadline counts from
# there, so the event-loop passes between the door and the route are inside it
ADMITTED_AT = "clf.admitted_at"
# set by the door (shedding.py) on a request whose body was still on its way once what had
# arrived was parsed: it holds no admission until its body is here (``App.read_then_admit``)
BODY_PENDING = "clf.body_pending"
# scope key: the body bytes this request holds in its worker's BodyBudget (given back when
# App.__call__ returns)
BUFFERED = "clf.buffered_bytes"
MOUNT_PREFIXES = ("/v1", "/v2")  # where BentoML mounts App (service.py)
_UNDER_A_MOUNT = tuple(prefix + "/" for prefix in MOUNT_PREFIXES)


class OverloadShortcut:
    """ASGI middleware that BentoML runs in front of its own (request metrics, tracing, timeout,
    routing, the mounted apps; ``patches.run_first``): a classify request is admitted, or
    refused 503 ``overloaded``, here, before any of them runs. Under a flood of connections the
    refusals are most of the work, and BentoML's stack costs about as much per request as
    serving one. Admitting here, not just checking, matters as much: between this point and the
    route the request crosses a task hop or two, and under a flood a whole event-loop pass of
    requests would pass a mere check before the first of them is counted. ``_classify`` takes
    the admission over (it still applies a shorter deadline a client asks for, and counts the
    other inputs of a request with several); one that never gets there is released here.
    Refusals answered here are counted in ``clf_shed_requests_total``, not in BentoML's request
    metrics. In a worker most of them never get here: the HTTP protocol refuses at the door, and
    what it admits arrives with its admission in the scope, which this takes over and releases
    the same way (``shedding.py``).

    Being first, it also hands ``App`` the paths under ``/v1/`` and ``/v2/`` that hold a line
    break (a percent-encoded ``%0A`` in a model name): Starlette's ``Mount`` matches its path
    with ``.*``, which stops at one, so BentoML would answer its own plain-text 404 instead of
    the documented JSON error (found by the fuzz test)."""

    def __init__(self, app: Callable, api: "App") -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if "\n" in scope["path"] and scope["path"].startswith(_UNDER_A_MOUNT):
                return await self.api(scope, receive, send)
            model = scope.get(ADMISSION)  # admitted at the door
            if model is None:
                model = self.api.classify_model(scope)
                if model is not None:
                    # a body still on its way: refused now if full, else admitted once the body
                    # is here (read_then_admit)
                    pending = scope.get(BODY_PENDING)
                    try:
                        (model.check if pending else model.admit)(self.api.budget_s)
                    except Overloaded as exc:
                        return await self.api.refuse(exc, scope, send)
                    if pending:
                        return await self.app(scope, receive, send)
                    scope[ADMISSION] = model
                    scope[ADMITTED_AT] = time.perf_counter()
            if model is not None:
                try:
                    return await self.app(scope, receive, send)
                finally:
                    if scope.get(ADMISSION) is model:  # never reached _classify
                        scope[ADMISSION] = None
                        model.release()
        await self.app(scope, receive, send)


class BodyBudget:
    """The request body bytes a worker holds (being read, or read and not yet answered), at
    most ``limit`` (``CLF_MAX_BUFFERED_BYTES``). Bodies are read before their request is
    admitted, so a slow upload holds no admission (``App.read_then_admit``); this bounds the
    memory they take instead: ``_read_body`` takes each chunk as it comes (``Overloaded`` past
    the limit), ``App.__call__`` gives a request's bytes back when it returns, and the door
    refuses a request whose ``Content-Length`` would not fit before reading any of it."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def refuses(self, more: int) -> bool:
        return self.held + more > self.limit

    def take(self, scope: Scope, size: int) -> None:
        if self.refuses(size):
            raise self.overloaded()
        self.held += size
        scope[BUFFERED] = scope.get(BUFFERED, 0) + size

    def give_back(self, scope: Scope) -> None:
        self.held -= scope.pop(BUFFERED, 0)

    def overloaded(self) -> Overloaded:
        return Overloaded(f"this worker holds {self.held / 2**20:.1f} MiB of request bodies "
                          f"being read or answered; the bound is {self.limit / 2**20:.1f} MiB "
                          "(CLF_MAX_BUFFERED_BYTES); retry after 1 s", 1)


class App:
    """ASGI callable; ``bind()`` hands it the loaded models and settings once the service has
    built them. Until then a classify route answers 503 not_ready."""

    def __init__(self, settings: Settings | None = None) -> None:
        """``settings``: the ones the service will bind, so the OpenAPI document states the
        limits in force (the defaults when not given)."""
        from .settings import Settings

        self.slots: dict[str, Slot] = {}
        self.settings: Settings | None = None
        self.budget_s = math.inf  # the default deadline, s (bind)
        self.slice_rules = SliceRules()
        self.prediction_log: PredictionLog | None = None  # for feedback
        self._static: dict[str, Route] = {}  # exact paths, looked up first
        self._templated: list[Route] = []
        documented = settings or Settings()
        self.bodies = BodyBudget(documented.max_buffered_bytes)  # bind() sets the served limit
        self.add_route("POST", "/v1/classify/image", self.classify_image,
                       openapi.classify_operation("image", documented))
        self.add_route("POST", "/v1/classify/text", self.classify_text,
                       openapi.classify_operation("text", documented))
        self.add_route("POST", "/v1/feedback", self.feedback, openapi.feedback_operation())
        self.add_route("GET", "/v1/models", self.models, openapi.models_operation())
        v2.register(self, documented)  # the Open Inference Protocol v2 routes (v2.py)

    def add_route(self, method: str, template: str, handler: Handler,
                  doc: dict | None = None) -> None:
        route = self._static.get(template) or next(
            (r for r in self._templated if r.template == template), None)
        if route is None:
            route = Route(template, {})
            if route.pattern is None:
                self._static[template] = route
            else:
                self._templated.append(route)
        route.handlers[method] = handler
        if doc is not None:
            route.docs[method] = doc

    @property
    def routes(self) -> list[Route]:
        return [*self._static.values(), *self._templated]

    def resolve(self, path: str) -> tuple[Route, dict[str, str]] | None:
        route = self._static.get(path)
        if route is not None:
            return route, {}
        for route in self._templated:
            params = route.match(path)
            if params is not None:
                return route, params
        return None

    def bind(self, slots: dict[str, Slot], settings: Settings,
             prediction_log: PredictionLog | None = None) -> None:
        self.slots = dict(slots)
        self.settings = settings
        # the default deadline in seconds (inf = none): a client's header may only shorten it,
        # so what this refuses, the request's own deadline refuses too (OverloadShortcut)
        self.budget_s = settings.request_deadline_ms / 1e3 or math.inf
        self.slice_rules = settings.slice_rules()
        self.prediction_log = prediction_log
        self.bodies.limit = settings.max_buffered_bytes

    def model(self, kind: str) -> ServedModel | None:
        slot = self.slots.get(kind)
        return None if slot is None else slot.current

    def classify_model(self, scope: Scope) -> ServedModel | None:
        """The ready model a classify request is for (``OverloadShortcut``); None otherwise."""
        if scope["method"] != "POST":
            return None
        return self.admitting_model(scope["path"])

    def admitting_model(self, path: str) -> ServedModel | None:
        """The ready model a POST to ``path`` classifies with, admitted before its body is read:
        ``/v1/classify/{image,text}`` and the v2 ``infer`` routes (``/v2/models/{name}[/versions/
        {version}]/infer``, the model of that name and, where given, version); None for any
        other path (its handler answers it, a 404 included)."""
        kind = SHED_ROUTES.get(path)
        if kind is not None:
            model = self.model(kind)
            return model if model is not None and model.ready else None
        if not path.startswith("/v2/models/") or not path.endswith("/infer"):
            return None
        parts = path.split("/")  # "", "v2", "models", name, ["versions", version,] "infer"
        if len(parts) == 5:
            name, version = parts[3], None
        elif len(parts) == 7 and parts[4] == "versions":
            name, version = parts[3], parts[5]
        else:
            return None
        model = next((slot.current for slot in self.slots.values()
                      if slot.current is not None and slot.current.name == name), None)
        if model is None or not model.ready or version not in (None, model.version):
            return None
        return model

    async def read_then_admit(self, scope: Scope, receive: Receive, headers: dict[str, str],
                              model: ServedModel, budget_s: float) -> tuple[bytes, float]:
        """A classify handler's body, then its admission to ``model`` (``take_admission``) and
        the time its deadline and logged latency count from (the admission). Admitted once the
        body is here: a request whose body was still on its way after the door parsed what had
        arrived holds no admission meanwhile (``shedding.py`` lets go of it, ``OverloadShortcut``
        only checks), so slow or stalled uploads cannot take a model's capacity from the
        requests that are ready for it. Raises what the read and the admission raise; once this
        returns the caller owes one ``model.release()``."""
        model.reading += 1  # a hot reload drains this version only once it is read
        try:
            body = await _read_body(receive, headers, self.settings.max_body_bytes, scope,
                                    self.bodies)
        except Overloaded:
            model.metrics.shed("body_bytes")
            raise
        finally:
            model.reading -= 1
        self.take_admission(scope, model, budget_s)
        return body, scope.get(ADMITTED_AT) or time.perf_counter()

    def take_admission(self, scope: Scope, model: ServedModel, budget_s: float) -> None:
        """Admit a request to ``model`` for a classify handler: take over the admission made at
        the door or by ``OverloadShortcut`` (re-checked against a shorter deadline the client
        asked for), or admit it here. Raises ``Overloaded``; once this returns the caller owes
        one ``model.release()``."""
        if scope.get(ADMISSION) is model:
            scope[ADMISSION] = None
            if budget_s < self.budget_s:  # the client shortened its deadline
                try:
                    model.recheck(budget_s)
                except Overloaded:
                    model.release()
                    raise
        else:
            model.admit(budget_s)

    async def refuse(self, exc: Overloaded, scope: Scope, send: Send) -> None:
        """503 ``overloaded``, exactly as ``_classify`` (or, on a v2 route, ``infer``) answers
        it."""
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        request_id = requests.request_id({"x-request-id": given.decode("latin-1")})
        if scope["path"].startswith("/v2/"):
            return await _send(send, v2.error_answer(exc, request_id), request_id)
        await _fail(send, "overloaded", exc.message, request_id,
                    [(b"retry-after", str(exc.retry_after_s).encode())])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is BentoML's business
        headers = _headers(scope)
        request_id = requests.request_id(headers)
        found = self.resolve(scope["path"])
        if found is None:
            return await _fail_for(scope, send, Failure(
                "not_found", f"no route {scope['method']} {scope['path']}"), request_id)
        route, params = found
        handler = route.handlers.get(scope["method"])
        if handler is None:
            allow = ", ".join(route.handlers)
            return await _fail_for(scope, send, Failure(
                "method_not_allowed", f"use {allow}", [(b"allow", allow.encode())]), request_id)
        try:
            if DRAIN.refuses(scope):  # a connection opened after SIGTERM (lifecycle.py)
                return await self._shutting_down(scope, receive, send, headers, request_id)
            try:
                answer = await handler(scope, receive, headers, request_id, **params)
            except (InputError, RequestError, Failure) as exc:
                return await _fail(send, exc.reason, exc.message, request_id,
                                   getattr(exc, "headers", None))
            except Overloaded as exc:
                return await _fail(send, "overloaded", exc.message, request_id,
                                   [(b"retry-after", str(exc.retry_after_s).encode())])
            except DeadlineExceeded as exc:
                return await _fail(send, "deadline_exceeded", exc.message, request_id)
            except LogUnavailable as exc:  # never answer what was not recorded
                return await _fail(send, "log_unavailable", f"{exc}; retry later", request_id)
            except BatchError:
                logger.exception("inference failed [request_id=%s]", request_id)
                return await _fail(send, "internal", "inference failed; the server log has "
                                   f"request id {request_id}", request_id)
            except Exception:
                logger.exception("unexpected failure [request_id=%s]", request_id)
                return await _fail(send, "internal", "internal error; the server log has "
                                   f"request id {request_id}", request_id)
            if isinstance(answer, tuple):
                answer = Answer(*answer)
            await _send(send, answer, request_id)
        finally:
            if BUFFERED in scope:  # the body bytes it held (BodyBudget)
                self.bodies.give_back(scope)

    async def _shutting_down(self, scope: Scope, receive: Receive, send: Send,
                             headers: dict[str, str], request_id: str) -> None:
        """503 ``shutting_down`` with ``Retry-After``, once the body is read: the connection
        closes after this answer, and closing with unread bytes would reset it, answer and all."""
        limit = self.settings.max_body_bytes if self.settings is not None else MAX_FEEDBACK_BYTES
        try:
            await _read_body(receive, headers, limit, scope, self.bodies)
        except (RequestError, Overloaded):
            pass
        failure = Failure("shutting_down", "this server is shutting down; send the request "
                          "again (another replica takes it)", [(b"retry-after", b"1")])
        if scope["path"].startswith("/v2/"):
            return await _send(send, v2.error_answer(failure, request_id), request_id)
        await _fail(send, failure.reason, failure.message, request_id, failure.headers)

    # ---- routes -------------------------------------------------------------------------------

    async def classify_image(self, scope: Scope, receive: Receive, headers: dict[str, str],
                             request_id: str) -> tuple[int, dict]:
        return await self._classify("image", scope, receive, headers, request_id)

    async def classify_text(self, scope: Scope, receive: Receive, headers: dict[str, str],
                            request_id: str) -> tuple[int, dict]:
        return await self._classify("text", scope, receive, headers, request_id)

    async def _classify(self, kind: str, scope: Scope, receive: Receive, headers: dict[str, str],
                        request_id: str) -> tuple[int, dict]:
        """One request to one model: read, parse, classify, answer."""
        model = self._ready_model(kind)
        settings = self.settings
        admitted = False
        try:
            # the deadline (s; inf = none) from the settings, shortened by the client's header
            budget_s = requests.deadline_ms(headers, settings.request_deadline_ms) / 1e3 or math.inf
            slices = requests.slices(headers.get(requests.SLICES_HEADER, ""), self.slice_rules)
            top_k = requests.top_k(scope.get("query_string", b""), settings.top_k)
            # the deadline and the logged latency count from the admission, at the door where
            # there was one (under a flood, whole event-loop passes lie between it and here)
            body, started = await self.read_then_admit(scope, receive, headers, model, budget_s)
            admitted = True
            ctx = RequestContext(request_id, slices, started)
            content_type = headers.get("content-type", "")
            if kind == "image":
                inputs = requests.images(body, content_type, settings.max_images_per_request)
            else:
                inputs = requests.texts(body, content_type, settings.max_texts_per_request)
            predictions = await model.classify(inputs, top_k, ctx, started + budget_s)
        except (InputError, RequestError) as exc:
            model.reject(exc.reason)
            raise
        finally:
            if admitted:
                model.release()
        return 200, {
            "request_id": request_id,
            "model": model.name,
            "model_version": model.version,
            "predictions": [p.to_dict() for p in predictions],
        }

    def _ready_model(self, kind: str) -> ServedModel:
        """404 for a model this service was not configured with, 503 for one still loading."""
        model = self.model(kind)
        if model is not None and model.ready:
            return model
        if model is None and self.settings is not None:
            setting = "CLF_IMAGE_MODEL" if kind == "image" else "CLF_TEXT_MODEL"
            raise Failure("not_found", f"this service has no {kind} model; start it with "
                          f"{setting} set to a model store tag to enable this route")
        raise Failure("not_ready", "the model is still loading; retry when /readyz answers 200")

    async def feedback(self, scope: Scope, receive: Receive, headers: dict[str, str],
                       request_id: str) -> tuple[int, dict]:
        """Ground-truth labels for logged requests: 401 without the token, 404 for an unknown
        request id, 422 for labels that do not fit; a repeat changes nothing."""
        token = self.settings.feedback_token if self.settings is not None else ""
        if not token or self.prediction_log is None:
            missing = "CLF_FEEDBACK_TOKEN" if not token else "CLF_PREDICTION_LOG"
            raise Failure("feedback_disabled", f"feedback is disabled on this server: set {missing}")
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):
            raise Failure("unauthorized", "send the feedback token as 'Authorization: Bearer <token>'",
                          [(b"www-authenticate", b'Bearer realm="feedback"')])
        items = requests.feedback(await _read_body(receive, headers, MAX_FEEDBACK_BYTES, scope,
                                                   self.bodies))
        labels = {slot.current.name: slot.current.labels for slot in self.slots.values()}
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                None, self.prediction_log.add_feedback_many, items, labels)
        except UnknownRequestError as exc:
            raise Failure("unknown_request_id", "no logged prediction has request "
                          f"id(s) {exc.request_ids}; nothing was stored") from None
        except FeedbackError as exc:
            raise Failure("bad_labels", f"{exc}; nothing was stored") from None
        counter = get_metrics().feedback
        for result in results:
            for name in ("created", "updated", "unchanged"):
                if getattr(result, name):
                    counter.labels(name).inc(getattr(result, name))
        return 200, {"request_id": request_id, "results": [
            {"request_id": r.request_id, "labels": r.items, "created": r.created,
             "updated": r.updated, "unchanged": r.unchanged} for r in results]}

    async def models(self, scope: Scope, receive: Receive, headers: dict[str, str],
                     request_id: str) -> tuple[int, dict]:
        return 200, {"models": [slot.current.describe() for slot in self.slots.values()]}


# ---- the wire --------------------------------------------------------------------------------

def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def _read_body(receive: Receive, headers: dict[str, str], limit: int,
                     scope: Scope | None = None, bodies: BodyBudget | None = None) -> bytes:
    """The whole body, at most ``limit`` bytes (413 ``too_large`` past it), inflated if
    compressed; each chunk taken from ``bodies`` (for ``scope``) as it comes."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError("too_large", f"the body is {declared} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError("bad_request", "the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError("too_large", f"the body is over the limit of {limit} bytes")
        if bodies is not None and chunk:
            bodies.take(scope, len(chunk))
        chunks.append(chunk)
        if not message.get("more_body", False):
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            encoding = headers.get("content-encoding")
            if encoding is None or encoding.strip().lower() in ("", "identity"):
                return body
            # A gzip or deflate body is inflated here, for every route, within the same limit,
            # in a thread (zlib lets go of the GIL): 19 KB of gzip inflate to 20 MB in ~60 ms,
            # which on the event loop would stall every other connection of the worker.
            return await asyncio.get_running_loop().run_in_executor(
                None, requests.inflate, body, encoding, limit)


def error_body(reason: str, message: str, request_id: str) -> dict:
    return {"error": {"reason": reason, "message": message}, "request_id": request_id}


async def _fail_for(scope: Scope, send: Send, failure: Failure, request_id: str) -> None:
    """A failure decided before any handler ran, in the error shape of the path's protocol."""
    if scope["path"].startswith("/v2/"):
        return await _send(send, v2.error_answer(failure, request_id), request_id)
    await _fail(send, failure.reason, failure.message, request_id, failure.headers)


async def _fail(send: Send, reason: str, message: str, request_id: str,
                extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send_json(send, STATUS[reason], error_body(reason, message, request_id), request_id,
                     extra_headers or [])


async def _send_json(send: Send, status: int, payload: dict, request_id: str,
                     extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    await _send(send, Answer(status, payload, headers=list(extra_headers)), request_id)


async def _send(send: Send, answer: Answer, request_id: str) -> None:
    body = answer.body
    if isinstance(body, dict):
        body = requests.dump_json(body)
    await send({
        "type": "http.response.start",
        "status": answer.status,
        "headers": [
            (b"content-type", answer.content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
            *answer.headers,
        ],
    })
    await send({"type": "http.response.body", "body": body})
