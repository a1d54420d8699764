"""What a request asks for, parsed from its body, query and headers: step 2 of the request path.

Pure functions over bytes and strings (no ASGI, no model): ``app.py`` reads the body and calls
one of these; a request that cannot be parsed raises ``RequestError`` with a reason from
``REASONS``, which ``app.py`` maps to an HTTP status. Bodies are already in memory and bounded by
the size limit, so the multipart parser is a few ``bytes.find`` calls rather than a streaming
parser (microseconds, on a path measured against a raw model's throughput).

Accepted bodies:
  images  multipart/form-data (field ``image``, repeatable), JSON ``{"images": ["<base64>", ...]}``
          (or ``{"image": "<base64>"}``, data URLs allowed), or one raw ``image/*`` body
  texts   JSON ``{"texts": ["...", ...]}`` or ``{"text": "..."}``, or one ``text/plain``
          body (UTF-8, or its ``charset``); the texts themselves are validated by the shared
          preprocessing
  feedback ``{"request_id": "...", "labels": ["..."]}`` (``"label"`` for one input) or
          ``{"feedback": [those, ...]}``
"""

from __future__ import annotations

import binascii
import json
import os
import re
import sys
import time
import zlib
from typing import Mapping

import orjson
import pybase64

from monitoring.slices import SliceError, SliceRules
from preprocessing import InputError, decode_text

IMAGE_FIELDS = ("image", "images")
TEXT_FIELDS = ("text", "texts")
SLICES_HEADER = "x-slices"
DEADLINE_HEADER = "x-request-deadline-ms"
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_NAME = re.compile(r'(?i)\bname="([^"]*)"')
_FILENAME = re.compile(r'(?i)\bfilename="([^"]*)"')

# reason -> what it means. The statuses are app.py's business.
REASONS: dict[str, str] = {
    "bad_request": "the body is not of the declared content type, or malformed",
    "bad_field": "a field is missing, unknown or of the wrong type",
    "empty": "the request holds no input",
    "too_large": "the body is over the size limit",
    "too_many_items": "more inputs in one request than the limit",
    "headers_too_large": "the request line and headers are over the size limit",
    "unsupported_encoding": "the body's Content-Encoding, or a text's charset, is not one the "
                            "server reads",
}


