"""The HTTP shell: a lean ASGI app mounted inside the BentoML service at ``/v1``; step 1 of the
request path (``service.py`` lists them all).

Why raw ASGI rather than ``@bentoml.api``: on 2 cores, BentoML's own request handling of an upload
costs about as much CPU as the benchmark model's inference. This app reads the body once, hands
it to ``requests.py`` to parse, calls the served model (``served.py``) and answers with one
``json.dumps``; BentoML still owns the server, the workers, ``/metrics``, ``/readyz`` and its
traffic middlewares around it.

Routes (exact paths):
  POST /v1/classify/image   one or many images (multipart, JSON with base64, or a raw image body)
  POST /v1/classify/text    one or many texts (JSON, or a UTF-8 text/plain body)
  POST /v1/feedback         ground truth by request id (``Authorization: Bearer <token>``)
  GET  /v1/models           what is served: name, version, task, labels, spec

A classify request may carry ``?top_k=N``, ``X-Request-ID`` (echoed, and the key of its log
records) and slice tags in ``X-Slices: key=value; key2=value2`` (keys the settings allow). Every
error is ``{"error": {"reason", "message"}, "request_id"}`` with the status ``STATUS`` gives its
reason: this table is the one place where a reason becomes an HTTP status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from monitoring.slices import SliceRules
from monitoring.store import FeedbackError, PredictionLog, UnknownRequestError
from preprocessing import InputError

from . import requests
from .batching import BatchError
from .metrics import get_metrics
from .recording import LogUnavailable
from .requests import RequestError
from .served import RequestContext, ServedModel, Slot

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
    # the service's own
    "not_found": 404,
    "method_not_allowed": 405,
    "unauthorized": 401,
    "feedback_disabled": 403,
    "unknown_request_id": 404,
    "bad_labels": 422,
    "not_ready": 503,
    "log_unavailable": 503,
    "internal": 500,
}


class Failure(Exception):
    """An error answer decided by the service itself (not by the input or the request)."""

    def __init__(self, reason: str, message: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.reason, self.message, self.headers = reason, message, headers or []


class App:
    """ASGI callable; ``bind()`` hands it the loaded models and settings once the service has
    built them. Until then a classify route answers 503 not_ready."""

    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}
        self.settings: Settings | None = None
        self.slice_rules = SliceRules()
        self.prediction_log: PredictionLog | None = None  # for feedback
        self.routes: dict[str, dict[str, Callable]] = {
            "/v1/classify/image": {"POST": self.classify_image},
            "/v1/classify/text": {"POST": self.classify_text},
            "/v1/feedback": {"POST": self.feedback},
            "/v1/models": {"GET": self.models},
        }

    def bind(self, slots: dict[str, Slot], settings: Settings,
             prediction_log: PredictionLog | None = None) -> None:
        self.slots = dict(slots)
        self.settings = settings
        self.slice_rules = settings.slice_rules()
        self.prediction_log = prediction_log

    def model(self, kind: str) -> ServedModel | None:
        slot = self.slots.get(kind)
        return None if slot is None else slot.current

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is BentoML's business
        headers = _headers(scope)
        request_id = requests.request_id(headers)
        methods = self.routes.get(scope["path"])
        if methods is None:
            return await _fail(send, "not_found", f"no route {scope['method']} {scope['path']}",
                               request_id)
        handler = methods.get(scope["method"])
        if handler is None:
            allow = ", ".join(methods)
            return await _fail(send, "method_not_allowed", f"use {allow}", request_id,
                               [(b"allow", allow.encode())])
        try:
            status, answer = await handler(scope, receive, headers, request_id)
        except (InputError, RequestError, Failure) as exc:
            return await _fail(send, exc.reason, exc.message, request_id,
                               getattr(exc, "headers", None))
        except LogUnavailable as exc:  # never answer what was not recorded
            return await _fail(send, "log_unavailable", f"{exc}; retry later", request_id)
        except BatchError:
            logger.exception("inference failed [request_id=%s]", request_id)
            return await _fail(send, "internal", "inference failed; the server log has request "
                               f"id {request_id}", request_id)
        except Exception:
            logger.exception("unexpected failure [request_id=%s]", request_id)
            return await _fail(send, "internal", "internal error; the server log has request id "
                               f"{request_id}", request_id)
        await _send_json(send, status, answer, request_id)

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
        try:
            ctx = RequestContext(request_id, requests.slices(
                headers.get(requests.SLICES_HEADER, ""), self.slice_rules))
            top_k = requests.top_k(scope.get("query_string", b""), settings.top_k)
            body = await _read_body(receive, headers, settings.max_body_bytes)
            content_type = headers.get("content-type", "")
            if kind == "image":
                inputs = requests.images(body, content_type, settings.max_images_per_request)
            else:
                inputs = requests.texts(body, content_type, settings.max_texts_per_request)
            predictions = await model.classify(inputs, top_k, ctx)
        except (InputError, RequestError) as exc:
            model.reject(exc.reason)
            raise
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
        items = requests.feedback(await _read_body(receive, headers, MAX_FEEDBACK_BYTES))
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


async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
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
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def error_body(reason: str, message: str, request_id: str) -> dict:
    return {"error": {"reason": reason, "message": message}, "request_id": request_id}


async def _fail(send: Send, reason: str, message: str, request_id: str,
                extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send_json(send, STATUS[reason], error_body(reason, message, request_id), request_id,
                     extra_headers or [])


async def _send_json(send: Send, status: int, payload: dict, request_id: str,
                     extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
            *extra_headers,
        ],
    })
    await send({"type": "http.response.body", "body": body})
