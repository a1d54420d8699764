"""The request path's JSON and base64 (``requests.parse_json``, ``dump_json``, ``b64decode``):
orjson and pybase64, with the standard library's results where they differ."""

from __future__ import annotations

import base64
import binascii
import json
import math

import pytest

from service import requests
from service.requests import RequestError

# documents orjson takes: what json.loads makes of them
BOTH_TAKE = [
    b'{"inputs": [{"name": "input", "shape": [1, 3], "data": [0.5, -1e-05, 3]}]}',
    b'{"a": 1, "a": 2}',  # the last of a repeated key
    b'"\\ud83d\\ude00 \\u0000 caf\xc3\xa9"',
    b' [1e-400, -0.0, -0, 1.7976931348623157e308] \n',
    b'18446744073709551615',
]
# documents only json.loads takes: taken as it takes them
ONLY_JSON_TAKES = [
    b'{"text": "\\ud800"}',  # a lone surrogate escape
    b'[NaN, Infinity, -Infinity]',
    b'\xef\xbb\xbf{"a": 1}',  # a UTF-8 byte order mark
    '{"a": [1, 2]}'.encode("utf-16"),
    b'[1E400]',
]


@pytest.mark.parametrize("doc", BOTH_TAKE + ONLY_JSON_TAKES)
def test_parse_json_gives_what_json_loads_gives(doc: bytes) -> None:
    got, want = requests.parse_json(doc), json.loads(doc)
    assert repr(got) == repr(want)  # repr: NaN != NaN, and 0 vs 0.0 vs -0.0 count


def test_an_integer_past_64_bits_is_a_float_and_an_integer_field_refuses_it() -> None:
    """The one document both parsers take and read differently (said in ``parse_json``)."""
    assert requests.parse_json(b"[18446744073709551616]") == [float(2**64)]
    from service import v2

    with pytest.raises(RequestError) as err:
        v2.parse_infer(b'{"inputs": [{"name": "input", "datatype": "FP32", '
                       b'"shape": [18446744073709551616], "data": []}]}')
    assert err.value.reason == "bad_field" and "non-negative integers" in err.value.message


@pytest.mark.parametrize("doc", [b"{nope", b'{"a": 1} x', b'"\xff"', b"", b'{"a": "\x01"}'])
def test_malformed_json_is_a_bad_request_with_json_loads_message(doc: bytes) -> None:
    with pytest.raises(RequestError) as err:
        requests.parse_json(doc, "the body")
    assert err.value.reason == "bad_request"
    assert err.value.message.startswith("the body is not valid JSON: ")
    try:
        json.loads(doc)
    except ValueError as exc:  # the standard library's words, as before orjson
        assert str(exc) in err.value.message


def test_dump_json_is_compact_json_that_reads_back() -> None:
    answer = {"request_id": "r-1", "predictions": [
        {"label": "7", "confidence": 0.9817, "top": [["7", 0.9817], ["1", 1e-05]],
         "ood": False, "ood_score": None}]}
    body = requests.dump_json(answer)
    assert isinstance(body, bytes) and json.loads(body) == answer
    assert body == json.dumps(answer, separators=(",", ":")).replace("1e-05", "0.00001").encode()


def test_dump_json_falls_back_where_orjson_does_not_encode() -> None:
    assert json.loads(requests.dump_json({1: "a"})) == {"1": "a"}  # a key not a string
    lone = {"message": "a lone \ud800 surrogate"}
    assert json.loads(requests.dump_json(lone)) == lone
    # NaN and the infinities: null (valid JSON), where json.dumps wrote NaN
    assert json.loads(requests.dump_json([math.nan, math.inf])) == [None, None]


@pytest.mark.parametrize("value", [
    "YWJj", "YWJjZA==", "", "+/+/", b"YWJj",
    "YWJjZA", "YWJjZA=", "YWJjZA===", "YW Jj", "YWJj\r\n", "=", "YQ==YQ==", "-_-_", "\x00YWJ",
    "é",
])
def test_b64decode_gives_what_the_standard_library_gives(value: str | bytes) -> None:
    def outcome(decode):
        try:
            return decode(value)
        except (binascii.Error, ValueError):  # what the callers catch
            return "refused"

    assert outcome(requests.b64decode) == outcome(lambda v: base64.b64decode(v, validate=True))