class RequestError(ValueError):
    """A request that cannot be parsed; ``message`` tells the caller what to send instead;
    ``headers``: extra response headers (``Accept-Encoding`` for an unsupported coding)."""

    def __init__(self, reason: str, message: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown request error reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.headers = headers or []


# ---- Content-Encoding ------------------------------------------------------------------------

# the content codings a request body may carry (RFC 9110 8.4.1; x-gzip is gzip's old name), with
# zlib's window bits for each: gzip's header, zlib's (deflate as RFC 9110 defines it)
CODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
ACCEPT_ENCODING = b"gzip, deflate"


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A request body under ``Content-Encoding: encoding`` (gzip, deflate, identity; codings
    applied in turn are undone in reverse), inflated to at most ``limit`` bytes: a small body
    that inflates past the limit (a zip bomb) is refused 413 after ``limit`` bytes of output,
    not inflated whole. Any other coding is 415 ``unsupported_encoding`` with
    ``Accept-Encoding`` (RFC 9110 15.5.16); a body that is not the coding it claims, is cut
    short, or has bytes after its end is 400. ``deflate`` is zlib's format, as RFC 9110 and
    tritonclient have it; a raw deflate stream (what some clients send) is taken too."""
    codings = [c.strip().lower() for c in encoding.split(",")]
    codings = [c for c in codings if c not in ("", "identity")]
    unknown = [c for c in codings if c not in CODINGS]
    if unknown:
        raise RequestError(
            "unsupported_encoding", f"Content-Encoding {unknown[0]!r} is not supported; send the "
            "body as it is, or compressed with gzip or deflate", [(b"accept-encoding",
                                                                   ACCEPT_ENCODING)])
    for coding in reversed(codings):
        body = _inflate_one(body, coding, limit)
    return body


def _inflate_one(body: bytes, coding: str, limit: int) -> bytes:
    wbits = CODINGS[coding]
    out: list[bytes] = []
    size, rest = 0, body
    while True:  # gzip allows members one after another (RFC 1952 2.2): each inflates in turn
        inflater = zlib.decompressobj(wbits)
        try:
            chunk = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            if coding == "deflate" and wbits == 15 and rest is body:  # a raw deflate stream
                wbits = -15
                continue
            raise RequestError("bad_request", f"the body is not valid {coding} data ({exc}); "
                               "send it as it is, or compressed as its Content-Encoding "
                               "says") from None
        size += len(chunk)
        out.append(chunk)
        if size > limit or inflater.unconsumed_tail:
            raise RequestError("too_large", f"the body inflates to over the limit of {limit} "
                               "bytes")
        if not inflater.eof:
            raise RequestError("bad_request", f"the {coding} body is cut short: its stream "
                               "does not end")
        rest = inflater.unused_data
        if not rest:
            return out[0] if len(out) == 1 else b"".join(out)
        if wbits != 31:
            raise RequestError("bad_request", f"{len(rest)} bytes after the end of the "
                               f"{coding} stream")


# ---- the bodies' schemas (the OpenAPI document's; tests hold the parsers to them) -----------

# The document's examples (Swagger UI's "Try it out" sends them as they are): scikit-learn's
# digits set's fourth image, a 3, as the training data turns it into an 8x8 grayscale PNG
# (``training.data``: 0-16 scaled to 0-255), and a short text any text model takes.
EXAMPLE_PNG_BASE64 = ("iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAARElEQVR42jXGMRGAMBAAsBzHzkuolJ"
                      "eCBHBQB0jAAg4qoRbqoEhgIlNwzB5Q+z4TSvSOxYgyAojW/t3VQs3Mzcp7eU4fVhgPr6U3F5oAAAAA"
                      "SUVORK5CYII=")
EXAMPLE_TEXT = "Hello! Are we still meeting at 7 tonight?"
# A text the preprocessing takes holds something visible; the schema says so much (it cannot
# say "no NUL" or "not only invisible characters", which are answered 422 with a reason).
_TEXT = {"type": "string", "minLength": 1, "pattern": r"\S"}
_BASE64 = {"type": "string", "format": "byte",
           "description": "an encoded image (PNG, JPEG, GIF, WebP, BMP, TIFF) in base64, or a "
                          "data: URL"}
IMAGE_BODIES: dict[str, dict] = {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "array", "minItems": 1,
                                 "items": {"type": "string", "format": "binary"},
                                 "description": "one file per image; repeat the field"}}}},
    "application/json": {"schema": {
        "type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1,
        "properties": {"images": {"type": "array", "minItems": 1, "items": _BASE64},
                       "image": _BASE64}},
        "example": {"image": EXAMPLE_PNG_BASE64}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}
TEXT_BODIES: dict[str, dict] = {
    "application/json": {"schema": {
        "type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1,
        "properties": {"texts": {"type": "array", "minItems": 1, "items": _TEXT},
                       "text": _TEXT}},
        "example": {"texts": [EXAMPLE_TEXT, "WINNER!! Claim your free prize now"]}},
    "text/plain": {"schema": _TEXT, "example": EXAMPLE_TEXT},
}
_LABELS = {"type": "array", "minItems": 1, "items": {"type": "string"},
           "description": "one true label per input of the request, in order"}
_FEEDBACK_ITEM = {
    "type": "object", "required": ["request_id"], "additionalProperties": False,
    "minProperties": 2, "maxProperties": 2,
    "properties": {"request_id": {"type": "string", "pattern": REQUEST_ID.pattern},
                   "labels": _LABELS,
                   "label": {"type": "string", "description": "the label of a one-input request"}}}
FEEDBACK_BODIES: dict[str, dict] = {
    "application/json": {"schema": {"oneOf": [
        _FEEDBACK_ITEM,
        {"type": "object", "required": ["feedback"], "additionalProperties": False,
         "properties": {"feedback": {"type": "array", "minItems": 1, "items": _FEEDBACK_ITEM}}},
    ]}, "examples": {
        "one request": {"summary": "the labels of one classify request, by its request_id",
                        "value": {"request_id": "req-42", "labels": ["3"]}},
        "a batch": {"summary": "several requests at once (all or nothing)",
                    "value": {"feedback": [{"request_id": "req-42", "label": "3"},
                                           {"request_id": "req-43", "labels": ["7", "1"]}]}}}},
}


# ---- headers and query -------------------------------------------------------------------

def request_id(headers: Mapping[str, str]) -> str:
    """The client's ``X-Request-ID`` when it is a sane token, else a fresh one."""
    given = headers.get("x-request-id", "")
    return given if REQUEST_ID.match(given) else new_request_id()


def new_request_id() -> str:
    """A UUIDv7 (RFC 9562) as 32 hex digits: the Unix time in milliseconds, then 74 random
    bits. Ids made later sort later, so the prediction log's index on the request id grows at
    its right edge, as its table does, instead of taking each row into a random page: a commit
    of five rows writes about half the WAL pages that random (version 4) ids took, and the
    index's working set stays small as the log grows (monitoring/README.md, Cheap logging)."""
    rand = int.from_bytes(os.urandom(10), "big")
    value = ((time.time_ns() // 1_000_000) & _MS_MASK) << 80 | 0x7 << 76
    value |= (rand >> 62 & 0xFFF) << 64 | 0b10 << 62 | rand & _RAND_B_MASK
    return f"{value:032x}"


_MS_MASK = (1 << 48) - 1
_RAND_B_MASK = (1 << 62) - 1


def top_k(query_string: bytes, default: int) -> int:
    for pair in query_string.decode("latin-1").split("&"):
        key, _, value = pair.partition("=")
        if key == "top_k":
            if not value.isdigit() or not 1 <= int(value) <= 1000:
                raise RequestError("bad_field", f"top_k must be an integer in 1..1000, got {value!r}")
            return int(value)
    return default


def deadline_ms(headers: Mapping[str, str], default_ms: float) -> float:
    """The request's deadline in milliseconds (0 = none): ``X-Request-Deadline-Ms`` when the
    client sends one, capped at the server's ``default_ms`` (a client may shorten its deadline,
    never lengthen it); the default otherwise."""
    given = headers.get(DEADLINE_HEADER)
    if given is None:
        return default_ms
    try:
        value = float(given)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3_600_000:  # also refuses nan and inf
        raise RequestError("bad_field", f"X-Request-Deadline-Ms must be a number of "
                           f"milliseconds in (0, 3600000], got {given!r}")
    return value if default_ms <= 0 else min(value, default_ms)


def slices(header: str, rules: SliceRules) -> dict[str, str]:
    """``X-Slices: device=ios; region=eu`` -> validated, folded tags."""
    if not header.strip():
        return {}
    tags: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in header.split(";"))):
        key, sep, value = part.partition("=")
        if not sep:
            raise RequestError("bad_field", f"X-Slices: {part!r} is not key=value; send "
                               "X-Slices: key=value; key2=value2")
        tags[key.strip()] = value.strip()
    try:
        return rules.apply(tags)
    except SliceError as exc:
        raise RequestError("bad_field", f"X-Slices: {exc}") from None


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


# ---- images ------------------------------------------------------------------------------

def images(body: bytes, content_type: str, max_images: int) -> list[bytes]:
    """The encoded images of an image request, in order (decoding is preprocessing's job)."""
    media = media_type(content_type)
    if media == "multipart/form-data":
        parts = parse_multipart(body, boundary_of(content_type), max_images)
        unknown = sorted({name for name, _, _ in parts if name not in IMAGE_FIELDS})
        if unknown:
            raise RequestError(
                "bad_field",
                f"unknown form field(s) {unknown}; send each image as a file in the field 'image' "
                "(repeat it for several)",
            )
        found = [data for _, _, data in parts]
    elif media == "application/json":
        found = _json_images(body)
    elif media.startswith("image/") or media == "application/octet-stream":
        found = [body]
    else:
        raise RequestError(
            "bad_request",
            f"unsupported Content-Type {media or '(none)'!r}; use multipart/form-data (field "
            "'image'), application/json ({\"images\": [\"<base64>\"]}) or an image/* body",
        )
    if not found:
        raise RequestError("empty", "the request contains no image; send at least one in the field 'image'")
    if len(found) > max_images:
        raise RequestError("too_many_items", f"{len(found)} images in one request; the limit is {max_images}")
    return found


def parse_json(body: bytes | str, what: str = "the body") -> object:
    """The body's JSON, with what it raises on bad input as 400 ``bad_request``: not JSON, not
    UTF-8, or nested deeper than the parser's recursion limit (``[[[...]]]`` 100,000 deep was
    answered 500 before).

    Parsed by orjson, and again by ``json.loads`` where orjson refuses it, so what the standard
    library takes is taken as before (``NaN``, a byte order mark, UTF-16, lone surrogate escapes)
    and a malformed body gets its message. The two agree on every document both take but one:
    an integer beyond 64 bits is a float from orjson (no field of this API takes one, and an
    integer field refuses it either way). orjson holds the event loop for a fifth of the time:
    a 24 MB v2 body of 1.2 million numbers 78 ms against 375, 20 MB of base64 images 17 against
    35 (docs/benchmark-history.md, session 30)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestError("bad_request", f"{what} is not valid JSON: {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if "integer string conversion" in str(exc):  # Python's bound on int() of a string
            raise RequestError("bad_request", f"{what} holds a number with more than "
                               f"{sys.get_int_max_str_digits()} digits; no field of this API "
                               "takes one") from None
        raise RequestError("bad_request", f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError("bad_request", f"{what} is JSON nested too deeply; no request of "
                           "this API nests more than a few levels") from None


def dump_json(payload: object) -> bytes:
    """An answer's JSON, compact and UTF-8: orjson (a v2 answer in 0.6 us against
    ``json.dumps``' 6.9), or ``json.dumps`` for what orjson does not encode (a key that is not a
    string, a string with a lone surrogate). orjson writes NaN and the infinities as ``null``
    (valid JSON), where ``json.dumps`` wrote ``NaN``."""
    try:
        return orjson.dumps(payload)
    except TypeError:  # orjson.JSONEncodeError is one
        return json.dumps(payload, separators=(",", ":")).encode()


def b64decode(value: str | bytes) -> bytes:
    """Strict base64 (``base64.b64decode(validate=True)``'s results and errors, ``binascii.Error``
    or ``ValueError``) by pybase64's SIMD decoder: 20 MB in 1.2 ms against 40, on the event
    loop."""
    return pybase64.b64decode(value, validate=True)


def _json_images(body: bytes) -> list[bytes]:
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise RequestError("bad_field", 'the JSON body must be an object like {"images": ["<base64>"]}')
    unknown = sorted(set(doc) - {"images", "image"})
    if unknown or not doc:
        raise RequestError(
            "bad_field",
            f"unknown JSON field(s) {unknown}; send {{\"images\": [\"<base64>\", ...]}} or {{\"image\": \"<base64>\"}}",
        )
    values = doc.get("images", doc.get("image"))
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RequestError("bad_field", "'images' must be a list of base64 strings")
    return [_b64(v, i) for i, v in enumerate(values)]


def _b64(value: str, index: int) -> bytes:
    if value.startswith("data:"):
        value = value.partition(",")[2]  # a data URL: data:image/png;base64,....
    try:
        return b64decode(value)
    except (binascii.Error, ValueError):
        raise RequestError("bad_field", f"images[{index}] is not valid base64") from None


def boundary_of(content_type: str) -> bytes:
    """The boundary from a ``multipart/form-data; boundary=...`` header value."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            value = value.strip().strip('"')
            if 0 < len(value) <= 200:
                return value.encode("latin-1")
    raise RequestError("bad_request", "multipart/form-data request without a boundary parameter")


