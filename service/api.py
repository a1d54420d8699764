"""The HTTP API: a lean ASGI app mounted inside the BentoML service at ``/v1``.

Why raw ASGI rather than ``@bentoml.api``: on 2 cores, BentoML's own request handling of an upload
costs about as much CPU as the benchmark model's inference. This route reads the body once,
parses it with a few ``bytes.find`` calls and answers with one ``json.dumps``; BentoML still owns
the server, the workers, ``/metrics``, ``/readyz`` and its traffic middlewares around this app.

Routes (paths relative to the mount point):
  POST /classify/image   one or many images: multipart (field ``image``, repeatable), JSON
                         ``{"images": ["<base64>", ...]}``, or a raw ``image/*`` body
  POST /classify/text    JSON ``{"texts": ["...", ...]}`` or ``{"text": "..."}``, or one UTF-8
                         ``text/plain`` body
  POST /feedback         ground truth by request id (``Authorization: Bearer <token>``):
                         ``{"request_id": "...", "labels": ["..."]}`` (one label per input, in
                         order; ``"label"`` for a one-input request) or ``{"feedback": [...]}``
  GET  /models           what is served: name, version, task, labels, spec

A route whose model is not configured answers 404 naming the setting that enables it. A classify
request may carry slice tags in ``X-Slices: key=value; key2=value2`` (keys the settings allow).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import asyncio
import hmac
import re
import uuid
from typing import Any, Awaitable, Callable

from monitoring.slices import SliceRules
from monitoring.store import FeedbackError, PredictionLog, UnknownRequestError
from preprocessing import InputError, decode_text

from .batching import BatchError
from .classifier import BaseClassifier
from .metrics import get_metrics
from .monitor import SLICES_HEADER, LogUnavailable, RequestContext, parse_slices
from .multipart import boundary_of, parse_multipart

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

IMAGE_FIELDS = ("image", "images")
TEXT_FIELDS = ("text", "texts")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


MAX_FEEDBACK_BYTES = 1024 * 1024


class Slot:
    """Holds the classifier currently serving a model; hot reload replaces ``current``."""

    def __init__(self, current: BaseClassifier) -> None:
        self.current = current


class ClassifyAPI:
    """ASGI callable; ``bind()`` hands it the loaded models once the service has started them."""

    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}
        self.bound = False  # after bind(), a missing model is "not configured", not "loading"
        self.max_body_bytes = 20 * 1024 * 1024
        self.max_images = 64
        self.max_texts = 64
        self.default_top_k = 3
        self.slice_rules = SliceRules()
        self.log: PredictionLog | None = None
        self.feedback_token = ""

    def bind(self, image: Slot | BaseClassifier | None, text: Slot | BaseClassifier | None = None,
             *, max_body_bytes: int, max_images: int, max_texts: int = 64, top_k: int,
             slice_rules: SliceRules | None = None, log: PredictionLog | None = None,
             feedback_token: str = "") -> None:
        self.slots = {kind: m if isinstance(m, Slot) else Slot(m)
                      for kind, m in (("image", image), ("text", text)) if m is not None}
        self.max_body_bytes = max_body_bytes
        self.max_images = max_images
        self.max_texts = max_texts
        self.default_top_k = top_k
        self.slice_rules = slice_rules or SliceRules()
        self.log = log
        self.feedback_token = feedback_token
        self.bound = True

    def model(self, kind: str) -> BaseClassifier | None:
        slot = self.slots.get(kind)
        return None if slot is None else slot.current

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is BentoML's business
        path = scope["path"].rstrip("/")
        headers = _headers(scope)
        request_id = _request_id(headers)
        method = scope["method"]
        post_routes = {"/classify/image": "image", "/classify/text": "text", "/feedback": "feedback"}
        route = next((r for r in post_routes if path.endswith(r)), None)
        if route is not None:
            if method != "POST":
                return await _fail(send, 405, "method_not_allowed", "use POST", request_id)
            if route == "/feedback":
                return await self._feedback(receive, send, headers, request_id)
            return await self._classify(scope, receive, send, headers, request_id, post_routes[route])
        if path.endswith("/models") and method == "GET":
            models = [slot.current.describe() for slot in self.slots.values()]
            return await _send_json(send, 200, {"models": models}, request_id)
        await _fail(send, 404, "not_found", f"no route {method} {scope['path']}", request_id)

    async def _classify(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str],
                        request_id: str, kind: str) -> None:
        """One request to one model: read, extract the inputs, classify, answer or explain."""
        model = self.model(kind)
        if model is None or not model.ready:
            return await self._unavailable(send, model, kind, request_id)
        try:
            ctx = RequestContext(request_id, parse_slices(headers.get(SLICES_HEADER, ""),
                                                          self.slice_rules))
            top_k = _top_k(scope, self.default_top_k)
            body = await _read_body(receive, headers, self.max_body_bytes)
            content_type = headers.get("content-type", "")
            if kind == "image":
                inputs = _extract_images(body, content_type, self.max_images)
            else:
                inputs = _extract_texts(body, content_type, self.max_texts)
            predictions = await model.classify(inputs, top_k, ctx)
        except InputError as exc:
            model.reject(exc.reason)
            return await _fail(send, exc.status, exc.reason, exc.message, request_id)
        except LogUnavailable as exc:  # never answer what was not recorded
            return await _fail(send, 503, "log_unavailable", f"{exc}; retry later", request_id)
        except BatchError:
            logger.exception("inference failed [request_id=%s]", request_id)
            return await _fail(send, 500, "internal", f"inference failed; the server log has request id {request_id}", request_id)
        except Exception:
            logger.exception("unexpected failure [request_id=%s]", request_id)
            return await _fail(send, 500, "internal", f"internal error; the server log has request id {request_id}", request_id)
        answer = {
            "request_id": request_id,
            "model": model.name,
            "model_version": model.version,
            "predictions": [p.to_dict() for p in predictions],
        }
        await _send_json(send, 200, answer, request_id)

    async def _feedback(self, receive: Receive, send: Send, headers: dict[str, str],
                        request_id: str) -> None:
        """Ground-truth labels for logged requests: 401 without the token, 404 for an unknown
        request id, 422 for labels that do not fit; a repeat changes nothing."""
        if not self.feedback_token or self.log is None:
            missing = "CLF_FEEDBACK_TOKEN" if not self.feedback_token else "CLF_PREDICTION_LOG"
            return await _fail(send, 403, "feedback_disabled",
                               f"feedback is disabled on this server: set {missing}", request_id)
        given = headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.feedback_token.encode()):
            return await _fail(send, 401, "unauthorized",
                               "send the feedback token as 'Authorization: Bearer <token>'",
                               request_id, [(b"www-authenticate", b'Bearer realm="feedback"')])
        try:
            raw = await _read_body(receive, headers, MAX_FEEDBACK_BYTES)
            feedback = _feedback_items(raw)
            labels = {slot.current.name: slot.current.labels for slot in self.slots.values()}
            results = await asyncio.get_running_loop().run_in_executor(
                None, self.log.add_feedback_many, feedback, labels)
        except InputError as exc:
            return await _fail(send, exc.status, exc.reason, exc.message, request_id)
        except UnknownRequestError as exc:
            return await _fail(send, 404, "unknown_request_id", "no logged prediction has request "
                               f"id(s) {exc.request_ids}; nothing was stored", request_id)
        except FeedbackError as exc:
            return await _fail(send, 422, "bad_labels", f"{exc}; nothing was stored", request_id)
        except Exception:
            logger.exception("feedback failed [request_id=%s]", request_id)
            return await _fail(send, 500, "internal", f"internal error; the server log has request id {request_id}", request_id)
        counter = get_metrics().feedback
        for result in results:
            for name in ("created", "updated", "unchanged"):
                if getattr(result, name):
                    counter.labels(name).inc(getattr(result, name))
        answer = {"request_id": request_id, "results": [
            {"request_id": r.request_id, "labels": r.items, "created": r.created,
             "updated": r.updated, "unchanged": r.unchanged} for r in results]}
        await _send_json(send, 200, answer, request_id)

    async def _unavailable(self, send: Send, model: object, kind: str, request_id: str) -> None:
        """404 for a model this service was not configured with, 503 for one still loading."""
        if model is None and self.bound:
            setting = "CLF_IMAGE_MODEL" if kind == "image" else "CLF_TEXT_MODEL"
            message = (f"this service has no {kind} model; start it with {setting} set to a "
                       "model store tag to enable this route")
            return await _fail(send, 404, "not_found", message, request_id)
        await _fail(send, 503, "not_ready", "the model is still loading; retry when /readyz answers 200",
                    request_id)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _request_id(headers: dict[str, str]) -> str:
    given = headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def _top_k(scope: Scope, default: int) -> int:
    query = scope.get("query_string", b"").decode("latin-1")
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if key == "top_k":
            if not value.isdigit() or not 1 <= int(value) <= 1000:
                raise InputError("bad_field", f"top_k must be a positive integer, got {value!r}")
            return int(value)
    return default


async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError("too_large", f"the body is {declared} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InputError("bad_request", "the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise InputError("too_large", f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _extract_images(body: bytes, content_type: str, max_images: int) -> list[bytes]:
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        parts = parse_multipart(body, boundary_of(content_type), max_images)
        unknown = sorted({name for name, _, _ in parts if name not in IMAGE_FIELDS})
        if unknown:
            raise InputError(
                "bad_field",
                f"unknown form field(s) {unknown}; send each image as a file in the field 'image' "
                "(repeat it for several)",
            )
        images = [data for _, _, data in parts]
    elif media == "application/json":
        images = _json_images(body)
    elif media.startswith("image/") or media == "application/octet-stream":
        images = [body]
    else:
        raise InputError(
            "bad_request",
            f"unsupported Content-Type {media or '(none)'!r}; use multipart/form-data (field "
            "'image'), application/json ({\"images\": [\"<base64>\"]}) or an image/* body",
        )
    if not images:
        raise InputError("empty", "the request contains no image; send at least one in the field 'image'")
    if len(images) > max_images:
        raise InputError("too_many_items", f"{len(images)} images in one request; the limit is {max_images}")
    return images


def _json_images(body: bytes) -> list[bytes]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError("bad_request", f"the body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InputError("bad_field", 'the JSON body must be an object like {"images": ["<base64>"]}')
    unknown = sorted(set(doc) - {"images", "image"})
    if unknown or not doc:
        raise InputError(
            "bad_field",
            f"unknown JSON field(s) {unknown}; send {{\"images\": [\"<base64>\", ...]}} or {{\"image\": \"<base64>\"}}",
        )
    values = doc.get("images", doc.get("image"))
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InputError("bad_field", "'images' must be a list of base64 strings")
    return [_b64(v, i) for i, v in enumerate(values)]


def _b64(value: str, index: int) -> bytes:
    if value.startswith("data:"):
        value = value.partition(",")[2]  # a data URL: data:image/png;base64,....
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("bad_field", f"images[{index}] is not valid base64") from None


def _extract_texts(body: bytes, content_type: str, max_texts: int) -> list:
    """The request's texts, unvalidated one by one (the classifier does that per item)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "text/plain":
        return [decode_text(body)]
    if media != "application/json":
        raise InputError(
            "bad_request",
            f"unsupported Content-Type {media or '(none)'!r}; use application/json "
            '({"texts": ["...", ...]} or {"text": "..."}) or a UTF-8 text/plain body',
        )
    decoded = decode_text(body)  # bad_encoding, before JSON can call it malformed
    try:
        doc = json.loads(decoded)
    except ValueError as exc:
        raise InputError("bad_request", f"the body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or len(doc) != 1 or next(iter(doc)) not in TEXT_FIELDS:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise InputError(
            "bad_field",
            f'the JSON body must be {{"texts": ["...", ...]}} or {{"text": "..."}}, got {keys}',
        )
    if "text" in doc:
        if not isinstance(doc["text"], str):
            raise InputError("bad_field", f"'text' must be a string, got {_json_type(doc['text'])}")
        return [doc["text"]]
    texts = doc["texts"]
    if not isinstance(texts, list):
        raise InputError("bad_field", f"'texts' must be a list of strings, got {_json_type(texts)}; "
                         'for one text send {"text": "..."}')
    if not texts:
        raise InputError("empty", "'texts' is an empty list; send at least one text")
    if len(texts) > max_texts:
        raise InputError("too_many_items", f"{len(texts)} texts in one request; the limit is {max_texts}")
    for i, value in enumerate(texts):
        if not isinstance(value, str):
            raise InputError("bad_field", f"texts[{i}] must be a string, got {_json_type(value)}")
    return texts


