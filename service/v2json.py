"""A v2 JSON request's FP32 ``data`` read straight into an array, not through Python floats.

Why. A v2 JSON body carries its tensors as JSON numbers. Parsed as a whole (orjson), each number
becomes a Python float and ``np.asarray`` then copies them into the float32 array: about 40 ns a
number, on the worker's event loop, which no other connection of the worker gets meanwhile (a
C call that holds the GIL, so a thread would not help). simdjson parses the body into its own
tape and exports an array of numbers as one buffer of doubles, no Python object per number:
about half the time, for one 64x64 RGB image (12,288 numbers: 0.28 against 0.55 ms) as for 64
of them (15 MB: 29 against 49-53 ms flat, 31-32 against 68-70 nested; docs/benchmark-history.md,
session 31).

What. ``fast_document(body)`` returns the document as ``orjson.loads`` would, except that the
``data`` of each ``FP32`` input is already the flat float32 array ``np.asarray(data,
np.float32).reshape(-1)`` would make, or None where it cannot vouch for exactly that. Then the
caller parses the body the usual way, which also words every error, so what is refused, and
how, does not depend on this module. It takes a body only where it can prove the usual way would
read the same:

* the body starts with ``{`` (not with white space or a byte order mark), its objects have no
  repeated key (orjson keeps the last one, simdjson's lookup the first), and simdjson accepts it
  (it refuses ``NaN``, lone surrogate escapes and numbers beyond double or 64-bit range, which
  the usual way may take);
* each FP32 ``data`` holds only numbers (no ``true``, ``null`` or string, which ``as_buffer``
  refuses) and is flat or evenly nested: every array at each level but the innermost has
  children that are arrays of one length, which is what ``np.asarray`` requires. The innermost
  arrays' elements are not visited (there are as many as numbers); that none of them is an array
  (``[[1, [2]], [3, 4]]``, which simdjson flattens) is proved by counting: the body's ``[``
  bytes equal the arrays found, and any array hidden there, or a ``[`` inside a string, makes
  the count larger, so the body goes the usual way.

Everything else in the document (names, shapes, parameters, BYTES data, outputs) is converted to
Python values as the usual parse makes them. Bodies under ``MIN_BYTES`` go the usual way: for a
few numbers orjson is as fast.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

try:  # optional at import: without it every body goes the usual way
    import simdjson
except ImportError:  # pragma: no cover - a dependency of the package
    simdjson = None

MIN_BYTES = 4096  # below this orjson is as fast (10 numbers: 1 us against 2)
REUSE_BYTES = 1 << 21  # bodies up to this share the thread's parser (``_parser``)
_OPEN = ord("[")


def fast_document(body: bytes) -> dict | None:
    """The request document with each FP32 input's ``data`` as a flat float32 array, or None
    where the usual parse must decide (see the module's docstring)."""
    if simdjson is None or len(body) < MIN_BYTES or body[:1] != b"{":
        return None
    try:
        doc = _parser(len(body)).parse(body)
        arrays = [0]
        out = _object(doc, arrays, top=True)
    except (_Usual, ValueError, TypeError, KeyError, RuntimeError, UnicodeDecodeError):
        return None  # RuntimeError: the thread's parser still lent out (it is not, see _parser);
        # RecursionError (a RuntimeError): nested deeper than Python's frames, simdjson's 1,024
    if _count_open(body) != arrays[0]:
        return None
    return out


_local = threading.local()


def _parser(size: int) -> "simdjson.Parser":
    """The thread's parser for a body up to ``REUSE_BYTES`` (its buffers, sized for the largest
    such body, are kept: a 240 KB body parses no faster in a new one, a 16 MB one takes 25 ms
    in a new parser against 15), a new one for a larger body, whose buffers go with it. A parser
    must not parse again while objects of its last document live; ``fast_document`` keeps none
    (what it returns is Python values and arrays of its own)."""
    if size > REUSE_BYTES:
        return simdjson.Parser()
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    return parser


class _Usual(Exception):
    """The body is one the usual parse must read."""


def _object(obj: Any, arrays: list[int], top: bool = False) -> dict:
    keys = list(obj.keys())
    if len(set(keys)) != len(keys):
        raise _Usual
    if top:
        return {k: (_inputs(obj[k], arrays) if k == "inputs" else _plain(obj[k], arrays))
                for k in keys}
    return {k: _plain(obj[k], arrays) for k in keys}


def _inputs(value: Any, arrays: list[int]) -> Any:
    if not isinstance(value, simdjson.Array):
        return _plain(value, arrays)
    arrays[0] += 1
    return [_entry(e, arrays) if isinstance(e, simdjson.Object) else _plain(e, arrays)
            for e in value]


def _entry(obj: Any, arrays: list[int]) -> dict:
    keys = list(obj.keys())
    if len(set(keys)) != len(keys):
        raise _Usual
    fp32 = "datatype" in keys and "data" in keys and obj["datatype"] == "FP32"
    return {k: (_floats(obj[k], arrays) if fp32 and k == "data" else _plain(obj[k], arrays))
            for k in keys}


def _plain(value: Any, arrays: list[int]) -> Any:
    """A value as the usual parse makes it (scalars already are)."""
    if isinstance(value, simdjson.Object):
        return _object(value, arrays)
    if isinstance(value, simdjson.Array):
        arrays[0] += 1
        return [_plain(v, arrays) for v in value]
    return value


def _floats(value: Any, arrays: list[int]) -> Any:
    """An FP32 ``data`` array as ``np.asarray(data, np.float32).reshape(-1)``; what is not an
    array is left to the usual path's message."""
    if not isinstance(value, simdjson.Array):
        return _plain(value, arrays)
    try:
        flat = np.frombuffer(value.as_buffer(of_type="d"), dtype="<f8")
    except (TypeError, ValueError):  # a non-number among them: the usual path's message
        raise _Usual from None
    arrays[0] += _even_arrays(value, flat.size)
    with np.errstate(over="ignore"):  # out of float32 range -> inf, refused later, as before
        return flat.astype(np.float32)


def _even_arrays(value: Any, numbers: int) -> int:
    """How many arrays an evenly nested ``value`` holding ``numbers`` numbers has, innermost
    included; ``_Usual`` where it is not evenly nested. Every array is visited but the innermost
    ones' elements: even where there is an array for each number ([[0.1], [0.2], ...], 12,288
    rows) that is 1.8 ms against the usual parse's 2.8, which makes a list of each."""
    dims = []
    node = value
    while isinstance(node, simdjson.Array):
        dims.append(len(node))
        if not dims[-1]:
            break
        node = node[0]
    if math.prod(dims) != numbers:
        raise _Usual
    if len(dims) == 1:
        return 1
    level = [value]
    for depth in range(1, len(dims)):
        nxt = []
        for array in level:
            for child in array:
                if not isinstance(child, simdjson.Array) or len(child) != dims[depth]:
                    raise _Usual
                nxt.append(child)
        level = nxt
    return 1 + sum(math.prod(dims[:d]) for d in range(1, len(dims)))


def _count_open(body: bytes, chunk: int = 1 << 20) -> int:
    """``body.count(b"[")``, five times faster on a large body (1.5 against 5.9 ms for 16 MB),
    a megabyte at a time so the comparison's array stays small."""
    raw = np.frombuffer(body, dtype=np.uint8)
    return sum(int(np.count_nonzero(raw[i:i + chunk] == _OPEN))
               for i in range(0, raw.size, chunk))