def parse_multipart(body: bytes, boundary: bytes, max_parts: int) -> list[tuple[str, str | None, bytes]]:
    """Split a form body into ``(field name, filename, data)`` parts, in order."""
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    if pos < 0:
        raise RequestError("bad_request", "multipart body does not contain its boundary")
    pos += len(delimiter)
    parts: list[tuple[str, str | None, bytes]] = []
    while True:
        if body.startswith(b"--", pos):
            return parts
        if not body.startswith(b"\r\n", pos):
            raise RequestError("bad_request", "malformed multipart body (no CRLF after boundary)")
        if len(parts) >= max_parts:
            raise RequestError("too_many_items", f"too many form parts; at most {max_parts} images per request")
        header_end = body.find(b"\r\n\r\n", pos + 2)
        if header_end < 0:
            raise RequestError("bad_request", "malformed multipart body (part headers never end)")
        data_start = header_end + 4
        data_end = body.find(b"\r\n" + delimiter, data_start)
        if data_end < 0:
            raise RequestError("bad_request", "malformed multipart body (missing closing boundary)")
        name, filename = _disposition(body[pos + 2:header_end])
        parts.append((name, filename, body[data_start:data_end]))
        pos = data_end + 2 + len(delimiter)


def _disposition(raw_headers: bytes) -> tuple[str, str | None]:
    for line in raw_headers.decode("latin-1").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            name = _NAME.search(value)
            if name is None:
                break
            filename = _FILENAME.search(value)
            return name.group(1), filename.group(1) if filename else None
    raise RequestError("bad_request", "a multipart part has no Content-Disposition name")