def _feedback_items(body: bytes) -> dict[str, list[str] | str]:
    """``{"request_id", "labels"|"label"}`` or ``{"feedback": [those, ...]}`` -> id -> labels."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError("bad_request", f"the body is not valid JSON: {exc}") from None
    usage = ('send {"request_id": "...", "labels": ["..."]} or {"feedback": [{"request_id": '
             '"...", "labels": ["..."]}, ...]}')
    if isinstance(doc, dict) and set(doc) == {"feedback"}:
        entries = doc["feedback"]
        if not isinstance(entries, list) or not entries:
            raise InputError("bad_field", f"'feedback' must be a non-empty list; {usage}")
    else:
        entries = [doc]
    out: dict[str, list[str] | str] = {}
    for i, entry in enumerate(entries):
        where = f"feedback[{i}]: " if len(entries) > 1 else ""
        if not isinstance(entry, dict) or "request_id" not in entry or \
                len(set(entry) & {"labels", "label"}) != 1 or \
                set(entry) - {"request_id", "labels", "label"}:
            raise InputError("bad_field", f"{where}{usage}")
        rid, labels = entry["request_id"], entry.get("labels", entry.get("label"))
        if not isinstance(rid, str) or not _REQUEST_ID.match(rid):
            raise InputError("bad_field", f"{where}'request_id' must be a request id string")
        ok = isinstance(labels, str) or (isinstance(labels, list) and labels
                                         and all(isinstance(x, str) for x in labels))
        if not ok:
            raise InputError("bad_field", f"{where}'labels' must be a non-empty list of strings "
                             "(one per input of the request), 'label' a string")
        if rid in out:
            raise InputError("bad_field", f"{where}request id {rid} appears twice")
        out[rid] = labels
    return out


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _error(reason: str, message: str, request_id: str) -> dict:
    return {"error": {"reason": reason, "message": message}, "request_id": request_id}


async def _fail(send: Send, status: int, reason: str, message: str, request_id: str,
                extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    await _send_json(send, status, _error(reason, message, request_id), request_id, extra_headers)


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