# ---- texts -------------------------------------------------------------------------------

_CHARSET = re.compile(r'(?i);\s*charset\s*=\s*"?([^";\s]+)')
_UTF8 = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})  # ASCII is UTF-8's subset


def plain_text(body: bytes, content_type: str) -> str:
    """A ``text/plain`` body as text, in the ``charset`` its Content-Type names (UTF-8 when it
    names none, as the shared preprocessing reads texts): a client that says
    ``charset=iso-8859-1`` or ``utf-16`` is read as it says, not refused as bad UTF-8. A
    charset Python does not know is 415 ``unsupported_encoding``; bytes that are not in the
    named one are ``bad_encoding``, as bad UTF-8 is."""
    found = _CHARSET.search(content_type)
    charset = found.group(1).lower() if found else "utf-8"
    if charset in _UTF8:
        return decode_text(body)
    try:
        return body.decode(charset)  # str.decode takes text encodings only (not zlib, rot13)
    except LookupError:
        raise RequestError("unsupported_encoding", f"charset {charset!r} is not one the server "
                           "reads; send UTF-8 (or name a charset such as iso-8859-1 or "
                           "utf-16)") from None
    except UnicodeDecodeError as exc:
        raise InputError("bad_encoding", f"the text is not valid {charset} (byte {exc.start}); "
                         "send it in the charset its Content-Type names, or UTF-8") from None


def texts(body: bytes, content_type: str, max_texts: int) -> list:
    """The request's texts, unvalidated one by one (the served model does that per item)."""
    media = media_type(content_type)
    if media == "text/plain":
        return [plain_text(body, content_type)]
    if media != "application/json":
        raise RequestError(
            "bad_request",
            f"unsupported Content-Type {media or '(none)'!r}; use application/json "
            '({"texts": ["...", ...]} or {"text": "..."}) or a UTF-8 text/plain body',
        )
    doc = parse_json(decode_text(body))  # bad_encoding, before JSON can call it malformed
    if not isinstance(doc, dict) or len(doc) != 1 or next(iter(doc)) not in TEXT_FIELDS:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise RequestError(
            "bad_field",
            f'the JSON body must be {{"texts": ["...", ...]}} or {{"text": "..."}}, got {keys}',
        )
    if "text" in doc:
        if not isinstance(doc["text"], str):
            raise RequestError("bad_field", f"'text' must be a string, got {json_type(doc['text'])}")
        return [doc["text"]]
    found = doc["texts"]
    if not isinstance(found, list):
        raise RequestError("bad_field", f"'texts' must be a list of strings, got {json_type(found)}; "
                           'for one text send {"text": "..."}')
    if not found:
        raise RequestError("empty", "'texts' is an empty list; send at least one text")
    if len(found) > max_texts:
        raise RequestError("too_many_items", f"{len(found)} texts in one request; the limit is {max_texts}")
    for i, value in enumerate(found):
        if not isinstance(value, str):
            raise RequestError("bad_field", f"texts[{i}] must be a string, got {json_type(value)}")
    return found


# ---- feedback ----------------------------------------------------------------------------

def feedback(body: bytes) -> dict[str, list[str] | str]:
    """``{"request_id", "labels"|"label"}`` or ``{"feedback": [those, ...]}`` -> id -> labels."""
    doc = parse_json(body)
    usage = ('send {"request_id": "...", "labels": ["..."]} or {"feedback": [{"request_id": '
             '"...", "labels": ["..."]}, ...]}')
    if isinstance(doc, dict) and set(doc) == {"feedback"}:
        entries = doc["feedback"]
        if not isinstance(entries, list) or not entries:
            raise RequestError("bad_field", f"'feedback' must be a non-empty list; {usage}")
    else:
        entries = [doc]
    out: dict[str, list[str] | str] = {}
    for i, entry in enumerate(entries):
        where = f"feedback[{i}]: " if len(entries) > 1 else ""
        if not isinstance(entry, dict) or "request_id" not in entry or \
                len(set(entry) & {"labels", "label"}) != 1 or \
                set(entry) - {"request_id", "labels", "label"}:
            raise RequestError("bad_field", f"{where}{usage}")
        rid, labels = entry["request_id"], entry.get("labels", entry.get("label"))
        if not isinstance(rid, str) or not REQUEST_ID.match(rid):
            raise RequestError("bad_field", f"{where}'request_id' must be a request id string")
        ok = isinstance(labels, str) or (isinstance(labels, list) and labels
                                         and all(isinstance(x, str) for x in labels))
        if not ok:
            raise RequestError("bad_field", f"{where}'labels' must be a non-empty list of strings "
                               "(one per input of the request), 'label' a string")
        if rid in out:
            raise RequestError("bad_field", f"{where}request id {rid} appears twice")
        out[rid] = labels
    return out


def json_type(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)
